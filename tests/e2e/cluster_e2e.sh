#!/usr/bin/env bash
# End-to-end: a coordinator and N joule-worker processes exchanging tokens over
# UCX (transport layer chosen by UCX_TLS) must produce the same greedy tokens
# as the single-process engine, for several prompts served by different ranks.
#   cluster_e2e.sh BUILD_DIR MODEL_DIR WORKERS UCX_TLS
set -euo pipefail
BUILD="$1"
MODEL="$2"
WORKERS="$3"
export UCX_TLS="$4"
source "$(dirname "$0")/cluster_lib.sh"

e2e_start_coordinator "" "$MODEL" "$WORKERS"
addr="127.0.0.1:$E2E_PORT"
for r in $(seq 0 $((WORKERS - 1))); do
  e2e_start_worker "" "w$r" "$addr" "$MODEL"
done
e2e_wait_ready "" "$addr" "$WORKERS"

prompts=("1,2,3,4,5" "72,101,108,108,111,44,32,119,111,114,108,100" "257,115,121,115,116,101,109,10" "9")
n=10
# Concurrently, so that several ranks hold requests in the same steps.
clients=()
for i in "${!prompts[@]}"; do
  e2e_cluster_tokens "" "$addr" "${prompts[$i]}" $n >"$E2E_TMP/cluster.$i" &
  clients+=($!)
done
for pid in "${clients[@]}"; do wait "$pid" || true; done
for i in "${!prompts[@]}"; do
  got="$(cat "$E2E_TMP/cluster.$i")"
  want="$(e2e_engine_tokens "$MODEL" "${prompts[$i]}" $n)"
  [ -n "$want" ] || e2e_fail "single-process engine produced nothing for prompt $i"
  [ "$got" = "$want" ] || e2e_fail "prompt $i: cluster (EP=$WORKERS, UCX_TLS=$UCX_TLS) gave [$got], engine gave [$want]"
done

# The cluster runs with mutual TLS and a cluster token (cluster_lib.sh): a
# client without the token, without a certificate, or with one from another CA
# is refused with a message saying so.
refused() {  # refused WHAT PATTERN [env -u ... / flags...]: joule-cli generate must fail
  local what="$1" pattern="$2"
  shift 2
  if "$@" "$BUILD/coordinator/cli/joule-cli" generate --coordinator "$addr" --prompt-ids 1,2,3 \
      --max-tokens 2 --timeout-s 10 >"$E2E_TMP/refused.out" 2>"$E2E_TMP/refused.err"; then
    e2e_fail "joule-cli generate $what was served"
  fi
  grep -q "$pattern" "$E2E_TMP/refused.err" ||
    e2e_fail "joule-cli generate $what: expected '$pattern' in: $(cat "$E2E_TMP/refused.err")"
}
if [ "${E2E_INSECURE:-0}" != 1 ]; then
  refused "without the cluster token" "UNAUTHENTICATED: missing or wrong cluster token" \
    env -u JOULE_CLUSTER_TOKEN
  refused "with a wrong cluster token" "UNAUTHENTICATED: missing or wrong cluster token" \
    env JOULE_CLUSTER_TOKEN="${JOULE_CLUSTER_TOKEN}0"
  refused "without a certificate" "UNAVAILABLE" env -u JOULE_TLS_CERT -u JOULE_TLS_KEY -u JOULE_TLS_CA
  "$E2E_LIB_DIR/../../deploy/local/make_secrets.sh" "$E2E_TMP/other-ca"
  refused "with a certificate from another CA" "UNAVAILABLE" \
    env JOULE_TLS_CERT="$E2E_TMP/other-ca/node.pem" JOULE_TLS_KEY="$E2E_TMP/other-ca/node.key"
fi
echo "PASS: EP=$WORKERS UCX_TLS=$UCX_TLS $(basename "$MODEL"): ${#prompts[@]} prompts match the single-process engine$(
  [ "${E2E_INSECURE:-0}" = 1 ] || echo "; clients without the token or a cluster certificate refused")"
