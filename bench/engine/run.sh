#!/usr/bin/env bash
# Engine benchmark: Joule's engine vs the PyTorch reference on the `mini`
# checkpoint, with the memory-bandwidth roofline measured in the same run.
#   bench/engine/run.sh [BUILD_DIR] [FAMILY]
# FAMILY: qwen3_moe (default), qwen2_moe, mixtral, deepseek_v3, or deepseek_v3_fp8 (the
# DeepSeek-V3 mini with block-scaled FP8 weights; bench/engine/deepseek_v3_run.sh runs both
# DeepSeek-V3 forms and compares them).
# Writes bench/results/engine-<family>-mini.{json,md} (bench/engine/report.py; the GPU
# version of this benchmark is bench/engine/gpu_run.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-$root/build/default}"
family="${2:-qwen3_moe}"
threads="$(nproc)"
model="$build/models/$family-mini"
make_flags=(--family "$family")
[ "$family" != deepseek_v3_fp8 ] || make_flags=(--family deepseek_v3 --dtype fp8)
if [ ! -f "$model/config.json" ]; then
  "$build/worker/tools/joule-make-model" "${make_flags[@]}" --preset mini --out "$model"
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$build/bench/engine/joule-engine-bench" --model "$model" --threads "$threads" \
  --batch 1,8,64 --prompt-len 32 --decode-steps 32 --prefill-len 512 --json "$tmp/joule.json"
ref="$root/tests/reference/reference.py"
/usr/bin/python3 "$ref" bench --model "$model" --threads "$threads" \
  --batch 1 --batch 8 --batch 64 --prompt-len 32 --decode-steps 32 --json "$tmp/torch_decode.json" >/dev/null
/usr/bin/python3 "$ref" bench --model "$model" --threads "$threads" \
  --batch 1 --prompt-len 512 --decode-steps 0 --json "$tmp/torch_prefill.json" >/dev/null
JOULE_BENCH_COMMAND="${JOULE_BENCH_COMMAND:-bench/engine/run.sh $*}" /usr/bin/python3 "$root/bench/engine/report.py" cpu \
  --joule "$tmp/joule.json" --torch-decode "$tmp/torch_decode.json" --torch-prefill "$tmp/torch_prefill.json" \
  --family "$family" --out "$root/bench/results"
