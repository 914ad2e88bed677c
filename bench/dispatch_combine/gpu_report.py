#!/usr/bin/env python3
"""Merges the raw results of bench/dispatch_combine/gpu_run.sh into
RESULTS_DIR/dispatch_combine-gpu.{json,md}: per (EP, tokens per rank) point the
executor's dispatch and combine latency and bandwidth on the GPU, its ratio to
cudaMemcpyAsync device-to-device on the same GPU at the same payload size
(measured in the same run), and the row path the ranks logged; DeepEP's
published intranode figures beside them.

  gpu_report.py RAW_DIR RESULTS_DIR COMMAND

RAW_DIR holds joule-ep<EP>.jsonl (rank 0's lines), ep<EP>-rank<R>.log (every
rank's stderr), memcpy.jsonl and nvidia-smi.csv.
"""
import datetime
import glob
import json
import os
import re
import sys

AIM = 0.7  # the aim: bandwidth >= 0.7x cudaMemcpy D2D on the same GPU

# Published, not measured here (deepseek-ai/DeepEP docs/legacy.md, "Normal kernels with
# NVLink and RDMA forwarding"; it was the V1 README's table before the V2 release).
DEEPEP = {
    "source": "github.com/deepseek-ai/DeepEP docs/legacy.md (V1 README table), "
              "commit 0297fc801788b14b338a46554faca28d419e518a",
    "setting": "H800 (~160 GB/s NVLink maximum), 4096 tokens per batch, hidden 7168, top-4 "
               "groups, top-8 experts, FP8 dispatching and BF16 combining; one GPU per rank",
    "intranode_ep8": {"dispatch_GBps": 153, "combine_GBps": 158,
                      "bottleneck": "NVLink"},
    "low_latency_ep8_128_tokens_rdma": {"dispatch_us": 77, "dispatch_GBps": 98,
                                        "combine_us": 114, "combine_GBps": 127,
                                        "note": "pure RDMA (CX7 400 Gb/s), not intranode"},
}

DEFINITIONS = {
    "dispatch_us_median": "per iteration the slowest rank's ExpertParallelExecutor::stats() "
                          "dispatch seconds, median: on a device the layout and count exchange "
                          "(host), the router choices' exchange over the control transport, "
                          "the layout's upload, packing (F32 -> BF16 rows written straight into "
                          "the destination's window) and the barrier that publishes the rows",
    "combine_us_median": "the same for combine seconds: waiting for this rank's expert kernels "
                         "(the stream is synchronized before the rows move), the return rows "
                         "(BF16 weighted sums), the barrier, and the reduce's launch",
    "latency_us_median": "per iteration the slowest rank's dispatch + combine, median",
    "run_us_median": "wall time of Run plus a device synchronize (the reduce done), slowest rank",
    "bytes_per_rank": "payload bytes a rank sends to other ranks, dispatch (one BF16 row of "
                      "hidden x 2 bytes per token and destination rank) plus combine (one "
                      "row back per such row), mean over ranks and iterations; expert ids and "
                      "router weights go over the control transport and are not counted",
    "dispatch_GBps": "dispatch_bytes_per_rank / dispatch_us_median",
    "combine_GBps": "combine_bytes_per_rank / combine_us_median",
    "algbw_GBps": "bytes_per_rank / latency_us_median",
    "memcpy_GBps": "one cudaMemcpyAsync device-to-device of the expected dispatch bytes per "
                   "rank on the same GPU, timed with cudaEvents, median of 100 (bytes / time; "
                   "each byte read once and written once)",
    "vs_memcpy": "dispatch_GBps, combine_GBps and algbw_GBps / memcpy_GBps",
}


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def machine(raw):
    info = {"host_cores": os.cpu_count()}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                           if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    path = os.path.join(raw, "nvidia-smi.csv")
    values = [v.strip() for v in open(path).read().strip().split(",")] if os.path.exists(path) else []
    fields = ["gpu", "driver_version", "memory_total", "pci_bus_id"]
    if len(values) == len(fields):
        info.update(zip(fields, values))
    else:
        info["nvidia_smi"] = ",".join(values) or "not run"
    return info


