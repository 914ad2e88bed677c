#!/usr/bin/env bash
# Energy sweep: for every scheduling policy, start a local cluster, run
# joule-bench at every arrival rate, stop the cluster; then plot
# (bench/energy/plot.py): throughput per watt against interactivity per tier.
#
#   bench/energy/sweep.sh                      # defaults below
#   POLICIES="fcfs ipw" RATES="4 8" DURATION=30 bench/energy/sweep.sh
#
# Every setting is an environment variable:
#   BUILD           build directory with joule-bench and the cluster (build/default)
#   POLICIES        scheduling policies ("fcfs priority ipw")
#   RATES           arrival rates, requests/s ("2 4 8 12")
#   DURATION WARMUP IDLE   seconds of load, of warm-up excluded, of idle-power measurement (60 10 10)
#   TIER_MIX PROMPT_LEN OUTPUT_LEN SEED   the workload (joule-bench flags of the same names)
#   PORT            HTTP port of the cluster (8000)
#   METRICS_PORT    first worker's /metrics port (9100); worker r serves on METRICS_PORT+r
#   METRICS_URLS    comma-separated /metrics URLs carrying the energy counter
#                   (default: the 2 workers' on METRICS_PORT; empty: no energy numbers)
#   SCHEDULER_CONFIG  scheduler JSON (SLOs, ipw knobs) for every policy
#                   (bench/energy/mini-slo.json: targets for the mini model on CPUs;
#                   mini-slo-x2.json: the same doubled, for a host half as fast)
#   CLUSTER_START   command that starts a cluster and serves until killed; {policy},
#                   {port}, {metrics_port} and {scheduler_config} are substituted
#                   (default: deploy/local/up.sh, mini model, 2 workers)
#   READY_PATH      polled on the cluster until it answers 200 (/ready: every rank serves)
#   READY_LOG       ...and until the cluster's output has this line ("serving until Ctrl-C",
#                   what up.sh prints after its demo requests; empty: do not wait)
#   SLO_SCALE       multiply every TTFT/TPOT target of SCHEDULER_CONFIG by this number (the
#                   scaled config goes to OUT/scheduler-config.json and is what the cluster and
#                   joule-bench use); "auto": by SLO_REFERENCE_TOK_S / this host's batch-1 decode
#                   tokens/s on the mini model (joule-engine-bench, OUT/engine-bench.json)
#   SLO_REFERENCE_TOK_S  batch-1 decode tokens/s of the host the config was calibrated on
#                   (710: mini-slo.json's host, bench/results/engine-qwen3_moe-mini.md of 11-23)
#   OUT             results directory (bench/results/energy-<date>)
#   MODEL           the requests' model field (qwen3_moe-mini)
#   EXTRA_ARGS      more joule-bench flags (--ignore-eos: outputs run to max_tokens)
#   QUICK           1: one rate (RATES: 8 on CPUs, 32 on a GPU), 20 s of load, 5 s warm-up and
#                   5 s idle, unless set: about 2 minutes for the three policies on a GPU
#   PYTHON          python3 for the SLO flags and the plots (/usr/bin/python3, else PATH's)
#
# On a GPU, DEVICE=cuda or cuda:N (default cpu): the cluster is bench/energy/gpu_cluster.sh's
# (GPU_WORKERS workers, default 1, all on that GPU), from the GPU bundle (tests/gpu/bundle.sh,
# BUILD defaults to it) or a build tree, its workers metered by NVML (ENERGY_SOURCE, default
# nvml: a worker without it exits, so no estimate passes for a measurement). NVML meters the
# whole GPU, so METRICS_URLS defaults to rank 0's /metrics only. MODEL_DIR is the checkpoint
# (default $TMPDIR/joule-bench-models/qwen3_moe-mini, where bench/engine/gpu_run.sh makes it;
# made here with joule-make-model when absent). SLO_SCALE=auto measures batch-1 decode on the
# GPU. The sweep ends with OUT/table.md (bench/energy/sweep_table.py) and fails when a run's
# energy is not NVML's.
# DEVICE=fake (tests only: joule-worker-fake-device, the model meter) runs the GPU path on the
# CPU: CI's smoke test of this script's GPU branch (energy_sweep_fake_device).
#   DEVICE=cuda:0 QUICK=1 bench/energy/sweep.sh                  # from the repository root
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEVICE="${DEVICE:-cpu}"
if [ "$DEVICE" != cpu ]; then
  [[ "$DEVICE" =~ ^(cuda(:[0-9]+)?|fake)$ ]] ||
    { echo "DEVICE: cpu, cuda, cuda:N or fake, got '$DEVICE'" >&2; exit 2; }
  source "$root/tests/gpu/env.sh"  # JOULE_GPU_BUNDLE; JOULE_GPU_LD: only our binaries get it
  # (|| true: env.sh is for scripts without set -e; its find fails on absent directories)
  if [ -z "${JOULE_GPU_LD:-}" ]; then joule_gpu_find_libraries || true; fi
  if [ -z "${BUILD:-}" ] && [ -d "$JOULE_GPU_BUNDLE/bin" ]; then BUILD="$JOULE_GPU_BUNDLE"; fi
  BUILD="${BUILD:-$root/build/default}"
  GPU_WORKERS="${GPU_WORKERS:-1}"
  MODEL_DIR="${MODEL_DIR:-${TMPDIR:-/tmp}/joule-bench-models/qwen3_moe-mini}"
  MODEL="${MODEL:-$(basename "$MODEL_DIR")}"
  ENERGY_SOURCE="${ENERGY_SOURCE:-nvml}"
  [ "$DEVICE" != fake ] || ENERGY_SOURCE=model  # the fake device has no NVML
  if [ -z "${CLUSTER_START:-}" ]; then
    CLUSTER_START="$(printf '%q ' "$root/bench/energy/gpu_cluster.sh" --build "$BUILD" \
      --model "$MODEL_DIR" --workers "$GPU_WORKERS" --device "$DEVICE" --energy-source "$ENERGY_SOURCE")"
    CLUSTER_START+="--port {port} --metrics-port {metrics_port} --policy {policy} --scheduler-config {scheduler_config}"
    gpu_cluster_logs=1  # each cluster's logs go to OUT/cluster-<policy>.logs/ (below)
  fi
  METRICS_URLS="${METRICS_URLS-http://127.0.0.1:${METRICS_PORT:-9100}/metrics}"
