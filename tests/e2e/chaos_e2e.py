#!/usr/bin/python3
"""Chaos end to end: a worker fails while streams run, and no request is lost.

  chaos_e2e.py BUILD_DIR MODEL_DIR --workers 4 --fault kill|stop|link|drain|coordinator
               [--streams 32]
               [--netns TAG --subnet A.B.C]

Starts a real coordinator (HTTP API) and WORKERS joule-worker processes over UCX
shared memory with F32 expert payloads, then runs the same STREAMS seeded,
streamed completions twice: once without a fault (the reference), once with a
random worker killed (kill -9), drained (joule-cli drain), frozen (SIGSTOP) or cut off (its network link taken
down: --fault link, with the workers in network namespaces made by netns_e2e.sh and this
script running in the coordinator's) in mid-generation. After a kill the worker is
restarted while streams run: it joins the running group and gets traffic. With --fault
coordinator the coordinator is killed and restarted instead: the workers must register
again without restarting and serve the same texts; with --fault unloadable the checkpoint's
files are gone when a worker dies, so nobody can load its experts: every request must end
with the reason, not hang. Every
request of the second run must finish with no error, its text equal to the
reference's (no duplicated or missing text), and its usage must count the
resumed tokens. Prints the recovery time (the fault to the first token after it,
per stream that was interrupted). A frozen worker, thawed, must exit on its own
(it left the group). Standard library only.
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from e2e_util import FAILURES, check, sse_data



class Cluster:
    """A coordinator and its workers as child processes, logs in a temp dir."""

    def __init__(self, build, model, workers, coordinator_flags=(), netns=None, subnet=None,
                 device="cpu"):
        self.build, self.model, self.n = build, model, workers
        self.device = device
        self.coordinator_flags = list(coordinator_flags)
        # With netns: worker r runs in namespace TAGwR at SUBNET.(r+2); the coordinator
        # (and this script) in the namespace at SUBNET.1.
        self.netns, self.subnet = netns, subnet
        self.tmp = tempfile.mkdtemp(prefix="joule-chaos.")
        self.coordinator = None
        self.workers = []
        self.spawned = 0  # worker processes started, for their log names
        self.failed = False
        self.env = dict(os.environ, UCX_TLS="shm,self", UCX_WARN_UNUSED_ENV_VARS="n")
        if netns:
            self.env.update(UCX_TLS="tcp,self", UCX_NET_DEVICES="eth0")

    def _spawn(self, name, argv):
        out = open(os.path.join(self.tmp, name + ".out"), "w")
        err = open(os.path.join(self.tmp, name + ".err"), "w")
        return subprocess.Popen(argv, stdout=out, stderr=err, env=self.env)

    def _wait_file(self, path, what):
        for _ in range(200):
            if os.path.exists(path) and os.path.getsize(path) > 0:
                return open(path).read().strip()
            time.sleep(0.05)
        self.fail(what + " did not start")

    def start_coordinator(self, port=0, http_port=0):
        port_file = os.path.join(self.tmp, "port")
        http_file = os.path.join(self.tmp, "http_port")
        for f in (port_file, http_file):
            if os.path.exists(f):
                os.remove(f)
        self.coordinator = self._spawn("coordinator.%d" % time.monotonic_ns(), [
            os.path.join(self.build, "coordinator/joule-coordinator"), "--model", self.model,
            "--workers", str(self.n), "--port", str(port), "--port-file", port_file,
            "--http-port", str(http_port), "--http-port-file", http_file, "--heartbeat-ms", "300",
            "--step-timeout-ms", "5000",
            "--tier-queue-cap", "fast=1024,priority=1024,standard=1024,batch=1024"] +
            # Across namespaces the workers dial the coordinator's interface (the
            # default, 127.0.0.1, serves this namespace only).
            (["--grpc-host", "0.0.0.0"] if self.netns else []) +
            self.coordinator_flags)
        self.addr = "127.0.0.1:" + self._wait_file(port_file, "coordinator")
        self.http_port = int(self._wait_file(http_file, "coordinator HTTP"))

    def restart_coordinator(self):
        """kill -9 of the coordinator, and a new one on the same ports at once."""
        self.coordinator.kill()
        self.coordinator.wait()
        self.start_coordinator(int(self.addr.split(":")[1]), self.http_port)

    def start(self):
        self.start_coordinator()
        for r in range(self.n):
            self.workers.append(self.spawn_worker(r))
        self.wait_ready(self.n)

    def spawn_worker(self, r, extra=()):
        """Worker process number r (in namespace TAGwR with --netns)."""
        reach = self.addr if not self.netns else "%s.1:%s" % (self.subnet, self.addr.split(":")[1])
        prefix, flags = [], list(extra)
        if self.netns:
            prefix = ["ip", "netns", "exec", "%sw%d" % (self.netns, r)]
            flags += ["--grpc-host", "0.0.0.0", "--advertise-host", "%s.%d" % (self.subnet, r + 2)]
        self.spawned += 1
        binary = "worker/service/joule-worker"
        if self.device == "fake":  # the GPU worker's path on the fake device (a test build)
            binary = "worker/service/joule-worker-fake-device"
            flags += ["--device", "fake", "--gpu-memory-utilization", "0"]
        return self._spawn("w%d.%d" % (r, self.spawned), prefix + [
            os.path.join(self.build, binary), "--coordinator", reach,
            "--model", self.model, "--threads", "1", "--kv-cache-mb", "32", "--payload", "f32"] + flags)

    def wait_ready(self, n, also=None):
        """Until n ranks are ready (and `also` matches the status, when given)."""
        for _ in range(240):
            status = self.status()
            if status.count(": ready") == n and (also is None or re.search(also, status)):
                return
            time.sleep(0.25)
        self.fail("the cluster did not become ready with %d ranks:\n%s" % (n, self.status()))

    def cut(self, r):
        """Takes worker r's network link down (its namespace's only interface)."""
        subprocess.run(["ip", "-n", "%sw%d" % (self.netns, r), "link", "set", "eth0", "down"], check=True)

    def cli(self, *args, must=True):
        """joule-cli COMMAND --coordinator ADDR ARGS...; its stdout (with `must`, a failure
        fails the test)."""
        r = subprocess.run([os.path.join(self.build, "coordinator/cli/joule-cli"), args[0],
                            "--coordinator", self.addr] + list(args[1:]),
                           capture_output=True, text=True, timeout=10)
        if must:
            check(r.returncode == 0, "joule-cli %s: %s" % (" ".join(args), r.stderr.strip()))
        return r.stdout

    def status(self):
        return self.cli("status", must=False)

    def metrics(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()

    def fail(self, what):
        self.failed = True
        print("FAIL: " + what, file=sys.stderr)
        for name in sorted(os.listdir(self.tmp)):
            if name.endswith(".err"):
                with open(os.path.join(self.tmp, name)) as f:
                    tail = f.readlines()[-8:]
                print("--- %s (tail)\n%s" % (name, "".join(tail)), file=sys.stderr)
        self.stop()
        sys.exit(1)

    def stop(self):
        procs = [p for p in [self.coordinator] + self.workers if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        deadline = time.time() + 5
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not os.environ.get("JOULE_CHAOS_KEEP"): subprocess.run(["rm", "-rf", self.tmp])


class Stream:
    """One streamed, seeded completion: its text, token arrival times and usage."""

    def __init__(self, port, model, index, max_tokens, on_token):
        self.port, self.model, self.index, self.max_tokens, self.on_token = port, model, index, max_tokens, on_token
        self.status, self.text, self.error, self.usage = None, "", None, None
        self.finish, self.done, self.times = None, False, []

    def run(self):
        body = {"model": self.model, "prompt": "chaos %d: " % self.index, "max_tokens": self.max_tokens,
                "temperature": 0.8, "seed": 1000 + self.index, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.status = resp.status
            for data in sse_data(resp):
                if data == "[DONE]":
                    self.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    self.error = event["error"]
                    continue
                if event.get("usage"):
                    self.usage = event["usage"]
                for choice in event.get("choices", []):
                    self.text += choice.get("text", "")
                    if choice.get("finish_reason"):
                        self.finish = choice["finish_reason"]
                    self.times.append(time.monotonic())
                    self.on_token()
        except Exception as e:  # a broken connection is a failure like any other
            self.error = repr(e)


def run_streams(port, model, count, max_tokens, fault=None, fault_after=0):
    """Runs `count` streams at once; calls fault() once `fault_after` tokens arrived."""
    lock = threading.Lock()
    seen = [0]
    fired = [None]

    def on_token():
        with lock:
            seen[0] += 1
            if fault is not None and fired[0] is None and seen[0] >= fault_after:
                fired[0] = time.monotonic()
                fault()

    streams = [Stream(port, model, i, max_tokens, on_token) for i in range(count)]
    threads = [threading.Thread(target=s.run) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return streams, fired[0]


def check_complete(streams, reference, phase):
    for s in streams:
        tag = "%s stream %d" % (phase, s.index)
        check(s.status == 200, "%s: HTTP %s" % (tag, s.status))
        check(s.error is None, "%s: error %s" % (tag, s.error))
        check(s.done, "%s: no [DONE]" % tag)
        check(s.finish == "length", "%s: finish_reason %s" % (tag, s.finish))
        check(s.usage is not None and s.usage["completion_tokens"] == s.max_tokens,
              "%s: usage %s" % (tag, s.usage))
        if reference is not None:
            check(s.text == reference[s.index].text,
                  "%s: text differs from the fault-free run (%d vs %d chars)" %
                  (tag, len(s.text), len(reference[s.index].text)))


def recovery_times(time_lists, fault_at):
    """Per stream (its token arrival times): the fault to the end of its longest
    stall after it (the fault counts as a token), i.e. when it flowed again."""
    out = []
    for times in time_lists:
        after = [t for t in times if t > fault_at]
        if not after:
            continue
        points = [fault_at] + after
        gaps = [(b - a, b) for a, b in zip(points, points[1:])]
        out.append(max(gaps)[1] - fault_at)
    return out


def coordinator_restart(cluster, name, reference, args):
    """The coordinator is killed in mid-generation and started again on the same
    ports: its streams are lost (their connections close, nothing hangs), the
    workers register again without restarting, and the cluster serves again."""
    pids = [w.pid for w in cluster.workers]
    total = args.streams * args.max_tokens
    print("fault: kill -9 of the coordinator after %d of %d tokens, restarted at once" %
          (total // 3, total), flush=True)
    streams, fault_at = run_streams(cluster.http_port, name, args.streams, args.max_tokens,
                                    fault=cluster.restart_coordinator, fault_after=total // 3)
    check(fault_at is not None, "the fault never fired")
    lost = sum(1 for s in streams if not s.done)
    print("%d of %d streams were open on the killed coordinator: their connections closed "
          "(documented: they are lost to their clients)" % (lost, len(streams)), flush=True)
    check(lost > 0, "the coordinator died after every stream had finished")
    cluster.wait_ready(args.workers, also=r"group_epoch: 1 \(serving\)")
    print("serving again %.2f s after the kill" % (time.monotonic() - fault_at), flush=True)
    check([w.pid for w in cluster.workers] == pids and all(w.poll() is None for w in cluster.workers),
          "a worker was restarted or exited")
    again, _ = run_streams(cluster.http_port, name, args.streams, args.max_tokens)
    check_complete(again, reference, "after the restart")


def unloadable_experts(cluster, name, victim, args):
    """A worker dies when its experts cannot be loaded anywhere (the checkpoint's
    files are gone): the survivors fail to load them and exit naming the cause,
    and every request ends with an error instead of hanging."""
    for f in os.listdir(cluster.model):
        if f.endswith(".safetensors"):  # open mappings stay valid; new loads fail
            os.rename(os.path.join(cluster.model, f), os.path.join(cluster.model, f + ".gone"))
    proc = cluster.workers[victim]
    total = args.streams * args.max_tokens
    print("fault: kill -9 of worker process %d with the checkpoint's files gone" % victim, flush=True)
    started = time.monotonic()
    streams, fault_at = run_streams(cluster.http_port, name, args.streams, args.max_tokens,
                                    fault=lambda: proc.send_signal(signal.SIGKILL),
                                    fault_after=total // 3)
    ended = time.monotonic() - started
    print("every stream ended %.1f s after the start" % ended, flush=True)
    check(ended < 60, "the streams took %.0f s to end" % ended)
    failed = [s for s in streams if s.finish is None]
    check(len(failed) > 0, "no stream failed although no rank could load the experts")
    for s in failed:
        check(s.error is not None and "died" in str(s.error),
              "stream %d ended without the reason: %s" % (s.index, s.error))
    left = [s for s in failed if "no rank is left" in str(s.error)]
    check(len(left) > 0, "no error says that no rank is left")
    for i, w in enumerate(cluster.workers):
        if i == victim:
            continue
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            check(False, "survivor %d did not exit" % i)
            continue
        check(w.returncode == 1, "survivor %d exited with %s" % (i, w.returncode))
        with open(os.path.join(cluster.tmp, "w%d.%d.err" % (i, i + 1))) as f:
            log = f.read()
        check("loading the experts of placement epoch" in log,
              "survivor %d's log does not say which load failed" % i)


def drained_process(cluster):
    """The worker process that exited (status 0) after its rank was drained."""
    for _ in range(150):
        exited = [i for i, w in enumerate(cluster.workers) if w.poll() is not None]
        if exited:
            i = exited[0]
            check(len(exited) == 1, "%d worker processes exited after one drain" % len(exited))
            check(cluster.workers[i].returncode == 0,
                  "the drained worker exited with %d" % cluster.workers[i].returncode)
            return i
        time.sleep(0.1)
    check(False, "no worker exited within 15 s of the drain")
    return -1


def rejoin(cluster, name, victim, reference, args):
    """The killed worker restarted: it joins the running group (epoch 3), which
    serves with every rank again and sends it traffic."""
    metrics_file = os.path.join(cluster.tmp, "rejoined.metrics_port")
    # Streams run while it joins: the group pauses to take it in, nothing is lost.
    during = {}
    load = threading.Thread(target=lambda: during.update(
        streams=run_streams(cluster.http_port, name, args.streams, args.max_tokens)[0]))
    load.start()
    joined_at = time.monotonic()
    cluster.workers[victim] = cluster.spawn_worker(
        victim, ["--metrics-port", "0", "--metrics-port-file", metrics_file])
    cluster.wait_ready(args.workers, also=r"group_epoch: 3 \(serving\) after rank \d+ joined")
    print("the restarted worker joined in %.2f s (start-up and weights included)" %
          (time.monotonic() - joined_at), flush=True)
    load.join(180)
    check_complete(during.get("streams", []), reference, "during the join")
    again, _ = run_streams(cluster.http_port, name, args.streams, args.max_tokens)
    check_complete(again, reference, "rejoined")
    conn = http.client.HTTPConnection("127.0.0.1", int(open(metrics_file).read()), timeout=10)
    conn.request("GET", "/metrics")
    page = conn.getresponse().read().decode()
    check((metric(page, "joule_generation_tokens_total") or 0) > 0, "the rejoined worker got no traffic")
    check(metric(page, "joule_group_epoch") == 3, "the rejoined worker is not in group epoch 3")


def metric(text, name):
    m = re.search(r"^%s(?:\{[^}]*\})? ([0-9.e+-]+)$" % re.escape(name), text, re.M)
    return float(m.group(1)) if m else None


def worker_fault(cluster, name, reference, args, seed, victim):
    """One worker killed, frozen, cut off or drained while streams run (see the top)."""
    proc = cluster.workers[victim]
    # drain: `victim` is the rank taken out (which process holds it does not matter).
    faults = {"kill": lambda: proc.send_signal(signal.SIGKILL),
              "stop": lambda: proc.send_signal(signal.SIGSTOP),
              "link": lambda: cluster.cut(victim),
              "drain": lambda: cluster.cli("drain", str(victim))}
    total = args.streams * args.max_tokens
    what = ("rank %d" % victim if args.fault == "drain" else
            "worker process %d (pid %d)" % (victim, proc.pid))
    print("fault: %s of %s (seed %d) after %d of %d tokens" %
          (args.fault, what, seed, total // 3, total), flush=True)
    streams, fault_at = run_streams(cluster.http_port, name, args.streams, args.max_tokens,
                                    fault=faults[args.fault], fault_after=total // 3)
    check(fault_at is not None, "the fault never fired")
    check_complete(streams, reference, "faulted")
    resumed = sum(s.usage.get("resumed_tokens", 0) for s in streams if s.usage)
    check(resumed > 0, "no stream's usage reports resumed tokens")
    times = recovery_times([s.times for s in streams], fault_at) if fault_at else []
    check(len(times) > 0, "no stream was interrupted by the fault")
    if times:
        print("recovery (fault -> stream flowing again, %d streams): median %.3f s, max %.3f s" %
              (len(times), statistics.median(times), max(times)), flush=True)
        check(max(times) < 20, "recovery took %.1f s" % max(times))
    print("resumed tokens recomputed: %d" % resumed)

    status = cluster.status()
    check(re.search(r"rank \d+: dead", status) is not None, "joule-cli status shows no dead rank:\n" + status)
    check(re.search(r"group_epoch: 2 \(serving\) after rank \d+ (died|drained)", status) is not None,
          "joule-cli status does not show group epoch 2 serving:\n" + status)
    m = cluster.metrics()
    check((metric(m, "joule_requests_resumed_total") or 0) > 0,
          "joule_requests_resumed_total did not count")
    if args.fault == "drain":
        check((metric(m, "joule_rank_failures_total") or 0) == 0, "a drain counted as a failure")
        victim = drained_process(cluster)
    else:
        check((metric(m, "joule_rank_failures_total") or 0) >= 1, "joule_rank_failures_total did not count")
    check((metric(m, "joule_membership_epoch") or 0) >= 2, "joule_membership_epoch did not advance")
    for i, w in enumerate(cluster.workers):
        if i != victim:
            check(w.poll() is None, "surviving worker %d exited (%s)" % (i, w.poll()))
    if args.fault == "stop":
        thawed = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(15)
            print("the thawed worker left after %.2f s (exit %d)" % (time.monotonic() - thawed, proc.returncode))
        except subprocess.TimeoutExpired:
            check(False, "the thawed worker did not leave within 15 s")

    # The smaller group serves new requests.
    after, _ = run_streams(cluster.http_port, name, 8, 16)
    check_complete(after, None, "after")

    if args.fault == "kill":
        rejoin(cluster, name, victim, reference, args)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("model")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--fault", choices=["kill", "stop", "link", "drain", "coordinator", "unloadable"],
                    default="kill")
    ap.add_argument("--netns", help="namespace tag (netns_e2e.sh); needed by --fault link")
    ap.add_argument("--subnet", help="the namespaces' /24, e.g. 10.231.40")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=None, help="picks the worker (default: random)")
    ap.add_argument("--device", choices=["cpu", "fake"], default="cpu",
                    help="fake: workers on the fake GPU (joule-worker-fake-device)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    victim = random.Random(seed).randrange(args.workers)

    if args.fault == "link" and not (args.netns and args.subnet):
        ap.error("--fault link needs --netns and --subnet (run it through netns_e2e.sh)")
    cluster = Cluster(args.build, args.model, args.workers, netns=args.netns, subnet=args.subnet,
                      device=args.device)
    if args.fault == "unloadable":  # its files will go: a private copy
        cluster.model = os.path.join(cluster.tmp, os.path.basename(os.path.normpath(args.model)))
        shutil.copytree(args.model, cluster.model)
    name = os.path.basename(os.path.normpath(args.model))
    try:
        cluster.start()
        reference, _ = run_streams(cluster.http_port, name, args.streams, args.max_tokens)
        check_complete(reference, None, "fault-free")
        if FAILURES:
            cluster.fail("the fault-free run failed")

        if args.fault == "coordinator":
            coordinator_restart(cluster, name, reference, args)
        elif args.fault == "unloadable":
            unloadable_experts(cluster, name, victim, args)
        else:
            worker_fault(cluster, name, reference, args, seed, victim)
    finally:
        if FAILURES and not cluster.failed:
            cluster.fail("%d check(s) failed" % len(FAILURES))
        if not cluster.failed:
            cluster.stop()
    outcome = ("no rank could load the dead one's experts and every request ended with the reason"
               if args.fault == "unloadable" else
               "every request completed, texts equal the fault-free run's")
    print("PASS: %s fault with %d workers under %d streams: %s" %
          (args.fault, args.workers, args.streams, outcome))


if __name__ == "__main__":
    main()
