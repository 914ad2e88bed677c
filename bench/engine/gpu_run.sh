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
#   * a whole GPU cluster under joule-bench (HTTP API, fcfs, one tier): the qwen3_moe mini with
#     EP 2 on this one GPU (two workers sharing it, rows through CUDA IPC windows) against EP 1
#     on the same GPU, and EP 2 with two-batch overlap (--two-batch-overlap) against EP 2, the
#     same open-loop load (--cluster-rate req/s, 128-token prompts, 64 output tokens): output
#     tokens/s, time per output token, TTFT, tokens per joule of the GPU.
# Writes OUT/engine-<model>.{json,md} with the ratios (bench/engine/report.py, as run.sh does
# on the CPU), OUT/cluster-<model>-ep2-vs-ep1.{json,md} (joule-bench's runs beside them:
# OUT/<model>.cluster-{ep1,ep2,ep2-tbo}.{json,csv}, cluster logs in .logs/ beside them) and
# OUT/gpu.json, and prints the tables. Exit status 1 when any measurement failed: the tables
# still show what ran. Takes about 3 minutes (most of it loading the Qwen3-shape checkpoint into
# transformers), plus about 2 minutes for the three cluster runs.
#
#   bench/engine/gpu_run.sh [--out DIR] [--models DIR] [--device cuda:0] [--layers 4]
#                           [--bin DIR] [--skip-qwen3-shape] [--skip-cluster] [--cluster-rate 32]
#                           [--cluster-only] [--cluster-model qwen3_moe-mini] [--cluster-duration 20]
#
# --cluster-only runs the cluster part alone (on --cluster-model from --models); with --device fake
# (the fake device, joule-worker-fake-device) that is CI's smoke test of this script's cluster part
# (bench_gpu_run_cluster_fake_device): its numbers measure nothing about a GPU.
#
# Binaries: the bundle's (.gpu/bin, tests/gpu/bundle.sh) when there is one, else build/default's;
# --bin DIR takes joule-engine-bench and joule-make-model (and the cluster's joule-coordinator,
# joule-worker, joule-cli and joule-bench) from DIR.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out=$root/bench/results/engine-gpu
models=${TMPDIR:-/tmp}/joule-bench-models
device=cuda:0
layers=4
bin=""
qwen3_shape=1
cluster=1
cluster_rate=32
cluster_only=0
cluster_model=qwen3_moe-mini
cluster_duration=20
args="$*"
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --skip-qwen3-shape) qwen3_shape=0; shift ;;
    --skip-cluster) cluster=0; shift ;;
    --cluster-rate) cluster_rate=$2; shift 2 ;;
    --cluster-only) cluster_only=1; shift ;;
    --cluster-model) cluster_model=$2; shift 2 ;;
    --cluster-duration) cluster_duration=$2; shift 2 ;;
    *) echo "gpu_run.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
source "$root/tests/gpu/env.sh"
[ -n "${JOULE_GPU_LD:-}" ] || joule_gpu_find_libraries
if [ -n "$bin" ]; then
  bench_bin=$bin/joule-engine-bench make_model=$bin/joule-make-model
  cluster_build=$bin load_bin=$bin/joule-bench
elif [ -d "$JOULE_GPU_BUNDLE/bin" ]; then
  bench_bin=$JOULE_GPU_BUNDLE/bin/joule-engine-bench make_model=$JOULE_GPU_BUNDLE/bin/joule-make-model
  cluster_build=$JOULE_GPU_BUNDLE load_bin=$JOULE_GPU_BUNDLE/bin/joule-bench
else
  bench_bin=$root/build/default/bench/engine/joule-engine-bench
  make_model=$root/build/default/worker/tools/joule-make-model
  cluster_build=$root/build/default load_bin=$root/build/default/bench/energy/joule-bench
fi
mkdir -p "$out" "$models"
failures=()
fail() { echo "FAILED: $*"; failures+=("$*"); }
# Shared by both tools, so every ratio compares the same work.
batches=1,8,64,256 prompt_len=32 decode_steps=32 prefill_len=512
# Each tool's run on one checkpoint gets this long; what it measured before is kept.
step_timeout=${JOULE_BENCH_STEP_TIMEOUT_S:-240}
# Every timeout here is --foreground: it stays in this script's process group, so a check's
# timeout (tests/gpu/run.sh) that kills the group kills the tool under it too.

