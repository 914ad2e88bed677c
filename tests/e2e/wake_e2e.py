#!/usr/bin/env python3
"""No penalty for waking up: requests sent 1.0-1.1 s after the previous one finished (where
gRPC's callback pollers nap, common/grpc_keep_awake.h) take as long as requests sent 0.3 s
apart. Medians over repeats; exits non-zero with the numbers when the difference is too big."""
import json
import statistics
import sys
import time
import urllib.request

PORT, MODEL = sys.argv[1], sys.argv[2]
BOUND_MS = 25  # the nap cost 40-100 ms


def request_ms():
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "wake"}], "max_tokens": 1,
                       "temperature": 0, "service_tier": "fast"}).encode()
    start = time.time()
    with urllib.request.urlopen(urllib.request.Request(
            "http://127.0.0.1:%s/v1/chat/completions" % PORT, body, {"Content-Type": "application/json"}),
            timeout=30) as r:
        r.read()
    return (time.time() - start) * 1000


request_ms()
medians = {}
for gap in (0.3, 1.01, 1.03, 1.05, 1.07, 0.3):
    samples = []
    for _ in range(3):
        time.sleep(gap)
        samples.append(request_ms())
    medians.setdefault(gap, []).append(statistics.median(samples))
base = min(medians[0.3])
worst_gap, worst = max(((g, max(m)) for g, m in medians.items() if g > 1), key=lambda x: x[1])
print("median latency: %s ms" % ", ".join("%.2f s gap %.1f" % (g, max(m)) for g, m in sorted(medians.items())))
if worst - base > BOUND_MS:
    print("FAIL: %.1f ms after a %.2f s gap against %.1f ms after 0.3 s" % (worst, worst_gap, base), file=sys.stderr)
    sys.exit(1)
print("PASS: waking up costs %.1f ms (bound %d ms)" % (worst - base, BOUND_MS))
