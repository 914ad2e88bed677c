#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite with ctest.
#   deploy/local/test.sh [--preset default|debug] [--sanitizers|--no-sanitizers] [ctest args...]
# Benchmarks (ctest labels "bench" and "perf") are not run here: ctest -L perf runs them.
# --sanitizers (the default where JOULE_CI=1, which .ci/run sets) then also runs the unit
# tests under ASan + UBSan, the concurrency tests under ThreadSanitizer and every fuzzer for
# JOULE_FUZZ_SECONDS (12) each; JOULE_SANITIZER_PHASES="asan tsan fuzz" picks among them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/sanitizers.sh"

preset=default
sanitizers=0
case "${JOULE_CI:-}" in 1 | true | yes) sanitizers=1 ;; esac
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --sanitizers) sanitizers=1; shift ;;
    --no-sanitizers) sanitizers=0; shift ;;
    -h | --help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) break ;;
  esac
done

if [ "$sanitizers" = 1 ]; then
  joule_install_packages "${JOULE_FUZZ_PACKAGES[@]}"
else
  joule_install_packages
fi
start=$SECONDS
joule_build "$preset"
cd "$JOULE_ROOT"
joule_log "running ctest"
ctest --preset "$preset" -j "$(nproc)" --label-exclude 'bench|perf' --timeout 600 "$@"
joule_phase_time "$preset" "$start"

if [ "$sanitizers" = 1 ]; then
  for phase in ${JOULE_SANITIZER_PHASES:-asan tsan fuzz}; do
    "joule_${phase}_phase"
  done
  joule_log "all phases: $(( SECONDS - start )) s"
fi
