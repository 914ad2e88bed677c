#!/usr/bin/env bash
# Dispatch/combine benchmark with its baselines, all in one run.
#
# Default stage, transport level:
#   - Joule's UcxTransport all-to-all-v (joule-transport-bench, EP processes),
#     over UCX shared memory (default, and with peer error handling) and TCP;
#   - ucx_perftest tag_bw (server + client on loopback) at the same per-peer sizes;
#   - OpenMPI MPI_Alltoallv (joule-mpi-alltoallv-bench) over shared memory and TCP.
#   Writes bench/results/dispatch_combine-transport.{json,md}.
# --executor, ExpertParallelExecutor level:
#   - ExpertParallelExecutor::Run on a synthetic one-MoE-layer Qwen3-MoE
#     checkpoint (joule-dispatch-combine-bench, EP processes), dispatch +
#     combine from its stats(), same UCX configurations;
#   - ucx_perftest tag_bw at the per-peer dispatch message size;
#   - OpenMPI count all-gather + dispatch and combine MPI_Alltoallv on the same
#     payloads (joule-mpi-alltoallv-bench --mode dispatch-combine).
#   Writes bench/results/dispatch_combine-executor.{json,md}.
#
#   bench/dispatch_combine/run.sh [BUILD_DIR] [--quick] [--executor]
# Environment: EPS (default "2 4"), CONFIGS (default "shm shm-peer tcp tcp-rt";
# tcp-rt is TCP with UcxOptions::receive_thread, which needs a spare core per
# rank to pay off).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="$root/build/default"
quick=""
stage=transport
for arg in "$@"; do
  case "$arg" in
    --quick) quick="--quick" ;;
    --executor) stage=executor ;;
    -*) echo "unknown flag $arg (usage: run.sh [BUILD_DIR] [--quick] [--executor])" >&2; exit 2 ;;
    *) build="$arg" ;;
  esac
done
bin="$build/bench/dispatch_combine"
tokens="1,4,16,64,128,256,1024,4096"
hidden="2048,7168"
eps="${EPS:-2 4}"
configs="${CONFIGS:-shm shm-peer tcp tcp-rt}"
if [ -n "$quick" ]; then tokens="1,128,1024"; hidden="2048"; fi
if [ "$stage" = executor ]; then
  joule_bin="$bin/joule-dispatch-combine-bench"; mpi_mode=dispatch-combine
else
  joule_bin="$bin/joule-transport-bench"; mpi_mode=alltoallv
fi
if [ ! -x "$joule_bin" ]; then echo "$joule_bin not built (configure with -DJOULE_BUILD_BENCH=ON)" >&2; exit 1; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export UCX_WARN_UNUSED_ENV_VARS=n

# One Joule run: EP processes of $joule_bin. $1 label, $2 EP, rest: env.
joule_run() {
  local label="$1" ep="$2"; shift 2
  local dir; dir="$(mktemp -d -p "$tmp")"
  local pids=()
  for ((r = 0; r < ep; r++)); do
    env "$@" "$joule_bin" --rank "$r" --world "$ep" --dir "$dir" \
      --hidden "$hidden" --tokens "$tokens" --out "$tmp/joule-$label.jsonl" \
      $( [ "$label" = shm-peer ] && echo --peer-errors=true ) \
      $( [ "$label" = tcp-rt ] && echo --recv-thread=true ) &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  rm -rf "$dir"
  return "$rc"
}

for ep in $eps; do
  for c in $configs; do
    echo "joule $stage, $c, EP $ep ($(date +%T))" >&2
    case "$c" in
      shm|shm-peer) joule_run "$c" "$ep" UCX_TLS=shm,self ;;
      tcp|tcp-rt) joule_run "$c" "$ep" UCX_TLS=tcp,self UCX_NET_DEVICES=lo ;;
      *) echo "unknown configuration $c" >&2; exit 2 ;;
    esac
  done
done

# ucx_perftest tag_bw at every per-peer size Joule measured.
sizes="$(cat "$tmp"/joule-*.jsonl | python3 -c '
import json, sys
print(" ".join(str(s) for s in sorted({json.loads(l).get("bytes_per_peer", 0) for l in sys.stdin if l.strip()} - {0})))')"
port=$((20000 + RANDOM % 20000))
perftest() {  # $1 label, $2 size, rest: env
  local label="$1" size="$2"; shift 2
  local iters=$(( 400000000 / size )); iters=$(( iters < 20 ? 20 : iters > 20000 ? 20000 : iters ))
  port=$((port + 1))
  env "$@" timeout --foreground 120 ucx_perftest -p "$port" -t tag_bw -s "$size" -n "$iters" >/dev/null 2>&1 &
  local server=$!
  local line=""
  for attempt in 1 2 3 4 5; do
    sleep 0.3
    line="$(env "$@" timeout --foreground 120 ucx_perftest 127.0.0.1 -p "$port" -t tag_bw -s "$size" -n "$iters" 2>/dev/null | grep '^Final:' || true)"
    [ -n "$line" ] && break
  done
  wait "$server" || true
  # Final: iters overhead50 overhead_avg overhead_overall bw_avg bw_overall(MB/s) rate_avg rate_overall
  [ -n "$line" ] && echo "{\"impl\":\"ucx_perftest\",\"tls\":\"$label\",\"bytes_per_peer\":$size,\"iters\":$iters,\"bw_MBps\":$(echo "$line" | awk '{print $7}')}" >> "$tmp/perftest.jsonl"
  return 0
}
for s in $sizes; do
  echo "ucx_perftest tag_bw $s bytes" >&2
  perftest shm "$s" UCX_TLS=shm,self
  perftest tcp "$s" UCX_TLS=tcp,self UCX_NET_DEVICES=lo
done

# OpenMPI MPI_Alltoallv (ob1 over the shared-memory BTL, and over TCP).
if [ -x "$bin/joule-mpi-alltoallv-bench" ] && command -v mpirun >/dev/null; then
  for ep in $eps; do
    echo "MPI_Alltoallv shm, EP $ep" >&2
    mpirun --allow-run-as-root --oversubscribe -np "$ep" --mca pml ob1 --mca btl self,vader \
      "$bin/joule-mpi-alltoallv-bench" --mode "$mpi_mode" --hidden "$hidden" --tokens "$tokens" \
      --out "$tmp/mpi-shm.jsonl"
    echo "MPI_Alltoallv tcp, EP $ep" >&2
    mpirun --allow-run-as-root --oversubscribe -np "$ep" --mca pml ob1 --mca btl self,tcp \
      --mca btl_tcp_if_include lo \
      "$bin/joule-mpi-alltoallv-bench" --mode "$mpi_mode" --hidden "$hidden" --tokens "$tokens" \
      --out "$tmp/mpi-tcp.jsonl"
  done
else
  echo "no MPI benchmark (install libopenmpi-dev openmpi-bin and rebuild): MPI columns stay empty" >&2
fi

python3 "$root/bench/dispatch_combine/report.py" "$tmp" "$root/bench/results" \
  "bench/dispatch_combine/run.sh ${build#$root/}${quick:+ $quick}$( [ "$stage" = executor ] && echo ' --executor')" \
  "$stage"
