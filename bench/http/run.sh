#!/usr/bin/env bash
# HTTP front door benchmark on a local tiny-model cluster (one coordinator on
# 2 cores, one worker):
#   (a) added latency: p50/p99 of a short non-streaming completion over HTTP
#       vs the same request over the gRPC Frontend (joule-cli's path),
#       interleaved in the same run;
#   (b) concurrent SSE streams the coordinator holds with no errors, then
#       disconnects them and checks the worker freed every KV block.
#   bench/http/run.sh BUILD_DIR [--streams N] [--latency-requests N] [--no-results]
# Writes bench/results/http.{json,md} unless --no-results (the ctest entry,
# label bench, runs it that way).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="$(cd "${1:?usage: run.sh BUILD_DIR [--streams N] [--latency-requests N] [--no-results]}" && pwd)"
shift
streams=1000
latency_requests=400
write_results=1
while [ $# -gt 0 ]; do
  case "$1" in
    --streams) streams="$2"; shift 2 ;;
    --latency-requests) latency_requests="$2"; shift 2 ;;
    --no-results) write_results=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=../../tests/e2e/cluster_lib.sh
source "$root/tests/e2e/cluster_lib.sh"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

model="$BUILD/models/qwen3_moe-tiny"
if [ ! -f "$model/config.json" ]; then
  "$BUILD/worker/tools/joule-make-model" --family qwen3_moe --preset tiny --out "$model" >/dev/null
fi

# The coordinator gets two cores (all this machine may have); the worker shares them.
pin=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then pin="taskset -c 0,1"; fi
$pin "$BUILD/coordinator/joule-coordinator" --model "$model" --workers 1 --host 127.0.0.1 --port 0 \
  --port-file "$E2E_TMP/port" --http-port 0 --http-port-file "$E2E_TMP/http_port" \
  >"$E2E_TMP/coordinator.out" 2>"$E2E_TMP/coordinator.err" &
coordinator_pid=$!
E2E_PIDS+=("$coordinator_pid")
for _ in $(seq 1 100); do
  [ -s "$E2E_TMP/port" ] && [ -s "$E2E_TMP/http_port" ] && break
  sleep 0.1
done
[ -s "$E2E_TMP/port" ] && [ -s "$E2E_TMP/http_port" ] || e2e_fail "coordinator did not start"
grpc_port="$(cat "$E2E_TMP/port")"
http_port="$(cat "$E2E_TMP/http_port")"

# Room for every stream in one running batch: max-running and KV cache sized
# for $streams sequences of a few hundred tokens.
e2e_start_worker "" w0 "127.0.0.1:$grpc_port" "$model" --listen-host 127.0.0.1 \
  --metrics-port 0 --metrics-port-file "$E2E_TMP/metrics_port" \
  --max-running $((streams + 64)) --max-batch-tokens $((streams + 512)) --kv-cache-mb 1024
e2e_wait_ready "" "127.0.0.1:$grpc_port" 1
metrics_port="$(cat "$E2E_TMP/metrics_port")"

"$BUILD/bench/http/joule-http-bench" --http "127.0.0.1:$http_port" --grpc "127.0.0.1:$grpc_port" \
  --latency-requests "$latency_requests" --streams "$streams" --stream-max-tokens 500 --hold-s 5 \
  --coordinator-pid "$coordinator_pid" --worker-metrics "127.0.0.1:$metrics_port" \
  --json-out "$E2E_TMP/bench.json"

# Pass/fail for ctest: no errors, every stream streaming at once, KV freed.
JOULE_BENCH_COMMAND="bench/http/run.sh BUILD_DIR $*" /usr/bin/python3 - "$E2E_TMP/bench.json" \
  "$root/bench/results" "$write_results" "$streams" <<'PY'
import datetime, json, os, sys
b = json.load(open(sys.argv[1])); out, write, streams = sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')
mem = next((int(l.split()[1]) // 1024 // 1024 for l in open('/proc/meminfo') if l.startswith('MemTotal')), 0)
b["date"] = datetime.date.today().isoformat()
b["machine"] = f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM; coordinator pinned to 2 cores, worker (1 thread) on the same cores"
b["command"] = os.environ.get("JOULE_BENCH_COMMAND", "")
lat, sse = b.get("latency", {}), b.get("sse", {})
failures = []
if lat.get("http_errors") or lat.get("grpc_errors"):
    failures.append(f"latency errors: {lat.get('http_errors')} HTTP, {lat.get('grpc_errors')} gRPC ({lat.get('first_error')})")
if sse.get("errors"):
    failures.append(f"{sse['errors']} stream errors: {sse.get('error_kinds')}")
if sse.get("peak_concurrent_streaming", 0) < streams:
    failures.append(f"only {sse.get('peak_concurrent_streaming')} of {streams} streams were streaming at once")
if sse.get("worker_idle_after_disconnect_s", -1) < 0:
    failures.append("the worker did not free every sequence after the clients disconnected")
b["failures"] = failures
lines = ["# HTTP front door benchmark", "",
         f"Machine: {b['machine']}; date {b['date']}.", f"Command: `{b['command']}`", "",
         "Cluster: joule-coordinator (HTTP + gRPC) and one joule-worker on the tiny qwen3_moe model, all local.", "",
         "## Added latency (non-streaming completion, 4 prompt tokens, max_tokens 1; interleaved)", "",
         "| path | p50 ms | p99 ms |", "|---|---|---|"]
if lat:
    lines += [f"| HTTP POST /v1/completions (keep-alive) | {lat['http_ms']['p50']:.3f} | {lat['http_ms']['p99']:.3f} |",
              f"| gRPC Frontend.Generate (joule-cli's path) | {lat['grpc_ms']['p50']:.3f} | {lat['grpc_ms']['p99']:.3f} |",
              f"| **added by the front door** | **{lat['added_ms']['p50']:.3f}** | {lat['added_ms']['p99']:.3f} |", "",
              f"{lat['requests_per_path']} requests per path; errors: {lat['http_errors']} HTTP, {lat['grpc_errors']} gRPC; "
              f"the server closed the keep-alive connection {lat['http_reconnects']} times (retried on a new connection, the retry timed).", ""]
if sse:
    lines += ["## Concurrent SSE streams", "",
              f"| measurement | value |", "|---|---|",
              f"| streams opened at once (one client thread) | {sse['streams']} |",
              f"| peak streams open and receiving tokens at the same time | {sse['peak_concurrent_streaming']} |",
              f"| all streaming after | {sse['all_streaming_after_s']:.2f} s |",
              f"| streams receiving tokens during the {sse['hold_s']:.1f} s hold | {sse['receiving_tokens_during_hold']} |",
              f"| token events/s delivered during the hold | {sse['token_events_per_s_during_hold']:.0f} |",
              f"| errors | {sse['errors']} |"]
    if "coordinator_cpu_cores_during_hold" in sse:
        lines += [f"| coordinator CPU during the hold | {sse['coordinator_cpu_cores_during_hold']:.2f} cores |",
                  f"| coordinator threads | {sse['coordinator_threads']} |",
                  f"| coordinator RSS | {sse['coordinator_rss_mb']:.0f} MiB |"]
    lines += [f"| worker idle (0 running, all KV free) after the clients disconnected | {sse.get('worker_idle_after_disconnect_s', -1):.2f} s |", ""]
lines += ["Result: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)), ""]
print("\n".join(lines))
if write:
    json.dump(b, open(os.path.join(out, "http.json"), "w"), indent=2)
    open(os.path.join(out, "http.md"), "w").write("\n".join(lines))
sys.exit(1 if failures else 0)
PY
