#!/usr/bin/python3
"""HTTP client side of http_e2e.sh: drives a running coordinator's OpenAI-compatible
API (standard library only) and fails loudly on any mismatch.

  http_e2e_client.py --port P --model NAME --worker-metrics PORT,PORT [--concurrency 256]

The model is a built-in tiny model: byte-level tokenizer (ids 0..255 are bytes, plus
<|endoftext|>, <|im_start|>, <|im_end|>) and random weights, so texts are gibberish and
the checks are about structure, counts and behaviour. Greedy decoding (temperature 0)
is deterministic, which lets streamed and non-streamed answers be compared.
"""
import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time

from e2e_util import FAILURES, check, scrape

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def count_tokens(text):
    """The built-in byte-level tokenizer's count: one per UTF-8 byte, one per added token."""
    n, i = 0, 0
    while i < len(text):
        for s in SPECIALS:
            if text.startswith(s, i):
                n += 1
                i += len(s)
                break
        else:
            n += len(text[i].encode("utf-8"))
            i += 1
    return n


def chatml(messages):
    out = "".join("<|im_start|>%s\n%s<|im_end|>\n" % (m["role"], m["content"]) for m in messages)
    return out + "<|im_start|>assistant\n"


class Api:
    def __init__(self, port):
        self.port = port

    def call(self, method, path, body=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body)
            headers = {} if body is None else {"Content-Type": "application/json"}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def post(self, path, body):
        status, _, data = self.call("POST", path, body)
        return status, json.loads(data)

    def stream(self, path, body):
        """(status, [event payloads]) of a streamed request; '[DONE]' kept as is."""
        status, headers, data = self.call("POST", path, body)
        if status != 200:
            return status, [data.decode("utf-8", "replace")]
        check(headers.get("Content-Type") == "text/event-stream", "stream content type %r" % headers)
        text = data.decode("utf-8")
        events = []
        for block in text.split("\n\n"):
            if not block:
                continue
            check(block.startswith("data: "), "SSE block without 'data: ': %r" % block[:80])
            events.append(block[6:])
        return status, events


def parse_stream(events, chat, where):
    """Checks one stream's shape; returns (text, finish_reason, token_chunks, usage)."""
    check(len(events) >= 2, "%s: too few events %r" % (where, events[:3]))
    check(events.count("[DONE]") == 1 and events[-1] == "[DONE]", "%s: not exactly one final [DONE]" % where)
    text, finish, token_chunks, usage = "", None, 0, None
    for i, raw in enumerate(events[:-1]):
        e = json.loads(raw)
        check("error" not in e, "%s: error event %r" % (where, e))
        if "error" in e:
            continue
        check(e["object"] == ("chat.completion.chunk" if chat else "text_completion"), "%s: object %r" % (where, e["object"]))
        if not e["choices"]:
            usage = e["usage"]
            continue
        c = e["choices"][0]
        check(finish is None, "%s: chunk after the finish reason" % where)
        if chat and i == 0:
            check(c["delta"] == {"role": "assistant", "content": ""}, "%s: first delta %r" % (where, c["delta"]))
            continue
        piece = c["delta"].get("content", "") if chat else c["text"]
        text += piece
        if c["finish_reason"] is None:
            token_chunks += 1
        else:
            finish = c["finish_reason"]
    check(finish in ("stop", "length"), "%s: finish_reason %r" % (where, finish))
    return text, finish, token_chunks, usage


def check_usage(usage, prompt_tokens, completion_tokens, where):
    check(usage is not None, "%s: no usage" % where)
    if usage is None:
        return
    check(usage["prompt_tokens"] == prompt_tokens, "%s: prompt_tokens %d, tokenizer says %d" % (where, usage["prompt_tokens"], prompt_tokens))
    check(usage["completion_tokens"] == completion_tokens,
          "%s: completion_tokens %d, counted %d" % (where, usage["completion_tokens"], completion_tokens))
    check(usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], "%s: total_tokens" % where)
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens")
    check(isinstance(cached, int) and 0 <= cached < max(usage["prompt_tokens"], 1),
          "%s: prompt_tokens_details.cached_tokens %r" % (where, cached))


