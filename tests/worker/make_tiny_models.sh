#!/usr/bin/env bash
# ctest fixture: writes the built-in tiny models the model/engine tests load.
#   make_tiny_models.sh JOULE_MAKE_MODEL OUT_DIR
set -euo pipefail
mk="$1"
out="$2"
mkdir -p "$out"
for family in qwen3_moe qwen2_moe mixtral; do
  "$mk" --family "$family" --preset tiny --out "$out/$family-tiny" >/dev/null
done
# The same numbers in other containers: sharded, F16 and F32.
"$mk" --family qwen3_moe --preset tiny --shards 3 --out "$out/qwen3_moe-tiny-sharded" >/dev/null
"$mk" --family qwen2_moe --preset tiny --dtype f16 --out "$out/qwen2_moe-tiny-f16" >/dev/null
"$mk" --family mixtral --preset tiny --dtype f32 --out "$out/mixtral-tiny-f32" >/dev/null
# DeepSeek-V3 (BF16, and FP8 E4M3 with 128x128 block scales), and its 256-expert routing shape.
"$mk" --family deepseek_v3 --preset tiny --out "$out/deepseek_v3-tiny" >/dev/null
"$mk" --family deepseek_v3 --preset tiny --dtype fp8 --out "$out/deepseek_v3_fp8-tiny" >/dev/null
"$mk" --family deepseek_v3 --preset wide --dtype fp8 --out "$out/deepseek_v3_fp8-wide" >/dev/null
echo "tiny models in $out"
