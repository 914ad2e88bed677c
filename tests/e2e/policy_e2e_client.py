#!/usr/bin/python3
"""Drives one policy's cluster: a burst of streamed completions of every tier at once, then
checks that each got exactly one terminal event with its tier and usage, that every request's
usage.energy_joules is positive and labelled, and that the requests' energy adds up to what the
workers' meters charged to requests (worker /metrics), which in turn is the meters' total minus
idle and unattributed energy. Standard library only; exits non-zero with the reason."""
import argparse
import http.client
import json
import re
import sys
import threading

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
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
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


def scrape(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(joule_energy_\w+)\{[^}]*\} (\S+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--worker-metrics", required=True, help="comma-separated metrics ports")
    ap.add_argument("--per-tier", type=int, default=6)
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
    for p in args.worker_metrics.split(","):
        for k, v in scrape(int(p)).items():
            totals[k] = totals.get(k, 0.0) + v
    attributed = totals.get("joule_energy_attributed_joules_total", -1)
    if abs(attributed - energy) > 1e-6 * max(1.0, attributed):
        fail("requests were charged %.9f J but the workers attributed %.9f J" % (energy, attributed))
    parts = attributed + totals["joule_energy_idle_joules_total"] + \
        totals["joule_energy_unattributed_joules_total"]
    if abs(parts - totals["joule_energy_joules_total"]) > 1e-6 * max(1.0, parts):
        fail("meter total %.6f J != attributed + idle + unattributed %.6f J"
             % (totals["joule_energy_joules_total"], parts))
    print("ok: %d requests, %.3f J charged to requests, %.3f J metered in all"
          % (len(results), energy, totals["joule_energy_joules_total"]))


if __name__ == "__main__":
    main()
