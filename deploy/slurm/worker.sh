#!/usr/bin/env bash
# One Joule worker per Slurm task, started by deploy/slurm/joule.sbatch through srun. Its rank,
# device and share of the node's cores come from Slurm's environment:
#   rank    SLURM_PROCID (task 0..N-1 of the step)
#   device  cuda:0 when Slurm bound GPUs to the task (--gpus-per-task: CUDA_VISIBLE_DEVICES
#           names just them), cuda:SLURM_LOCALID when JOULE_DEVICE=cuda without binding, else cpu
#   cores   SLURM_CPUS_PER_TASK when set; otherwise the usable cores divided by this node's tasks
set -euo pipefail
: "${JOULE_COORDINATOR:?}" "${JOULE_MODEL:?}" "${JOULE_BUILD_DIR:?}" "${JOULE_RUN_DIR:?}"
rank="${SLURM_PROCID:?not a Slurm task}"

# SLURM_STEP_TASKS_PER_NODE is like "4(x2),3": the count for node i of the step.
tasks_on_this_node() {
  local i=0 item count times
  IFS=, read -ra items <<<"${SLURM_STEP_TASKS_PER_NODE:-1}"
  for item in "${items[@]}"; do
    count="${item%%(*}" times=1
    [[ "$item" =~ \(x([0-9]+)\) ]] && times="${BASH_REMATCH[1]}"
    if [ "${SLURM_NODEID:-0}" -lt $((i + times)) ]; then echo "$count"; return; fi
    i=$((i + times))
  done
  echo 1
}

device="${JOULE_DEVICE:-auto}"
if [ "$device" = auto ]; then
  device=cpu
  [ -z "${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-}}" ] || [ -z "${CUDA_VISIBLE_DEVICES:-}" ] || device=cuda
fi
case "$device" in
  cpu) ;;
  cuda) if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [[ "$CUDA_VISIBLE_DEVICES" != *,* ]]; then
          device=cuda:0  # Slurm bound exactly one GPU to this task
        else
          device="cuda:${SLURM_LOCALID:-0}"
        fi ;;
  *) echo "JOULE_DEVICE: must be auto, cpu or cuda, got '$device'" >&2; exit 2 ;;
esac

threads=(--threads 0 --workers-per-host "$(tasks_on_this_node)")
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || threads=(--threads "$SLURM_CPUS_PER_TASK")

# shellcheck disable=SC2086  # JOULE_WORKER_ARGS is a list of flags
exec "$JOULE_BUILD_DIR/worker/service/joule-worker" --coordinator "$JOULE_COORDINATOR" \
  --model "$JOULE_MODEL" --rank "$rank" --device "$device" "${threads[@]}" \
  --grpc-host "${JOULE_BIND_HOST:-0.0.0.0}" --metrics-host "${JOULE_BIND_HOST:-0.0.0.0}" \
  --metrics-port 0 --metrics-port-file "$JOULE_RUN_DIR/metrics_port.$rank" \
  ${JOULE_WORKER_ARGS:-} >"$JOULE_RUN_DIR/worker$rank.out" 2>"$JOULE_RUN_DIR/worker$rank.log"
