#!/usr/bin/env bash
# Regenerates the golden fixtures tests/data/golden/<family>-tiny.json (float32, the CPU
# engine's numbers) and <family>-tiny.bf16act.json (GEMM inputs and KV cache rounded to BF16,
# the GPU path's numbers). For deepseek_v3: deepseek_v3-tiny.json and deepseek_v3-tiny.bf16act.json
# (absorbed MLA, as the engine's GPU path runs it) and, from the --dtype fp8 checkpoint,
# deepseek_v3_fp8-tiny.json (no bf16act file: the GPU path refuses FP8 weights); and
# tests/data/deepseek_v3/ffn-tiny.json (deepseek_v3_ffn.py: the per-layer feed-forward outputs
# feed_forward_test compares with).
#
#   tests/reference/make_golden.sh BUILD_DIR [FAMILY...]
#
# BUILD_DIR is a configured+built CMake tree holding worker/tools/joule-make-model
# (e.g. build/default). For each family (default: qwen3_moe qwen2_moe mixtral deepseek_v3) it writes
# the tiny checkpoint into a temporary directory with joule-make-model, then runs
# reference.py golden on it (which also runs the reference's KV-cache self-check).
# Override the interpreter with PYTHON=/path/to/python3 (needs numpy + torch).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 BUILD_DIR [FAMILY...]" >&2
  exit 2
fi
BUILD_DIR=$(cd "$1" && pwd)
shift
FAMILIES=("$@")
if [[ ${#FAMILIES[@]} -eq 0 ]]; then
  FAMILIES=(qwen3_moe qwen2_moe mixtral deepseek_v3)
fi

PYTHON=${PYTHON:-/usr/bin/python3}
SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TOOL="$BUILD_DIR/worker/tools/joule-make-model"
OUT_DIR="$SRC_DIR/tests/data/golden"
PRESET=tiny

if [[ ! -x "$TOOL" ]]; then
  echo "error: $TOOL not found; build the joule-make-model target first" >&2
  exit 1
fi
mkdir -p "$OUT_DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

for family in "${FAMILIES[@]}"; do
  if [[ "$family" == deepseek_v3 ]]; then
    for dtype in bf16 fp8; do
      name=deepseek_v3-$PRESET
      [[ "$dtype" == fp8 ]] && name=deepseek_v3_fp8-$PRESET
      "$TOOL" --family "$family" --preset "$PRESET" --dtype "$dtype" --out "$TMP/$name"
      PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$SRC_DIR/tests/reference/reference.py" golden \
        --model "$TMP/$name" --name "$name" --out "$OUT_DIR/$name.json" \
        --source "tests/reference/make_golden.sh BUILD_DIR: joule-make-model --family $family --preset $PRESET --dtype $dtype --out DIR; reference.py golden --model DIR --name $name --out tests/data/golden/$name.json"
      [[ "$dtype" == fp8 ]] && continue  # the GPU path refuses FP8 weights: no GPU numerics
      PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$SRC_DIR/tests/reference/reference.py" golden \
        --model "$TMP/$name" --name "$name" --out "$OUT_DIR/$name.bf16act.json" --bf16-activations \
        --source "tests/reference/make_golden.sh BUILD_DIR: joule-make-model --family $family --preset $PRESET --dtype $dtype --out DIR; reference.py golden --model DIR --name $name --out tests/data/golden/$name.bf16act.json --bf16-activations"
    done
    # The engine's feed-forward layer fixture (feed_forward_test) from the same two checkpoints.
    PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$SRC_DIR/tests/reference/deepseek_v3_ffn.py" ffn \
      --model "$TMP/deepseek_v3-$PRESET" --name "deepseek_v3-$PRESET" \
      --model "$TMP/deepseek_v3_fp8-$PRESET" --name "deepseek_v3_fp8-$PRESET" \
      --out "$SRC_DIR/tests/data/deepseek_v3/ffn-$PRESET.json"
    continue
  fi
  name="$family-$PRESET"
  "$TOOL" --family "$family" --preset "$PRESET" --out "$TMP/$name"
  PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$SRC_DIR/tests/reference/reference.py" golden \
    --model "$TMP/$name" --name "$name" --out "$OUT_DIR/$name.json" \
    --source "tests/reference/make_golden.sh BUILD_DIR: joule-make-model --family $family --preset $PRESET --out DIR; reference.py golden --model DIR --name $name --out tests/data/golden/$name.json"
  PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$SRC_DIR/tests/reference/reference.py" golden \
    --model "$TMP/$name" --name "$name" --out "$OUT_DIR/$name.bf16act.json" --bf16-activations \
    --source "tests/reference/make_golden.sh BUILD_DIR: joule-make-model --family $family --preset $PRESET --out DIR; reference.py golden --model DIR --name $name --out tests/data/golden/$name.bf16act.json --bf16-activations"
done
ls -l "$OUT_DIR"
