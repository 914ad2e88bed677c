#!/usr/bin/env bash
# Installs what is missing, builds, makes the built-in tiny model if absent, and
# starts a local cluster: one coordinator and N workers (expert parallelism
# over UCX). Sends one request per service tier through the coordinator, prints
# the answers and where to send requests, then serves until Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: deploy/local/up.sh [options]
  --model DIR        checkpoint directory (default: the built-in tiny model, made if absent)
  --family NAME      built-in model family: qwen3_moe | qwen2_moe | mixtral (default qwen3_moe)
  --preset NAME      built-in model size: tiny | mini (default tiny)
  --workers N        worker processes (expert-parallel ranks) (default 2)
  --port P           coordinator port (default 50051; 0 picks a free one)
  --prompt TEXT      demo prompt (default: "Joule serves mixture-of-experts models")
  --max-tokens N     tokens per demo answer (default 16)
  --once             exit after the demo instead of serving
  --no-build         skip package installation and the build
  -h, --help         this help
Environment: UCX_TLS selects UCX transports (e.g. shm,self or tcp,self).
USAGE
}

model="" family=qwen3_moe preset=tiny workers=2 port=50051
prompt="Joule serves mixture-of-experts models" max_tokens=16 once=0 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --family) family="$2"; shift 2 ;;
    --preset) preset="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --once) once=1; shift ;;
    --no-build) build=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ "$build" = 1 ]; then
  joule_install_packages
  joule_build default
fi
bin="${JOULE_BUILD_DIR:-$JOULE_ROOT/build/default}"  # JOULE_BUILD_DIR: use another build
if [ -z "$model" ]; then
  model="$bin/models/$family-$preset"
  if [ ! -f "$model/config.json" ]; then
    "$bin/worker/tools/joule-make-model" --family "$family" --preset "$preset" --out "$model"
  fi
fi

run_dir="$(mktemp -d /tmp/joule-up.XXXXXX)"
pids=()
stop() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  joule_log "stopped; logs were in $run_dir"
}
trap stop EXIT
trap 'exit 0' INT TERM

joule_log "model: $model"
"$bin/coordinator/joule-coordinator" --model "$model" --workers "$workers" --port "$port" \
  --port-file "$run_dir/port" >"$run_dir/coordinator.out" 2>"$run_dir/coordinator.log" &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$run_dir/port" ] && break; sleep 0.1; done
[ -s "$run_dir/port" ] || { tail "$run_dir/coordinator.log" >&2; echo "coordinator did not start" >&2; exit 1; }
addr="127.0.0.1:$(cat "$run_dir/port")"
for r in $(seq 0 $((workers - 1))); do
  "$bin/worker/service/joule-worker" --coordinator "$addr" --model "$model" \
    >"$run_dir/worker$r.out" 2>"$run_dir/worker$r.log" &
  pids+=($!)
done
cli="$bin/coordinator/cli/joule-cli"
joule_log "waiting for $workers workers to load and connect"
for _ in $(seq 1 600); do
  [ "$("$cli" status --coordinator "$addr" 2>/dev/null | grep -c ': ready')" = "$workers" ] && break
  sleep 0.2
done
"$cli" status --coordinator "$addr"

# The built-in tokenizer maps each byte to the token id of the same value.
ids="$(printf '%s' "$prompt" | od -An -tu1 | tr -s ' \n' ',' | sed 's/^,//; s/,$//')"
joule_log "prompt: \"$prompt\" -> token ids $ids"
joule_log "the built-in models have random weights: answers are arbitrary tokens, not English"
# Tiers by their OpenAI service_tier values: fast, priority, default (standard), flex (batch).
for tier in fast priority default flex; do
  answer="$("$cli" generate --coordinator "$addr" --prompt-ids "$ids" --max-tokens "$max_tokens" \
              --temperature 0 --tier "$tier" 2>&1 | tr "\n" " " || true)"
  printf '  %-9s %s\n' "$tier:" "$answer"
done

cat <<EOF

Joule is serving $model with $workers expert-parallel workers.
  gRPC front door (joule.v1.Frontend): $addr
  try:   $cli generate --coordinator $addr --prompt-ids 1,2,3 --max-tokens 8
         $cli status --coordinator $addr
  logs:  $run_dir
(The OpenAI-compatible HTTP API arrives with the front-door issue.)
EOF
if [ "$once" = 1 ]; then
  exit 0
fi
joule_log "serving until Ctrl-C"
wait "${pids[0]}"
