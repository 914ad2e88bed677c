#!/usr/bin/env bash
# A real Prometheus (Debian's) scraping a real cluster: a coordinator and two workers on the
# tiny model, deploy/prometheus/joule-rules.yml loaded, a known workload sent over HTTP, then
# PromQL through Prometheus' HTTP API (prometheus_e2e_check.py): tokens, tokens per joule, TTFT
# p99, SLO attainment by tier; power by rank; per-expert load; every rule and every expression
# of the Grafana dashboard evaluated; alerts that must fire do (energy modelled; a rank down).
#   prometheus_e2e.sh BUILD_DIR MODEL_DIR
# Installs prometheus when missing (root); exit 77 (skipped) when it is missing and not root.
set -euo pipefail
BUILD="$1"
MODEL="$2"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
source "$ROOT/deploy/local/common.sh"
joule_require "prometheus promtool" "${JOULE_PROMETHEUS_PACKAGES[@]}"
export UCX_TLS=shm,self
source "$(dirname "$0")/cluster_lib.sh"

promtool check rules "$ROOT/deploy/prometheus/joule-rules.yml" >/dev/null || e2e_fail "promtool check rules"

e2e_start_coordinator "" "$MODEL" 2 --http-port 0 --http-port-file "$E2E_TMP/http_port"
addr="127.0.0.1:$E2E_PORT"
for r in 0 1; do
  e2e_start_worker "" "w$r" "$addr" "$MODEL" --metrics-port 0 --metrics-port-file "$E2E_TMP/metrics.$r" \
    --energy-source model
done
e2e_wait_ready "" "$addr" 2
http="127.0.0.1:$(cat "$E2E_TMP/http_port")"
w0="127.0.0.1:$(cat "$E2E_TMP/metrics.0")"
w1="127.0.0.1:$(cat "$E2E_TMP/metrics.1")"

# The shipped rules, evaluated every second instead of every 15 s (a test's time).
sed 's/interval: 15s/interval: 1s/' "$ROOT/deploy/prometheus/joule-rules.yml" >"$E2E_TMP/joule-rules.yml"
cat >"$E2E_TMP/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [joule-rules.yml]
scrape_configs:
  - job_name: joule-coordinator
    static_configs: [{targets: ["$http"]}]
  - job_name: joule-worker
    static_configs: [{targets: ["$w0", "$w1"]}]
EOF
promtool check config "$E2E_TMP/prometheus.yml" >/dev/null || e2e_fail "promtool check config"
prom_port="$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
prometheus --config.file="$E2E_TMP/prometheus.yml" --storage.tsdb.path="$E2E_TMP/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$E2E_TMP/prometheus.err" 2>&1 &
E2E_PIDS+=($!)
w1_pid="${E2E_PIDS[2]}"  # coordinator, w0, w1, prometheus

/usr/bin/python3 "$(dirname "$0")/prometheus_e2e_check.py" --http "$http" --prometheus "127.0.0.1:$prom_port" \
  --model "$(basename "$MODEL")" --config "$MODEL/config.json" \
  --dashboard "$ROOT/deploy/grafana/joule-dashboard.json" --kill-pid "$w1_pid" --kill-instance "$w1" ||
  e2e_fail "PromQL checks failed"
echo "PASS: Prometheus scraped the cluster; every check, rule and dashboard expression holds"
