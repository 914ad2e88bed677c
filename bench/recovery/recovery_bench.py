#!/usr/bin/python3
"""Recovery benchmark: kill -9 of one worker of an EP group under steady load, again and again.

  recovery_bench.py BUILD_DIR MODEL_DIR [--workers 4] [--kills 10] [--streams 16] [--out DIR]

One cluster (coordinator + WORKERS joule-worker processes over UCX shared memory, F32
payloads; tests/e2e/chaos_e2e.py's Cluster) under a steady closed-loop load of STREAMS
streamed, seeded completions. KILLS times: a random worker is killed with kill -9, the load
runs on for a few seconds, then the worker is started again and joins the running group.
Per kill it measures:

  first_token_s   the kill -> the first token any client received after it
  all_flowing_s   the kill -> every stream that was running flowing again (the end of its
                  longest stall after the kill)
  join_s          the restart -> the group serving with every rank again
  resumed_tokens  tokens recomputed by resumed attempts (joule_resumed_tokens_total)
  gap_p99_s       the 99th percentile gap between tokens before the kill (the same run's
                  baseline: how long a stream pauses without any fault)

and over the run: requests lost (aim: 0). The before-elastic baseline, in the same run: one
kill on a cluster with --elastic=false --max-resumes 0 (requests lost, whether it serves
after). Writes OUT/recovery.json and OUT/recovery.md.
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "e2e"))
import chaos_e2e  # noqa: E402  (Cluster, Stream, metric)


class Load:
    """STREAMS closed-loop clients: each sends a request as soon as its last one ended."""

    def __init__(self, port, model, streams, max_tokens):
        self.port, self.model, self.streams, self.max_tokens = port, model, streams, max_tokens
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = []    # finished Stream objects
        self.times = {}   # client -> every token arrival, over its requests
        self.threads = [threading.Thread(target=self._client, args=(c,)) for c in range(streams)]

    def _client(self, c):
        n = 0
        while not self.stop.is_set():
            times = self.times.setdefault(c, [])
            s = chaos_e2e.Stream(self.port, self.model, c * 100000 + n, self.max_tokens,
                                 on_token=lambda: times.append(time.monotonic()))
            s.run()
            with self.lock:
                self.done.append(s)
            n += 1
            if s.error is not None or s.status != 200:
                time.sleep(0.2)  # a refusing cluster is not hammered

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def gaps_before(times, t0, t1):
    out = []
    for ts in times.values():
        window = [t for t in ts if t0 <= t <= t1]
        out.extend(b - a for a, b in zip(window, window[1:]))
    return sorted(out)


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] if sorted_values else None


def kill_once(cluster, load, rng, args, since):
    """Kills a random worker; the measures of that kill over the next args.after seconds."""
    victim = rng.randrange(args.workers)
    resumed_before = chaos_e2e.metric(cluster.metrics(), "joule_resumed_tokens_total") or 0
    killed = time.monotonic()
    cluster.workers[victim].kill()
    time.sleep(args.after)
    until = killed + args.after
    times = [[t for t in ts if t <= until] for ts in list(load.times.values())]
    after = [t for ts in times for t in ts if t > killed]
    running = [ts for ts in times if any(since <= t <= killed for t in ts)]
    flowing = chaos_e2e.recovery_times(running, killed)
    gaps = gaps_before(dict(enumerate(times)), since, killed)
    resumed = (chaos_e2e.metric(cluster.metrics(), "joule_resumed_tokens_total") or 0) - resumed_before
    return victim, {
        "victim": victim,
        "first_token_s": (min(after) - killed) if after else None,
        "all_flowing_s": max(flowing) if flowing else None,
        "resumed_tokens": resumed,
        "gap_p50_s": percentile(gaps, 0.5),
        "gap_p99_s": percentile(gaps, 0.99),
    }


def lost_requests(load):
    return [s for s in load.done if s.error is not None or s.status != 200 or not s.done]


def elastic_run(args, name, rng):
    """KILLS kills on one cluster, each killed worker restarted and rejoined."""
    cluster = chaos_e2e.Cluster(args.build, args.model, args.workers)
    rows = []
    try:
        cluster.start()
        load = Load(cluster.http_port, name, args.streams, args.max_tokens)
        load.start()
        time.sleep(args.warmup)
        since = time.monotonic()
        for k in range(args.kills):
            time.sleep(rng.random())
            victim, row = kill_once(cluster, load, rng, args, since)
            restarted = time.monotonic()
            cluster.workers[victim] = cluster.spawn_worker(victim)
            # Each kill and each join opens a group epoch.
            cluster.wait_ready(args.workers, also=r"group_epoch: %d \(serving\)" % (1 + 2 * (k + 1)))
            row["join_s"] = time.monotonic() - restarted
            rows.append(row)
            print("kill %d: worker %d, first token after %.3f s, all flowing after %s s, %d tokens "
                  "recomputed, rejoined in %.2f s" % (
                      k + 1, victim, row["first_token_s"] if row["first_token_s"] is not None else -1,
                      "%.3f" % row["all_flowing_s"] if row["all_flowing_s"] is not None else "-",
                      row["resumed_tokens"], row["join_s"]), flush=True)
            time.sleep(1.0)
            since = time.monotonic()
        load.finish()
        lost = lost_requests(load)
        return rows, len(load.done), lost
    finally:
        cluster.stop()


def baseline_run(args, name, rng):
    """One kill with elastic groups and resumes off: the behaviour before them."""
    cluster = chaos_e2e.Cluster(args.build, args.model, args.workers,
                                ["--elastic=false", "--max-resumes", "0"])
    try:
        cluster.start()
        load = Load(cluster.http_port, name, args.streams, args.max_tokens)
        load.start()
        time.sleep(args.warmup)
        cluster.workers[rng.randrange(args.workers)].kill()
        time.sleep(args.after)
        load.finish()
        probe = chaos_e2e.Stream(cluster.http_port, name, 999999, 4, on_token=lambda: None)
        probe.run()
        return {"requests": len(load.done), "lost": len(lost_requests(load)),
                "serves_after": probe.status == 200 and probe.error is None and probe.done}
    finally:
        cluster.stop()


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release()}


def summary(rows, key):
    vals = [r[key] for r in rows if r[key] is not None]
    return {"median": statistics.median(vals), "max": max(vals)} if vals else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("model")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=1.5, help="seconds of load before the first kill")
    ap.add_argument("--after", type=float, default=2.0, help="seconds of load after a kill, before the restart")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="bench/results/recovery-ep4")
    args = ap.parse_args()
    name = os.path.basename(os.path.normpath(args.model))
    rng = random.Random(args.seed)

    rows, requests, lost = elastic_run(args, name, rng)
    baseline = baseline_run(args, name, rng)
    print("baseline --elastic=false: %d/%d requests lost, serves after the kill: %s" %
          (baseline["lost"], baseline["requests"], baseline["serves_after"]), flush=True)

    result = {
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine(),
        "model": name, "workers": args.workers, "streams": args.streams,
        "max_tokens": args.max_tokens,
        "first_token_s": summary(rows, "first_token_s"),
        "all_flowing_s": summary(rows, "all_flowing_s"),
        "gap_p99_s": summary(rows, "gap_p99_s"),
        "join_s": summary(rows, "join_s"),
        "lost": len(lost),
        "lost_errors": sorted({str(s.error)[:160] for s in lost})[:3],
        "requests": requests,
        "resumed_tokens": sum(r["resumed_tokens"] for r in rows),
        "kills": rows,
        "baseline_non_elastic": baseline,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recovery.json"), "w") as f:
        json.dump(result, f, indent=1)
    ft, af, gp, js = (result["first_token_s"], result["all_flowing_s"], result["gap_p99_s"],
                      result["join_s"])
    md = [
        "# Recovery from kill -9 of one of %d workers (%s, %d streams)" % (args.workers, name, args.streams),
        "",
        "Command: `%s`  " % result["command"],
        "Machine: %s, %d cores, Linux %s" % (result["machine"]["cpu"], result["machine"]["cores"],
                                            result["machine"]["kernel"]),
        "",
        "| | median | max |",
        "|---|---|---|",
        "| kill -> first token after it | %.3f s | %.3f s |" % (ft["median"], ft["max"]),
        "| kill -> every running stream flowing again | %.3f s | %.3f s |" % (af["median"], af["max"]),
        "| baseline: p99 gap between tokens before the kill | %.3f s | %.3f s |" % (gp["median"], gp["max"]),
        "| restart of the killed worker -> serving with every rank | %.3f s | %.3f s |" % (js["median"], js["max"]),
        "",
        "Requests lost: %d of %d over %d kills on one cluster; tokens recomputed by resumed requests: %d." % (
            result["lost"], result["requests"], len(rows), result["resumed_tokens"]),
        "Recovery / p99 token gap (medians): %.1fx." % (af["median"] / gp["median"]),
        "",
        "Before elastic groups (`--elastic=false --max-resumes 0`, same run, one kill): %d of %d "
        "requests lost; serving after the kill: %s." % (baseline["lost"], baseline["requests"],
                                                       "yes" if baseline["serves_after"] else "no (restart needed)"),
    ]
    with open(os.path.join(args.out, "recovery.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
