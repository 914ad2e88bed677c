#!/usr/bin/env python3
"""Result files of the engine benchmark: bench/results-style JSON + a markdown table of Joule
against a baseline measured in the same run, with the ratios and the memory roofline.

    report.py cpu --joule J.json --torch-decode D.json --torch-prefill P.json --family F --out DIR
        bench/engine/run.sh: Joule's engine vs tests/reference/reference.py on the CPU;
        writes DIR/engine-F-mini.{json,md}.
    report.py fp8 --bf16 B.json --fp8 F.json --out DIR
        bench/engine/deepseek_v3_run.sh: the two `cpu` results of the DeepSeek-V3 mini (BF16 and
        FP8 weights) side by side; writes DIR/engine-deepseek_v3-mini-fp8-vs-bf16.{json,md}.
    report.py gpu --joule J.json --hf H.json --name NAME --out DIR [--gpu-info G.json]
                  [--joule-error TEXT] [--hf-error TEXT]
        bench/engine/gpu_run.sh: joule-engine-bench --device cuda:N vs transformers
        (bench/engine/hf_bench.py) on the same checkpoint and GPU; writes DIR/engine-NAME.{json,md}.
        Either side may be missing (its error is then shown in its column).

The command is taken from $JOULE_BENCH_COMMAND. Ratios are Joule / baseline, per row.
"""

import argparse
import datetime
import json
import os
import sys


