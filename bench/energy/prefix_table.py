#!/usr/bin/env python3
"""The table of a prefix_sweep.sh run: prefix_table.py OUT prints Markdown.

Reads OUT/<workload>-cache-<true|false>.json (joule-bench outputs) and gives, per
workload and cache setting, TTFT p50/p99, tokens/s, tokens per joule (with and
without the idle power) and the prefix cache's hit rate over the window
(joule_prefix_cache_hits_total / joule_prefix_cache_queries_total, prompt
tokens, summed over the workers); then the on/off ratios per workload.
"""
import json
import os
import sys

WORKLOADS = {"shared": "shared prefixes", "none": "no shared prefixes"}


def load(out, workload, caching):
    path = os.path.join(out, "%s-cache-%s.json" % (workload, caching))
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def num(v, fmt="%.1f"):
    return "n/a" if v is None else fmt % v


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main(out):
    runs = {}
    for workload in WORKLOADS:
        for caching in ("true", "false"):
            doc = load(out, workload, caching)
            if doc is not None:
                runs[(workload, caching)] = doc
    if not runs:
        sys.exit("no <workload>-cache-<true|false>.json in %s" % out)
    source = next(iter(runs.values()))["energy"]["source"] or "none"
    lines = [
        "| workload | rate req/s | prefix cache | requests (errors) | TTFT p50 ms | TTFT p99 ms | tokens/s | tokens/J"
        " | tokens/J excl. idle | cache hit rate | prefill tokens computed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    warnings = []
    for (workload, caching), doc in runs.items():
        a = doc["all"]
        c = doc.get("window_counters", {})
        queries = c.get("joule_prefix_cache_queries_total")
        hits = c.get("joule_prefix_cache_hits_total")
        if caching == "false":
            hit = "off" if not queries else "%.2f (!)" % (hits / queries)
            if queries:
                warnings.append("%s: the cache was meant to be off but was queried" % workload)
        elif queries:
            hit = "%.2f" % (hits / queries)
        else:
            hit = "n/a"
            warnings.append("%s: no prefix-cache queries counted with the cache on" % workload)
        computed = c.get("joule_prompt_tokens_total")
        lines.append("| %s | %g | %s | %d (%d) | %s | %s | %s | %s | %s | %s | %s |" % (
            WORKLOADS[workload], doc["meta"]["rate"], "on" if caching == "true" else "off", a["requests"], a["errors"],
            num(a["ttft_ms"]["p50"], "%.0f"), num(a["ttft_ms"]["p99"], "%.0f"), num(a["throughput_tok_s"]),
            num(a["tokens_per_joule"], "%.2f"), num(a["tokens_per_joule_excl_idle"], "%.2f"), hit,
            "n/a" if computed is None else "%d" % computed))
        warnings += ["%s, cache %s: %s" % (workload, caching, w) for w in doc.get("warnings", [])]
    lines += ["", "On against off (TTFT: off / on, how many times lower with the cache; the rest: on / off):", "",
              "| workload | TTFT p50 | TTFT p99 | tokens/s | tokens/J | tokens/J excl. idle |", "|---|---|---|---|---|---|"]
    for workload in WORKLOADS:
        on, off = runs.get((workload, "true")), runs.get((workload, "false"))
        if on is None or off is None:
            continue
        on, off = on["all"], off["all"]
        cells = [ratio(off["ttft_ms"]["p50"], on["ttft_ms"]["p50"]), ratio(off["ttft_ms"]["p99"], on["ttft_ms"]["p99"]),
                 ratio(on["throughput_tok_s"], off["throughput_tok_s"]),
                 ratio(on["tokens_per_joule"], off["tokens_per_joule"]),
                 ratio(on["tokens_per_joule_excl_idle"], off["tokens_per_joule_excl_idle"])]
        lines.append("| %s | %s |" % (WORKLOADS[workload], " | ".join(num(x, "%.2fx") for x in cells)))
    lines += ["", "Energy: %s." % source]
    if "model" in source:
        lines[-1] += (" The workers' `model` meter is an estimate (idle watts per worker plus joules per CPU-second"
                      " of the worker process), not a measurement.")
    if warnings:
        lines += ["", "Warnings:"] + ["- " + w for w in warnings]
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: prefix_table.py OUT")
    main(sys.argv[1])
