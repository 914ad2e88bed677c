#!/usr/bin/env bash
# ctest k8s_manifests: installs the checker's npm packages (pinned by package-lock.json) into
# BUILD_DIR/k8s-check once, then checks deploy/k8s (check_manifests.mjs) against the API schemas
# and against the binaries' settings. A broken manifest must fail: --self-test also feeds it
# broken copies and expects each to be refused.
#   check_manifests.sh BUILD_DIR [--self-test]
set -euo pipefail
BUILD="$(cd "$1" && pwd)"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
source "$ROOT/deploy/local/common.sh"
joule_require "node npm" "${JOULE_NODE_PACKAGES[@]}"
work="$BUILD/k8s-check"
mkdir -p "$work"
if ! cmp -s "$HERE/package-lock.json" "$work/package-lock.json" || [ ! -d "$work/node_modules" ]; then
  cp "$HERE/package.json" "$HERE/package-lock.json" "$work/"
  (cd "$work" && npm ci --no-audit --no-fund --loglevel=error)
fi
cp "$HERE/check_manifests.mjs" "$HERE/leaderworkerset-v1.schema.json" "$work/"
T="$(mktemp -d /tmp/joule-k8s.XXXXXX)"
trap 'rm -rf "$T"' EXIT
"$BUILD/coordinator/joule-coordinator" --help >"$T/coordinator.help"
"$BUILD/worker/service/joule-worker" --help >"$T/worker.help"
check() { node "$work/check_manifests.mjs" "$1" "$T/coordinator.help" "$T/worker.help"; }
check "$ROOT/deploy/k8s"
[ "${2:-}" = --self-test ] || exit 0

# Each edit breaks one thing the checker must catch.
broken=(
  "workers.yaml|s/readinessProbe:/readinessProbes:/|unknown field"
  "workers.yaml|s/restartPolicy: None/restartPolicy: Never/|must be equal to one of"
  "workers.yaml|s/size: 2 /size: 3 /|JOULE_COORDINATOR_WORKERS"
  "coordinator.yaml|s/JOULE_COORDINATOR_POLICY/JOULE_COORDINATOR_POLICIES/|no setting"
  "coordinator.yaml|s/containerPort: 8000/containerPort: \"8000\"/|must be integer"
  "coordinator.yaml|s/path: \\/ready/path: \\/readyz/|readinessProbe on"
  "monitoring.yaml|s/port: metrics/port: metric/|no worker port"
  "workers.yaml|s/joule-coordinator:50051/joule-coord:50051/|JOULE_WORKER_COORDINATOR"
)
for b in "${broken[@]}"; do
  IFS='|' read -r file edit want <<<"$b"
  rm -rf "$T/k8s" && cp -r "$ROOT/deploy/k8s" "$T/k8s"
  sed -i "$edit" "$T/k8s/$file"
  cmp -s "$ROOT/deploy/k8s/$file" "$T/k8s/$file" && { echo "FAIL: edit '$edit' changed nothing in $file"; exit 1; }
  if check "$T/k8s" >"$T/out" 2>&1; then echo "FAIL: accepted $file after '$edit'"; exit 1; fi
  grep -q -- "$want" "$T/out" || { echo "FAIL: $file after '$edit': wanted '$want' in:"; cat "$T/out"; exit 1; }
done
echo "PASS: ${#broken[@]} broken copies refused"
