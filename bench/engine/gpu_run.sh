#!/usr/bin/env bash
# Engine benchmark on one GPU: joule-engine-bench --device cuda:N against Hugging Face
# transformers (bench/engine/hf_bench.py) in the same run, on the same checkpoints and GPU:
#   * checkpoints generated here with joule-make-model: the qwen3_moe `mini` preset, the
#     deepseek_v3 `mini` preset in BF16 and FP8, and Qwen3-30B-A3B's layer shapes with a few
#     layers (--preset qwen3-30b-a3b-shape);
#   * decode tokens/s at batch 1, 8, 64 and 256 (32-token prompts, windows of 32 steps), prefill
#     of 512-token prompts, tokens per joule (NVML) where each tool reports it;
#   * the batch-1 decode roofline: active weight bytes per token / the device-to-device copy
#     bandwidth measured in this run (bytes read + written; hf_bench.py's docstring).
# Writes OUT/engine-<model>.{json,md} with the ratios (bench/engine/report.py, as run.sh does
# on the CPU) and OUT/gpu.json, and prints the tables. Exit status 1 when any measurement
# failed: the tables still show what ran. Takes about 3 minutes (most of it loading the
# Qwen3-shape checkpoint into transformers).
#
#   bench/engine/gpu_run.sh [--out DIR] [--models DIR] [--device cuda:0] [--layers 4]
#                           [--bin DIR] [--skip-qwen3-shape]
#
# Binaries: the bundle's (.gpu/bin, tests/gpu/bundle.sh) when there is one, else build/default's;
# --bin DIR takes both joule-engine-bench and joule-make-model from DIR.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out=$root/bench/results/engine-gpu
models=${TMPDIR:-/tmp}/joule-bench-models
device=cuda:0
layers=4
bin=""
qwen3_shape=1
args="$*"
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --skip-qwen3-shape) qwen3_shape=0; shift ;;
    *) echo "gpu_run.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
source "$root/tests/gpu/env.sh"
[ -n "${JOULE_GPU_LD:-}" ] || joule_gpu_find_libraries
if [ -n "$bin" ]; then
  bench_bin=$bin/joule-engine-bench make_model=$bin/joule-make-model
elif [ -d "$JOULE_GPU_BUNDLE/bin" ]; then
  bench_bin=$JOULE_GPU_BUNDLE/bin/joule-engine-bench make_model=$JOULE_GPU_BUNDLE/bin/joule-make-model
else
  bench_bin=$root/build/default/bench/engine/joule-engine-bench
  make_model=$root/build/default/worker/tools/joule-make-model
fi
mkdir -p "$out" "$models"
failures=()
fail() { echo "FAILED: $*"; failures+=("$*"); }
# Shared by both tools, so every ratio compares the same work.
batches=1,8,64,256 prompt_len=32 decode_steps=32 prefill_len=512
# Each tool's run on one checkpoint gets this long; what it measured before is kept.
step_timeout=${JOULE_BENCH_STEP_TIMEOUT_S:-240}

# The GPU, for the tables (nvidia-smi's index = NVML's; cuda:N is assumed to be the same GPU).
index=${device#cuda:}
[ "$index" = "$device" ] && index=0
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,pci.bus_id --format=csv,noheader \
  -i "$index" > "$out/nvidia-smi.csv" 2>&1 || fail "nvidia-smi: $(cat "$out/nvidia-smi.csv")"
python3 - "$out/nvidia-smi.csv" "$out/gpu.json" <<'PY'
import json, os, sys
fields = ["name", "driver_version", "memory_total", "power_limit", "pci_bus_id"]
values = [v.strip() for v in open(sys.argv[1]).read().strip().split(",")]
info = dict(zip(fields, values)) if len(values) == len(fields) else {"nvidia_smi": ",".join(values)}
info["host_cores"] = os.cpu_count()
json.dump(info, open(sys.argv[2], "w"), indent=2)
PY

# checkpoint NAME ARGS...: joule-make-model ARGS into $models/NAME, unless a complete one is there.
checkpoint() {
  local name=$1
  shift
  if [ -f "$models/$name/config.json" ] && [ -f "$models/$name/model.safetensors" ]; then
    echo "checkpoint $models/$name exists"
    return 0
  fi
  LD_LIBRARY_PATH=$JOULE_GPU_LD timeout 180 "$make_model" "$@" --out "$models/$name" ||
    { fail "joule-make-model $* (exit $?)"; return 1; }
}

# exit_note TOOL RC: what a tool's failure is called in the tables.
exit_note() { echo "$1 exit $2$([ "$2" -eq 124 ] && echo ' (timed out)')"; }

# bench NAME: both tools on $models/NAME, then the report.
bench() {
  local name=$1 joule_err="" hf_err="" rc
  local shared=(--model "$models/$1" --device "$device" --batch "$batches" --prompt-len "$prompt_len"
                --decode-steps "$decode_steps" --prefill-len "$prefill_len")
  local joule=("$bench_bin" "${shared[@]}" --threads "$(nproc)")
  local hf=(python3 bench/engine/hf_bench.py "${shared[@]}")
  rm -f "$out/$name.joule.json" "$out/$name.hf.json"
  echo
  echo "----- $name: Joule ($(date +%T)): ${joule[*]}"
  LD_LIBRARY_PATH=$JOULE_GPU_LD timeout "$step_timeout" "${joule[@]}" --json "$out/$name.joule.json"
  rc=$?
  [ $rc -eq 0 ] || { joule_err=$(exit_note joule-engine-bench $rc); fail "$name: $joule_err"; }
  echo
  echo "----- $name: transformers ($(date +%T)): ${hf[*]}"
  (cd "$root" && timeout "$step_timeout" "${hf[@]}" --json "$out/$name.hf.json")
  rc=$?
  [ $rc -eq 0 ] || { hf_err=$(exit_note hf_bench.py $rc); fail "$name: $hf_err"; }
  echo
  JOULE_BENCH_COMMAND="bench/engine/gpu_run.sh $args" python3 "$root/bench/engine/report.py" gpu \
    --joule "$out/$name.joule.json" --hf "$out/$name.hf.json" --name "$name" --out "$out" \
    --gpu-info "$out/gpu.json" --joule-error "$joule_err" --hf-error "$hf_err" \
    --joule-command "${joule[*]/#$bench_bin/joule-engine-bench}" --hf-command "${hf[*]}" ||
    fail "$name: report.py"
}

echo "----- checkpoints in $models ($(date +%T))"
checkpoint qwen3_moe-mini --family qwen3_moe --preset mini && bench qwen3_moe-mini
if [ "$qwen3_shape" = 1 ]; then
  shape=qwen3-30b-a3b-shape-${layers}l
  checkpoint "$shape" --preset qwen3-30b-a3b-shape --layers "$layers" && bench "$shape"
fi
# DeepSeek-V3 (multi-head latent attention, noaux_tc routing), BF16 and block-scaled FP8 weights.
checkpoint deepseek_v3-mini --family deepseek_v3 --preset mini && bench deepseek_v3-mini
checkpoint deepseek_v3_fp8-mini --family deepseek_v3 --preset mini --dtype fp8 && bench deepseek_v3_fp8-mini
echo
if [ ${#failures[@]} -gt 0 ]; then
  echo "gpu_run.sh: ${#failures[@]} failure(s):"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "gpu_run.sh: results in $out ($(date +%T))"
