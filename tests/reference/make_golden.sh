#!/usr/bin/env bash
# Regenerates the golden fixtures tests/data/golden/<family>-tiny.json (float32, the CPU
# engine's numbers) and <family>-tiny.bf16act.json (GEMM inputs and KV cache rounded to BF16,
# the GPU path's numbers).
#
#   tests/reference/make_golden.sh BUILD_DIR [FAMILY...]
#
# BUILD_DIR is a configured+built CMake tree holding worker/tools/joule-make-model
# (e.g. build/default). For each family (default: qwen3_moe qwen2_moe mixtral) it writes
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
  FAMILIES=(qwen3_moe qwen2_moe mixtral)
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