def row_paths(raw, ep):
    """What the ranks of one EP run logged about how rows move: the path chosen at
    construction ("rows through ..."), then whether the windows were mapped or the
    ranks fell back to an all-to-all (and why)."""
    chosen, messages = set(), set()
    for path in sorted(glob.glob(os.path.join(raw, f"ep{ep}-rank*.log"))):
        for line in open(path, errors="replace"):
            m = re.search(r"rank \d+: (.*(rows through (.*)|dispatch/combine .*))$", line.strip())
            if not m:
                continue
            messages.add(m.group(1))
            if m.group(3):
                chosen.add(m.group(3))
    fallback = sorted(m for m in messages if "through all-to-all-v" in m)
    mapped = any("write into peers' shared windows" in m for m in messages)
    if fallback:
        path = "host-staged all-to-all (windows not mapped: " + "; ".join(fallback) + ")"
    elif chosen == {"device windows"} and mapped:
        on_gpu = any(re.search(r"expert parallelism on cuda", m) for m in messages)
        path = "device windows" + (" (CUDA IPC)" if on_gpu else " (the fake device: host memory)")
    else:
        path = ", ".join(sorted(chosen)) or "not logged"
    return path, sorted(messages)


def ratio(x, base):
    return x / base if x and base else None


def join(raw):
    memcpy = {(m["ep"], m["hidden"], m["tokens"]): m for m in load(os.path.join(raw, "memcpy.jsonl"))}
    rows, skipped = [], []
    eps = sorted({int(re.search(r"joule-ep(\d+)\.jsonl$", p).group(1))
                  for p in glob.glob(os.path.join(raw, "joule-ep*.jsonl"))})
    for ep in eps:
        path, messages = row_paths(raw, ep)
        for j in load(os.path.join(raw, f"joule-ep{ep}.jsonl")):
            if "skipped" in j:
                skipped.append(j)
                continue
            m = memcpy.get((j["ep"], j["hidden"], j["tokens"]))
            base = m["GBps"] if m else None
            rows.append(dict(j, row_path=path, row_path_log=messages,
                             memcpy_bytes=m["bytes"] if m else None, memcpy_GBps=base,
                             dispatch_vs_memcpy=ratio(j.get("dispatch_GBps"), base),
                             combine_vs_memcpy=ratio(j.get("combine_GBps"), base),
                             algbw_vs_memcpy=ratio(j["algbw_GBps"], base)))
    return rows, skipped, list(memcpy.values())


