#!/usr/bin/python3
"""Drives one policy's cluster: a burst of streamed completions of every tier at once, then
checks that each got exactly one terminal event with its tier and usage, that every request's
usage.energy_joules is positive and labelled, that the requests' energy adds up to what the
workers charged to requests (worker /metrics), and that the meters' own readings match their
accounting (attributed + idle + unattributed). Then the other metrics: workers' power, exchange and per-expert
load; the coordinator's SLO outcomes and tokens per joule per tier, and the step cost model
learned from the workers' heartbeats. Last, a workload on which the policies must differ: with
one request in flight per rank (the test's scheduler config), six long batch requests arrive,
then four fast ones; fcfs serves every batch request first, priority and ipw the fast ones as
soon as a slot frees (at most one batch request ties with them). Standard library only; exits
non-zero with the reason."""
import argparse
import http.client
import json
import re
import sys
import threading
import time

from e2e_util import scrape, sse_data

TIERS = {"fast": "fast", "priority": "priority", "default": "default", "flex": "flex"}


def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    sys.exit(1)


def stream(port, model, tier, i, results):
    body = json.dumps({"model": model, "prompt": "policy check %d %s" % (i, tier), "max_tokens": 12,
                       "temperature": 0.7, "seed": i, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}, "service_tier": tier})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            results.append((tier, "status %d: %s" % (resp.status, resp.read()[:200]), None, 0))
            return
        done, usage, tokens, served = 0, None, 0, None
        for data in sse_data(resp):
            if data == "[DONE]":
                done += 1
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                results.append((tier, "error event: %s" % chunk["error"], None, 0))
                return
            served = chunk.get("service_tier")
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                tokens += 1
        err = None
        if done != 1:
            err = "%d [DONE] events" % done
        elif served != TIERS[tier]:
            err = "served as %r" % served
        elif usage is None or usage["completion_tokens"] != 12:
            err = "usage %r" % usage
        results.append((tier, err, usage, tokens))
    except Exception as e:  # noqa: BLE001 - any failure is a test failure
        results.append((tier, repr(e), None, 0))
    finally:
        conn.close()


def first_token_at(port, model, tier, tokens, arrived, hold_until, out):
    """Streams one completion until its first token; records (tier, arrival, first token time)
    or the error."""
    body = json.dumps({"model": model, "prompt": "order check %s %f" % (tier, arrived), "max_tokens": tokens,
                       "temperature": 0, "stream": True, "ignore_eos": True, "service_tier": tier})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = None
        for data in sse_data(resp):
            if first is None and data != "[DONE]" and '"text"' in data:
                first = time.time()
            # Hold the slot until every request has arrived, then only the first token
            # matters: closing cancels the rest (ipw paces batch decoding).
            if first is not None and time.time() >= hold_until:
                break
        out.append((tier, arrived, first, None if first else "no token (status %d)" % resp.status))
    except Exception as e:  # noqa: BLE001 - any failure is a test failure
        out.append((tier, arrived, None, repr(e)))
    finally:
        conn.close()


def order_check(port, model, policy):
    """Six long batch requests, then four fast ones: which policy serves which first."""
    out, threads = [], []
    hold_until = time.time() + 0.5  # all ten arrive within 0.05 s
    for tier, n, tokens in (("flex", 6, 400), ("fast", 4, 8)):
        for _ in range(n):
            t = threading.Thread(target=first_token_at,
                                 args=(port, model, tier, tokens, time.time(), hold_until, out))
            t.start()
            threads.append(t)
            time.sleep(0.005)  # a fixed arrival order
    for t in threads:
        t.join(180)
    errors = ["%s: %s" % (tier, e) for tier, _, _, e in out if e]
    if len(out) != len(threads) or errors:
        fail("order check: %d of %d answered, errors %s" % (len(out), len(threads), errors[:3]))
    last_fast = max(f for tier, _, f, _ in out if tier == "fast")
    batch_before = sum(1 for tier, _, f, _ in out if tier == "flex" and f < last_fast)
    t0 = min(a for _, a, _, _ in out)
    print("order check (%s): %d of 6 batch requests got their first token before the last fast one; "
          "first tokens at %s s" % (policy, batch_before, ", ".join(
              "%s %.2f" % (tier, f - t0) for tier, _, f, _ in sorted(out, key=lambda r: r[2]))))
    # Two ranks, one request each: two batch requests run when the fast ones arrive; under
    # priority and ipw the fast ones take the freed slots (allow one batch request to tie with
    # the last fast one: a slot may free while the fast ones' streams are being answered).
    want = {"fcfs": (6, 6), "priority": (0, 3), "ipw": (0, 3)}[policy]
    if not want[0] <= batch_before <= want[1]:
        fail("order check: under %s %d batch requests went before the fast ones, expected %d..%d"
             % (policy, batch_before, want[0], want[1]))


