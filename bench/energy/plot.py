#!/usr/bin/python3
"""Plots a joule-bench sweep (bench/energy/sweep.sh): the InferenceMAX picture
with watts.

  /usr/bin/python3 bench/energy/plot.py RESULTS_DIR

Reads every run JSON in RESULTS_DIR (one per policy and rate) and writes:
  energy_pareto.png  tokens per joule (throughput per watt) against interactivity
                     (tokens/s/user), one series per policy, one panel per tier;
                     filled markers include idle power, hollow ones exclude it
  j_per_token.png    joules per output token against arrival rate, per tier
  slo.png            SLO attainment against arrival rate, per tier
and prints the table behind them. Needs matplotlib (Debian python3-matplotlib).
"""
import collections
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TIERS = ["fast", "priority", "standard", "batch", "all"]


def load(results_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if "meta" not in doc or "all" not in doc:
            continue  # not a joule-bench run
        runs.append(doc)
    if not runs:
        sys.exit(f"plot.py: no joule-bench JSON in {results_dir}")
    return runs


def series(runs):
    """{tier: {policy: [(rate, tier_dict), ...] sorted by rate}}"""
    out = collections.defaultdict(lambda: collections.defaultdict(list))
    for doc in runs:
        policy = doc["meta"].get("label") or "run"
        rate = doc["meta"]["rate"]
        for t in doc["tiers"] + [doc["all"]]:
            out[t["tier"]][policy].append((rate, t))
    for tier in out.values():
        for points in tier.values():
            points.sort(key=lambda p: p[0])
    return out


def panels(n):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def source_note(runs):
    sources = sorted({d["energy"]["source"] for d in runs if d["energy"]["source"]})
    if not sources:
        return "no energy counter"
    note = "energy: " + ", ".join(sources)
    if any("estimate" in s for s in sources):
        note += " -- MODELLED ESTIMATE, not a measurement"
    return note


def plot_pareto(data, tiers, note, out):
    fig, axes = panels(len(tiers))
    for ax, tier in zip(axes, tiers):
        for i, (policy, points) in enumerate(sorted(data[tier].items())):
            color = f"C{i}"
            pts = [(t["interactivity_tok_s_user"], t["tokens_per_joule"], r, t["tokens_per_joule_excl_idle"])
                   for r, t in points if t["interactivity_tok_s_user"] and t["tokens_per_joule"]]
            if not pts:
                continue
            xs, ys, rates, ys_ex = zip(*pts)
            ax.plot(xs, ys, "o-", color=color, label=policy)
            ax.plot(xs, [y or float("nan") for y in ys_ex], "o:", color=color, mfc="none")
            for x, y, r in zip(xs, ys, rates):
                ax.annotate(f"{r:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(tier)
        ax.set_xlabel("interactivity (tokens/s/user)")
        ax.set_ylabel("throughput per watt (tokens/J)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("tokens per joule vs interactivity (labels: req/s; hollow: idle excluded)\n" + note, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_by_rate(data, tiers, key, ylabel, title, out, key_excl=None):
    fig, axes = panels(len(tiers))
    for ax, tier in zip(axes, tiers):
        for i, (policy, points) in enumerate(sorted(data[tier].items())):
            rates = [r for r, _ in points]
            ax.plot(rates, [t[key] if t[key] is not None else float("nan") for _, t in points], "o-",
                    color=f"C{i}", label=policy)
            if key_excl:
                ax.plot(rates, [t[key_excl] if t[key_excl] is not None else float("nan") for _, t in points],
                        "o:", color=f"C{i}", mfc="none")
        ax.set_title(tier)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    results_dir = sys.argv[1]
    runs = load(results_dir)
    data = series(runs)
    tiers = [t for t in TIERS if t in data]
    note = source_note(runs)
    plot_pareto(data, tiers, note, os.path.join(results_dir, "energy_pareto.png"))
    plot_by_rate(data, tiers, "j_per_token", "J per output token",
                 "energy per output token (hollow: idle excluded)\n" + note,
                 os.path.join(results_dir, "j_per_token.png"), key_excl="j_per_token_excl_idle")
    plot_by_rate(data, tiers, "slo_attainment", "SLO attainment", "SLO attainment per tier",
                 os.path.join(results_dir, "slo.png"))

    def fmt(v, f="{:.3g}"):
        return "-" if v is None else f.format(v)

    print(f"{'policy':<16}{'rate':>6} {'tier':<9}{'tok/s':>9}{'tok/s/user':>11}{'ttft p99':>10}"
          f"{'tpot p99':>10}{'SLO':>6}{'J/tok':>9}{'J/tok-idle':>11}")
    for doc in sorted(runs, key=lambda d: (d["meta"].get("label", ""), d["meta"]["rate"])):
        for t in doc["tiers"] + [doc["all"]]:
            print(f"{doc['meta'].get('label', ''):<16}{doc['meta']['rate']:>6g} {t['tier']:<9}"
                  f"{fmt(t['throughput_tok_s']):>9}{fmt(t['interactivity_tok_s_user']):>11}"
                  f"{fmt(t['ttft_ms']['p99']):>10}{fmt(t['tpot_ms']['p99']):>10}{fmt(t['slo_attainment'], '{:.2f}'):>6}"
                  f"{fmt(t['j_per_token']):>9}{fmt(t['j_per_token_excl_idle']):>11}")
    print(f"({note}; plots in {results_dir})")


if __name__ == "__main__":
    main()
