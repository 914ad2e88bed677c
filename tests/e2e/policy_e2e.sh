#!/usr/bin/env bash
# End-to-end: one scheduling policy (fcfs | priority | ipw) in a real coordinator
# in front of two workers over UCX shared memory, on the tiny model, driven over
# HTTP by policy_e2e_client.py (every tier at once; energy attribution adds up).
#   policy_e2e.sh BUILD_DIR MODEL_DIR POLICY
set -euo pipefail
BUILD="$1"
MODEL="$2"
POLICY="$3"
WORKERS=2
export UCX_TLS=shm,self
source "$(dirname "$0")/cluster_lib.sh"

# Short holds so that ipw's deferral of batch work fits a test's time; one request in flight
# per rank, so that requests queue at the coordinator and the policy picks who goes next.
# The workers run at most 48 sequences (--max-running), fewer than the scheduler's 128.
cat >"$E2E_TMP/scheduler.json" <<JSON
{"batch_max_wait_ms": 3000, "max_inflight_per_rank": 1, "ipw": {"valley_hold_ms": 1000}}
JSON
e2e_start_coordinator "" "$MODEL" "$WORKERS" --http-port 0 --http-port-file "$E2E_TMP/http_port" \
  --policy "$POLICY" --scheduler-config "$E2E_TMP/scheduler.json"
[ -s "$E2E_TMP/http_port" ] || e2e_fail "coordinator wrote no --http-port-file"
addr="127.0.0.1:$E2E_PORT"
metrics=()
for r in $(seq 0 $((WORKERS - 1))); do
  e2e_start_worker "" "w$r" "$addr" "$MODEL" --metrics-port 0 --metrics-port-file "$E2E_TMP/metrics.$r" \
    --energy-source model --max-running 48
done
e2e_wait_ready "" "$addr" "$WORKERS"
for r in $(seq 0 $((WORKERS - 1))); do metrics+=("$(cat "$E2E_TMP/metrics.$r")"); done
grep -q "policy=$POLICY" "$E2E_TMP/coordinator.err" || e2e_fail "coordinator did not log policy=$POLICY"
/usr/bin/python3 "$(dirname "$0")/policy_e2e_client.py" --port "$(cat "$E2E_TMP/http_port")" \
  --model "$(basename "$MODEL")" --worker-metrics "$(IFS=,; echo "${metrics[*]}")" \
  --dashboard "$(dirname "$0")/../../deploy/grafana/joule-dashboard.json" --policy "$POLICY" ||
  e2e_fail "policy $POLICY checks failed"
# The workers report their engine limits at registration; the scheduler plans within them.
for r in $(seq 0 $((WORKERS - 1))); do
  grep -qF "rank $r runs at most 48 sequences (--max-running); the scheduler's max_running 128 is capped to it" \
    "$E2E_TMP/coordinator.err" || e2e_fail "coordinator did not log rank $r's --max-running 48"
done
echo "PASS: policy $POLICY on $(basename "$MODEL"), EP=$WORKERS"