fi
if [ "${QUICK:-0}" = 1 ]; then
  if [ "$DEVICE" = cpu ]; then RATES="${RATES:-8}"; else RATES="${RATES:-32}"; fi
  DURATION="${DURATION:-20}" WARMUP="${WARMUP:-5}" IDLE="${IDLE:-5}"
fi
source "$root/bench/energy/cluster.sh"  # BUILD PORT METRICS_* CLUSTER_START READY_* MODEL; cluster_start/stop
# Our binaries; on a GPU with the bundle's libraries (the host's python3 and curl keep theirs).
ours=()
[ "$DEVICE" = cpu ] || ours=(env "LD_LIBRARY_PATH=$JOULE_GPU_LD")
POLICIES="${POLICIES:-fcfs priority ipw}"
RATES="${RATES:-2 4 8 12}"
DURATION="${DURATION:-60}"
WARMUP="${WARMUP:-10}"
IDLE="${IDLE:-10}"
TIER_MIX="${TIER_MIX:-fast=0.1,priority=0.2,standard=0.4,batch=0.3}"
PROMPT_LEN="${PROMPT_LEN:-lognormal:64:0.5:512}"
OUTPUT_LEN="${OUTPUT_LEN:-uniform:16:64}"
SEED="${SEED:-1}"
SCHEDULER_CONFIG="${SCHEDULER_CONFIG:-$root/bench/energy/mini-slo.json}"
OUT="${OUT:-$root/bench/results/energy-$(date +%Y%m%d-%H%M%S)}"
EXTRA_ARGS="${EXTRA_ARGS---ignore-eos}"
SLO_SCALE="${SLO_SCALE:-1}"
SLO_REFERENCE_TOK_S="${SLO_REFERENCE_TOK_S:-710}"
mkdir -p "$OUT"
if [ "${gpu_cluster_logs:-0}" = 1 ]; then CLUSTER_START+=" --run-dir $(printf '%q' "$OUT")/cluster-{policy}.logs"; fi

# The GPU's checkpoint, made here unless gpu_run.sh (or an earlier sweep) left a complete one.
if [ "$DEVICE" != cpu ] && { [ ! -f "$MODEL_DIR/config.json" ] || [ ! -f "$MODEL_DIR/model.safetensors" ]; }; then
  echo "[sweep] making $MODEL_DIR" >&2
  "${ours[@]}" "$(joule_bin joule-make-model worker/tools)" --family qwen3_moe --preset mini \
    --out "$MODEL_DIR" >/dev/null
