#!/usr/bin/env bash
# The DeepSeek-V3 engine benchmark (issue 25): the mini checkpoint with BF16 and with FP8
# (128x128 block-scaled E4M3) weights, each against the PyTorch reference in the same run
# (bench/engine/run.sh), then FP8 against BF16: decode tokens/s at batch 1, 8 and 64, the
# memory-bandwidth roofline of each, and the KV cache bytes per token against per-head K/V.
#   bench/engine/deepseek_v3_run.sh [BUILD_DIR]
# Writes bench/results/engine-deepseek_v3{,_fp8}-mini.{json,md} and
# bench/results/engine-deepseek_v3-mini-fp8-vs-bf16.{json,md}.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-$root/build/default}"
export JOULE_BENCH_COMMAND="bench/engine/deepseek_v3_run.sh $*"
"$root/bench/engine/run.sh" "$build" deepseek_v3
"$root/bench/engine/run.sh" "$build" deepseek_v3_fp8
/usr/bin/python3 "$root/bench/engine/report.py" fp8 --bf16 "$root/bench/results/engine-deepseek_v3-mini.json" \
  --fp8 "$root/bench/results/engine-deepseek_v3_fp8-mini.json" --out "$root/bench/results"