# The GPU, for the tables (nvidia-smi's index = NVML's; cuda:N is assumed to be the same GPU).
index=${device#cuda:}
[ "$index" = "$device" ] && index=0
if [ "$device" = fake ]; then
  echo "fake device (CPU kernels; tests only),-,-,-,-" > "$out/nvidia-smi.csv"
else nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,pci.bus_id --format=csv,noheader \
  -i "$index" > "$out/nvidia-smi.csv" 2>&1 || fail "nvidia-smi: $(cat "$out/nvidia-smi.csv")"
fi
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
  LD_LIBRARY_PATH=$JOULE_GPU_LD timeout --foreground 180 "$make_model" "$@" --out "$models/$name" ||
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
  LD_LIBRARY_PATH=$JOULE_GPU_LD timeout --foreground "$step_timeout" "${joule[@]}" --json "$out/$name.joule.json"
  rc=$?
  [ $rc -eq 0 ] || { joule_err=$(exit_note joule-engine-bench $rc); fail "$name: $joule_err"; }
  echo
  echo "----- $name: transformers ($(date +%T)): ${hf[*]}"
  (cd "$root" && timeout --foreground "$step_timeout" "${hf[@]}" --json "$out/$name.hf.json")
  rc=$?
  [ $rc -eq 0 ] || { hf_err=$(exit_note hf_bench.py $rc); fail "$name: $hf_err"; }
  echo
  JOULE_BENCH_COMMAND="bench/engine/gpu_run.sh $args" python3 "$root/bench/engine/report.py" gpu \
    --joule "$out/$name.joule.json" --hf "$out/$name.hf.json" --name "$name" --out "$out" \
    --gpu-info "$out/gpu.json" --joule-error "$joule_err" --hf-error "$hf_err" \
    --joule-command "${joule[*]/#$bench_bin/joule-engine-bench}" --hf-command "${hf[*]}" ||
    fail "$name: report.py"
}

