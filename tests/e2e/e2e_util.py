"""Shared by the Python end-to-end clients: mismatch bookkeeping and reading
Server-Sent Events from an OpenAI-style streamed response (standard library only)."""
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
