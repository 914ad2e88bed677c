#!/usr/bin/env bash
# Prefix caching, on against off in one run (issue 26): for each setting of the
# workers' prefix cache, start a local cluster with it, run joule-bench on a
# shared-prefix workload (multi-turn conversations over a few long system
# prompts) and on one with no shared prefixes, stop the cluster; then write a
# table of TTFT p50/p99, tokens/s, tokens per joule and the cache's hit rate
# with on/off ratios (bench/energy/prefix_table.py, OUT/table.md).
#
#   RATE=0.2 DURATION=100 bench/energy/prefix_sweep.sh
#
# Settings (environment variables), besides sweep.sh's BUILD, PORT, METRICS_PORT,
# METRICS_URLS, CLUSTER_START, READY_PATH, READY_LOG and MODEL (bench/energy/cluster.sh):
#   RATE            requests/s of the shared-prefix workload, Poisson (0.2)
#   NOSHARE_RATE    requests/s of the no-shared-prefix workload (1)
#   DURATION WARMUP IDLE   seconds of load, of warm-up excluded, of idle power (100 16 5); WARMUP
#                   should cover (TURNS - 1) x TURN_GAP so conversations reach their later turns
#   CACHING         the worker setting per cluster, in this order ("true false":
#                   JOULE_WORKER_PREFIX_CACHING for every worker)
#   WORKLOADS       "shared none": the shared-prefix workload and the independent-prompt one
#   SHARED_PREFIXES SYSTEM_LEN TURNS TURN_LEN TURN_GAP   the conversations (4, uniform:1024:2048,
#                   3, uniform:32:128, 8 s): joule-bench's --shared-prefixes, --system-len,
#                   --turns, --turn-len, --turn-gap-s
#   NOSHARE_PROMPT_LEN  prompts of the no-shared-prefix workload (uniform:256:1024: shorter than
#                   the conversations' turns, so that a run has enough requests to see a small cost)
#   OUTPUT_LEN      max_tokens of both, reached (--ignore-eos) (uniform:32:64)
#   MAX_MODEL_LEN   joule-bench refuses a workload whose longest request exceeds it (4096, the mini model's)
#   SEED            workload seed (1): both settings send the same requests
#   POLICY SCHEDULER_CONFIG   the cluster's scheduling (fcfs, bench/energy/mini-slo-x2.json)
#   OUT             results directory (bench/results/prefix-cache-<date>)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$root/bench/energy/cluster.sh"  # BUILD PORT METRICS_* CLUSTER_START READY_* MODEL; cluster_start/stop
RATE="${RATE:-0.2}"
NOSHARE_RATE="${NOSHARE_RATE:-1}"
DURATION="${DURATION:-100}"
WARMUP="${WARMUP:-16}"
IDLE="${IDLE:-5}"
CACHING="${CACHING:-true false}"
WORKLOADS="${WORKLOADS:-shared none}"
SHARED_PREFIXES="${SHARED_PREFIXES:-4}"
SYSTEM_LEN="${SYSTEM_LEN:-uniform:1024:2048}"
TURNS="${TURNS:-3}"
TURN_LEN="${TURN_LEN:-uniform:32:128}"
TURN_GAP="${TURN_GAP:-8}"
NOSHARE_PROMPT_LEN="${NOSHARE_PROMPT_LEN:-uniform:256:1024}"
OUTPUT_LEN="${OUTPUT_LEN:-uniform:32:64}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-4096}"
SEED="${SEED:-1}"
POLICY="${POLICY:-fcfs}"
SCHEDULER_CONFIG="${SCHEDULER_CONFIG:-$root/bench/energy/mini-slo-x2.json}"
OUT="${OUT:-$root/bench/results/prefix-cache-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

# The cache's own counters (summed over the workers), read at the window's edges.
counters="joule_prefix_cache_queries_total,joule_prefix_cache_hits_total,joule_prompt_tokens_total"
common_flags=(--url "$url" --model "$MODEL" --duration-s "$DURATION" --warmup-s "$WARMUP"
  --idle-s "$IDLE" --tier-mix standard=1 --output-len "$OUTPUT_LEN" --ignore-eos --seed "$SEED"
  --max-model-len "$MAX_MODEL_LEN" --metrics-urls "$METRICS_URLS" --window-counters "$counters")
workload_flags() {
  case "$1" in
    shared) echo --rate "$RATE" --shared-prefixes "$SHARED_PREFIXES" --system-len "$SYSTEM_LEN" --turns "$TURNS" \
              --turn-len "$TURN_LEN" --turn-gap-s "$TURN_GAP" ;;
    none) echo --rate "$NOSHARE_RATE" --prompt-len "$NOSHARE_PROMPT_LEN" ;;
    *) echo "WORKLOADS: unknown workload '$1' (shared, none)" >&2; return 1 ;;
  esac
}
for workload in $WORKLOADS; do workload_flags "$workload" >/dev/null; done
for caching in $CACHING; do
  case "$caching" in true|false) ;; *) echo "CACHING: 'true' or 'false', got '$caching'" >&2; exit 2 ;; esac
done

echo "before: $(uptime)" >"$OUT/load.txt"
for caching in $CACHING; do
  echo "[prefix-sweep] prefix caching $caching" >&2
  cluster_start "$POLICY" "$SCHEDULER_CONFIG" "$OUT/cluster-cache-$caching.log" \
    JOULE_WORKER_PREFIX_CACHING="$caching"
  for workload in $WORKLOADS; do
    echo "[prefix-sweep] prefix caching $caching, workload $workload" >&2
    # shellcheck disable=SC2046  # workload_flags prints a list of flags
    "$bench" "${common_flags[@]}" $(workload_flags "$workload") --label "$workload-cache-$caching" \
      --out "$OUT/$workload-cache-$caching" >/dev/null 2>"$OUT/$workload-cache-$caching.log"
    tail -3 "$OUT/$workload-cache-$caching.log" >&2
  done
  cluster_stop
  # The workers say at start-up whether they cache prefixes, the coordinator
  # whether it routes by prefix (scheduler config prefix_affinity); keep those lines.
  run_dir="$(sed -n -e 's/.*logs were in //p' -e 's/^  logs:  //p' "$OUT/cluster-cache-$caching.log" | tail -1)"
  if [ -n "$run_dir" ]; then
    grep -h -e "prefix caching" -e "prefix_affinity" "$run_dir"/worker*.log "$run_dir"/coordinator.log \
      >>"$OUT/cluster-cache-$caching.log" 2>/dev/null || true
  fi
done
echo "after: $(uptime)" >>"$OUT/load.txt"

/usr/bin/python3 "$root/bench/energy/prefix_table.py" "$OUT" | tee "$OUT/table.md"