fi

# Host-scaled targets: a host k times slower gets k times the TTFT/TPOT targets.
if [ "$SLO_SCALE" = auto ]; then
  mini="${MODEL_DIR:-$BUILD/models/qwen3_moe-mini}"
  [ -f "$mini/config.json" ] ||
    "$BUILD/worker/tools/joule-make-model" --family qwen3_moe --preset mini --out "$mini" >/dev/null
  device_flags=()
  [ "$DEVICE" = cpu ] || device_flags=(--device "$DEVICE")
  "${ours[@]}" "$(joule_bin joule-engine-bench bench/engine)" --model "$mini" --batch 1 --decode-steps 32 \
    --prefill-len 32 "${device_flags[@]}" --json "$OUT/engine-bench.json" >/dev/null
  SLO_SCALE="$("$PYTHON" -c 'import json, sys
tok_s = json.load(open(sys.argv[1]))["decode"]["1"]["tokens_per_s"]
print("%.3f" % (float(sys.argv[2]) / tok_s))' "$OUT/engine-bench.json" "$SLO_REFERENCE_TOK_S")"
  echo "[sweep] batch-1 decode here vs the calibration host's $SLO_REFERENCE_TOK_S tokens/s: SLO_SCALE=$SLO_SCALE" >&2
fi
if [ "$SLO_SCALE" != 1 ]; then
  "$PYTHON" - "$SCHEDULER_CONFIG" "$SLO_SCALE" "$OUT/scheduler-config.json" <<'PY'
import json, sys
config, scale = json.load(open(sys.argv[1])), float(sys.argv[2])
if scale <= 0:
    sys.exit("SLO_SCALE must be positive, got %s" % sys.argv[2])
for tier in config.get("tiers", {}).values():
    for key in ("ttft_ms", "tpot_ms"):
        if tier.get(key):
            tier[key] = round(tier[key] * scale, 1)
json.dump(config, open(sys.argv[3], "w"), indent=1)
PY
  SCHEDULER_CONFIG="$OUT/scheduler-config.json"
  echo "[sweep] targets x$SLO_SCALE: $SCHEDULER_CONFIG" >&2
fi

# joule-bench judges attainment by the same targets the scheduler aims for.
slo_flags="$("$PYTHON" - "$SCHEDULER_CONFIG" <<'PY'
import json, sys
tiers = json.load(open(sys.argv[1])).get("tiers", {})
def flag(key, none):
    return ",".join("%s=%g" % (t, tiers[t].get(key, none) or none) for t in tiers)
if tiers:
    print("--slo-ttft-ms %s --slo-tpot-ms %s" % (flag("ttft_ms", 1e9), flag("tpot_ms", 1e9)))
PY
)"

for policy in $POLICIES; do
  echo "[sweep] policy $policy" >&2
  cluster_start "$policy" "$SCHEDULER_CONFIG" "$OUT/cluster-$policy.log"
  for rate in $RATES; do
    echo "[sweep] policy $policy, rate $rate req/s" >&2
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    "${ours[@]}" "$bench" --url "$url" --model "$MODEL" --rate "$rate" --duration-s "$DURATION" --warmup-s "$WARMUP" \
      --idle-s "$IDLE" --tier-mix "$TIER_MIX" --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" \
      --seed "$SEED" --metrics-urls "$METRICS_URLS" --label "$policy" \
      --out "$OUT/$policy-rate$rate" $slo_flags $EXTRA_ARGS >/dev/null
  done
  cluster_stop
done

# One CSV with every run (the per-run header once).
first=1
for f in "$OUT"/*-rate*.csv; do
  if [ "$first" = 1 ]; then cat "$f"; first=0; else tail -n +2 "$f"; fi
done >"$OUT/all.csv"
echo "[sweep] results in $OUT (all.csv, one JSON per run)" >&2
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
  "$PYTHON" "$root/bench/energy/plot.py" "$OUT"
else
  echo "[sweep] no matplotlib: apt-get install python3-matplotlib (JOULE_BENCH_PACKAGES), then" \
       "/usr/bin/python3 bench/energy/plot.py $OUT" >&2
fi
if [ "$DEVICE" != cpu ]; then
  # Measured, not modelled: every run's energy must be NVML's (ENERGY_SOURCE).
  "$PYTHON" "$root/bench/energy/sweep_table.py" "$OUT" --require-source "$ENERGY_SOURCE" | tee "$OUT/table.md"
fi
