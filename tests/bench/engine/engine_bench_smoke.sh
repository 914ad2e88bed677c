#!/usr/bin/env bash
# joule-engine-bench end to end on the tiny model (CPU, one thread, a few steps), as
# bench/engine/run.sh and the GPU bundle run it: every row is in its JSON, and the roofline's
# bandwidth was read over a buffer the model's size (16 MiB to 1 GiB) with the 1 GiB figure
# beside it. The numbers measure nothing here (the tiny model, a loaded CI machine).
#   engine_bench_smoke.sh BUILD_DIR
set -euo pipefail
BUILD="$1"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$BUILD/bench/engine/joule-engine-bench" --model "$BUILD/models/qwen3_moe-tiny" --threads 1 \
  --batch 1,2 --decode-steps 2 --prefill-len 8 --energy-source model --json "$out/result.json" \
  >"$out/log" 2>&1 || { cat "$out/log"; exit 1; }
grep -q "over .* MB (the model's weights; 1 GiB: " "$out/log" || { cat "$out/log"; exit 1; }
python3 - "$out/result.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
want = min(max(j["loaded_bytes"], 16 << 20), 1 << 30)
assert j["bandwidth_buffer_bytes"] == want, (j["bandwidth_buffer_bytes"], want)
for key in ("read_bandwidth_gbs", "read_bandwidth_gbs_1gib", "roofline_tokens_per_s_batch1",
            "roofline_fraction_batch1"):
    assert j[key] > 0, (key, j[key])
assert sorted(j["decode"]) == ["1", "2"], sorted(j["decode"])
assert all(row["tokens_per_s"] > 0 for row in j["decode"].values()), j["decode"]
assert j["prefill"]["len"] == 8 and j["prefill"]["tokens_per_s"] > 0, j["prefill"]
print(f"PASS: roofline read over {j['bandwidth_buffer_bytes'] / 1e6:.0f} MB "
      f"(the model loads {j['loaded_bytes'] / 1e6:.1f} MB)")
PY
