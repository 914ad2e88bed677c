#!/usr/bin/env bash
# Runs every libFuzzer harness (or the named ones) for a bounded time from its
# seed corpus, one after another, and fails if any of them crashes, leaks, hits
# undefined behaviour, times out or runs out of memory.
#   tests/fuzz/run.sh BUILD_DIR [SECONDS_PER_TARGET (default 60)] [TARGET...]
# BUILD_DIR is a build of the fuzz preset (cmake --preset fuzz && cmake --build
# --preset fuzz --target fuzzers). TARGET is a harness name: openai_request,
# http_request, tokenizer_json, ...
#
# The seeds in tests/fuzz/corpus/TARGET/ are only read; inputs that reach new
# code go to OUT/TARGET/corpus and a failing input to OUT/TARGET/crash-* (or
# leak-*, timeout-*, oom-*), with OUT = $JOULE_FUZZ_OUT or BUILD_DIR/fuzz-out.
# Reproduce one with `BUILD_DIR/tests/fuzz/TARGET_fuzzer FILE`; once fixed, add it
# to tests/fuzz/corpus/TARGET/ so that every later run replays it.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -ge 1 ] && exit 0 || exit 2
fi
build="$(cd "$1" && pwd)"
seconds="${2:-60}"
shift $(( $# >= 2 ? 2 : 1 ))
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${JOULE_FUZZ_OUT:-$build/fuzz-out}"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for dir in "$here"/corpus/*/; do targets+=("$(basename "$dir")"); done
fi

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

failed=()
for target in "${targets[@]}"; do
  fuzzer="$build/tests/fuzz/${target}_fuzzer"
  seeds="$here/corpus/$target"
  if [ ! -x "$fuzzer" ] || [ ! -d "$seeds" ]; then
    echo "fuzz: no harness or no seeds for '$target' ($fuzzer, $seeds)" >&2
    failed+=("$target")
    continue
  fi
  mkdir -p "$out/$target/corpus"
  log="$out/$target/fuzz.log"
  printf 'fuzz: %-18s %ss from %s seeds ... ' "$target" "$seconds" "$(ls "$seeds" | wc -l)"
  # -timeout: one input taking this long is a hang; -rss_limit_mb: and this much memory a leak.
  if "$fuzzer" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2560 -print_final_stats=1 \
      -artifact_prefix="$out/$target/" "$out/$target/corpus" "$seeds" >"$log" 2>&1; then
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    echo "ok (${runs:-?} inputs)"
  else
    echo "FAILED"
    failed+=("$target")
    grep -E '^(==[0-9]+==ERROR|SUMMARY|.*FUZZ_CHECK|.*runtime error)' "$log" | head -5 | sed 's/^/  /' >&2 || true
    for artifact in "$out/$target"/crash-* "$out/$target"/leak-* "$out/$target"/timeout-* "$out/$target"/oom-*; do
      [ -e "$artifact" ] || continue
      echo "  input: $artifact" >&2
      echo "  reproduce: $fuzzer $artifact" >&2
      echo "  after the fix: cp $artifact $seeds/regress-NAME" >&2
    done
    echo "  log: $log" >&2
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
