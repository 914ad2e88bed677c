#!/usr/bin/env bash
# joule-dispatch-combine-bench's device path without a GPU: EP 2 rank processes
# with --device fake (device::FakeDeviceBackend) at one small point. Checks
# that rank 0 writes one JSON line whose fields are sane, that the bytes are
# the BF16 rows the device path moves (one row of hidden x 2 bytes per token
# and peer, the same back in combine), and that every rank's executor took the
# device path (its "rows through ..." log line). With --two-batch-overlap, the
# same with each Run as two micro-batches (the same bytes move).
#
#   fake_device_smoke.sh BUILD_DIR [--two-batch-overlap]
set -euo pipefail
bin="$1/bench/dispatch_combine/joule-dispatch-combine-bench"
tbo="${2:-}"
[ -z "$tbo" ] || [ "$tbo" = --two-batch-overlap ] || { echo "unknown argument '$tbo'"; exit 2; }
[ -x "$bin" ] || { echo "no $bin"; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/rv"
export UCX_TLS=shm,self UCX_WARN_UNUSED_ENV_VARS=n
hidden=256 tokens=32
pids=()
for r in 0 1; do
  timeout 50 "$bin" --rank "$r" --world 2 --dir "$tmp/rv" --hidden "$hidden" --tokens "$tokens" \
    --device fake --target-seconds 0.05 --max-iters 20 --out "$tmp/out.jsonl" $tbo 2>"$tmp/rank$r.log" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
cat "$tmp"/rank*.log
[ "$rc" -eq 0 ] || { echo "FAIL: a rank exited with $rc"; exit 1; }
for r in 0 1; do
  grep -q "rank $r: expert parallelism on .*, rows through device windows${tbo:+, two micro-batches}" \
    "$tmp/rank$r.log" ||
    { echo "FAIL: rank $r did not log the device path's rows through device windows${tbo:+ in two micro-batches}"; exit 1; }
done
cat "$tmp/out.jsonl"
python3 - "$tmp/out.jsonl" "$hidden" "$tokens" "$tbo" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
hidden, tokens, tbo = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] != ""
if len(lines) != 1:
    sys.exit(f"FAIL: {len(lines)} JSON lines, expected 1")
j = json.loads(lines[0])
want = {"impl": "joule-ep-executor", "device": "fake", "ep": 2, "hidden": hidden,
        "tokens": tokens, "top_k": 8, "two_batch_overlap": tbo}
bad = {k: j.get(k) for k, v in want.items() if j.get(k) != v}
if bad or "skipped" in j:
    sys.exit(f"FAIL: fields {bad} (want {want}); skipped: {j.get('skipped')}")
if not j["stats_scope"].startswith("device:"):
    sys.exit(f"FAIL: stats_scope {j['stats_scope']!r} is not the device path's")
if not 3 <= j["iters"] <= 20:
    sys.exit(f"FAIL: iters {j['iters']} outside [3, 20]")
for k in ("latency_us_median", "dispatch_us_median", "combine_us_median", "run_us_median",
          "algbw_GBps", "dispatch_GBps", "combine_GBps"):
    if not 0 < j[k] < 1e7:
        sys.exit(f"FAIL: {k} = {j[k]}")
if not j["dispatch_us_median"] + j["combine_us_median"] <= j["latency_us_median"] * 2 + 1:
    sys.exit("FAIL: dispatch + combine far above the latency")
if j["run_us_median"] < 0.5 * j["latency_us_median"]:
    sys.exit("FAIL: a Run shorter than its dispatch + combine")
# With 8 of 64 experts per token, a token reaches the peer's 32 experts all but
# about 0.3% of the time: about one BF16 row per token each way, nothing else
# on the rows' path (expert ids and weights go over the control transport).
row = 2 * hidden
for k in ("dispatch_bytes_per_rank", "combine_bytes_per_rank"):
    if not 0.9 * tokens * row <= j[k] <= tokens * row:
        sys.exit(f"FAIL: {k} = {j[k]}, expected about {tokens * row} ({tokens} rows of {row} bytes)")
# Means over ranks and iterations, each printed rounded: equal within the rounding.
if abs(j["bytes_per_rank"] - j["dispatch_bytes_per_rank"] - j["combine_bytes_per_rank"]) > 1:
    sys.exit("FAIL: bytes_per_rank is not dispatch + combine")
print("PASS")
PY
