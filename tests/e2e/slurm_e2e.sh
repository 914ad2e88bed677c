#!/usr/bin/env bash
# deploy/slurm against a real Slurm: starts munged, slurmctld and slurmd on this machine
# (deploy/slurm/local_slurm.sh), submits deploy/slurm/joule.sbatch with two workers, waits for
# /ready, sends one chat completion per tier, scancels the job and checks that every process
# of it exited by itself (SIGTERM handled, no SIGKILL after KillWait) and nothing is left.
#   slurm_e2e.sh BUILD_DIR MODEL_DIR
# Installs slurm-wlm and munge when missing (root); exit 77 (skipped) when not root.
set -euo pipefail
BUILD="$(cd "$1" && pwd)"
MODEL="$(cd "$2" && pwd)"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
[ "$(id -u)" = 0 ] || { echo "SKIP: a local Slurm needs root"; exit 77; }
source "$ROOT/deploy/local/common.sh"
joule_install_packages "${JOULE_SLURM_PACKAGES[@]}"

T="$(mktemp -d /tmp/joule-slurm.XXXXXX)"
RUN="$T/run"
job=""
cleanup() {
  [ -z "$job" ] || scancel "$job" 2>/dev/null || true
  "$ROOT/deploy/slurm/local_slurm.sh" stop "$T/slurm" || true
  pkill -KILL -f "$RUN/" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$T/job.out" "$RUN"/*.log "$T/slurm/log/"*.log; do
    [ -f "$f" ] && { echo "--- $f (tail)" >&2; tail -8 "$f" >&2; }
  done
  exit 1
}

slurm_env="$("$ROOT/deploy/slurm/local_slurm.sh" start "$T/slurm")" || fail "no local Slurm"
eval "$slurm_env"
echo "slurm up: $(sinfo -h -o '%P %t %N %c CPUs')"

# The job's environment is this shell's (sbatch --export=ALL): settings travel as JOULE_*.
job="$(JOULE_MODEL="$MODEL" JOULE_HOME="$ROOT" JOULE_BUILD_DIR="$BUILD" JOULE_RUN_DIR="$RUN" \
  JOULE_HTTP_PORT=0 JOULE_GRPC_PORT=0 JOULE_BIND_HOST=127.0.0.1 JOULE_COORDINATOR_HOST=127.0.0.1 \
  JOULE_WORKER_ARGS="--kv-cache-mb 32 --payload f32" JOULE_READY_TIMEOUT_S=120 \
  UCX_TLS=shm,self UCX_WARN_UNUSED_ENV_VARS=n \
  sbatch --parsable --ntasks=2 --output="$T/job.out" --chdir="$T" "$ROOT/deploy/slurm/joule.sbatch")"
echo "submitted job $job"

for _ in $(seq 1 600); do
  [ -s "$RUN/endpoint" ] && break
  [ -n "$(squeue -h -j "$job" 2>/dev/null)" ] || fail "job $job ended before it was ready"
  sleep 0.2
done
[ -s "$RUN/endpoint" ] || fail "job $job not ready after 120 s"
url="$(cat "$RUN/endpoint")"
[ "$(squeue -h -j "$job" -o %T)" = RUNNING ] || fail "job $job is not RUNNING"
echo "job $job serving at $url"

served="$(curl -sf "$url/v1/models" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
for tier in fast priority default flex; do
  body="{\"model\": \"$served\", \"messages\": [{\"role\": \"user\", \"content\": \"hello from slurm\"}],
         \"max_tokens\": 6, \"temperature\": 0, \"service_tier\": \"$tier\"}"
  reply="$(curl -s -w '\n%{http_code}' -H 'Content-Type: application/json' -d "$body" \
    "$url/v1/chat/completions")" || fail "tier $tier: curl failed"
  [ "$(tail -n1 <<<"$reply")" = 200 ] || fail "tier $tier: $(head -n1 <<<"$reply")"
  head -n1 <<<"$reply" | /usr/bin/python3 -c '
import json, sys
r = json.load(sys.stdin)
tier = sys.argv[1]
assert r["service_tier"] == tier, (r["service_tier"], tier)
assert r["usage"]["completion_tokens"] > 0, r["usage"]
print("  %-8s %d tokens, finish %s" % (tier, r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]))
' "$tier" || fail "tier $tier: unexpected answer"
done

pids="$(pgrep -f "$RUN/" | paste -sd' ')"
[ "$(wc -w <<<"$pids")" -ge 3 ] || fail "expected a coordinator and two workers, found pids '$pids'"
# A stream still running when the job is cancelled must end, and not as a normal finish: a
# completion (no chat stop tokens) that ignores EOS ends normally only at its 480th token.
curl -sN -m 60 -H 'Content-Type: application/json' -d "{\"model\": \"$served\", \"stream\": true,
  \"prompt\": \"a long answer\", \"max_tokens\": 480, \"ignore_eos\": true}" \
  "$url/v1/completions" >"$T/stream.txt" 2>&1 &
stream_pid=$!
for _ in $(seq 1 100); do grep -q '"text"' "$T/stream.txt" && break; sleep 0.05; done
grep -q '"text"' "$T/stream.txt" || fail "the long stream did not start: $(head -c 300 "$T/stream.txt")"
echo "scancel $job (processes: $pids)"
scancel "$job"
for _ in $(seq 1 150); do
  [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && break
  sleep 0.2
done
[ -z "$(squeue -h -j "$job" 2>/dev/null)" ] || fail "job $job still listed 30 s after scancel"
stream_rc=0
wait "$stream_pid" || stream_rc=$?
[ "$stream_rc" != 28 ] || fail "the stream running at scancel hung until curl's 60 s limit"
chunks="$(grep -c '"text"' "$T/stream.txt" || true)"
# An error event, or a connection closed without a terminal event: never a normal finish.
ending="$(grep -o '"finish_reason":"[a-z_]*"\|"error":{[^}]*}' "$T/stream.txt" | tail -n1 || true)"
[ -n "$ending" ] || ending="(the connection closed without a terminal event)"
echo "the stream running at scancel ended (curl status $stream_rc) after $chunks chunks with: $ending"
if [ "$chunks" -lt 480 ] && [[ "$ending" == *finish_reason* ]]; then
  fail "a stream cut off by scancel after $chunks of 480 tokens ended as a normal finish: $ending"
fi
job_done="$job"
job=""
left="$(pgrep -f "$RUN/" || true)"
[ -z "$left" ] || fail "processes left after job $job_done ended: $left"
# Each exited on its own after SIGTERM: Slurm's SIGKILL would come only after KillWait (20 s).
grep -q "every process has exited" "$T/job.out" || fail "the batch script did not see everyone exit"
grep -q "received SIGTERM" "$RUN/coordinator.log" || fail "the coordinator did not log SIGTERM"
for r in 0 1; do
  grep -q "received SIGTERM\|shutdown" "$RUN/worker$r.log" || fail "worker $r did not shut down cleanly"
done
echo "PASS: job $job_done served every tier and left nothing running after scancel"