def total(samples, name):
    return sum(samples.get(name, {}).values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--worker-metrics", required=True, help="comma-separated metrics ports")
    ap.add_argument("--per-tier", type=int, default=6)
    ap.add_argument("--dashboard", help="Grafana dashboard JSON whose joule_ metrics must all be served")
    ap.add_argument("--policy", required=True, choices=["fcfs", "priority", "ipw"])
    args = ap.parse_args()

    results = []
    threads = [threading.Thread(target=stream, args=(args.port, args.model, tier, i, results))
               for i in range(args.per_tier) for tier in TIERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    if len(results) != len(threads):
        fail("%d of %d requests returned" % (len(results), len(threads)))
    errors = [(tier, err) for tier, err, _, _ in results if err]
    if errors:
        fail("%d requests failed, e.g. %s" % (len(errors), errors[:3]))
    energy = 0.0
    for tier, _, usage, _ in results:
        if usage.get("energy_source") != "model" or not usage.get("energy_joules", 0) > 0:
            fail("%s request without metered energy: %r" % (tier, usage))
        energy += usage["energy_joules"]

    totals = {}
    workers = [scrape(int(p)) for p in args.worker_metrics.split(",")]
    for w in workers:
        for k in w:
            totals[k] = totals.get(k, 0.0) + total(w, k)
    attributed = totals.get("joule_energy_attributed_joules_total", -1)
    if abs(attributed - energy) > 1e-6 * max(1.0, attributed):
        fail("requests were charged %.9f J but the workers attributed %.9f J" % (energy, attributed))
    # The accounting (attributed + idle + unattributed, as of each worker's last step) against
    # the meters' own readings at the scrape, a little later: nothing lost, nothing invented.
    parts = attributed + totals["joule_energy_idle_joules_total"] + \
        totals["joule_energy_unattributed_joules_total"]
    meter = totals.get("joule_energy_meter_joules_total", -1)
    if not parts - 1e-6 <= meter <= parts * 1.02 + 1.0:
        fail("the meters read %.6f J, their accounting (attributed + idle + unattributed) %.6f J"
             % (meter, parts))
    # Power is a mean over windows of at least a second: wait for the first.
    deadline = time.time() + 5
    while not all(total(w, "joule_power_watts") > 0 for w in workers) and time.time() < deadline:
        time.sleep(0.2)
        workers = [scrape(int(p)) for p in args.worker_metrics.split(",")]
    for i, w in enumerate(workers):
        if not total(w, "joule_power_watts") > 0:
            fail("worker %d reports no power: %r" % (i, w.get("joule_power_watts")))
        if not total(w, "joule_dispatch_seconds_total") > 0:
            fail("worker %d reports no dispatch time" % i)
    if not totals.get("joule_dispatch_bytes_total", 0) > 0:
        fail("no dispatch bytes between the two workers")
    routed = totals.get("joule_expert_tokens_total", 0)
    if not routed > 0:
        fail("no per-expert load in the workers' metrics")

    # The coordinator: SLO outcomes of every request, tokens per joule per tier,
    # and a step cost model learned from the workers' heartbeats (every 500 ms).
    deadline = time.time() + 10
    while True:
        coord = scrape(args.port)
        learned = coord.get("joule_step_cost_samples", {})
        if len(learned) >= 2 and all(v > 0 for v in learned.values()):
            break
        if time.time() > deadline:
            fail("the step cost model learned no steps from the workers: %r" % learned)
        time.sleep(0.2)
    for tier in ("fast", "priority", "standard", "batch"):  # default -> standard, flex -> batch
        outcomes = coord.get("joule_slo_requests_total", {})
        done = sum(v for k, v in outcomes.items()
                   if 'tier="%s"' % tier in k and ('"attained"' in k or '"missed"' in k))
        if done != args.per_tier:
            fail("%s: %d SLO outcomes for %d requests: %r" % (tier, done, args.per_tier, outcomes))
        tpj = coord.get("joule_tokens_per_joule", {}).get('{tier="%s"}' % tier, 0)
        if not tpj > 0:
            fail("%s: no tokens per joule at the coordinator" % tier)
    if args.dashboard:
        served = set(coord)
        for w in workers:
            served |= set(w)
        with open(args.dashboard) as f:
            wanted = set(re.findall(r"joule_\w+", f.read()))
        missing = sorted(wanted - served)
        if missing:
            fail("the dashboard plots metrics nobody serves: %s" % ", ".join(missing))
    order_check(args.port, args.model, args.policy)
    print("ok: %d requests, %.3f J charged to requests, %.3f J metered in all, "
          "%d steps behind the cost model"
          % (len(results), energy, totals["joule_energy_joules_total"], sum(learned.values())))


if __name__ == "__main__":
    main()
