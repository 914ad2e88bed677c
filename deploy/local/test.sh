#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite with ctest.
#   deploy/local/test.sh [--preset default|debug] [ctest args...]
# Benchmarks (ctest labels "bench" and "perf") are not run here: ctest -L perf runs them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

preset=default
if [ "${1:-}" = "--preset" ]; then
  preset="$2"
  shift 2
fi
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

joule_install_packages
joule_build "$preset"
cd "$JOULE_ROOT"
joule_log "running ctest"
ctest --preset "$preset" -j "$(nproc)" --label-exclude 'bench|perf' --timeout 600 "$@"
