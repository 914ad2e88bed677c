#!/usr/bin/env bash
# Engine benchmark: Joule's engine vs the PyTorch reference on the `mini`
# checkpoint, with the memory-bandwidth roofline measured in the same run.
#   bench/engine/run.sh [BUILD_DIR] [--family qwen3_moe]
# Writes bench/results/engine-<family>-mini.{json,md}.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-$root/build/default}"
family="${2:-qwen3_moe}"
threads="$(nproc)"
model="$build/models/$family-mini"
if [ ! -f "$model/config.json" ]; then
  "$build/worker/tools/joule-make-model" --family "$family" --preset mini --out "$model"
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$build/bench/engine/joule-engine-bench" --model "$model" --threads "$threads" \
  --batch 1,8,64 --prompt-len 32 --decode-steps 32 --prefill-len 512 --json "$tmp/joule.json"
ref="$root/tests/reference/reference.py"
/usr/bin/python3 "$ref" bench --model "$model" --threads "$threads" \
  --batch 1 --batch 8 --batch 64 --prompt-len 32 --decode-steps 32 --json "$tmp/torch_decode.json" >/dev/null
/usr/bin/python3 "$ref" bench --model "$model" --threads "$threads" \
  --batch 1 --prompt-len 512 --decode-steps 0 --json "$tmp/torch_prefill.json" >/dev/null
/usr/bin/python3 - "$tmp/torch_decode.json" "$tmp/torch_prefill.json" > "$tmp/torch.json" <<'PY'
import json, sys
d, p = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(json.dumps({"torch_version": d["torch_version"], "threads": d["threads"],
                  "decode": {str(r["batch"]): {"tokens_per_s": r["decode_tokens_per_s"]} for r in d["results"]},
                  "prefill": {"len": p["results"][0]["prompt_len"], "tokens_per_s": p["results"][0]["prefill_tokens_per_s"]}}))
PY

JOULE_BENCH_COMMAND="bench/engine/run.sh $*" /usr/bin/python3 - "$tmp/joule.json" "$tmp/torch.json" "$root/bench/results" "$family" <<'PY'
import json, sys, platform, subprocess, datetime, os
j = json.load(open(sys.argv[1])); t = json.load(open(sys.argv[2])); out, family = sys.argv[3], sys.argv[4]
cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')
res = {"date": datetime.date.today().isoformat(), "machine": f"{cpu}, {os.cpu_count()} cores",
       "command": os.environ.get("JOULE_BENCH_COMMAND", ""), "joule": j, "pytorch_reference": t,
       "ratios": {}}
lines = [f"# Engine benchmark: {family} mini", "",
         f"Machine: {res['machine']}; threads {j['threads']}; date {res['date']}.",
         f"Command: `{res['command']}`", "",
         f"Memory read bandwidth (same run): {j['read_bandwidth_gbs']:.1f} GB/s; "
         f"active weights per token {j['active_bytes_per_token']/1e6:.2f} MB -> "
         f"batch-1 roofline {j['roofline_tokens_per_s_batch1']:.1f} tokens/s.", "",
         "| measurement | Joule tokens/s | PyTorch reference tokens/s | speed-up |", "|---|---|---|---|"]
for b in sorted(j["decode"], key=int):
    jt = j["decode"][b]["tokens_per_s"]; tt = t["decode"].get(b, {}).get("tokens_per_s")
    sp = jt / tt if tt else None
    res["ratios"][f"speedup_decode_batch{b}"] = sp
    lines.append(f"| decode batch {b} | {jt:.1f} | {tt:.1f} | {sp:.1f}x |" if tt else f"| decode batch {b} | {jt:.1f} | - | - |")
jp = j["prefill"]["tokens_per_s"]; tp = t.get("prefill", {}).get("tokens_per_s")
res["ratios"]["speedup_prefill"] = jp / tp if tp else None
lines.append(f"| prefill {j['prefill']['len']} tokens | {jp:.1f} | {tp:.1f} | {jp/tp:.1f}x |" if tp else f"| prefill | {jp:.1f} | - | - |")
res["ratios"]["roofline_fraction_batch1"] = j["roofline_fraction_batch1"]
lines += ["", f"Decode at batch 1 = {100*j['roofline_fraction_batch1']:.0f}% of the memory-bandwidth roofline.", ""]
os.makedirs(out, exist_ok=True)
base = os.path.join(out, f"engine-{family}-mini")
json.dump(res, open(base + ".json", "w"), indent=2)
open(base + ".md", "w").write("\n".join(lines))
print("\n".join(lines))
PY