TIERS = [("fast", "fast"), ("priority", "priority"), ("default", "default"), ("auto", "default"), ("flex", "flex")]


def test_models(api, model):
    status, models = api.post("/v1/completions", {"model": "no-such-model", "prompt": "x"})
    check(status == 404 and models["error"]["code"] == "model_not_found", "unknown model: %d %r" % (status, models))
    status, _, data = api.call("GET", "/v1/models")
    j = json.loads(data)
    check(status == 200 and [m["id"] for m in j["data"]] == [model], "/v1/models: %d %r" % (status, j))
    check(j["data"][0]["object"] == "model" and j["data"][0]["owned_by"] == "joule", "/v1/models entry %r" % j)
    for path in ("/health", "/ready"):
        status, _, _ = api.call("GET", path)
        check(status == 200, "%s: %d" % (path, status))


def test_completions(api, model):
    prompt = "The quick brown fox"
    n = 8
    base = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
    texts = set()
    for asked, reported in TIERS:
        status, r = api.post("/v1/completions", dict(base, service_tier=asked))
        where = "completion tier=%s" % asked
        if not check(status == 200, "%s: %d %r" % (where, status, r)):
            continue
        check(r["object"] == "text_completion" and r["id"].startswith("cmpl-"), "%s: %r" % (where, r))
        check(r["service_tier"] == reported, "%s: service_tier %r" % (where, r["service_tier"]))
        c = r["choices"][0]
        check(c["finish_reason"] in ("stop", "length"), "%s: finish %r" % (where, c["finish_reason"]))
        if c["finish_reason"] == "length":
            check(r["usage"]["completion_tokens"] == n, "%s: length after %d tokens" % (where, r["usage"]["completion_tokens"]))
        check_usage(r["usage"], count_tokens(prompt), r["usage"]["completion_tokens"], where)
        texts.add((c["text"], c["finish_reason"], r["usage"]["completion_tokens"]))
    check(len(texts) == 1, "greedy completions differ across tiers: %r" % texts)
    text, finish, tokens = texts.pop()

    # The same prompt as token ids.
    status, r = api.post("/v1/completions", dict(base, prompt=list(prompt.encode())))
    check(status == 200 and r["choices"][0]["text"] == text and r["usage"]["prompt_tokens"] == len(prompt),
          "token-id prompt: %d %r" % (status, r))

    # Streamed, every tier: same text, one chunk per token, usage at the end.
    for asked, reported in TIERS:
        where = "streamed completion tier=%s" % asked
        status, events = api.stream("/v1/completions", dict(base, service_tier=asked, stream=True,
                                                              stream_options={"include_usage": True}))
        if not check(status == 200, "%s: %d %r" % (where, status, events)):
            continue
        s_text, s_finish, chunks, usage = parse_stream(events, False, where)
        check(s_text == text and s_finish == finish, "%s: %r/%s vs non-streamed %r/%s" % (where, s_text, s_finish, text, finish))
        check_usage(usage, count_tokens(prompt), chunks, where)
        check(chunks == tokens, "%s: %d token chunks, non-streamed had %d tokens" % (where, chunks, tokens))
        check(json.loads(events[0])["service_tier"] == reported, "%s: service_tier" % where)


