#!/usr/bin/env bash
# A cluster on one GPU host for the benchmarks (bench/energy/sweep.sh with DEVICE=cuda:N, and
# bench/engine/gpu_run.sh): one joule-coordinator and N `joule-worker --device DEV` on this host,
# from a build tree or the GPU bundle (tests/gpu/bundle.sh: binaries in bin/, libraries from
# tests/gpu/env.sh). Serves until it gets SIGTERM or SIGINT, which stop every process it started.
# Once every rank is ready it prints "serving until Ctrl-C" (sweep.sh's READY_LOG) and writes
# RUN_DIR/ready; the ports are in RUN_DIR/http_port and RUN_DIR/metrics_port.R.
#
# --device fake (tests only: joule-worker-fake-device, the model meter) runs the same on the CPU.
#
#   bench/energy/gpu_cluster.sh --build DIR --model DIR [--workers 1] [--device cuda:0]
#       [--port 8000] [--metrics-port 9100] [--policy priority] [--scheduler-config FILE]
#       [--kv-cache-mb 4096] [--energy-source nvml] [--run-dir DIR] [-- MORE WORKER FLAGS]
#
# --port and --metrics-port 0 pick free ports (worker r serves /metrics on --metrics-port + r
# otherwise). Every worker gets a fixed KV cache (--gpu-memory-utilization 0 --kv-cache-mb M):
# workers sharing a GPU must (a fraction of the GPU counts the memory the others already hold,
# docs/operations.md), and a single worker gets the same so that EP 1 and EP N compare equal
# caches. NVML meters the whole GPU, so every worker on one GPU reads the same counter: sum one
# worker's /metrics per GPU, not all of them. Internal gRPC runs without TLS (every process
# listens on 127.0.0.1 only); UCX over shared memory unless UCX_TLS says otherwise. Every worker
# meters its own GPU by PCI bus id; JOULE_WORKER_* variables reach every worker (e.g.
# JOULE_WORKER_NVML_PCI_BUS_ID names another GPU to meter), as do flags after --.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

build="" model="" workers=1 device=cuda:0 port=8000 metrics_port=9100 policy=priority
scheduler_config="" kv_cache_mb=4096 energy_source=nvml run_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --metrics-port) metrics_port="$2"; shift 2 ;;
    --policy) policy="$2"; shift 2 ;;
    --scheduler-config) scheduler_config="$2"; shift 2 ;;
    --kv-cache-mb) kv_cache_mb="$2"; shift 2 ;;
    --energy-source) energy_source="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "gpu_cluster.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
worker_flags=("$@")
if [ -z "$build" ] || [ -z "$model" ]; then echo "gpu_cluster.sh: --build and --model are required" >&2; exit 2; fi
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_cluster.sh: --workers: a positive integer, got '$workers'" >&2; exit 2; }
[ -f "$model/config.json" ] || { echo "gpu_cluster.sh: --model: no config.json in '$model'" >&2; exit 2; }

# binary NAME BUILD_SUBDIR: the binary in a build tree, a bundle (bin/) or a flat directory.
binary() {
  local p
  for p in "$build/$2/$1" "$build/bin/$1" "$build/$1"; do
    [ -x "$p" ] && { echo "$p"; return 0; }
  done
  echo "gpu_cluster.sh: no $1 in $build ($2/, bin/ or the directory itself)" >&2
  return 1
}
coordinator_bin=$(binary joule-coordinator coordinator)
worker_bin=$(binary joule-worker worker/service)
# The fake device (tests only) is in a test build of the worker, and has no NVML.
if [ "$device" = fake ]; then
  worker_bin=$(binary joule-worker-fake-device worker/service)
  [ "$energy_source" != nvml ] || energy_source=model
fi
cli_bin=$(binary joule-cli coordinator/cli)