def two_batch_overlap(raw):
    """EP 2 with real expert work, one batch per Run against two overlapped
    micro-batches: per point the Run time of each and two / one (< 1: it pays)."""
    one = {j["tokens"]: j for j in load(os.path.join(raw, "joule-tbo-one.jsonl")) if "skipped" not in j}
    two = {j["tokens"]: j for j in load(os.path.join(raw, "joule-tbo-two.jsonl")) if "skipped" not in j}
    return [{"ep": one[t]["ep"], "hidden": one[t]["hidden"], "tokens": t,
             "moe_intermediate": one[t].get("moe_intermediate"),
             "one_batch_run_us": one[t]["run_us_median"], "two_batches_run_us": two[t]["run_us_median"],
             "two_over_one": ratio(two[t]["run_us_median"], one[t]["run_us_median"])}
            for t in sorted(set(one) & set(two))]


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(res):
    mc = res["machine"]
    gpu = mc.get("gpu") or mc.get("nvidia_smi")
    lines = ["# Dispatch/combine benchmark: ExpertParallelExecutor on one GPU", "",
             f"GPU: {gpu}, driver {mc.get('driver_version', '?')}, {mc.get('memory_total', '?')}; "
             f"host {mc.get('cpu', '?')}, {mc['host_cores']} cores. Date {res['date']}.",
             f"Command: `{res['command']}`", ""]
    if any(m.get("impl") == "fake-device-copy" for m in res["memcpy"]):
        lines += ["**The fake device (CPU-backed): a check of the scripts, not a GPU "
                  "measurement.**", ""]
    lines += [
             "Every rank is one process, and all ranks share the one GPU: rows move through "
             "CUDA IPC windows in its memory (each rank writes its BF16 rows straight into the "
             "destination rank's window), control messages (counts, router choices, barriers) "
             "over UCX shared memory on the host. Synthetic one-MoE-layer Qwen3-MoE "
             "checkpoint: 64 experts, top-8, moe_intermediate_size 8 (tiny expert GEMMs), "
             "contiguous placement, uniform random routing, fresh every iteration, a barrier "
             "before each Run. On a device, dispatch seconds include the router choices' "
             "exchange and the layout's upload; combine seconds include waiting for the expert "
             "kernels. Bandwidth = payload bytes a rank sends to other ranks / time; baseline: "
             "cudaMemcpyAsync device-to-device of the expected dispatch bytes per rank on the "
             f"same GPU in the same run. The aim is >= {AIM}x of it.", "",
             "| EP | hidden | tokens/rank | row path | iters | dispatch us | combine us | "
             "latency us | Run us | bytes/rank (d + c) | dispatch GB/s | combine GB/s | "
             "algbw GB/s | cudaMemcpy GB/s | dispatch / memcpy | combine / memcpy | "
             "algbw / memcpy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['ep']} | {r['hidden']} | {r['tokens']} | {r['row_path']} | {r['iters']} | "
            f"{r['dispatch_us_median']:.1f} | {r['combine_us_median']:.1f} | "
            f"{r['latency_us_median']:.1f} | {r['run_us_median']:.1f} | "
            f"{r['dispatch_bytes_per_rank']:.0f} + {r['combine_bytes_per_rank']:.0f} | "
            f"{fmt(r.get('dispatch_GBps'))} | {fmt(r.get('combine_GBps'))} | "
            f"{r['algbw_GBps']:.2f} | {fmt(r['memcpy_GBps'])} | {fmt(r['dispatch_vs_memcpy'])} | "
            f"{fmt(r['combine_vs_memcpy'])} | {fmt(r['algbw_vs_memcpy'])} |")
    if not res["rows"]:
        lines.append("| (no executor results: see the rank logs in dispatch_combine-gpu-raw/) |"
                     + " |" * 16)
    if res["skipped"]:
        lines += ["", "Skipped: " + ", ".join(
            f"EP {s['ep']} hidden {s['hidden']} tokens {s['tokens']} ({s['skipped']})"
            for s in res["skipped"]) + "."]
    lines += ["", "cudaMemcpyAsync D2D on the same GPU: " + (", ".join(
        f"{m['bytes']} B {m['GBps']:.0f} GB/s" for m in res["memcpy"]) or "not measured") + "."]
    d = res["deepep_published"]
    lines += ["", "DeepEP's published figures (not measured here; " + d["source"] + "): "
              f"{d['setting']}: intranode EP 8 dispatch {d['intranode_ep8']['dispatch_GBps']} "
              f"GB/s, combine {d['intranode_ep8']['combine_GBps']} GB/s (NVLink bottleneck "
              "bandwidth). Those move rows between 8 GPUs over NVLink; here every rank shares "
              "one GPU, so a row's move is a write within its HBM, which cudaMemcpy bounds."]
    lines += ["", "Two-batch overlap (each Run as two micro-batches whose exchanges wait while "
              "the other's experts run, ExpertParallelOptions::two_batch_overlap), EP 2 on the "
              "same GPU, experts with real work: median Run time, slowest rank.", "",
              "| EP | hidden | moe_intermediate | tokens/rank | one batch Run us | two batches Run us "
              "| two / one |", "|---|---|---|---|---|---|---|"]
    for t in res["two_batch_overlap"]:
        lines.append(f"| {t['ep']} | {t['hidden']} | {t['moe_intermediate']} | {t['tokens']} | "
                     f"{t['one_batch_run_us']:.1f} | {t['two_batches_run_us']:.1f} | "
                     f"{fmt(t['two_over_one'])} |")
    if not res["two_batch_overlap"]:
        lines.append("| (not measured) |" + " |" * 6)
    if res["failures"]:
        lines += ["", "Failures: " + "; ".join(res["failures"])]
    return "\n".join(lines) + "\n"


def main():
    raw, out_dir, command = sys.argv[1], sys.argv[2], sys.argv[3]
    rows, skipped, memcpy = join(raw)
    failures = []
    for r in rows:
        if not r["row_path"].startswith("device windows"):
            failures.append(f"EP {r['ep']}: rows did not go through device windows: {r['row_path']}")
    res = {"date": datetime.date.today().isoformat(), "command": command, "machine": machine(raw),
           "aim": f"bandwidth >= {AIM}x cudaMemcpyAsync D2D on the same GPU",
           "definitions": DEFINITIONS, "rows": rows, "skipped": skipped, "memcpy": memcpy,
           "deepep_published": DEEPEP, "two_batch_overlap": two_batch_overlap(raw),
           "failures": sorted(set(failures))}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "dispatch_combine-gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    text = markdown(res)
    with open(os.path.join(out_dir, "dispatch_combine-gpu.md"), "w") as f:
        f.write(text)
    print(text)
    if not rows:
        sys.exit("no executor results")
    if res["failures"]:
        sys.exit("; ".join(res["failures"]))


if __name__ == "__main__":
    main()
