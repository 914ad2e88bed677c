#!/usr/bin/env bash
# End-to-end: the OpenAI-compatible HTTP API of a real coordinator in front of
# two joule-worker processes exchanging tokens over UCX shared memory, driven by
# http_e2e_client.py (completions and chat, streamed and not, every tier, usage
# counts, stop strings, errors, a shared prompt found in the prefix cache, 256
# concurrent streams, and a client that disconnects mid-stream freeing its KV
# blocks).
#   http_e2e.sh BUILD_DIR MODEL_DIR
set -euo pipefail
BUILD="$1"
MODEL="$2"
WORKERS=2
export UCX_TLS=shm,self
source "$(dirname "$0")/cluster_lib.sh"

# The caps are raised so that the concurrent streams measure serving, not admission.
e2e_start_coordinator "" "$MODEL" "$WORKERS" --http-port 0 --http-port-file "$E2E_TMP/http_port" \
  --tier-queue-cap fast=1024,priority=1024,standard=1024,batch=1024
[ -s "$E2E_TMP/http_port" ] || e2e_fail "coordinator wrote no --http-port-file"
addr="127.0.0.1:$E2E_PORT"
http_port="$(cat "$E2E_TMP/http_port")"
sleep 0.2
grep -q "^http listening on 127.0.0.1:$http_port\$" "$E2E_TMP/coordinator.out" ||
  e2e_fail "coordinator did not print 'http listening on 127.0.0.1:$http_port'"

metrics=()
for r in $(seq 0 $((WORKERS - 1))); do
  e2e_start_worker "" "w$r" "$addr" "$MODEL" --metrics-port 0 --metrics-port-file "$E2E_TMP/metrics.$r"
done
e2e_wait_ready "" "$addr" "$WORKERS"
for r in $(seq 0 $((WORKERS - 1))); do
  [ -s "$E2E_TMP/metrics.$r" ] || e2e_fail "worker $r wrote no --metrics-port-file"
  metrics+=("$(cat "$E2E_TMP/metrics.$r")")
done

/usr/bin/python3 "$(dirname "$0")/http_e2e_client.py" --port "$http_port" --model "$(basename "$MODEL")" \
  --worker-metrics "$(IFS=,; echo "${metrics[*]}")" --concurrency "${HTTP_E2E_CONCURRENCY:-256}" ||
  e2e_fail "HTTP API checks failed"
echo "PASS: HTTP API on $(basename "$MODEL"), EP=$WORKERS over UCX shm"