def test_chat(api, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    base = {"model": model, "messages": messages, "max_completion_tokens": 12, "temperature": 0}
    prompt_tokens = count_tokens(chatml(messages))
    for asked, reported in TIERS:
        where = "chat tier=%s" % asked
        status, r = api.post("/v1/chat/completions", dict(base, service_tier=asked))
        if not check(status == 200, "%s: %d %r" % (where, status, r)):
            continue
        check(r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-"), "%s: %r" % (where, r))
        check(r["service_tier"] == reported, "%s: service_tier" % where)
        msg = r["choices"][0]["message"]
        check(msg["role"] == "assistant", "%s: role" % where)
        check(all(s not in msg["content"] for s in SPECIALS), "%s: special token in text %r" % (where, msg["content"]))
        check_usage(r["usage"], prompt_tokens, r["usage"]["completion_tokens"], where)

        status, events = api.stream("/v1/chat/completions", dict(base, service_tier=asked, stream=True,
                                                                   stream_options={"include_usage": True}))
        if not check(status == 200, "%s streamed: %d %r" % (where, status, events)):
            continue
        s_text, s_finish, chunks, usage = parse_stream(events, True, where + " streamed")
        check(s_text == msg["content"] and s_finish == r["choices"][0]["finish_reason"],
              "%s: streamed %r/%s vs %r/%s" % (where, s_text, s_finish, msg["content"], r["choices"][0]["finish_reason"]))
        check_usage(usage, prompt_tokens, chunks, where + " streamed")
        check(chunks == r["usage"]["completion_tokens"], "%s: %d chunks vs %d tokens" % (where, chunks, r["usage"]["completion_tokens"]))


def test_stop_strings(api, model):
    base = {"model": model, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    status, r = api.post("/v1/completions", base)
    full = r["choices"][0]["text"] if status == 200 else ""
    if not check(len(full) >= 8, "stop: need a longer greedy text than %r" % full):
        return
    k = len(full) // 2
    stop = full[k:k + 2]
    want = full[:full.find(stop)]
    status, r = api.post("/v1/completions", dict(base, stop=[stop, "\x00never"]))
    check(status == 200 and r["choices"][0]["text"] == want and r["choices"][0]["finish_reason"] == "stop",
          "stop %r: got %r, want %r" % (stop, r, want))
    status, events = api.stream("/v1/completions", dict(base, stop=stop, stream=True, stream_options={"include_usage": True}))
    text, finish, chunks, usage = parse_stream(events, False, "streamed stop")
    check(text == want and finish == "stop", "streamed stop %r: got %r, want %r" % (stop, text, want))
    check_usage(usage, count_tokens(base["prompt"]), chunks, "streamed stop")
    check(chunks < 40, "streamed stop: generation went on for %d tokens" % chunks)


def test_errors(api, model):
    cases = [
        ({"model": model, "prompt": "x", "temperature": "hot"}, 400, "temperature", None),
        ({"model": model, "prompt": "x", "n": 17}, 400, "n", None),
        ({"model": model, "prompt": "x" * 600}, 400, "prompt", "context_length_exceeded"),
        ({"model": model, "prompt": [100000]}, 400, "prompt", None),
    ]
    for body, status_want, param, code in cases:
        status, r = api.post("/v1/completions", body)
        check(status == status_want and r["error"]["param"] == param and r["error"]["code"] == code
              and r["error"]["type"] == "invalid_request_error", "error case %r: %d %r" % (str(body)[:60], status, r))


def test_concurrent_streams(api, model, n):
    results = [None] * n

    def one(i):
        chat = i % 2 == 1
        tier = TIERS[i % len(TIERS)][0]
        body = {"model": model, "max_tokens": 4, "temperature": 0.8, "seed": i, "service_tier": tier, "stream": True,
                "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = [{"role": "user", "content": "request %d" % i}]
        else:
            body["prompt"] = "request %d" % i
        try:
            status, events = api.stream("/v1/chat/completions" if chat else "/v1/completions", body)
            results[i] = (status, events, chat)
        except Exception as e:  # noqa: BLE001 - any failure is a mismatch
            results[i] = (None, [repr(e)], chat)

    start = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - start
    ok = 0
    for i, (status, events, chat) in enumerate(results):
        where = "concurrent stream %d" % i
        if not check(status == 200, "%s: status %r %r" % (where, status, events[:1])):
            continue
        _, _, chunks, usage = parse_stream(events, chat, where)
        if usage is not None:
            check(usage["completion_tokens"] == chunks, "%s: %d chunks vs usage %r" % (where, chunks, usage))
            check(1 <= chunks <= 4, "%s: %d tokens for max_tokens 4" % (where, chunks))
        ok += 1
    print("concurrent: %d/%d streams ended with one [DONE] in %.1f s" % (ok, n, elapsed), flush=True)


def worker_metric(ports, names):
    """[{name: value}] per worker from its /metrics (a metric's series summed)."""
    out = []
    for port in ports:
        samples = scrape(port)
        out.append({name: sum(samples[name].values()) for name in names if name in samples})
    return out


def worker_kv(ports):
    """[(free, total)] KV blocks per worker."""
    names = ("joule_kv_cache_free_blocks", "joule_kv_cache_total_blocks")
    return [(v.get(names[0]), v.get(names[1])) for v in worker_metric(ports, names)]


def tokens_sampled(ports):
    return sum(v.get("joule_generation_tokens_total", 0) for v in worker_metric(ports, ("joule_generation_tokens_total",)))


def wait_kv_free(ports, timeout):
    deadline = time.time() + timeout
    kv = worker_kv(ports)
    while time.time() < deadline and any(f != t for f, t in kv):
        time.sleep(0.1)
        kv = worker_kv(ports)
    return kv


def test_prefix_cache(api, model, ports):
    """Requests sharing a long prompt: the first computes it in full (as with prefix caching off),
    a later one on the same rank finds its full KV blocks cached (cached_tokens > 0) and gives the
    same greedy text; the workers count the hits."""
    prompt = "Prefix cache check %s: " % os.urandom(8).hex() + " ".join("word%d" % i for i in range(40))
    names = ("joule_prefix_cache_queries_total", "joule_prefix_cache_hits_total", "joule_prefix_cache_blocks")
    before = worker_metric(ports, names)
    base = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    runs = []
    for i in range(4):  # two ranks: at least two of them land on the same one
        where = "shared prompt %d" % i
        status, r = api.post("/v1/completions", base)
        if not check(status == 200, "%s: %d %r" % (where, status, r)):
            return
        check_usage(r["usage"], count_tokens(prompt), r["usage"]["completion_tokens"], where)
        runs.append((r["choices"][0]["text"], r["usage"]["prompt_tokens_details"]["cached_tokens"]))
    status, events = api.stream("/v1/completions", dict(base, stream=True, stream_options={"include_usage": True}))
    if check(status == 200, "shared prompt streamed: %d %r" % (status, events)):
        text, _, chunks, usage = parse_stream(events, False, "shared prompt streamed")
        check_usage(usage, count_tokens(prompt), chunks, "shared prompt streamed")
        if usage is not None:
            runs.append((text, usage["prompt_tokens_details"]["cached_tokens"]))
    cached = [c for _, c in runs]
    check(cached[0] == 0, "shared prompt: the first request found %d tokens cached" % cached[0])
    check(max(cached) > 0, "shared prompt: no request found the prompt cached: %r" % cached)
    check(all(c % 16 == 0 for c in cached), "shared prompt: cached_tokens not whole 16-token blocks: %r" % cached)
    check(len({t for t, _ in runs}) == 1, "shared prompt: greedy texts differ with cached prefixes: %r" % runs)
    after = worker_metric(ports, names)
    hits = sum(a.get(names[1], 0) - b.get(names[1], 0) for a, b in zip(after, before))
    check(hits >= sum(cached), "shared prompt: workers counted %d hit tokens, responses %d" % (hits, sum(cached)))
    check(sum(a.get(names[2], 0) for a in after) > 0, "shared prompt: no cached blocks reported %r" % after)
    print("prefix cache: cached_tokens per request %r" % cached, flush=True)


def test_prefix_routing(api, model):
    """Requests that share a system prompt go to the rank that holds it (the coordinator routes
    for prefix-cache hits): after one request computed it, six sent at once all find it cached,
    where least-loaded routing would send half of them to the other rank, whose first computes
    it again. The coordinator counts the hits by tier."""
    system = "Routing check %s: " % os.urandom(8).hex() + " ".join("rule%d" % i for i in range(40))
    full_blocks = count_tokens(system) // 16 * 16

    def send(suffix):
        status, r = api.post("/v1/completions", {"model": model, "prompt": system + suffix, "max_tokens": 2,
                                                  "temperature": 0})
        return r["usage"]["prompt_tokens_details"]["cached_tokens"] if status == 200 else -1

    before = scrape(api.port).get("joule_prompt_tokens_cached_total", {}).get('{tier="standard"}', 0)
    first = send(" first")
    cached = [None] * 6
    threads = [threading.Thread(target=lambda i=i: cached.__setitem__(i, send(" user %d" % i))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(first == 0, "prefix routing: the first request found %d tokens cached" % first)
    check(all(c >= full_blocks - 16 for c in cached),
          "prefix routing: not every request found the %d-token system prompt cached: %r" % (full_blocks, cached))
    after = scrape(api.port).get("joule_prompt_tokens_cached_total", {}).get('{tier="standard"}', 0)
    check(after - before == sum(cached),
          "prefix routing: joule_prompt_tokens_cached_total{tier=standard} rose by %r, responses say %d" % (
              after - before, sum(cached)))
    print("prefix routing: cached_tokens %r of a %d-token system prompt" % (cached, count_tokens(system)), flush=True)


def test_disconnect_frees_kv(api, model, ports):
    kv = wait_kv_free(ports, 10)
    check(all(f is not None and f == t for f, t in kv), "KV not all free before the disconnect test: %r" % kv)
    sampled_before = tokens_sampled(ports)
    max_tokens = 480
    body = {"model": model, "prompt": "a long story", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    check(resp.status == 200, "disconnect: status %d" % resp.status)
    seen = 0
    while seen < 3:
        line = resp.readline()
        if not line:
            break
        seen += line.startswith(b"data: ")
    held = worker_kv(ports)
    check(any(f < t for f, t in held), "disconnect: no KV blocks in use mid-stream %r" % held)
    # Gone without a goodbye: the coordinator must notice and cancel on the worker.
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    kv = wait_kv_free(ports, 10)
    check(all(f == t for f, t in kv), "disconnect: KV blocks not freed within 10 s: %r" % kv)
    # Freed because it was cancelled, not because it ran to max_tokens.
    time.sleep(0.3)
    sampled = tokens_sampled(ports) - sampled_before
    check(sampled < max_tokens, "disconnect: the worker sampled all %d tokens; it was not cancelled" % sampled)
    print("disconnect: KV in use mid-stream %r, after disconnect %r; %d of %d tokens sampled"
          % (held, kv, sampled, max_tokens), flush=True)
    status, _, data = api.call("GET", "/metrics")
    check('status="499"' in data.decode(), "coordinator /metrics has no 499 (client gone) count")


def test_no_5xx(api):
    status, _, data = api.call("GET", "/metrics")
    text = data.decode()
    bad = [l for l in text.splitlines() if l.startswith("joule_http_requests_total") and 'status="5' in l]
    check(status == 200 and not bad, "5xx answers counted: %r" % bad)
    check("joule_time_to_first_token_seconds_count" in text and "joule_generation_tokens_total" in text,
          "coordinator metrics missing")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--worker-metrics", required=True)
    p.add_argument("--concurrency", type=int, default=256)
    a = p.parse_args()
    api = Api(a.port)
    ports = [int(x) for x in a.worker_metrics.split(",")]
    for name, fn in [("models", lambda: test_models(api, a.model)),
                     ("completions", lambda: test_completions(api, a.model)),
                     ("chat", lambda: test_chat(api, a.model)),
                     ("stop strings", lambda: test_stop_strings(api, a.model)),
                     ("errors", lambda: test_errors(api, a.model)),
                     ("concurrent streams", lambda: test_concurrent_streams(api, a.model, a.concurrency)),
                     ("prefix cache", lambda: test_prefix_cache(api, a.model, ports)),
                     ("prefix routing", lambda: test_prefix_routing(api, a.model)),
                     ("disconnect frees KV", lambda: test_disconnect_frees_kv(api, a.model, ports)),
                     ("no 5xx", lambda: test_no_5xx(api))]:
        before = len(FAILURES)
        t0 = time.time()
        fn()
        print("%s: %s (%.1f s)" % (name, "ok" if len(FAILURES) == before else "FAILED", time.time() - t0), flush=True)
    if FAILURES:
        print("FAIL: %d mismatches" % len(FAILURES), file=sys.stderr)
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
