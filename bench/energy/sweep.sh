#!/usr/bin/env bash
# Energy sweep: for every scheduling policy, start a local cluster, run
# joule-bench at every arrival rate, stop the cluster; then plot
# (bench/energy/plot.py): throughput per watt against interactivity per tier.
#
#   bench/energy/sweep.sh                      # defaults below
#   POLICIES="fcfs joule" RATES="1 2 4" DURATION=60 bench/energy/sweep.sh
#
# Every setting is an environment variable:
#   BUILD           build directory with joule-bench and the cluster (build/default)
#   POLICIES        policy names ("fcfs strict-priority joule")
#   RATES           arrival rates, requests/s ("0.5 1 2 4")
#   DURATION WARMUP IDLE   seconds of load, of warm-up excluded, of idle-power measurement (60 10 10)
#   TIER_MIX PROMPT_LEN OUTPUT_LEN SEED   the workload (joule-bench flags of the same names)
#   PORT            HTTP port of the cluster (8000)
#   METRICS_URLS    comma-separated /metrics URLs carrying the energy counter
#                   (empty: no energy numbers, latency and throughput only)
#   CLUSTER_START   command that starts a cluster and serves until killed; {policy}
#                   and {port} are substituted. The default passes the policy in
#                   JOULE_POLICY; replace it once joule-coordinator has --policy, e.g.
#                   CLUSTER_START='$BUILD/coordinator/joule-coordinator --policy {policy} ...'
#   READY_PATH      polled on the cluster until it answers 200 (/v1/models)
#   OUT             results directory (bench/results/energy-<date>)
#   EXTRA_ARGS      more joule-bench flags (e.g. --ignore-eos --slo-tpot-ms fast=15)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${BUILD:-$root/build/default}"
POLICIES="${POLICIES:-fcfs strict-priority joule}"
RATES="${RATES:-0.5 1 2 4}"
DURATION="${DURATION:-60}"
WARMUP="${WARMUP:-10}"
IDLE="${IDLE:-10}"
TIER_MIX="${TIER_MIX:-fast=0.1,priority=0.2,standard=0.4,batch=0.3}"
PROMPT_LEN="${PROMPT_LEN:-lognormal:64:0.5:512}"
OUTPUT_LEN="${OUTPUT_LEN:-uniform:16:64}"
SEED="${SEED:-1}"
PORT="${PORT:-8000}"
METRICS_URLS="${METRICS_URLS:-}"
default_start='JOULE_POLICY={policy} ROOT/deploy/local/up.sh --no-build --port {port}'
CLUSTER_START="${CLUSTER_START:-${default_start//ROOT/$root}}"
READY_PATH="${READY_PATH:-/v1/models}"
OUT="${OUT:-$root/bench/results/energy-$(date +%Y%m%d-%H%M%S)}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

bench="$BUILD/bench/energy/joule-bench"
[ -x "$bench" ] || { echo "no $bench: build the joule-bench target first" >&2; exit 1; }
mkdir -p "$OUT"
url="http://127.0.0.1:$PORT"
cluster_pid=""

stop_cluster() {
  if [ -n "$cluster_pid" ]; then
    # The cluster runs in its own session (setsid): signal that process group only.
    kill -TERM -- "-$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
    cluster_pid=""
  fi
}
trap stop_cluster EXIT

for policy in $POLICIES; do
  cmd="${CLUSTER_START//\{policy\}/$policy}"
  cmd="${cmd//\{port\}/$PORT}"
  echo "[sweep] policy $policy: $cmd" >&2
  setsid bash -c "$cmd" >"$OUT/cluster-$policy.log" 2>&1 &
  cluster_pid=$!
  ready=0
  for _ in $(seq 1 300); do
    if curl -sf -o /dev/null "$url$READY_PATH"; then ready=1; break; fi
    kill -0 "$cluster_pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ "$ready" != 1 ]; then
    echo "[sweep] cluster for $policy did not become ready at $url$READY_PATH; log:" >&2
    tail -20 "$OUT/cluster-$policy.log" >&2
    exit 1
  fi
  for rate in $RATES; do
    echo "[sweep] policy $policy, rate $rate req/s" >&2
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    "$bench" --url "$url" --rate "$rate" --duration-s "$DURATION" --warmup-s "$WARMUP" \
      --idle-s "$IDLE" --tier-mix "$TIER_MIX" --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" \
      --seed "$SEED" --metrics-urls "$METRICS_URLS" --label "$policy" \
      --out "$OUT/$policy-rate$rate" $EXTRA_ARGS >/dev/null
  done
  stop_cluster
done

# One CSV with every run (the per-run header once).
first=1
for f in "$OUT"/*-rate*.csv; do
  if [ "$first" = 1 ]; then cat "$f"; first=0; else tail -n +2 "$f"; fi
done >"$OUT/all.csv"
echo "[sweep] results in $OUT (all.csv, one JSON per run)" >&2
if /usr/bin/python3 -c "import matplotlib" 2>/dev/null; then
  /usr/bin/python3 "$root/bench/energy/plot.py" "$OUT"
else
  echo "[sweep] no matplotlib: apt-get install python3-matplotlib (JOULE_BENCH_PACKAGES), then" \
       "/usr/bin/python3 bench/energy/plot.py $OUT" >&2
fi