# cluster_bench NAME: a whole cluster on $models/NAME under joule-bench, EP 1, EP 2, then EP 2
# with two-batch overlap (--two-batch-overlap) on this one GPU (bench/energy/gpu_cluster.sh:
# fcfs, a fixed KV cache per worker, NVML on the GPU), the same seeded open-loop load for all;
# then OUT/cluster-NAME-ep2-vs-ep1.{json,md}. Both workers of EP 2 meter the same GPU:
# joule-bench reads rank 0's counter only (the whole GPU).
cluster_warmup=$(( cluster_duration >= 10 ? 5 : cluster_duration / 2 ))
# The running cluster's session (setsid) is stopped on any exit too: a check killed mid-run
# must not leave its coordinator and workers on the GPU (the energy sweep comes next).
cluster_pid=""
cluster_stop() {
  if [ -n "$cluster_pid" ]; then
    kill -TERM -- "-$cluster_pid" 2>/dev/null
    wait "$cluster_pid" 2>/dev/null
    cluster_pid=""
  fi
}
trap cluster_stop EXIT
cluster_bench() {
  local name=$1 ep run rc run_dir rows="" extra
  # The same seeded open-loop load for both clusters (joule-bench's flags; the URLs are each run's).
  local load=(--model "$name" --rate "$cluster_rate" --duration-s "$cluster_duration"
              --warmup-s "$cluster_warmup" --idle-s 0 --tier-mix standard=1 --prompt-len fixed:128
              --output-len fixed:64 --ignore-eos --seed 1)
  for run in ep1 ep2 ep2-tbo; do
    ep=${run#ep} ep=${ep%-tbo} extra=()
    [ "$run" = ep2-tbo ] && extra=(-- --two-batch-overlap)
    run_dir=$out/$name.cluster-$run.logs
    rm -rf "$run_dir" "$out/$name.cluster-$run".{json,csv}
    mkdir -p "$run_dir"
    echo
    echo "----- $name: GPU cluster, EP $ep${extra:+ ${extra[*]:1}} on $device under joule-bench ($(date +%T))"
    # Its own session: stopping it signals the coordinator and every worker at once.
    setsid "$root/bench/energy/gpu_cluster.sh" --build "$cluster_build" --model "$models/$name" \
      --workers "$ep" --device "$device" --port 0 --metrics-port 0 --policy fcfs --kv-cache-mb 2048 \
      --run-dir "$run_dir" "${extra[@]}" >/dev/null 2>"$run_dir/gpu_cluster.log" &
    cluster_pid=$!
    for _ in $(seq 1 360); do
      [ -f "$run_dir/ready" ] && break
      kill -0 "$cluster_pid" 2>/dev/null || break
      sleep 0.5
    done
    if [ ! -f "$run_dir/ready" ]; then
      tail -8 "$run_dir/gpu_cluster.log"
      fail "$name: the $run cluster did not become ready (logs: $run_dir)"
      cluster_stop
      continue
    fi
    echo "joule-bench ${load[*]} (rank 0's /metrics: the GPU's NVML counter)"
    LD_LIBRARY_PATH=$JOULE_GPU_LD timeout --foreground 120 "$load_bin" --url "http://127.0.0.1:$(cat "$run_dir/http_port")" \
      --metrics-urls "http://127.0.0.1:$(cat "$run_dir/metrics_port.0")/metrics" --label "$run" \
      --progress-s 5 "${load[@]}" --out "$out/$name.cluster-$run" >/dev/null
    rc=$?
    [ $rc -eq 0 ] || fail "$name: $(exit_note "joule-bench ($run)" $rc)"
    [ "$run" != ep2 ] || rows=$(grep -ho 'rows through [a-z -]*[a-z]' "$run_dir"/worker*.log | sort | uniq -c |
      sed 's/^ *\([0-9]*\) /\1 ranks: /' | paste -sd';' -)
    cluster_stop
  done
  JOULE_BENCH_COMMAND="bench/engine/gpu_run.sh $args" python3 - "$out" "$name" "$device" "$cluster_rate" \
    "$rows" "joule-bench ${load[*]}" <<'PY' || fail "$name: the cluster report"
import datetime, json, os, sys
out, name, device, rate, rows, load = sys.argv[1:7]
def run(label):
    path = os.path.join(out, f"{name}.cluster-{label}.json")
    if not os.path.exists(path):
        return None
    doc = json.load(open(path))
    a = doc["all"]
    return {"requests": a.get("requests"), "completed": a.get("completed"), "errors": a.get("errors"),
            "throughput_tok_s": a.get("throughput_tok_s"), "mean_tpot_ms": a.get("mean_tpot_ms"),
            "tpot_p50_ms": a.get("tpot_ms", {}).get("p50"), "tpot_p99_ms": a.get("tpot_ms", {}).get("p99"),
            "ttft_p50_ms": a.get("ttft_ms", {}).get("p50"), "ttft_p99_ms": a.get("ttft_ms", {}).get("p99"),
            "tokens_per_joule": a.get("tokens_per_joule"),
            "energy_source": doc.get("energy", {}).get("source")}
ep1, ep2, tbo = run("ep1"), run("ep2"), run("ep2-tbo")
def ratio(key, top, bottom):
    a, b = (top or {}).get(key), (bottom or {}).get(key)
    return a / b if a and b else None
keys = ("throughput_tok_s", "mean_tpot_ms", "ttft_p50_ms", "tokens_per_joule")
ratios = {k: ratio(k, ep2, ep1) for k in keys}
tbo_ratios = {k: ratio(k, tbo, ep2) for k in keys}
gpu = {}
if os.path.exists(os.path.join(out, "gpu.json")):
    gpu = json.load(open(os.path.join(out, "gpu.json")))
doc = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": os.environ.get("JOULE_BENCH_COMMAND", ""), "load": load, "device": device,
                "gpu": gpu, "model": name, "rate": float(rate), "ep2_row_path": rows},
       "ep1": ep1, "ep2": ep2, "ep2_over_ep1": ratios, "ep2_two_batch_overlap": tbo,
       "tbo_over_ep2": tbo_ratios}
