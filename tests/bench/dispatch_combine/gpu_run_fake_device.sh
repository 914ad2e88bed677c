#!/usr/bin/env bash
# bench/dispatch_combine/gpu_run.sh, the script the GPU bundle's dispatch_combine_gpu check
# runs, on the CPU-backed fake device at small points: EP 2 and 4 rank processes, the memcpy
# baseline (joule-memcpy-bench --device fake), the two-batch-overlap pair and gpu_report.py.
# Checks the report it writes: every point of every EP joined to its baseline at the
# executor's payload size, rows through device windows, both overlap runs measured. It
# measures nothing about a GPU; it keeps a lease from being spent on a script error.
#
#   gpu_run_fake_device.sh BUILD_DIR
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
build=$1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
EPS="2 4" TOKENS=16,64 HIDDEN=256 TARGET_SECONDS=0.05 TBO_INTERMEDIATE=16 \
  "$root/bench/dispatch_combine/gpu_run.sh" "$build" --out "$tmp" --device fake ||
  { echo "FAIL: gpu_run.sh exited with $?"; tail -n 5 "$tmp"/dispatch_combine-gpu-raw/*.log; exit 1; }
grep -q "The fake device" "$tmp/dispatch_combine-gpu.md" ||
  { echo "FAIL: the report does not say it ran on the fake device"; exit 1; }
python3 - "$tmp/dispatch_combine-gpu.json" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))
def fail(msg):
    sys.exit(f"FAIL: {msg}")
got = sorted((r["ep"], r["tokens"]) for r in res["rows"])
if got != [(2, 16), (2, 64), (4, 16), (4, 64)]:
    fail(f"executor points {got}")
for r in res["rows"]:
    where = f"EP {r['ep']} tokens {r['tokens']}"
    if r["row_path"] != "device windows (the fake device: host memory)":
        fail(f"{where}: row path {r['row_path']!r}")
    if r["device"] != "fake" or not r["stats_scope"].startswith("device:"):
        fail(f"{where}: device {r['device']!r}, stats scope {r['stats_scope']!r}")
    # The baseline copies the dispatch bytes a rank is expected to send (payload.h); the
    # executor measured what it sent under random routing: within a few percent.
    if not r["memcpy_bytes"] or abs(r["memcpy_bytes"] - r["dispatch_bytes_per_rank"]) > 0.1 * r["memcpy_bytes"]:
        fail(f"{where}: baseline bytes {r['memcpy_bytes']} vs dispatched {r['dispatch_bytes_per_rank']}")
    for k in ("dispatch_vs_memcpy", "combine_vs_memcpy", "algbw_vs_memcpy"):
        if not r[k] or r[k] <= 0:
            fail(f"{where}: {k} = {r[k]}")
if {m["impl"] for m in res["memcpy"]} != {"fake-device-copy"} or len(res["memcpy"]) != 4:
    fail(f"baseline points {res['memcpy']}")
tbo = res["two_batch_overlap"]
if sorted(t["tokens"] for t in tbo) != [16, 64] or any(
        not (t["one_batch_run_us"] > 0 and t["two_batches_run_us"] > 0) for t in tbo):
    fail(f"two-batch overlap rows {tbo}")
if res["failures"] or res["skipped"]:
    fail(f"failures {res['failures']}, skipped {res['skipped']}")
print("PASS: 4 executor points joined to their baselines, 2 overlap points")
PY