# Only our binaries get the bundle's libraries (tests/gpu/env.sh): the host's tools keep theirs.
if [ -z "${JOULE_GPU_LD:-}" ]; then
  [ -d "$build/lib" ] && export JOULE_GPU_BUNDLE="$build"
  source "$root/tests/gpu/env.sh"
  joule_gpu_find_libraries || true  # env.sh is for scripts without set -e (find fails on absent dirs)
fi
run() { LD_LIBRARY_PATH="$JOULE_GPU_LD" "$@"; }
# spawn CMD... &: the same in the background, exec'd so that $! is the process itself (with
# run, $! is a subshell: stop() would signal and wait for it while the process, still holding
# its port and GPU, outlives it, and the next cluster fails to bind).
spawn() { LD_LIBRARY_PATH="$JOULE_GPU_LD" exec "$@"; }
export UCX_TLS="${UCX_TLS:-shm,self}" UCX_WARN_UNUSED_ENV_VARS=n

[ -n "$run_dir" ] || run_dir="$(mktemp -d /tmp/joule-gpu-cluster.XXXXXX)"
mkdir -p "$run_dir"
rm -f "$run_dir"/{port,http_port,ready} "$run_dir"/metrics_port.*
pids=()
stop() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop EXIT
trap 'exit 0' INT TERM

spawn "$coordinator_bin" --model "$model" --workers "$workers" --port 0 --port-file "$run_dir/port" \
  --http-port "$port" --http-port-file "$run_dir/http_port" --policy "$policy" \
  ${scheduler_config:+--scheduler-config "$scheduler_config"} \
  >"$run_dir/coordinator.out" 2>"$run_dir/coordinator.log" &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$run_dir/port" ] && [ -s "$run_dir/http_port" ] && break; sleep 0.1; done
[ -s "$run_dir/http_port" ] || { tail "$run_dir/coordinator.log" >&2; echo "coordinator did not start" >&2; exit 1; }
addr="127.0.0.1:$(cat "$run_dir/port")"

# Each worker's share of this host's cores drives its step loop; the GPU does the math.
threads=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
for r in $(seq 0 $((workers - 1))); do
  worker_metrics_port=0
  [ "$metrics_port" = 0 ] || worker_metrics_port=$((metrics_port + r))
  spawn "$worker_bin" --coordinator "$addr" --model "$model" --device "$device" --threads "$threads" \
    --gpu-memory-utilization 0 --kv-cache-mb "$kv_cache_mb" --energy-source "$energy_source" \
    --metrics-port "$worker_metrics_port" --metrics-port-file "$run_dir/metrics_port.$r" \
    ${worker_flags[@]+"${worker_flags[@]}"} >"$run_dir/worker$r.out" 2>"$run_dir/worker$r.log" &
  pids+=($!)
done

echo "[gpu_cluster] $workers worker(s) on $device, model $model, policy $policy; logs in $run_dir" >&2
for _ in $(seq 1 1200); do
  if [ "$(run "$cli_bin" status --coordinator "$addr" 2>/dev/null | grep -c ': ready')" = "$workers" ]; then
    touch "$run_dir/ready"
    break
  fi
  for i in "${!pids[@]}"; do  # a process that exits (no GPU, no NVML, bad model) says why
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      log="$run_dir/coordinator.log"
      [ "$i" = 0 ] || log="$run_dir/worker$((i - 1)).log"
      tail -5 "$log" >&2
      echo "[gpu_cluster] a process exited before the cluster was ready (log: $log)" >&2
      exit 1
    fi
  done
  sleep 0.25
done
[ -f "$run_dir/ready" ] || { echo "[gpu_cluster] not ready after 300 s (logs: $run_dir)" >&2; exit 1; }
run "$cli_bin" status --coordinator "$addr" >&2
echo "[gpu_cluster] HTTP http://127.0.0.1:$(cat "$run_dir/http_port"), worker metrics ports:" \
  "$(cat "$run_dir"/metrics_port.* 2>/dev/null | paste -sd' ' -)" >&2
echo "serving until Ctrl-C"
wait "${pids[0]}"
