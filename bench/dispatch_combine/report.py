#!/usr/bin/env python3
"""Merges the raw results of bench/dispatch_combine/run.sh into
bench/results/dispatch_combine-transport.{json,md} (STAGE transport, the
default) or bench/results/dispatch_combine-executor.{json,md} (STAGE
executor), with the ratios against the baselines measured in the same run.

  report.py RAW_DIR RESULTS_DIR COMMAND [transport|executor]
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

MIB = 1 << 20
# Joule configuration -> the baselines it is compared with.
CONFIGS = {
    "shm": ("shm", "mpi-shm", "UCX_TLS=shm,self (default: no peer error handling, CMA zero-copy)"),
    "shm-peer": ("shm", "mpi-shm", "UCX_TLS=shm,self, peer error handling on (no CMA)"),
    "tcp": ("tcp", "mpi-tcp", "UCX_TLS=tcp,self over loopback"),
    "tcp-rt": ("tcp", "mpi-tcp", "UCX_TLS=tcp,self over loopback, receive thread "
               "(UcxOptions::receive_thread)"),
}


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def cmd(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // (1 << 20) for l in open("/proc/meminfo")
                if l.startswith("MemTotal")), 0)
    ucx = next((l.strip("# \n") for l in cmd("ucx_info", "-v").splitlines() if "Version" in l), "?")
    mpi = next((l.strip() for l in cmd("ompi_info", "--version").splitlines() if l.strip()), "none")
    load1 = os.getloadavg()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "kernel": platform.release(),
            "ucx": ucx, "mpi": mpi, "load_average_at_end": round(load1, 2)}


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    if not xs:
        return None
    p = 1.0
    for x in xs:
        p *= x
    return p ** (1.0 / len(xs))


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def join_baselines(raw, omit_empty_configs):
    """Joule's points with the ucx_perftest and MPI baselines of the same run
    joined in, and per configuration the ratios the issue asks for. Points a
    rank skipped (memory) are returned apart. With omit_empty_configs a
    configuration without points gets no ratios entry."""
    perftest = {(p["tls"], p["bytes_per_peer"]): p["bw_MBps"] * MIB / 1e9
                for p in load(os.path.join(raw, "perftest.jsonl"))}
    mpi = {}
    for label in ("mpi-shm", "mpi-tcp"):
        for m in load(os.path.join(raw, f"{label}.jsonl")):
            mpi[(label, m["ep"], m["hidden"], m["tokens"])] = m
    rows, skipped, ratios = [], [], {}
    for label, (ptls, mpi_label, _) in CONFIGS.items():
        bw_ratios, mpi_ratios, skew_free_ratios = [], [], []
        for j in load(os.path.join(raw, f"joule-{label}.jsonl")):
            if "skipped" in j:
                skipped.append(dict(j, config=label))
                continue
            pt = perftest.get((ptls, j["bytes_per_peer"]))
            m = mpi.get((mpi_label, j["ep"], j["hidden"], j["tokens"]))
            row = dict(j, config=label, perftest_GBps=pt,
                       vs_perftest=(j["algbw_GBps"] / pt) if pt else None,
                       mpi_latency_us=m["latency_us_median"] if m else None,
                       mpi_over_joule_latency=(m["latency_us_median"] / j["latency_us_median"])
                       if m else None)
            if m and j.get("latency_us_median_skew_free"):
                row["mpi_over_joule_skew_free"] = (m["latency_us_median"]
                                                   / j["latency_us_median_skew_free"])
                if j["tokens"] == 128:
                    skew_free_ratios.append((j["ep"], j["hidden"], row["mpi_over_joule_skew_free"]))
            rows.append(row)
            if j["bytes_per_peer"] >= MIB and row["vs_perftest"]:
                bw_ratios.append(row["vs_perftest"])
            if j["tokens"] == 128 and row["mpi_over_joule_latency"]:
                mpi_ratios.append((j["ep"], j["hidden"], row["mpi_over_joule_latency"]))
        if (omit_empty_configs and not bw_ratios and not mpi_ratios
                and not any(r["config"] == label for r in rows)):
            continue
        ratios[label] = {
            "bandwidth_vs_ucx_perftest_at_ge_1MiB_per_peer": {
                "points": len(bw_ratios),
                "min": min(bw_ratios) if bw_ratios else None,
                "geomean": geomean(bw_ratios),
                "max": max(bw_ratios) if bw_ratios else None},
            "mpi_latency_over_joule_latency_at_128_tokens": {
                f"ep{ep}_hidden{h}": r for ep, h, r in mpi_ratios},
        }
        if skew_free_ratios:
            ratios[label]["mpi_latency_over_joule_skew_free_latency_at_128_tokens"] = {
                f"ep{ep}_hidden{h}": r for ep, h, r in skew_free_ratios}
    return rows, skipped, ratios


def header_lines(title, res, command):
    mc = res["machine"]
    return [title, "",
            f"Machine: {mc['cpu']}, {mc['cores']} cores (shared with other jobs; load average "
            f"{mc['load_average_at_end']} at the end), {mc['memory_gib']} GiB, Linux "
            f"{mc['kernel']}; UCX {mc['ucx']}; {mc['mpi']}. Date {res['date']}.",
            f"Command: `{command}`", ""]


def ratio_lines(ratios, mpi_column):
    """The "## Ratios" table, one line per configuration that has ratios."""
    lines = ["## Ratios", "",
             "| Joule configuration | bandwidth / ucx_perftest at >= 1 MiB per peer (min / "
             f"geomean / max, points) | {mpi_column} |",
             "|---|---|---|"]
    for label, (_, _, desc) in CONFIGS.items():
        if label not in ratios:
            continue
        r = ratios[label]
        b = r["bandwidth_vs_ucx_perftest_at_ge_1MiB_per_peer"]
        m = ", ".join(f"{k}: {v:.2f}x" for k, v in
                      r["mpi_latency_over_joule_latency_at_128_tokens"].items()) or "-"
        sf = r.get("mpi_latency_over_joule_skew_free_latency_at_128_tokens")
        if sf:
            m += " (skew-free: " + ", ".join(f"{v:.2f}x" for v in sf.values()) + ")"
        lines.append(f"| {desc} | {fmt(b['min'])} / {fmt(b['geomean'])} / {fmt(b['max'])} "
                     f"({b['points']}) | {m} |")
    return lines


def transport_report(raw, out_dir, command):
    rows, _, ratios = join_baselines(raw, omit_empty_configs=True)
    res = {"date": datetime.date.today().isoformat(), "command": command, "machine": machine(),
           "definitions": {
               "payload": "tokens_per_rank x top_k x hidden x 2 bytes (BF16) per rank, spread "
                          "evenly over the EP ranks; a rank's own share stays out of the "
                          "exchange (Joule and MPI alike), as the executor packs it in place",
               "latency_us_median": "median of one all-to-all-v (a dispatch; combine moves the "
                                    "same bytes back, so dispatch+combine is about twice it)",
               "algbw_GBps": "bytes a rank sends to other ranks / median latency",
               "vs_perftest": "algbw / ucx_perftest tag_bw (one pair, same message size, same "
                              "UCX_TLS, same run)",
               "mpi_over_joule_latency": "MPI_Alltoallv median latency / Joule median latency "
                                         "(>= 1: Joule no slower)"},
           "ratios": ratios, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "dispatch_combine-transport.json"), "w") as f:
        json.dump(res, f, indent=1)

    lines = header_lines("# Dispatch/combine benchmark: transport level (all-to-all-v)", res, command)
    lines += ["Payload per rank: tokens x top-k 8 x hidden x 2 bytes (BF16), spread evenly over "
              "the EP ranks; a rank's own share stays out of the exchange, for Joule and MPI alike, "
              "since ExpertParallelExecutor packs those rows straight into its receive buffer "
              "(until 2026-12-05 both copied it inside the timed call). Latency is the median of one all-to-all-v (dispatch; combine is the "
              "same exchange reversed). algbw = bytes sent to other ranks / latency. Baselines "
              "measured in the same run: ucx_perftest tag_bw at the same per-peer message size "
              "(one pair, unidirectional) and OpenMPI MPI_Alltoallv (pml ob1; vader for shm, tcp "
              "over loopback for tcp).", ""]
    lines += ratio_lines(ratios, "MPI_Alltoallv latency / Joule latency at 128 tokens per rank")
    for label, (_, _, desc) in CONFIGS.items():
        if label not in ratios:  # not run (CONFIGS)
            continue
        lines += ["", f"## {desc}", "",
                  "| EP | hidden | tokens/rank | bytes/peer | latency us | algbw GB/s | perftest GB/s | vs perftest | MPI latency us | MPI/Joule |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["config"] != label:
                continue
            lines.append(f"| {r['ep']} | {r['hidden']} | {r['tokens']} | {r['bytes_per_peer']} | "
                         f"{r['latency_us_median']:.1f} | {r['algbw_GBps']:.2f} | "
                         f"{fmt(r['perftest_GBps'])} | {fmt(r['vs_perftest'])} | "
                         f"{fmt(r['mpi_latency_us'], '.1f')} | {fmt(r['mpi_over_joule_latency'])} |")
    lines += ["", "ExpertParallelExecutor-level dispatch+combine: "
              "bench/results/dispatch_combine-executor.md (run.sh --executor)."]
    with open(os.path.join(out_dir, "dispatch_combine-transport.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:16]))


def executor_report(raw, out_dir, command):
    rows, skipped, ratios = join_baselines(raw, omit_empty_configs=True)
    model = rows[0] if rows else {}
    res = {"date": datetime.date.today().isoformat(), "command": command, "machine": machine(),
           "model": {"family": "qwen3_moe (synthetic, one decoder layer, MoE)",
                     "experts": model.get("experts"), "top_k": model.get("top_k"),
                     "moe_intermediate_size": model.get("moe_intermediate"),
                     "placement": "contiguous, no replicas; each rank loads only its experts",
                     "payload": "BF16 (ExpertParallelOptions::payload kBF16)",
                     "threads_per_rank": model.get("threads")},
           "definitions": {
               "routing": "each token picks top_k distinct experts uniformly at random (fresh "
                          "every iteration), router weights 1/top_k",
               "latency_us_median": "per iteration, the slowest rank's dispatch_seconds + "
                                    "combine_seconds (ExpertParallelExecutor::stats() deltas: "
                                    "layout, count exchange, packing, dispatch all-to-all; "
                                    "combine all-to-all or barrier, un-permute: BF16 combine "
                                    "rows are summed and rounded inside the expert down "
                                    "projection, in Run); median "
                                    "over iterations; expert compute excluded",
               "latency_us_median_rank_mean": "the same with the mean over ranks instead of the "
                                              "slowest rank",
               "latency_us_median_skew_free": "per iteration, the slowest rank's dispatch_seconds "
                                              "+ the fastest rank's combine_seconds: a rank's "
                                              "combine also waits for peers that finish their "
                                              "experts later; the rank that arrives last waits "
                                              "for nobody's, so this leaves the compute skew "
                                              "out, as the MPI baseline (no compute between its "
                                              "exchanges) has none; median over iterations",
               "run_us_median": "wall time of ExpertParallelExecutor::Run (slowest rank), which "
                                "adds ordering the received rows by expert (an index: the GEMMs read the "
                                "rows where they landed) and the expert GEMMs",
               "minor_faults_median": "minor page faults of a rank during one Run (the rank "
                                      "with most, median over iterations)",
               "bytes_per_rank": "payload bytes a rank sends to other ranks per Run, dispatch "
                                 "(one row per token and destination rank: hidden x 2 + top_k "
                                 "expert ids and router weights) plus combine (hidden x 2 per "
                                 "row, each rank's weighted sum of the token's experts), mean "
                                 "over ranks and iterations",
               "bytes_per_peer": "expected dispatch message to one peer: tokens x P(a token has "
                                 "an expert there) rows x (hidden x 2 + 8 x top_k) bytes (the "
                                 "ucx_perftest size)",
               "slot_algbw_GBps": "bytes one row per (token, expert) slot would send (the MPI "
                                  "baseline's payload: tokens x top_k x (EP-1)/EP rows of hidden "
                                  "x 2 + 4 in dispatch and hidden x 2 in combine) / latency",
               "algbw_GBps": "bytes_per_rank / latency_us_median",
               "vs_perftest": "algbw / ucx_perftest tag_bw bandwidth (one pair, unidirectional, "
                              "message = bytes_per_peer, same UCX_TLS, same run)",
               "mpi_over_joule_latency": "MPI latency / Joule latency (>= 1: Joule no slower); "
                                         "MPI does per iteration an MPI_Allgather of the counts "
                                         "and two MPI_Alltoallv (dispatch rows, combine rows) on "
                                         "the same payloads, rows spread evenly, no packing, "
                                         "own share not exchanged, slowest rank, median"},
           "ratios": ratios, "rows": rows, "skipped": skipped}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "dispatch_combine-executor.json"), "w") as f:
        json.dump(res, f, indent=1)

    lines = header_lines("# Dispatch/combine benchmark: ExpertParallelExecutor level", res, command)
    lines += [f"Each rank process loads a synthetic Qwen3-MoE checkpoint with one MoE layer "
              f"({model.get('experts')} experts, top-k {model.get('top_k')}, "
              f"moe_intermediate_size {model.get('moe_intermediate')}) through the production "
              "loader, only its own experts (contiguous placement), and runs "
              "`ExpertParallelExecutor::Run` with BF16 payloads over `UcxTransport`, one thread "
              "per rank, a barrier before each Run, after warm-up Runs (the first with 10% fewer "
              "tokens, so that the executor's scratch buffers get headroom and random routing "
              "does not regrow them during timed Runs). Routing is uniform at random (top-k distinct "
              "experts per token, fresh every iteration). The expert GEMMs are small, not free "
              "(moe_intermediate_size 8 at hidden 2048 is about 0.1 MFLOP per (token, expert) "
              "row, 100 MFLOP per rank per Run at 128 tokens per rank): they take most of a Run, "
              "and random routing gives the ranks unequal shares. They are excluded: "
              "latency = the slowest rank's dispatch + combine seconds from `stats()` (layout, "
              "count exchange, BF16 packing of dispatch rows, both exchanges: over shared memory writes into peers' windows and a barrier, over TCP all-to-all-v; un-permute; the combine rows are summed and rounded to BF16 inside the experts' down projection, so that is in Run, not here), median over "
              "iterations. skew-free = the slowest rank's dispatch + the fastest rank's "
              "combine: a rank's combine also waits for peers that finish their experts later, "
              "and the rank that arrived last waited for nobody's (the MPI baseline computes "
              "nothing between its exchanges). Run = the whole `Run` wall time (adds ordering received rows by expert, an index: "
              "the GEMMs read them where they landed, and the expert GEMMs). faults/Run = minor page faults during a Run (median, slowest rank). "
              "algbw = payload bytes a rank sends to other ranks in dispatch "
              "(one row per token and destination rank: hidden x 2 + top-k expert ids and "
              "weights) and combine (hidden x 2 per row: the weighted sum of the token's experts "
              "on that rank) / latency. slot GB/s = the bytes of one row per (token, expert) "
              "slot, as the MPI baseline sends, / latency. bytes/peer = expected dispatch "
              "message to one peer.", "",
              "Baselines measured in the same run: ucx_perftest tag_bw at bytes/peer (one pair, "
              "unidirectional, same UCX_TLS) and OpenMPI (pml ob1; vader for shm, tcp over "
              "loopback for tcp) doing an MPI_Allgather of the counts plus the dispatch and the "
              "combine MPI_Alltoallv on the same payloads (rows spread evenly, no packing, the own "
              "share left out as the executor leaves it out), slowest rank, median.", ""]
    if skipped:
        lines += ["Reduced sweep: points skipped because all ranks' buffers would not fit in "
                  "the memory share the benchmark allows itself on this shared host: " + ", ".join(
                      f"{s['config']} EP {s['ep']} hidden {s['hidden']} tokens {s['tokens']} "
                      f"({s['skipped']})" for s in skipped) + ".", ""]
    lines += ratio_lines(ratios, "MPI latency / Joule latency at 128 tokens per rank")
    for label, (_, _, desc) in CONFIGS.items():
        if label not in ratios:
            continue
        lines += ["", f"## {desc}", "",
                  "| EP | hidden | tokens/rank | bytes/peer | iters | latency us | skew-free us | dispatch us | combine us | Run us | faults/Run | algbw GB/s | slot GB/s | perftest GB/s | vs perftest | MPI latency us | MPI/Joule | MPI/Joule skew-free |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["config"] != label:
                continue
            lines.append(f"| {r['ep']} | {r['hidden']} | {r['tokens']} | {r['bytes_per_peer']} | "
                         f"{r['iters']} | {r['latency_us_median']:.1f} | "
                         f"{fmt(r.get('latency_us_median_skew_free'), '.1f')} | "
                         f"{r['dispatch_us_median']:.1f} | {r['combine_us_median']:.1f} | "
                         f"{r['run_us_median']:.1f} | {r.get('minor_faults_median', 0):.0f} | "
                         f"{r['algbw_GBps']:.2f} | {fmt(r.get('slot_algbw_GBps'))} | "
                         f"{fmt(r['perftest_GBps'])} | {fmt(r['vs_perftest'])} | "
                         f"{fmt(r['mpi_latency_us'], '.1f')} | {fmt(r['mpi_over_joule_latency'])} | "
                         f"{fmt(r.get('mpi_over_joule_skew_free'))} |")
    lines += ["", "Transport-level all-to-all-v (no executor): "
              "bench/results/dispatch_combine-transport.md (run.sh without --executor)."]
    with open(os.path.join(out_dir, "dispatch_combine-executor.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:20]))


def main():
    raw, out_dir, command = sys.argv[1], sys.argv[2], sys.argv[3]
    stage = sys.argv[4] if len(sys.argv) > 4 else "transport"
    if stage == "executor":
        executor_report(raw, out_dir, command)
    elif stage == "transport":
        transport_report(raw, out_dir, command)
    else:
        sys.exit(f"unknown stage {stage} (transport or executor)")


if __name__ == "__main__":
    main()
