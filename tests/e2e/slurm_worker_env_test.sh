#!/usr/bin/env bash
# deploy/slurm/worker.sh derives a worker's flags from Slurm's environment: rank, device and
# its share of the node's cores. A stand-in joule-worker prints the flags it was given.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
T="$(mktemp -d /tmp/joule-slurm-env.XXXXXX)"
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/bin/worker/service"
printf '#!/bin/sh\necho "$@"\n' >"$T/bin/worker/service/joule-worker"
chmod +x "$T/bin/worker/service/joule-worker"

# flags_of VAR=VALUE... -> the stand-in's arguments
flags_of() {
  rm -f "$T/worker5.out"
  env -i PATH="$PATH" JOULE_COORDINATOR=n1:50051 JOULE_MODEL=/m JOULE_BUILD_DIR="$T/bin" \
    JOULE_RUN_DIR="$T" SLURM_PROCID=5 "$@" "$ROOT/deploy/slurm/worker.sh"
  cat "$T/worker5.out"
}
expect() {  # expect WANTED_SUBSTRING VAR=VALUE...
  local want="$1"; shift
  local got; got="$(flags_of "$@")"
  [[ " $got " == *" $want "* ]] || { echo "FAIL: with $*: wanted '$want' in: $got" >&2; exit 1; }
}

expect "--rank 5 --device cpu"
expect "--threads 0 --workers-per-host 4" SLURM_STEP_TASKS_PER_NODE="4(x2),3" SLURM_NODEID=1
expect "--threads 0 --workers-per-host 3" SLURM_STEP_TASKS_PER_NODE="4(x2),3" SLURM_NODEID=2
expect "--threads 8" SLURM_CPUS_PER_TASK=8 SLURM_STEP_TASKS_PER_NODE=2
expect "--device cuda:0" SLURM_STEP_GPUS=3 CUDA_VISIBLE_DEVICES=3
expect "--device cpu" SLURM_STEP_GPUS=3 JOULE_DEVICE=cpu CUDA_VISIBLE_DEVICES=3
expect "--device cuda:2" JOULE_DEVICE=cuda SLURM_LOCALID=2
expect "--device cuda:2" JOULE_DEVICE=cuda SLURM_LOCALID=2 CUDA_VISIBLE_DEVICES=0,1,2,3
expect "--coordinator n1:50051 --model /m"
rc=0
env -i PATH="$PATH" JOULE_COORDINATOR=n1:50051 JOULE_MODEL=/m JOULE_BUILD_DIR="$T/bin" \
  JOULE_RUN_DIR="$T" SLURM_PROCID=5 JOULE_DEVICE=tpu "$ROOT/deploy/slurm/worker.sh" 2>"$T/err" || rc=$?
[ "$rc" = 2 ] && grep -q "JOULE_DEVICE" "$T/err" || { echo "FAIL: JOULE_DEVICE=tpu: rc $rc" >&2; exit 1; }
echo PASS
