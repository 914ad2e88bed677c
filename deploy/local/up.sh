#!/usr/bin/env bash
# Installs what is missing, builds, makes the built-in tiny model if absent, and
# starts a local cluster: one coordinator and N workers (expert parallelism
# over UCX). Sends one request per service tier to the coordinator's
# OpenAI-compatible HTTP API, prints the answers and where to send requests,
# then serves until Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: deploy/local/up.sh [options]
  --model DIR        checkpoint directory (default: the built-in tiny model, made if absent)
  --family NAME      built-in model family: qwen3_moe | qwen2_moe | mixtral | deepseek_v3
                     (default qwen3_moe)
  --preset NAME      built-in model size: tiny | mini (default tiny)
  --workers N        worker processes (expert-parallel ranks) (default 2; 1 with --device cuda)
  --device DEV       where workers compute: cpu | cuda | cuda:N (default cpu). A GPU worker
                     serves a one-rank cluster: expert parallelism between GPU workers is
                     not available yet
  --port P           HTTP port of the OpenAI-compatible API (default 8000; 0 picks a free one)
  --grpc-port P      coordinator gRPC port for workers and joule-cli (default 50051; 0 picks one)
  --policy NAME      scheduling policy: priority | ipw | fcfs | none (default priority)
  --scheduler-config FILE  scheduler JSON: tier SLOs, queue caps, ipw knobs (docs/operations.md)
  --worker-metrics-port P  worker r serves Prometheus /metrics on P+r (default 0: free ports)
  --worker-threads N compute threads per worker (default: the usable cores, after CPU
                     affinity and any cgroup CPU quota, divided among the workers, at
                     least 1; 0: every usable core in every worker)
  --prompt TEXT      demo prompt (default: "Joule serves mixture-of-experts models")
  --max-tokens N     tokens per demo answer (default 16)
  --once             exit after the demo instead of serving
  --no-build         skip package installation and the build
  --insecure         internal gRPC without TLS and without a cluster token (by default the
                     cluster gets a throwaway CA, certificate and token in its run directory,
                     deploy/local/make_secrets.sh)
  -h, --help         this help
Environment: UCX_TLS selects UCX transports (e.g. shm,self or tcp,self).
USAGE
}

model="" family=qwen3_moe preset=tiny workers="" device=cpu port=8000 grpc_port=50051
policy=priority scheduler_config="" worker_metrics_port=0 worker_threads=""
prompt="Joule serves mixture-of-experts models" max_tokens=16 once=0 build=1 secure=1
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --family) family="$2"; shift 2 ;;
    --preset) preset="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --grpc-port) grpc_port="$2"; shift 2 ;;
    --policy) policy="$2"; shift 2 ;;
    --scheduler-config) scheduler_config="$2"; shift 2 ;;
    --worker-metrics-port) worker_metrics_port="$2"; shift 2 ;;
    --worker-threads) worker_threads="$2"; shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --once) once=1; shift ;;
    --no-build) build=0; shift ;;
    --insecure) secure=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$device" =~ ^(cpu|cuda|cuda:[0-9]+)$ ]] ||
  { echo "--device: must be cpu, cuda or cuda:N, got '$device'" >&2; exit 2; }
if [ -z "$workers" ]; then
  workers=2
  [ "$device" = cpu ] || workers=1
fi
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "--workers: must be a positive integer, got '$workers'" >&2; exit 2; }
if [ "$device" != cpu ] && [ "$workers" != 1 ]; then
  echo "--device $device: a GPU worker serves a one-rank cluster (--workers 1); expert parallelism" \
       "between GPU workers is not available yet" >&2
  exit 2
fi
[[ -z "$worker_threads" || "$worker_threads" =~ ^[0-9]+$ ]] ||
  { echo "--worker-threads: must be a non-negative integer, got '$worker_threads'" >&2; exit 2; }

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

# Workers on one host share its cores: each one's compute pool spins while it
# waits for work, so N workers with every core each oversubscribe the machine
# (2 cores, 2 workers: 1 thread each rather than 2 gave 1.06-1.38x the tokens
# per joule, depending on policy and load; docs/operations.md). Each worker
# divides the cores it may use (affinity and cgroup CPU quota, which nproc
# does not see) by --workers-per-host.
thread_flags=(--threads 0 --workers-per-host "$workers")
[ -z "$worker_threads" ] || thread_flags=(--threads "$worker_threads")

run_dir="$(mktemp -d /tmp/joule-up.XXXXXX)"
pids=()
stop() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  joule_log "stopped; logs were in $run_dir"
}
trap stop EXIT
trap 'exit 0' INT TERM

# Mutual TLS and a cluster token on every internal gRPC channel (docs/operations.md, Security).
sec_flags=()
if [ "$secure" = 1 ]; then
  "$JOULE_ROOT/deploy/local/make_secrets.sh" "$run_dir/secrets"
  sec_flags=(--tls-cert "$run_dir/secrets/node.pem" --tls-key "$run_dir/secrets/node.key"
             --tls-ca "$run_dir/secrets/ca.pem" --cluster-token-file "$run_dir/secrets/cluster-token")
