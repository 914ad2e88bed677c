#!/usr/bin/env python3
"""The PromQL half of prometheus_e2e.sh: sends a known workload to the coordinator, waits until
Prometheus has scraped all of it, then checks through Prometheus' HTTP API that what it holds
matches what was sent, that every rule and dashboard expression evaluates, and that the alerts
that must fire do."""
import argparse
import json
import math
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

TIERS = {"fast": "fast", "priority": "priority", "default": "standard", "flex": "batch"}
PER_TIER = 3


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def post(http, body):
    req = urllib.request.Request("http://%s/v1/chat/completions" % http, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def query(prom, expr):
    url = "http://%s/api/v1/query?%s" % (prom, urllib.parse.urlencode({"query": expr}))
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            reply = json.load(r)
    except urllib.error.HTTPError as e:
        return None, "%s: %s" % (e.code, e.read().decode(errors="replace")[:300])
    except (urllib.error.URLError, ConnectionError) as e:  # not listening yet
        return None, str(e)
    if reply.get("status") != "success":
        return None, str(reply)
    return reply["data"]["result"], None


def values(prom, expr, label):
    """{label value: float} of an instant vector."""
    result, err = query(prom, expr)
    if err:
        fail("%s: %s" % (expr, err))
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}


def wait_for(what, predicate, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    fail("timed out waiting for " + what)


def workload(args):
    """PER_TIER greedy requests per tier; returns per-tier totals from the responses."""
    sent = {t: {"requests": 0, "completion": 0, "processed": 0} for t in TIERS.values()}
    for i in range(PER_TIER):
        for api_tier, tier in TIERS.items():
            r = post(args.http, {"model": args.model, "max_tokens": 6 + i, "temperature": 0,
                                 "ignore_eos": True, "service_tier": api_tier,
                                 "messages": [{"role": "user", "content": "tier %s, request %d" % (tier, i)}]})
            u = r["usage"]
            sent[tier]["requests"] += 1
            sent[tier]["completion"] += u["completion_tokens"]
            # Tokens through the layers: the prompt but what the prefix cache held, then every
            # generated token but the last.
            cached = u.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            sent[tier]["processed"] += u["prompt_tokens"] - cached + u["completion_tokens"] - 1
    return sent


def check_tiers(prom, sent):
    coord = '{job="joule-coordinator"}'
    tokens = values(prom, "sum by (tier) (joule_generation_tokens_total%s)" % coord, "tier")
    for tier, s in sent.items():
        if tokens.get(tier) != s["completion"]:
            fail("tier %s: Prometheus holds %s generated tokens, %d were sent" % (tier, tokens.get(tier), s["completion"]))
    ttft_count = values(prom, "sum by (tier) (joule_time_to_first_token_seconds_count)", "tier")
    ttft_p99 = values(prom, "histogram_quantile(0.99, sum by (le, tier) (joule_time_to_first_token_seconds_bucket))", "tier")
    tpj = values(prom, "sum by (tier) (joule_generation_tokens_total%s) / sum by (tier) (joule_request_energy_joules_total%s)"
                 % (coord, coord), "tier")
    slo = values(prom, "joule_slo_attainment", "tier")
    slo_requests = values(prom, "sum by (tier) (joule_slo_requests_total)", "tier")
    for tier, s in sent.items():
        if ttft_count.get(tier) != s["requests"]:
            fail("tier %s: %s TTFT observations, %d requests" % (tier, ttft_count.get(tier), s["requests"]))
        if not 0 < ttft_p99.get(tier, -1) < 60:
            fail("tier %s: TTFT p99 %s" % (tier, ttft_p99.get(tier)))
        if not 0 < tpj.get(tier, -1) < math.inf:
            fail("tier %s: tokens per joule %s" % (tier, tpj.get(tier)))
        if not 0 <= slo.get(tier, -1) <= 1:
            fail("tier %s: SLO attainment %s" % (tier, slo.get(tier)))
        if slo_requests.get(tier) != s["requests"]:
            fail("tier %s: %s SLO outcomes, %d requests" % (tier, slo_requests.get(tier), s["requests"]))
        print("  %-8s %2d tokens, TTFT p99 %.3f s, %.1f tokens/J, SLO attainment %.2f"
              % (tier, s["completion"], ttft_p99[tier], tpj[tier], slo[tier]))
    # What requests were charged cannot exceed what the workers metered.
    charged = sum(values(prom, "sum(joule_request_energy_joules_total%s)" % coord, "").values())
    metered = sum(values(prom, 'sum(joule_energy_joules_total{job="joule-worker"})', "").values())
    if not 0 < charged <= metered * 1.0001:
        fail("requests were charged %.3f J, the workers metered %.3f J" % (charged, metered))


def check_ranks(prom, sent, config):
    # The energy counters' slope (a window the 1 s scrapes fill) against the meters' own gauge.
    power = values(prom, 'sum by (rank) (rate(joule_energy_joules_total{job="joule-worker"}[3s]))', "rank")
    gauge = values(prom, 'sum by (rank) (joule_power_watts{job="joule-worker"})', "rank")
    if sorted(power) != ["0", "1"] or not all(1 < w < 2000 for w in power.values()):
        fail("power by rank: %s" % power)
    for rank, watts in power.items():
        if abs(watts - gauge.get(rank, 0)) > 0.25 * watts:
            fail("rank %s: the energy counter rises at %.1f W, its power gauge says %s W" % (rank, watts, gauge.get(rank)))
    print("  power by rank (W): %s" % ", ".join("%s: %.1f" % kv for kv in sorted(power.items())))
    # The coordinator relays every rank's meter from heartbeats (every 500 ms): one scrape of
    # it shows the cluster's power and energy.
    relayed = values(prom, 'sum by (rank) (joule_rank_power_watts{job="joule-coordinator"})', "rank")
    for rank, watts in gauge.items():
        if abs(relayed.get(rank, 0) - watts) > 0.25 * watts:
            fail("rank %s: the coordinator says %s W, the worker %.1f W" % (rank, relayed.get(rank), watts))
    cluster = values(prom, 'joule_cluster_energy_joules_total{job="joule-coordinator"}', "").get("", -1)
    workers = values(prom, 'sum(joule_energy_joules_total{job="joule-worker"})', "").get("", 0)
    lag = 2 * sum(gauge.values())  # a heartbeat and a scrape behind, at most ~2 s of power
    if not workers - lag <= cluster <= workers + lag:
        fail("the coordinator's cluster energy %.1f J, the workers' %.1f J" % (cluster, workers))
    imbalance = values(prom, 'joule_ep_load_imbalance{job="joule-coordinator"}', "").get("", 0)
    if not 1 <= imbalance <= config["num_experts"]:
        fail("EP load imbalance %s" % imbalance)
    print("  coordinator: power by rank relayed, cluster energy %.1f J (workers %.1f J), EP imbalance %.2f"
          % (cluster, workers, imbalance))
    # Every processed token is routed to top_k experts in every MoE layer, by its own rank.
    top_k = config["num_experts_per_tok"]
    processed = sum(s["processed"] for s in sent.values())
    per_layer = values(prom, "sum by (layer) (joule_expert_tokens_total)", "layer")
    experts = values(prom, 'count by (expert) (joule_expert_tokens_total{layer="0"})', "expert")
    if len(experts) != config["num_experts"]:
        fail("per-expert load of layer 0 has %d experts, the model %d" % (len(experts), config["num_experts"]))
    # Qwen's rule (transformers): a layer is MoE unless listed in mlp_only_layers or off the step.
    step = config.get("decoder_sparse_step", 1)
    moe = [l for l in range(config["num_hidden_layers"])
           if l not in config.get("mlp_only_layers", []) and (l + 1) % step == 0]
    for layer in range(config["num_hidden_layers"]):
        got = per_layer.get(str(layer), 0)
        want = top_k * processed if layer in moe else 0
        if got != want:
            fail("layer %d: %s tokens routed to experts, %d expected (%d tokens x top-%d; MoE layers %s)"
                 % (layer, got, want, processed, top_k, moe))
    print("  per-expert load: %d routings in each MoE layer %s = %d tokens x top-%d"
          % (top_k * processed, moe, processed, top_k))


def metric_names(expr):
    names = set(re.findall(r"\b(joule_\w+|up)\b(?!\s*\()", expr))
    return {n for n in names if not n.startswith("joule:")}


def check_dashboard_and_rules(prom, dashboard):
    with open(dashboard) as f:
        d = json.load(f)
    exprs = [t["expr"] for p in d.get("panels", []) for t in p.get("targets", []) if "expr" in t]
    if len(exprs) < 10:
        fail("the dashboard has only %d expressions" % len(exprs))
    for expr in exprs:
        result, err = query(prom, expr)
        if err:
            fail("dashboard expression %r: %s" % (expr, err))
        for name in metric_names(expr):
            present, err = query(prom, "present_over_time(%s[5m])" % name)
            if err or not present:
                fail("dashboard expression %r uses %s, which no process exports" % (expr, name))
    print("  %d dashboard expressions evaluate over exported metrics" % len(exprs))
    with urllib.request.urlopen("http://%s/api/v1/rules" % prom, timeout=30) as r:
        groups = json.load(r)["data"]["groups"]
    rules = [rule for g in groups for rule in g["rules"]]
    if len(rules) < 10:
        fail("Prometheus loaded %d rules" % len(rules))
    for rule in rules:
        if rule.get("health") != "ok":
            fail("rule %s: %s %s" % (rule["name"], rule.get("health"), rule.get("lastError", "")))
        if rule["type"] == "recording":
            wait_for("recording rule %s to have samples" % rule["name"],
                     lambda: bool(query(prom, rule["name"])[0]))
    print("  %d rules healthy; every recording rule has samples" % len(rules))


def alert_state(prom, name):
    with urllib.request.urlopen("http://%s/api/v1/alerts" % prom, timeout=30) as r:
        alerts = json.load(r)["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name]


def check_alerts(prom, kill_pid, kill_instance):
    wait_for("JouleEnergyModelled (the workers' energy is modelled)",
             lambda: len(alert_state(prom, "JouleEnergyModelled")) == 2)
    if alert_state(prom, "JouleRankDown"):
        fail("JouleRankDown is active while every rank serves")
    os.kill(kill_pid, signal.SIGKILL)
    wait_for("JouleRankDown after a worker was killed",
             lambda: any(a["labels"].get("instance") == kill_instance for a in alert_state(prom, "JouleRankDown")))
    print("  alerts: JouleEnergyModelled for both ranks; JouleRankDown once %s was killed" % kill_instance)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True, help="the model's config.json")
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--kill-pid", type=int, required=True)
    ap.add_argument("--kill-instance", required=True)
    args = ap.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    prom = args.prometheus
    wait_for("Prometheus to be ready", lambda: query(prom, "up")[0], timeout=60)
    sent = workload(args)
    total = sum(s["completion"] for s in sent.values())
    # Scrapes every second: wait until one has seen the whole workload.
    wait_for("Prometheus to scrape the whole workload", lambda: values(
        prom, 'sum(joule_generation_tokens_total{job="joule-coordinator"})', "").get("") == total)
    time.sleep(2)  # the workers' counters and a rate window behind them
    check_tiers(prom, sent)
    check_ranks(prom, sent, config)
    check_dashboard_and_rules(prom, args.dashboard)
    check_alerts(prom, args.kill_pid, args.kill_instance)


if __name__ == "__main__":
    main()
