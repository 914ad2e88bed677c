#!/usr/bin/env python3
"""The table of a sweep.sh run: sweep_table.py OUT [--require-source nvml] prints Markdown.

Reads OUT/<policy>-rate<R>.json (joule-bench outputs) and gives, per rate and policy: each
tier's SLO attainment, the fast tier's TTFT / TPOT p99, output tokens/s, tokens per joule with
idle power included and without it, and both against fcfs at the same rate (the baseline of the
same run; the first policy when fcfs did not run). The energy source of every run is listed:
"nvml" is measured, "model (estimate)" is not. With --require-source SOURCE it exits 1 when a
run's energy source does not start with SOURCE (or no run was found): what sweep.sh on a GPU
uses to refuse to pass off an estimate as a measurement.
"""
import argparse
import glob
import json
import os
import sys

TIERS = ["fast", "priority", "standard", "batch"]


def num(v, fmt="%.2f"):
    return "-" if v is None else fmt % v


def ratio(a, b):
    return None if a is None or not b else a / b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--require-source", default="")
    args = parser.parse_args()

    runs = []
    for path in sorted(glob.glob(os.path.join(args.out, "*-rate*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if "meta" in doc and "all" in doc:
            runs.append(doc)
    if not runs:
        sys.exit(f"sweep_table.py: no joule-bench run (<policy>-rate<R>.json) in {args.out}")

    policies = []
    for r in runs:
        if r["meta"]["label"] not in policies:
            policies.append(r["meta"]["label"])
    order = {"fcfs": 0, "priority": 1, "ipw": 2}
    policies.sort(key=lambda p: order.get(p, 3))
    baseline = policies[0]
    by_key = {(r["meta"]["rate"], r["meta"]["label"]): r for r in runs}
    rates = sorted({r["meta"]["rate"] for r in runs})

    lines = [
        "| rate req/s | policy | SLO attainment fast / priority / standard / batch "
        "| fast TTFT / TPOT p99 ms | tokens/s | tokens/J | tokens/J excl. idle "
        f"| tokens/J vs {baseline} | excl. idle vs {baseline} | energy source |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    wrong_source = []
    for rate in rates:
        base = by_key.get((rate, baseline))
        for policy in policies:
            r = by_key.get((rate, policy))
            if r is None:
                continue
            tiers = {t["tier"]: t for t in r.get("tiers", [])}
            attainment = " / ".join(num(tiers.get(t, {}).get("slo_attainment")) for t in TIERS)
            fast = tiers.get("fast", {})
            a = r["all"]
            source = r.get("energy", {}).get("source", "none")
            if args.require_source and not source.startswith(args.require_source):
                wrong_source.append(f"{policy} at {rate:g} req/s: {source}")
            b = base["all"] if base else {}
            lines.append(
                f"| {rate:g} | {policy} | {attainment} "
                f"| {num(fast.get('ttft_ms', {}).get('p99'), '%.0f')} / "
                f"{num(fast.get('tpot_ms', {}).get('p99'), '%.1f')} "
                f"| {num(a.get('throughput_tok_s'), '%.1f')} | {num(a.get('tokens_per_joule'))} "
                f"| {num(a.get('tokens_per_joule_excl_idle'))} "
                f"| {num(ratio(a.get('tokens_per_joule'), b.get('tokens_per_joule')), '%.2fx')} "
                f"| {num(ratio(a.get('tokens_per_joule_excl_idle'), b.get('tokens_per_joule_excl_idle')), '%.2fx')} "
                f"| {source} |")
    idle = sorted({round(r.get("energy", {}).get("idle_watts") or 0, 1) for r in runs})
    lines += ["", f"Idle power measured before each run: {', '.join('%g W' % w for w in idle)}."]
    print("\n".join(lines))
    if args.require_source and wrong_source:
        sys.exit(f"sweep_table.py: energy not from {args.require_source}: " + "; ".join(wrong_source))


if __name__ == "__main__":
    main()
