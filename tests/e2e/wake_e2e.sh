#!/usr/bin/env bash
# No penalty for waking up (wake_e2e.py) against a real coordinator and two workers.
#   wake_e2e.sh BUILD_DIR MODEL_DIR
set -euo pipefail
BUILD="$1"
MODEL="$2"
export UCX_TLS=shm,self
source "$(dirname "$0")/cluster_lib.sh"
e2e_start_coordinator "" "$MODEL" 2 --http-port 0 --http-port-file "$E2E_TMP/http_port"
addr="127.0.0.1:$E2E_PORT"
for r in 0 1; do e2e_start_worker "" "w$r" "$addr" "$MODEL"; done
e2e_wait_ready "" "$addr" 2
/usr/bin/python3 "$(dirname "$0")/wake_e2e.py" "$(cat "$E2E_TMP/http_port")" "$(basename "$MODEL")" ||
  e2e_fail "requests after an idle second are slower"