fi

joule_log "model: $model"
"$bin/coordinator/joule-coordinator" --model "$model" --workers "$workers" \
  --port "$grpc_port" --port-file "$run_dir/port" \
  --http-port "$port" --http-port-file "$run_dir/http_port" --policy "$policy" \
  ${scheduler_config:+--scheduler-config "$scheduler_config"} "${sec_flags[@]}" \
  >"$run_dir/coordinator.out" 2>"$run_dir/coordinator.log" &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$run_dir/port" ] && [ -s "$run_dir/http_port" ] && break; sleep 0.1; done
[ -s "$run_dir/http_port" ] || { tail "$run_dir/coordinator.log" >&2; echo "coordinator did not start" >&2; exit 1; }
addr="127.0.0.1:$(cat "$run_dir/port")"
url="http://127.0.0.1:$(cat "$run_dir/http_port")"
for r in $(seq 0 $((workers - 1))); do
  metrics_port=0
  [ "$worker_metrics_port" = 0 ] || metrics_port=$((worker_metrics_port + r))
  "$bin/worker/service/joule-worker" --coordinator "$addr" --model "$model" \
    --metrics-port "$metrics_port" --metrics-port-file "$run_dir/metrics_port.$r" \
    --device "$device" "${thread_flags[@]}" "${sec_flags[@]}" \
    >"$run_dir/worker$r.out" 2>"$run_dir/worker$r.log" &
  pids+=($!)
done
cli="$bin/coordinator/cli/joule-cli"
cli_args=(--coordinator "$addr" "${sec_flags[@]}")
joule_log "waiting for $workers workers to load and connect"
for _ in $(seq 1 600); do
  [ "$("$cli" status "${cli_args[@]}" 2>/dev/null | grep -c ': ready')" = "$workers" ] && break
  for r in $(seq 0 $((workers - 1))); do  # a worker that exits (no GPU, bad model) says why
    if ! kill -0 "${pids[$((r + 1))]}" 2>/dev/null; then
      tail -5 "$run_dir/worker$r.log" >&2
      echo "worker $r exited before it was ready (log: $run_dir/worker$r.log)" >&2
      exit 1
    fi
  done
  sleep 0.2
done
"$cli" status "${cli_args[@]}"

for _ in $(seq 1 100); do curl -sf "$url/ready" >/dev/null && break; sleep 0.1; done
served="$(curl -sf "$url/v1/models" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
joule_log "the built-in models have random weights: answers are arbitrary text, not English"
# One chat completion per tier, by its OpenAI service_tier value:
# fast, priority, default (standard), flex (batch).
for tier in fast priority default flex; do
  body="$(/usr/bin/python3 -c 'import json,sys; print(json.dumps({"model": sys.argv[1],
    "messages": [{"role": "user", "content": sys.argv[2]}], "max_tokens": int(sys.argv[3]),
    "temperature": 0, "service_tier": sys.argv[4]}))' "$served" "$prompt" "$max_tokens" "$tier")"
  answer="$(curl -s -H 'Content-Type: application/json' -d "$body" "$url/v1/chat/completions" |
    /usr/bin/python3 -c 'import json,sys
r = json.load(sys.stdin)
if "error" in r: print("error:", r["error"]["message"]); sys.exit(0)
u = r["usage"]
energy = " %.3f J (%s)," % (u["energy_joules"], u["energy_source"]) if "energy_joules" in u else ""
print("[%s, %d+%d tokens,%s %s] %r" % (r["service_tier"], u["prompt_tokens"], u["completion_tokens"],
      energy, r["choices"][0]["finish_reason"], r["choices"][0]["message"]["content"]))' 2>&1 || true)"
  printf '  %-9s %s\n' "$tier:" "$answer"
done

cat <<EOF

Joule is serving $model as "$served" with $workers expert-parallel worker(s) on $device.
  OpenAI-compatible API: $url/v1  (chat/completions, completions, models; /health /ready /metrics)
  try:   curl $url/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"model": "$served", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "service_tier": "fast"}'
         $cli status ${cli_args[*]}
  scheduling policy: $policy; metrics: $url/metrics (coordinator), $(
    for r in $(seq 0 $((workers - 1))); do
      printf 'http://127.0.0.1:%s/metrics ' "$(cat "$run_dir/metrics_port.$r" 2>/dev/null)"
    done)(workers)
  logs:  $run_dir
  internal gRPC: $([ "$secure" = 1 ] && echo "mutual TLS + cluster token (throwaway CA and token in $run_dir/secrets)" ||
    echo "NOT encrypted, no cluster token (--insecure)")
EOF
if [ "$once" = 1 ]; then
  exit 0
fi
joule_log "serving until Ctrl-C"
wait "${pids[0]}"
