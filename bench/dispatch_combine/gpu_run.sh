#!/usr/bin/env bash
# Dispatch/combine on one GPU, with its baseline in the same run:
#   * ExpertParallelExecutor ranks (joule-dispatch-combine-bench --device cuda:N), EP 2 and then
#     EP 4 rank processes all on the same GPU: rows through CUDA IPC windows, control messages
#     (counts, router choices, barriers) over UCX shared memory in host memory; hidden 7168,
#     top-8 of 64 experts, 128 and 4096 tokens per rank;
#   * cudaMemcpyAsync device-to-device on the same GPU at the same payload sizes
#     (joule-memcpy-bench), after the ranks are done;
#   * two-batch overlap: EP 2 with experts that do real work (moe_intermediate TBO_INTERMEDIATE,
#     default 256), each Run as one batch and then as two overlapped micro-batches
#     (--two-batch-overlap), the same points: the Run time of each and their ratio.
# Writes OUT/dispatch_combine-gpu.{json,md} (gpu_report.py): the GPU, per point the dispatch and
# combine latency, bandwidth and its ratio to cudaMemcpy, and the row path each rank logged;
# raw JSON lines and rank logs in OUT/dispatch_combine-gpu-raw/. Exit status 1 when a
# measurement failed (the report still shows what ran). About a minute on an H100.
#
#   bench/dispatch_combine/gpu_run.sh [BUNDLE_OR_BUILD_DIR] [--out DIR] [--device cuda:0|fake]
#
# BUNDLE_OR_BUILD_DIR: a GPU bundle (tests/gpu/bundle.sh's .gpu/: binaries in bin/) or a build
# tree (binaries in bench/dispatch_combine/); default .gpu/ when it has the binaries, else
# build/default. OUT defaults to bench/results/. EPS (default "2 4"), TOKENS ("128,4096") and
# HIDDEN ("7168") narrow or widen the sweep; TARGET_SECONDS (default 1) is each point's time.
# --device fake runs every step on the CPU-backed fake device, the memcpy baseline included
# (tests/bench/dispatch_combine/gpu_run_fake_device.sh: CI's check of this script).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out=$root/bench/results
device=cuda:0
from=""
args="$*"
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    -*) echo "gpu_run.sh: unknown argument '$1'" >&2; exit 2 ;;
    *) from=$1; shift ;;
  esac
done
eps=${EPS:-2 4}
tokens=${TOKENS:-128,4096}
hidden=${HIDDEN:-7168}

# The binaries: a bundle's bin/, or a build tree's bench/dispatch_combine/.
[ -n "$from" ] || { [ -x "$root/.gpu/bin/joule-dispatch-combine-bench" ] && from=$root/.gpu; } ||
  from=$root/build/default
if [ -x "$from/bin/joule-dispatch-combine-bench" ]; then
  bin=$from/bin
  export JOULE_GPU_BUNDLE=$from  # its lib/ goes first on the library path
else
  bin=$from/bench/dispatch_combine
fi
source "$root/tests/gpu/env.sh"
[ -n "${JOULE_GPU_LD:-}" ] || joule_gpu_find_libraries
raw=$out/dispatch_combine-gpu-raw
rm -rf "$raw" && mkdir -p "$raw"
failures=()
fail() { echo "FAILED: $*"; failures+=("$*"); }
for b in joule-dispatch-combine-bench joule-memcpy-bench; do
  [ -x "$bin/$b" ] || fail "$bin/$b is missing (build it with CUDA; tests/gpu/bundle.sh packs it)"
done

if [ "$device" = fake ]; then
  echo "fake device (CPU-backed; a CI smoke test that measures nothing about a GPU)" > "$raw/nvidia-smi.csv"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,pci.bus_id --format=csv,noheader \
    -i "${device#cuda:}" > "$raw/nvidia-smi.csv" 2>&1 || fail "nvidia-smi: $(cat "$raw/nvidia-smi.csv")"
fi

export UCX_TLS=shm,self UCX_WARN_UNUSED_ENV_VARS=n JOULE_LOG_LEVEL=info
# ep_run EP NAME [FLAGS]: EP rank processes on $device, the file rendezvous in a fresh
# directory; rank 0's lines in $raw/joule-NAME.jsonl, every rank's log in $raw/NAME-rankR.log.
ep_run() {
  local ep=$1 name=$2 dir pids=() rc=0 r
  shift 2
  dir=$(mktemp -d)
  # --foreground: the timeouts stay in the caller's process group, so a check's timeout
  # (tests/gpu/run.sh) that kills the group kills the ranks too.
  for ((r = 0; r < ep; r++)); do
    LD_LIBRARY_PATH=$JOULE_GPU_LD timeout --foreground -k 5 100 "$bin/joule-dispatch-combine-bench" \
      --rank "$r" --world "$ep" --dir "$dir" --device "$device" --hidden "$hidden" \
      --tokens "$tokens" --top-k 8 --experts 64 --target-seconds "${TARGET_SECONDS:-1}" --max-iters 500 \
      --out "$raw/joule-$name.jsonl" "$@" 2> "$raw/$name-rank$r.log" &
    pids+=($!)
  done
  for r in "${pids[@]}"; do wait "$r" || rc=$?; done
  rm -rf "$dir"
  return "$rc"
}
if [ -x "$bin/joule-dispatch-combine-bench" ]; then
  for ep in $eps; do
    echo "EP $ep on $device: hidden $hidden, tokens per rank $tokens ($(date +%T))"
    ep_run "$ep" "ep$ep" || fail "EP $ep (exit $?): $(tail -n 3 "$raw"/ep"$ep"-rank*.log | tr '\n' ' ')"
    grep -h "rows through\|dispatch/combine" "$raw"/ep"$ep"-rank*.log
  done
  for mode in one two; do
    echo "Two-batch overlap: EP 2, moe_intermediate ${TBO_INTERMEDIATE:-256}, $mode batch(es) per Run ($(date +%T))"
    flags=(--moe-intermediate "${TBO_INTERMEDIATE:-256}")
    [ "$mode" = one ] || flags+=(--two-batch-overlap)
    ep_run 2 "tbo-$mode" "${flags[@]}" ||
      fail "two-batch overlap, $mode (exit $?): $(tail -n 3 "$raw"/tbo-"$mode"-rank*.log | tr '\n' ' ')"
  done
fi
if [ -x "$bin/joule-memcpy-bench" ]; then
  echo "cudaMemcpyAsync D2D on $device ($(date +%T))"
  LD_LIBRARY_PATH=$JOULE_GPU_LD timeout --foreground -k 5 60 "$bin/joule-memcpy-bench" --device "$device" \
    --ep "${eps// /,}" --hidden "$hidden" --tokens "$tokens" --top-k 8 --experts 64 --iters 100 \
    --out "$raw/memcpy.jsonl" || fail "joule-memcpy-bench (exit $?)"
fi

python3 "$root/bench/dispatch_combine/gpu_report.py" "$raw" "$out" \
  "bench/dispatch_combine/gpu_run.sh${args:+ $args}" || fail "gpu_report.py"
if [ ${#failures[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failures[@]}"
  exit 1
fi