def load(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def ratio(a, b):
    return a / b if a and b else None


def fmt(value, spec=".1f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def decode_batches(*results):
    """Every decode batch size any of the results has, in increasing order."""
    batches = set()
    for r in results:
        batches.update((r or {}).get("decode", {}).keys())
    return sorted(batches, key=int)


def row_value(result, batch, key):
    """decode[batch][key] (or prefill[key] for batch None) where it was measured, else None."""
    if not result:
        return None
    row = result.get("prefill", {}) if batch is None else result.get("decode", {}).get(batch, {})
    return row.get(key)


def write(out_dir, base, res, lines):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, base)
    with open(path + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------
# CPU: Joule vs the PyTorch reference (bench/engine/run.sh)
# ------------------------------------------------------------------------------------------

def torch_reference(decode, prefill):
    """reference.py bench's two JSON outputs in the shape of Joule's."""
    return {"torch_version": decode["torch_version"], "threads": decode["threads"],
            "decode": {str(r["batch"]): {"tokens_per_s": r["decode_tokens_per_s"]} for r in decode["results"]},
            "prefill": {"len": prefill["results"][0]["prompt_len"],
                        "tokens_per_s": prefill["results"][0]["prefill_tokens_per_s"]}}


def buffer_note(j):
    """Over how many bytes the roofline's bandwidth was read: the model's weights, which may fit
    the caches (older runs: always 1 GiB)."""
    if not j.get("bandwidth_buffer_bytes"):
        return ""
    return (f" over {j['bandwidth_buffer_bytes']/1e6:.0f} MB, the model's weights "
            f"({j['read_bandwidth_gbs_1gib']:.1f} GB/s over 1 GiB)")


def cpu_report(j, t, family, out_dir, command):
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')
    res = {"date": datetime.date.today().isoformat(), "machine": f"{cpu}, {os.cpu_count()} cores",
           "command": command, "joule": j, "pytorch_reference": t, "ratios": {}}
    lines = [f"# Engine benchmark: {family} mini", "",
             f"Machine: {res['machine']}; threads {j['threads']}; date {res['date']}.",
             f"Command: `{res['command']}`", "",
             f"Memory read bandwidth (same run): {j['read_bandwidth_gbs']:.1f} GB/s{buffer_note(j)}; "
             f"active weights per token {j['active_bytes_per_token']/1e6:.2f} MB -> "
             f"batch-1 roofline {j['roofline_tokens_per_s_batch1']:.1f} tokens/s.", ""]
    rows = []
    for b in sorted(j["decode"], key=int):
        jt, tt = j["decode"][b]["tokens_per_s"], row_value(t, b, "tokens_per_s")
        res["ratios"][f"speedup_decode_batch{b}"] = ratio(jt, tt)
        rows.append([f"decode batch {b}", f"{jt:.1f}", fmt(tt), fmt(ratio(jt, tt), suffix="x")])
    jp, tp = j["prefill"]["tokens_per_s"], row_value(t, None, "tokens_per_s")
    res["ratios"]["speedup_prefill"] = ratio(jp, tp)
    rows.append([f"prefill {j['prefill']['len']} tokens" if tp else "prefill", f"{jp:.1f}", fmt(tp),
                 fmt(ratio(jp, tp), suffix="x")])
    lines += table(["measurement", "Joule tokens/s", "PyTorch reference tokens/s", "speed-up"], rows)
    res["ratios"]["roofline_fraction_batch1"] = j["roofline_fraction_batch1"]
    lines += ["", f"Decode at batch 1 = {100*j['roofline_fraction_batch1']:.0f}% of the memory-bandwidth roofline.", ""]
    lines += kv_lines(j, res)
    write(out_dir, f"engine-{family}-mini", res, lines)


def kv_lines(j, res):
    """The KV cache's bytes per token against per-head keys and values (MLA's saving)."""
    stored, per_head = j.get("kv_cache_bytes_per_token"), j.get("kv_cache_bytes_per_token_per_head_kv")
    if not stored or not per_head:
        return []
    res["ratios"]["kv_bytes_per_head_kv_over_stored"] = per_head / stored
    return [f"KV cache: {stored} bytes per token ({j['kv_cache_type']}, every layer); per-head keys "
            f"and values would take {per_head} bytes: {per_head / stored:.1f}x more.", ""]


def fp8_report(bf16, fp8, out_dir, command):
    """FP8 against BF16 weights, each measured with its own PyTorch-reference baseline
    (engine-deepseek_v3-mini.json and engine-deepseek_v3_fp8-mini.json of report.py cpu)."""
    jb, jf = bf16["joule"], fp8["joule"]
    res = {"date": datetime.date.today().isoformat(), "machine": bf16["machine"], "command": command,
           "ratios": {}}
    lines = ["# Engine benchmark: deepseek_v3 mini, FP8 weights against BF16", "",
             f"Machine: {bf16['machine']}; threads {jb['threads']}; date {res['date']}.",
             f"Command: `{command}`", "",
             f"Weights: {jb['loaded_bytes']/1e6:.1f} MB BF16, {jf['loaded_bytes']/1e6:.1f} MB FP8; "
             f"active per token {jb['active_bytes_per_token']/1e6:.2f} MB BF16, "
             f"{jf['active_bytes_per_token']/1e6:.2f} MB FP8 "
             f"({jb['active_bytes_per_token']/jf['active_bytes_per_token']:.2f}x fewer bytes).", ""]
    rows = []
    for b in sorted(jb["decode"], key=lambda x: int(x)):
        tb, tf = jb["decode"][b]["tokens_per_s"], row_value(jf, b, "tokens_per_s")
        rb = row_value(bf16["pytorch_reference"], b, "tokens_per_s")
        rf = row_value(fp8["pytorch_reference"], b, "tokens_per_s")
        res["ratios"][f"fp8_over_bf16_decode_batch{b}"] = ratio(tf, tb)
        rows.append([f"decode batch {b}", f"{tb:.1f}", fmt(tf), fmt(ratio(tf, tb), ".2f", "x"),
                     fmt(rb), fmt(rf)])
    pb, pf = jb["prefill"]["tokens_per_s"], jf["prefill"]["tokens_per_s"]
    res["ratios"]["fp8_over_bf16_prefill"] = ratio(pf, pb)
    rows.append([f"prefill {jb['prefill']['len']} tokens", f"{pb:.1f}", f"{pf:.1f}",
                 fmt(ratio(pf, pb), ".2f", "x"), fmt(row_value(bf16["pytorch_reference"], None, "tokens_per_s")),
                 fmt(row_value(fp8["pytorch_reference"], None, "tokens_per_s"))])
    lines += table(["measurement", "Joule BF16 tokens/s", "Joule FP8 tokens/s", "FP8 / BF16",
                    "reference BF16", "reference FP8 (dequantized)"], rows)
    for name, j in (("BF16", jb), ("FP8", jf)):
        res["ratios"][f"roofline_fraction_batch1_{name.lower()}"] = j["roofline_fraction_batch1"]
        lines += ["", f"{name}: batch-1 roofline {j['roofline_tokens_per_s_batch1']:.1f} tokens/s "
                      f"({j['read_bandwidth_gbs']:.1f} GB/s{buffer_note(j)}); decode at batch 1 = "
                      f"{100*j['roofline_fraction_batch1']:.0f}% of it."]
    lines += [""] + kv_lines(jb, res)
    write(out_dir, "engine-deepseek_v3-mini-fp8-vs-bf16", res, lines)


# ------------------------------------------------------------------------------------------
# GPU: Joule vs transformers (bench/engine/gpu_run.sh)
# ------------------------------------------------------------------------------------------

# Where joule-engine-bench may put its bandwidth on the GPU, most specific first.
JOULE_BANDWIDTH_KEYS = ("copy_bandwidth_gbs", "device_copy_bandwidth_gbs", "read_bandwidth_gbs")


def first_key(d, keys):
    for k in keys:
        if d and d.get(k):
            return k, d[k]
    return None, None


def roofline(j, h):
    """The batch-1 decode roofline: active bytes per token / the best bandwidth measured in this
    run (either tool's: the larger one gives the lower, conservative, fraction)."""
    candidates = []
    if h and h.get("copy_bandwidth_gbs"):
        candidates.append((h["copy_bandwidth_gbs"], "hf_bench.py device-to-device copy, read + write"))
    key, value = first_key(j, JOULE_BANDWIDTH_KEYS)
    if value:
        candidates.append((value, f"joule-engine-bench {j.get('bandwidth_kind') or key}"))
    active = (j or {}).get("active_bytes_per_token") or (h or {}).get("active_bytes_per_token")
    if not candidates or not active:
        return None
    bandwidth, source = max(candidates)
    return {"bandwidth_gbs": bandwidth, "bandwidth_source": source, "all_bandwidths_gbs": dict(
        (s, b) for b, s in candidates), "active_bytes_per_token": active,
        "active_bytes_source": "joule-engine-bench" if (j or {}).get("active_bytes_per_token") else "hf_bench.py",
        "tokens_per_s_batch1": bandwidth * 1e9 / active}


def engines_line(h):
    if not h:
        return "transformers: not measured."
    engines = []
    for name, label in (("vllm", "vLLM"), ("sglang", "SGLang")):
        found = h.get("other_engines", {}).get(name, {})
        engines.append(f"{label}: " + (f"installed ({found.get('version') or '?'}), not run"
                                       if found.get("installed") else "not installed"))
    return (f"transformers {h['transformers_version']} (torch {h['torch_version']}, BF16, attention "
            f"{h.get('attn_implementation')}, experts {h.get('experts_implementation')}, eager mode). "
            + "; ".join(engines) + ".")


def gpu_line(g):
    if not g:
        return "GPU: unknown (no nvidia-smi output)."
    return (f"GPU: {g.get('name', '?')} ({g.get('memory_total', '?')}, driver {g.get('driver_version', '?')}, "
            f"power limit {g.get('power_limit', '?')}, PCI {g.get('pci_bus_id', '?')}); "
            f"host {g.get('host_cores', '?')} cores.")


def missing(result, batch):
    """Why a tool has no number for a row: its error, or that a run cut short never got there."""
    error = row_value(result, batch, "error")
    if error:
        return error[:60]
    if result and result.get("complete") is False:
        return "not reached"
    return "-"


def gpu_report(j, h, name, out_dir, command, gpu, joule_error=None, hf_error=None, tool_commands=None):
    res = {"date": datetime.date.today().isoformat(), "gpu": gpu, "command": command,
           "tool_commands": tool_commands or {}, "model": name,
           "joule": j, "transformers": h, "errors": {}, "ratios": {}, "tokens_per_joule": {}}
    if joule_error:
        res["errors"]["joule"] = joule_error
    if hf_error:
        res["errors"]["transformers"] = hf_error
    model_dir = (j or h or {}).get("model", name)
    lines = [f"# Engine benchmark on the GPU: {name}", "",
             gpu_line(gpu) + f" Date {res['date']}.",
             f"Checkpoint: `{model_dir}`.",
             f"Command: `{command}`"]
    lines += [f"- {who}: `{c}`" for who, c in res["tool_commands"].items() if c]
    lines += ["",
             "Baselines in the same run, same checkpoint, same GPU: " + engines_line(h), ""]
    roof = roofline(j, h)
    res["roofline"] = roof
    if roof:
        lines += [f"Memory bandwidth (same run): {roof['bandwidth_gbs']:.0f} GB/s ({roof['bandwidth_source']}); "
                  f"active weights per token {roof['active_bytes_per_token']/1e6:.1f} MB -> "
                  f"batch-1 decode roofline {roof['tokens_per_s_batch1']:.0f} tokens/s.", ""]
    rows = []
    for b in decode_batches(j, h):
        jt, ht = row_value(j, b, "tokens_per_s"), row_value(h, b, "tokens_per_s")
        jj, hj = row_value(j, b, "tokens_per_joule"), row_value(h, b, "tokens_per_joule")
        res["ratios"][f"joule_over_transformers_decode_batch{b}"] = ratio(jt, ht)
        res["tokens_per_joule"][f"decode_batch{b}"] = {"joule": jj, "transformers": hj}
        rows.append([f"decode batch {b}", fmt(jt) if jt else missing(j, b), fmt(ht) if ht else missing(h, b),
                     fmt(ratio(jt, ht), ".2f", "x"), fmt(jj, ".2f"), fmt(hj, ".2f")])
    jp, hp = row_value(j, None, "tokens_per_s"), row_value(h, None, "tokens_per_s")
    if jp or hp:
        length = row_value(j, None, "len") or row_value(h, None, "len")
        res["ratios"]["joule_over_transformers_prefill"] = ratio(jp, hp)
        jj, hj = row_value(j, None, "tokens_per_joule"), row_value(h, None, "tokens_per_joule")
        res["tokens_per_joule"]["prefill"] = {"joule": jj, "transformers": hj}
        rows.append([f"prefill {length} tokens", fmt(jp) if jp else missing(j, None),
                     fmt(hp) if hp else missing(h, None), fmt(ratio(jp, hp), ".2f", "x"),
                     fmt(jj, ".2f"), fmt(hj, ".2f")])
    lines += table(["measurement", "Joule tokens/s", "transformers tokens/s", "Joule / transformers",
                    "Joule tokens/J", "transformers tokens/J"], rows)
    notes = []
    if roof:
        for who, r in (("joule", j), ("transformers", h)):
            t1 = row_value(r, "1", "tokens_per_s")
            if t1:
                res["ratios"][f"{who}_roofline_fraction_batch1"] = t1 / roof["tokens_per_s_batch1"]
        fj = res["ratios"].get("joule_roofline_fraction_batch1")
        fh = res["ratios"].get("transformers_roofline_fraction_batch1")
        notes.append(f"Decode at batch 1: Joule {fmt(fj and 100 * fj, '.1f', '%')} of the roofline (aim >= 50%), "
                     f"transformers {fmt(fh and 100 * fh, '.1f', '%')}.")
    r64 = res["ratios"].get("joule_over_transformers_decode_batch64")
    if r64:
        notes.append(f"Decode at batch 64: Joule = {r64:.1f}x transformers (aim >= 10x).")
    for who, r in (("Joule", j), ("transformers", h)):
        if r and r.get("energy_source"):
            estimate = " (an ESTIMATE, not a measurement)" if r["energy_source"] == "model" else ""
            notes.append(f"{who} tokens/J: {r['energy_source']}, {r.get('energy_meter', '')}{estimate}.")
        elif r:
            notes.append(f"{who} tokens/J: no energy reading ({r.get('energy_meter') or 'no meter'}).")
    for who, err in res["errors"].items():
        notes.append(f"{who} failed: {err}")
    lines += [""] + notes + [""]
    write(out_dir, f"engine-{name}", res, lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cpu")
    p.add_argument("--joule", required=True)
    p.add_argument("--torch-decode", required=True)
    p.add_argument("--torch-prefill", required=True)
    p.add_argument("--family", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("fp8")
    p.add_argument("--bf16", required=True, help="engine-deepseek_v3-mini.json of report.py cpu")
    p.add_argument("--fp8", required=True, help="engine-deepseek_v3_fp8-mini.json of report.py cpu")
    p.add_argument("--out", required=True)
    p = sub.add_parser("gpu")
    p.add_argument("--joule", default="")
    p.add_argument("--hf", default="")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--gpu-info", default="")
    p.add_argument("--joule-error", default="")
    p.add_argument("--hf-error", default="")
    p.add_argument("--joule-command", default="")
    p.add_argument("--hf-command", default="")
    args = ap.parse_args(argv)
    command = os.environ.get("JOULE_BENCH_COMMAND", "")
    if args.cmd == "cpu":
        cpu_report(load(args.joule), torch_reference(load(args.torch_decode), load(args.torch_prefill)),
                   args.family, args.out, command)
        return 0
    if args.cmd == "fp8":
        fp8_report(load(args.bf16), load(args.fp8), args.out, command)
        return 0
    j, h = load(args.joule), load(args.hf)
    if j is None and h is None:
        print(f"report.py: neither {args.joule or '(no Joule JSON)'} nor {args.hf or '(no hf JSON)'} exists",
              file=sys.stderr)
        return 1
    gpu_report(j, h, args.name, args.out, command, load(args.gpu_info), args.joule_error or None,
               args.hf_error or None, {"joule": args.joule_command, "transformers": args.hf_command})
    return 0


if __name__ == "__main__":
    sys.exit(main())
