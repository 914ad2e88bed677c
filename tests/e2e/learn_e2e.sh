#!/usr/bin/env bash
# The scheduler learns from telemetry (learn_e2e.py): the same workload against a
# one-worker cluster under ipw, first as it is, then with the worker slowed by an
# injected delay per step and per token; the coordinator's learned step-time
# model must find the delay within a bounded number of steps and ipw's step cap
# for the standard tier must follow it.
#   learn_e2e.sh BUILD_DIR MODEL_DIR
set -euo pipefail
BUILD="$1"
MODEL="$2"
DELAY_US=5000
PER_TOKEN_US=400
REQUESTS=40
export UCX_TLS=shm,self
source "$(dirname "$0")/cluster_lib.sh"
client="$(dirname "$0")/learn_e2e.py"

# run_phase NAME [worker flags...]: one cluster, the workload, then the cluster stops.
run_phase() {
  local name="$1"
  shift
  e2e_start_coordinator "" "$MODEL" 1 --policy ipw --http-port 0 --http-port-file "$E2E_TMP/http_port"
  e2e_start_worker "" "w-$name" "127.0.0.1:$E2E_PORT" "$MODEL" "$@"
  e2e_wait_ready "" "127.0.0.1:$E2E_PORT" 1
  /usr/bin/python3 "$client" run "$(cat "$E2E_TMP/http_port")" "$(basename "$MODEL")" "$REQUESTS" \
    "$E2E_TMP/$name.json" || e2e_fail "$name: the workload failed"
  for pid in "${E2E_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  E2E_PIDS=()
}
run_phase base
run_phase slowed --inject-step-delay-us "$DELAY_US" --inject-delay-per-token-us "$PER_TOKEN_US"
/usr/bin/python3 "$client" check "$E2E_TMP/base.json" "$E2E_TMP/slowed.json" "$DELAY_US" "$PER_TOKEN_US" ||
  e2e_fail "the slowed worker was not learned"
