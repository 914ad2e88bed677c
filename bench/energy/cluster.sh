# Sourced by sweep.sh and prefix_sweep.sh, not run: the settings both read from
# the environment (see sweep.sh's header), joule-bench's path, and starting and
# stopping a local cluster. Expects `root` (the checkout) to be set.
# shellcheck shell=bash
BUILD="${BUILD:-$root/build/default}"
PORT="${PORT:-8000}"
METRICS_PORT="${METRICS_PORT:-9100}"
METRICS_URLS="${METRICS_URLS-http://127.0.0.1:$METRICS_PORT/metrics,http://127.0.0.1:$((METRICS_PORT + 1))/metrics}"
default_start="JOULE_BUILD_DIR=$BUILD ROOT/deploy/local/up.sh --no-build --preset mini --workers 2"
default_start+=" --port {port} --grpc-port 0 --policy {policy} --scheduler-config {scheduler_config}"
default_start+=" --worker-metrics-port {metrics_port}"
CLUSTER_START="${CLUSTER_START:-${default_start//ROOT/$root}}"
READY_PATH="${READY_PATH:-/ready}"
READY_LOG="${READY_LOG-serving until Ctrl-C}"
MODEL="${MODEL:-qwen3_moe-mini}"
# Debian's python3 (matplotlib for the plots); a host without /usr/bin/python3 (a GPU image) uses
# the python3 on its PATH.
PYTHON="${PYTHON:-/usr/bin/python3}"
[ -x "$PYTHON" ] || PYTHON=python3

# joule_bin NAME BUILD_SUBDIR: NAME in the build tree, or in BUILD/bin (a tests/gpu bundle).
joule_bin() {
  if [ ! -x "$BUILD/$2/$1" ] && [ -x "$BUILD/bin/$1" ]; then echo "$BUILD/bin/$1"; else echo "$BUILD/$2/$1"; fi
}
bench="$(joule_bin joule-bench bench/energy)"
[ -x "$bench" ] || { echo "no $bench: build the joule-bench target first" >&2; exit 1; }
url="http://127.0.0.1:$PORT"
cluster_pid=""

# http_ok URL: the URL answers 2xx (curl; python3 where curl is missing).
http_ok() {
  if command -v curl >/dev/null; then
    curl -sf -o /dev/null "$1"
  else
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" 2>/dev/null
  fi
}

# cluster_start POLICY SCHEDULER_CONFIG LOG [NAME=VALUE...]: runs CLUSTER_START
# (placeholders substituted) in its own session with NAME=VALUE added to its
# environment (e.g. JOULE_WORKER_PREFIX_CACHING=false for every worker), output
# to LOG, and waits until it is ready; exits the script if it never is.
cluster_start() {
  local policy="$1" scheduler_config="$2" log="$3"
  shift 3
  local cmd="${CLUSTER_START//\{policy\}/$policy}"
  cmd="${cmd//\{port\}/$PORT}"
  cmd="${cmd//\{metrics_port\}/$METRICS_PORT}"
  cmd="${cmd//\{scheduler_config\}/$scheduler_config}"
  echo "[cluster] ${*:+$* }$cmd" >&2
  # env and setsid exec in place (a background job leads no process group), so
  # $! is the session's leader and its process group id.
  env "$@" setsid bash -c "$cmd" >"$log" 2>&1 &
  cluster_pid=$!
  local ready=0
  for _ in $(seq 1 300); do
    if http_ok "$url$READY_PATH" &&
       { [ -z "$READY_LOG" ] || grep -q "$READY_LOG" "$log"; }; then
      ready=1
      break
    fi
    kill -0 "$cluster_pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ "$ready" != 1 ]; then
    echo "[cluster] did not become ready at $url$READY_PATH; log ($log):" >&2
    tail -20 "$log" >&2
    exit 1
  fi
}

cluster_stop() {
  if [ -n "$cluster_pid" ]; then
    # The cluster runs in its own session (setsid): signal that process group only.
    kill -TERM -- "-$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
    cluster_pid=""
  fi
}
trap cluster_stop EXIT
