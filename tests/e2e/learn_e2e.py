#!/usr/bin/env python3
"""The scheduler learns from telemetry: drives one cluster with standard-tier requests of
varied prompt lengths and follows the coordinator's learned step-time model
(joule_step_cost_seconds), its sample count and ipw's step cap for the tier
(joule_scheduler_step_token_cap) after every request, into a JSON trajectory; then compares
the trajectory of a cluster whose worker was slowed (--inject-step-delay-us,
--inject-delay-per-token-us) with an unslowed one's.

  learn_e2e.py run HTTP_PORT MODEL REQUESTS OUT_JSON
  learn_e2e.py check BASE_JSON SLOWED_JSON DELAY_US PER_TOKEN_US"""
import http.client
import json
import random
import sys

from e2e_util import scrape

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"]


def complete(port, model, prompt):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                       "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        sys.exit("request failed: %d %s" % (resp.status, data[:200]))


def learned(port):
    m = scrape(port)
    term = {k: v for k, v in m.get("joule_step_cost_seconds", {}).items() if 'rank="0"' in k}
    coef = [next((v for k, v in term.items() if 'term="%s"' % t in k), None)
            for t in ("fixed", "per_batch_token", "per_context_token")]
    samples = next((v for k, v in m.get("joule_step_cost_samples", {}).items() if 'rank="0"' in k), 0)
    cap = next((v for k, v in m.get("joule_scheduler_step_token_cap", {}).items()
                if 'rank="0"' in k and 'tier="standard"' in k), None)
    return {"samples": samples, "fixed_s": coef[0], "per_token_s": coef[1],
            "per_context_s": coef[2], "standard_cap": cap}


def run(port, model, requests, out):
    rng = random.Random(7)
    trajectory = []
    for _ in range(requests):
        # 3-70 words (~6.5 tokens each in the tiny model, which holds 512):
        # prefill steps of many sizes between one-token decode steps, so the
        # fixed and per-token costs can be told apart; random words, so the
        # prefix cache does not turn prefills into short steps.
        complete(port, model, " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 70))))
        trajectory.append(learned(port))
    with open(out, "w") as f:
        json.dump(trajectory, f)
    last = trajectory[-1]
    print("after %d requests: %d samples, fixed %.2f ms, %.1f us/token, standard cap %s" % (
        requests, last["samples"], 1e3 * last["fixed_s"], 1e6 * last["per_token_s"],
        last["standard_cap"]))


def check(base_path, slowed_path, delay_us, per_token_us):
    base = json.load(open(base_path))[-1]
    slowed = json.load(open(slowed_path))
    fixed = base["fixed_s"] + delay_us * 1e-6
    per_token = base["per_token_s"] + per_token_us * 1e-6

    def close(point):
        return (abs(point["fixed_s"] - fixed) <= FIXED_TOLERANCE_S and
                abs(point["per_token_s"] - per_token) <= PER_TOKEN_TOLERANCE * per_token_us * 1e-6)
    # The first sample count from which the slowed model stays within tolerance.
    learned_at = None
    for point in slowed:
        if close(point):
            learned_at = learned_at or point["samples"]
        else:
            learned_at = None
    last = slowed[-1]
    print("true: fixed %.2f ms, %.1f us/token; learned %.2f ms, %.1f us/token after %d samples "
          "(within tolerance from sample %s)" % (1e3 * fixed, 1e6 * per_token, 1e3 * last["fixed_s"],
                                                 1e6 * last["per_token_s"], last["samples"], learned_at))
    if learned_at is None or learned_at > MAX_SAMPLES_TO_LEARN:
        sys.exit("FAIL: the slowed worker's step cost was not learned within %d steps" % MAX_SAMPLES_TO_LEARN)
    # ipw's cap for the standard tier at an idle rank: the most tokens whose
    # step fits safety * TPOT, by the true (injected) costs.
    budget = IPW_SAFETY * STANDARD_TPOT_S
    want = max(MIN_STEP_TOKENS, min(MAX_BATCH_TOKENS, int((budget - fixed) / per_token)))
    print("standard-tier step cap: %s unslowed, %s slowed, %d by the true costs" % (
        base["standard_cap"], last["standard_cap"], want))
    if abs(last["standard_cap"] - want) > CAP_TOLERANCE * want:
        sys.exit("FAIL: ipw's step cap %s does not follow the slowed costs (want %d +- %d%%)" % (
            last["standard_cap"], want, 100 * CAP_TOLERANCE))
    if base["standard_cap"] < 1.5 * last["standard_cap"]:
        sys.exit("FAIL: the unslowed cap %s is not well above the slowed %s" % (
            base["standard_cap"], last["standard_cap"]))
    print("PASS")


# Defaults of scheduler/config.h (the test does not override them).
IPW_SAFETY = 0.9
STANDARD_TPOT_S = 0.100
MIN_STEP_TOKENS = 16
MAX_BATCH_TOKENS = 512
FIXED_TOLERANCE_S = 2.5e-3
PER_TOKEN_TOLERANCE = 0.3
CAP_TOLERANCE = 0.25
MAX_SAMPLES_TO_LEARN = 64

if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        check(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
