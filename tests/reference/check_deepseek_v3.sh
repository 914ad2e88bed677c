#!/usr/bin/env bash
# ctest reference_deepseek_v3: the DeepSeek-V3 reference on joule-make-model's deepseek_v3
# checkpoints, until the C++ engine loads the family and golden_test takes over.
#
#   check_deepseek_v3.sh JOULE_MAKE_MODEL PYTHON WORK_DIR
#
# Writes the tiny preset in BF16 and FP8 and a 2-layer mini (the form without query LoRA, two
# shared experts) into WORK_DIR, then with reference.py:
#   check --selfcheck  the committed fixtures deepseek_v3-tiny.json / deepseek_v3_fp8-tiny.json still
#                      describe those checkpoints; cached/chunked/batched paths and the absorbed MLA
#                      reproduce the expanded full recompute
#   check              deepseek_v3-tiny.bf16act.json (the GPU path's numbers: --bf16-activations,
#                      absorbed MLA) still describes the BF16 checkpoint, at the tolerance the file
#                      states
#   selfcheck          the same self-checks on the mini checkpoint
#   fp8check           the FP8 checkpoint is exactly the 128x128-block E4M3 quantization of the BF16 one
# and with deepseek_v3_ffn.py check, that tests/data/deepseek_v3/ffn-tiny.json (the engine's
# feed_forward_test fixture) still describes the tiny checkpoints.
# Exit 77 (ctest SKIP) when PYTHON cannot import numpy and torch.
set -euo pipefail
mk="$1"
py="$2"
out="$3"
if ! "$py" -c "import numpy, torch" 2>/dev/null; then
  echo "SKIP: $py cannot import numpy and torch"
  exit 77
fi
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ref="$src/tests/reference/reference.py"
rm -rf "$out"
mkdir -p "$out"
"$mk" --family deepseek_v3 --preset tiny --out "$out/deepseek_v3-tiny"
"$mk" --family deepseek_v3 --preset tiny --dtype fp8 --out "$out/deepseek_v3_fp8-tiny"
"$mk" --family deepseek_v3 --preset mini --layers 2 --out "$out/deepseek_v3-mini-2layers"
"$py" "$ref" check --models-dir "$out" --atol 1e-4 --selfcheck \
  --fixtures "$src/tests/data/golden/deepseek_v3-tiny.json" "$src/tests/data/golden/deepseek_v3_fp8-tiny.json"
"$py" "$ref" check --models-dir "$out" --atol 1e-4 \
  --fixtures "$src/tests/data/golden/deepseek_v3-tiny.bf16act.json"
"$py" "$ref" selfcheck --model "$out/deepseek_v3-mini-2layers"
"$py" "$ref" fp8check --model "$out/deepseek_v3_fp8-tiny" --like "$out/deepseek_v3-tiny"
"$py" "$src/tests/reference/deepseek_v3_ffn.py" check --model "$out/deepseek_v3-tiny" \
  --model "$out/deepseek_v3_fp8-tiny" --fixture "$src/tests/data/deepseek_v3/ffn-tiny.json"