base = os.path.join(out, f"cluster-{name}-ep2-vs-ep1")
json.dump(doc, open(base + ".json", "w"), indent=2)
def f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)
def line(label, r):
    if r is None:
        return f"| {label} | failed | - | - | - | - | - |"
    return (f"| {label} | {r['completed']} / {r['requests']} ({r['errors']} errors) | {f(r['throughput_tok_s'])} "
            f"| {f(r['mean_tpot_ms'], '.2f')} | {f(r['tpot_p50_ms'], '.2f')} / {f(r['tpot_p99_ms'], '.2f')} "
            f"| {f(r['ttft_p50_ms'])} / {f(r['ttft_p99_ms'])} | {f(r['tokens_per_joule'], '.2f')} |")
md = [f"# A GPU cluster under joule-bench: {name}, EP 2 against EP 1 on one GPU", "",
      f"{gpu.get('name', 'GPU')} ({device}), {doc['meta']['date']}. Same run, same GPU, same load: "
      f"`{load}`. Both EP 2 workers share the GPU (expert rows: {rows or 'not logged'}); tokens "
      f"per joule are the whole GPU's (NVML, read through rank 0's meter: {f((ep1 or ep2 or {}).get('energy_source'), 's')}), "
      "idle power included.", "",
      "| cluster | completed / requests | output tokens/s | mean TPOT ms | TPOT p50 / p99 ms | TTFT p50 / p99 ms | tokens/J |",
      "|---|---|---|---|---|---|---|", line("EP 1", ep1), line("EP 2", ep2),
      line("EP 2, two-batch overlap", tbo)]
def ratio_line(label, r):
    return (f"| {label} | | {f(r['throughput_tok_s'], '.2f')}x | {f(r['mean_tpot_ms'], '.2f')}x | "
            f"| {f(r['ttft_p50_ms'], '.2f')}x (p50) | {f(r['tokens_per_joule'], '.2f')}x |")
md += [ratio_line("EP 2 / EP 1", ratios), ratio_line("two-batch overlap / EP 2", tbo_ratios), "",
       "Two-batch overlap stays (and becomes the default) only if its row beats EP 2's here.", ""]
open(base + ".md", "w").write("\n".join(md))
print("\n".join(md))
if any(r is None or r["errors"] for r in (ep1, ep2, tbo)):
    sys.exit("a cluster run failed or had errors")
PY
}

echo "----- checkpoints in $models ($(date +%T))"
if [ "$cluster_only" = 1 ]; then
  [ -f "$models/$cluster_model/config.json" ] || checkpoint "$cluster_model" --family qwen3_moe --preset mini
  cluster_bench "$cluster_model"
else
  checkpoint qwen3_moe-mini --family qwen3_moe --preset mini && bench qwen3_moe-mini
  # A whole GPU cluster, EP 2 on this one GPU against EP 1, on the same checkpoint.
  if [ "$cluster" = 1 ] && [ -f "$models/qwen3_moe-mini/config.json" ]; then
    cluster_bench qwen3_moe-mini
  fi
  if [ "$qwen3_shape" = 1 ]; then
    shape=qwen3-30b-a3b-shape-${layers}l
    checkpoint "$shape" --preset qwen3-30b-a3b-shape --layers "$layers" && bench "$shape"
  fi
  # DeepSeek-V3 (multi-head latent attention, noaux_tc routing), BF16 and block-scaled FP8 weights.
  checkpoint deepseek_v3-mini --family deepseek_v3 --preset mini && bench deepseek_v3-mini
  checkpoint deepseek_v3_fp8-mini --family deepseek_v3 --preset mini --dtype fp8 && bench deepseek_v3_fp8-mini
fi
echo
if [ ${#failures[@]} -gt 0 ]; then
  echo "gpu_run.sh: ${#failures[@]} failure(s):"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "gpu_run.sh: results in $out ($(date +%T))"
