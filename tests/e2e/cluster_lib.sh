# Helpers for the end-to-end cluster tests: start a coordinator and workers as
# real processes, wait until ready, and clean up everything on exit.
# shellcheck shell=bash

E2E_PIDS=()
E2E_TMP="$(mktemp -d /tmp/joule-e2e.XXXXXX)"

e2e_cleanup() {
  for pid in "${E2E_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${E2E_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$E2E_TMP"
}
trap e2e_cleanup EXIT
E2E_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Internal gRPC with mutual TLS and a cluster token, as deploy/local/up.sh runs
# it: joule-coordinator, joule-worker and joule-cli read JOULE_TLS_CERT,
# JOULE_TLS_KEY, JOULE_TLS_CA and JOULE_CLUSTER_TOKEN. (Re)makes the throwaway
# secrets in $E2E_TMP/secrets; the certificate also names each SAN given
# (IP:10.0.0.2). On by default; E2E_INSECURE=1 leaves both off.
e2e_secure() {
  "$E2E_LIB_DIR/../../deploy/local/make_secrets.sh" "$E2E_TMP/secrets" "$@"
  export JOULE_TLS_CERT="$E2E_TMP/secrets/node.pem" JOULE_TLS_KEY="$E2E_TMP/secrets/node.key"
  export JOULE_TLS_CA="$E2E_TMP/secrets/ca.pem"
  JOULE_CLUSTER_TOKEN="$(cat "$E2E_TMP/secrets/cluster-token")"
  export JOULE_CLUSTER_TOKEN
}
if [ "${E2E_INSECURE:-0}" != 1 ]; then
  e2e_secure
fi

e2e_fail() {
  echo "FAIL: $*" >&2
  for f in "$E2E_TMP"/*.err; do
    [ -f "$f" ] && { echo "--- $f (tail)" >&2; tail -5 "$f" >&2; }
  done
  exit 1
}

# e2e_start_coordinator PREFIX_CMD MODEL WORKERS [extra flags...] -> sets E2E_PORT
e2e_start_coordinator() {
  local prefix="$1" model="$2" workers="$3"
  shift 3
  rm -f "$E2E_TMP/port"
  $prefix "$BUILD/coordinator/joule-coordinator" --model "$model" --workers "$workers" --port 0 \
    --port-file "$E2E_TMP/port" --step-timeout-ms 5000 "$@" \
    >"$E2E_TMP/coordinator.out" 2>"$E2E_TMP/coordinator.err" &
  E2E_PIDS+=($!)
  for _ in $(seq 1 100); do
    [ -s "$E2E_TMP/port" ] && break
    sleep 0.1
  done
  [ -s "$E2E_TMP/port" ] || e2e_fail "coordinator did not start"
  E2E_PORT="$(cat "$E2E_TMP/port")"
}

# e2e_start_worker PREFIX_CMD NAME COORDINATOR_ADDR MODEL [extra flags...]
# (E2E_WORKER_BIN: another worker binary, e.g. joule-worker-fake-device)
e2e_start_worker() {
  local prefix="$1" name="$2" addr="$3" model="$4"
  shift 4
  $prefix "${E2E_WORKER_BIN:-$BUILD/worker/service/joule-worker}" --coordinator "$addr" --model "$model" \
    --threads 1 --kv-cache-mb 32 --payload f32 "$@" >"$E2E_TMP/$name.out" 2>"$E2E_TMP/$name.err" &
  E2E_PIDS+=($!)
}

# e2e_wait_ready PREFIX_CMD COORDINATOR_ADDR N
e2e_wait_ready() {
  local prefix="$1" addr="$2" n="$3"
  for _ in $(seq 1 120); do
    if [ "$($prefix "$BUILD/coordinator/cli/joule-cli" status --coordinator "$addr" 2>/dev/null | grep -c ': ready')" = "$n" ]; then
      return 0
    fi
    sleep 0.25
  done
  $prefix "$BUILD/coordinator/cli/joule-cli" status --coordinator "$addr" >&2 || true
  e2e_fail "cluster at $addr did not become ready with $n ranks"
}

# Greedy tokens through the cluster, comma separated.
e2e_cluster_tokens() {
  local prefix="$1" addr="$2" ids="$3" n="$4"
  $prefix "$BUILD/coordinator/cli/joule-cli" generate --coordinator "$addr" --prompt-ids "$ids" \
    --max-tokens "$n" --temperature 0 2>/dev/null | grep -E '^[0-9]+$' | paste -sd, -
}

# Greedy tokens of the single-process engine, comma separated.
e2e_engine_tokens() {
  local model="$1" ids="$2" n="$3"
  "$BUILD/worker/tools/joule-generate" --model "$model" --prompt-ids "$ids" --max-tokens "$n" \
    --ignore-eos --threads 1 | sed -n 's/^token ids: //p'
}
