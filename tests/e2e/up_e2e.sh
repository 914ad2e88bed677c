#!/usr/bin/env bash
# End-to-end: deploy/local/up.sh (the README's first command) without its
# install and build steps: a coordinator and workers on the built-in tiny
# model, one answer per tier, each worker with its share of the cores; bad
# flags exit 2 naming the flag.
#   up_e2e.sh BUILD_DIR
set -euo pipefail
BUILD="$1"
root="$(cd "$(dirname "$0")/../.." && pwd)"
up="$root/deploy/local/up.sh"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
fail() { echo "FAIL: $*" >&2; cat "$out" >&2; exit 1; }

run_up() { JOULE_BUILD_DIR="$BUILD" timeout 100 "$up" --no-build "$@" >"$out" 2>&1; }

# Bad flags: exit 2 before anything starts, the message naming the flag.
for bad in "--workers 0" "--workers two" "--worker-threads -1" "--bogus"; do
  # shellcheck disable=SC2086  # each case is a list of arguments
  rc=0; run_up $bad || rc=$?
  [ "$rc" = 2 ] || fail "up.sh $bad: exit $rc, want 2"
  grep -q -- "${bad%% *}" "$out" || fail "up.sh $bad: message does not name ${bad%% *}"
done

check_threads() {  # WANT N: N worker logs say "compute threads: WANT"; WANT "share": usable cores / N
  local logs n=0 log line threads usable want
  logs="$(sed -n 's/.*logs were in \(.*\)$/\1/p' "$out" | tail -1)"
  [ -d "$logs" ] || fail "up.sh printed no logs directory"
  for log in "$logs"/worker*.log; do
    line="$(grep -o 'compute threads: [0-9]* (usable cores [0-9]*' "$log" | head -1)"
    [ -n "$line" ] || fail "$log has no compute-threads line"
    threads="$(echo "$line" | awk '{print $3}')"
    usable="$(echo "$line" | awk '{print $6}')"
    [ "$usable" -ge 1 ] && [ "$usable" -le "$(nproc)" ] || fail "$log: usable cores $usable, nproc $(nproc)"
    want="$1"
    if [ "$want" = share ]; then want=$((usable / $2)); [ "$want" -ge 1 ] || want=1; fi
    [ "$threads" = "$want" ] || fail "$log: $threads compute threads, want $want"
    n=$((n + 1))
  done
  [ "$n" = "$2" ] || fail "$n worker logs, want $2 ($logs)"
  echo "workers: $threads compute threads of $usable usable cores each"
  rm -rf "$logs"
}

# Secure by default: mutual TLS and a cluster token; --insecure says so in the logs.
check_security() {  # secure | insecure
  local logs
  logs="$(sed -n 's/.*logs were in \(.*\)$/\1/p' "$out" | tail -1)"
  if [ "$1" = secure ]; then
    grep -q "internal gRPC: mutual TLS + cluster token" "$out" || fail "up.sh did not secure internal gRPC"
    if grep -q "warning: internal gRPC" "$logs/coordinator.log" "$logs"/worker*.log; then
      fail "a process warned that internal gRPC is unprotected under up.sh's defaults"
    fi
  else
    grep -q "warning: internal gRPC is not encrypted" "$logs/coordinator.log" ||
      fail "up.sh --insecure: the coordinator did not warn"
  fi
}

run_up --once --port 0 --grpc-port 0 || fail "up.sh --once exited $?"
check_security secure
for tier in fast priority default flex; do
  grep -Eq "^  $tier: +\[$tier, [0-9]+\+[0-9]+ tokens, " "$out" || fail "no answer for tier $tier"
done
grep -q "OpenAI-compatible API: http://127.0.0.1:[0-9]*/v1" "$out" || fail "no API address printed"
check_threads share 2

# An explicit count wins (3 workers: the default would give each usable cores / 3).
run_up --once --port 0 --grpc-port 0 --workers 3 --worker-threads 1 --max-tokens 4 --insecure ||
  fail "up.sh --workers 3 --worker-threads 1 --insecure exited $?"
check_security insecure
check_threads 1 3
# DeepSeek-V3 (multi-head latent attention, its chat template) the same way.
run_up --once --port 0 --grpc-port 0 --family deepseek_v3 --max-tokens 4 ||
  fail "up.sh --family deepseek_v3 exited $?"
for tier in fast priority default flex; do
  grep -Eq "^  $tier: +\[$tier, [0-9]+\+[0-9]+ tokens, " "$out" || fail "deepseek_v3: no answer for tier $tier"
done
rm -rf "$(sed -n 's/.*logs were in \(.*\)$/\1/p' "$out" | tail -1)"
echo "PASS: up.sh served every tier over mutual TLS with a cluster token (and --insecure without)," \
  "for Qwen3-MoE and DeepSeek-V3; workers took their share of the usable cores by default"
