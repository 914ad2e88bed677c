"""Shared by the Python end-to-end clients: mismatch bookkeeping and reading
Server-Sent Events from an OpenAI-style streamed response, scraping /metrics
(standard library only)."""
import http.client
import re
import sys

FAILURES = []


def check(cond, what):
    """Records (and prints) a mismatch instead of stopping at the first one."""
    if not cond:
        FAILURES.append(what)
        print("MISMATCH: " + what, file=sys.stderr, flush=True)
    return cond


def sse_data(resp):
    """The `data:` payloads of a streamed response, in order ("[DONE]" included)."""
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line[len("data: "):]


def scrape(port):
    """Every joule_ sample of a /metrics page: {name: {labels: value}}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(joule_\w+)(\{[^}]*\})? (\S+)$", line)
        if m:
            out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
    return out
