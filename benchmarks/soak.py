"""Soak: a bounded, seeded mix of streams against a longcat-serve it starts on 127.0.0.1 (free port, demo model).

    python benchmarks/soak.py --streams 300 --concurrency 16          # the CI-sized run (tests/test_soak.py)
    python benchmarks/soak.py --streams 5000 --concurrency 32         # the long run (benchmarks/RESULTS.md)
    python benchmarks/soak.py --streams 2000 --sigterm                # SIGTERM half-way: checks the drain

The mix: completions, mid-stream cancels, short deadlines, n>1, stop strings, logprobs, Abort RPCs, invalid
requests and raw garbage bodies. It fails (exit 1, or SoakReport.failures) on any UNKNOWN/INTERNAL or other
unexpected status, an OK stream missing a `complete`, an `error` outcome in the server's metrics or outcome
counts that do not add up, KV blocks still in use or requests still running at the end, health not SERVING,
different greedy tokens for the same prompt before and after, or RSS growth above the bound. With --sigterm:
the server must exit 0 within --drain-grace-s + its epsilon (+ interpreter exit) and streams cut off must end
UNAVAILABLE (a call started after the signal may also end CANCELLED: gRPC cancels the calls that race the
server's final close). Loopback only; every call has a deadline, and no stream starts after --time-limit-s."""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from longcat_service.server.generated import longcat_pb2 as pb  # noqa: E402
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc  # noqa: E402

KINDS = ("complete", "cancel", "deadline", "n>1", "stop", "logprobs", "abort", "invalid", "garbage")
WORDS = "the cat sat on a mat and looked at the moon while music played softly in another room".split()
GREEDY_PROMPT = "Once upon a time the cat"
CALL_TIMEOUT_S = 60.0
EXIT_ALLOWANCE_S = 5.0  # --sigterm: the Python interpreter's own exit (torch loaded, busy 2-core machine)
# Statuses each kind may end with. RESOURCE_EXHAUSTED (admission control) is allowed everywhere; UNAVAILABLE only
# once the server is draining (--sigterm).
EXPECTED = {
    "complete": {"OK"}, "n>1": {"OK"}, "stop": {"OK"}, "logprobs": {"OK"}, "abort": {"OK"},
    "cancel": {"OK", "CANCELLED"}, "deadline": {"OK", "DEADLINE_EXCEEDED"},
    "invalid": {"INVALID_ARGUMENT"}, "garbage": {"INVALID_ARGUMENT", "OK"},  # random bytes may parse
}


@dataclass
class SoakReport:
    streams: int = 0
    seconds: float = 0.0
    by_kind: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    failures: list = field(default_factory=list)
    outcomes: dict = field(default_factory=dict)  # longcat_requests_total by outcome, at the end
    rss_mb: tuple = (0.0, 0.0)
    exit_s: float | None = None  # --sigterm: signal to exit

    def table(self) -> str:
        codes = sorted({c for counts in self.by_kind.values() for c in counts})
        rows = [["kind", *codes, "total"]]
        for kind in KINDS:
            counts = self.by_kind.get(kind, {})
            rows.append([kind, *(str(counts.get(c, 0)) for c in codes), str(sum(counts.values()))])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        lines.append(f"{self.streams} streams in {self.seconds:.1f}s; server outcomes {self.outcomes}; "
                     f"RSS {self.rss_mb[0]:.0f} -> {self.rss_mb[1]:.0f} MB"
                     + (f"; exited {self.exit_s:.2f}s after SIGTERM" if self.exit_s is not None else ""))
        lines.append("PASS" if not self.failures else "FAIL:\n  " + "\n  ".join(self.failures[:30]))
        return "\n".join(lines)


class Server:
    """longcat-serve as a subprocess on 127.0.0.1 with free ports."""

    def __init__(self, drain_grace_s: float, threads: int, extra_args=()):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("OMP_NUM_THREADS", str(threads))  # the load generator shares the cores
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "longcat_service.server.cli", "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", "--device", "cpu", "--drain-grace-s", str(drain_grace_s),
             "--log-level", "WARNING", *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        self.log: list[str] = []
        ports = {}
        while "metrics" not in ports:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("longcat-serve did not start:\n" + "".join(self.log))
            self.log.append(line)
            if m := re.match(r"longcat-serve listening on [\d.]+:(\d+)", line):
                ports["grpc"] = int(m.group(1))
            if m := re.match(r"metrics on http://[\d.]+:(\d+)/", line):
                ports["metrics"] = int(m.group(1))
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        self.address, self.metrics_port = f"127.0.0.1:{ports['grpc']}", ports["metrics"]

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) ([0-9.e+-]+)$", text, re.MULTILINE)}

    def rss_mb(self) -> float:
        """Resident memory of the server and its engine process (Linux /proc)."""
        total, pids = 0, [self.proc.pid]
        while pids:
            pid = pids.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pids += [int(p) for p in (task / "children").read_text().split()]
            except (OSError, AttributeError):
                continue
        return total / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _sampling(rng: random.Random, **fields) -> pb.SamplingParams:
    params = pb.SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.7, 1.0]),
                               seed=rng.randrange(2**31))
    for name, value in fields.items():
        if name == "stop":
            params.stop.extend(value)
        else:
            setattr(params, name, value)
    return params


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))


def _code_name(e: grpc.RpcError, failures: list) -> str:
    failures.append(f"({e.code().name}: {e.details()})")  # dropped unless the status was unexpected
    return e.code().name


def run_one(kind: str, rng: random.Random, stub, channel, index: int, failures: list) -> str:
    """One call of `kind`; returns its status name and appends what went wrong to failures."""
    rid = f"soak-{index}"
    sampling = {"complete": lambda: _sampling(rng), "cancel": lambda: _sampling(rng, max_tokens=200, ignore_eos=True),
                "deadline": lambda: _sampling(rng, max_tokens=200, ignore_eos=True),
                "n>1": lambda: _sampling(rng, n=rng.randint(2, 4), temperature=0.8),
                "stop": lambda: _sampling(rng, stop=[rng.choice(WORDS), " a"]),
                "logprobs": lambda: _sampling(rng, logprobs=rng.randint(0, 5)),
                "abort": lambda: _sampling(rng, max_tokens=200, ignore_eos=True),
                "invalid": lambda: _sampling(rng, top_p=rng.choice([0.0, 7.0, float("nan")]))}
    if kind == "garbage":
        body = rng.choice([b"\xff\xff\xff", bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))])
        try:
            list(channel.unary_stream("/longcat.v1.LongCat/Generate")(body, timeout=CALL_TIMEOUT_S))
            return "OK"  # random bytes that happen to parse as a valid request
        except grpc.RpcError as e:
            return _code_name(e, failures)
    request = pb.GenerateRequest(request_id=rid, text=_prompt(rng), sampling=sampling[kind]())
    timeout = rng.uniform(0.02, 0.3) if kind == "deadline" else CALL_TIMEOUT_S
    call = stub.Generate(request, timeout=timeout)
    completes: dict[int, int] = collections.Counter()
    received = 0
    try:
        for response in call:
            if response.WhichOneof("response") == "complete":
                completes[response.index] += 1
                continue
            received += 1
            if kind == "logprobs" and len(response.chunk.logprobs) != len(response.chunk.token_ids):
                failures.append(f"{rid}: {len(response.chunk.token_ids)} tokens, {len(response.chunk.logprobs)} logprobs")
            if kind == "cancel" and received >= 2:
                call.cancel()
            if kind == "abort" and received == 1:
                stub.Abort(pb.AbortRequest(request_ids=[rid]), timeout=CALL_TIMEOUT_S)
        status = "OK"
    except grpc.RpcError as e:
        status = _code_name(e, failures)
    if status == "OK":
        n = request.sampling.n if request.sampling.HasField("n") else 1
        if completes != {i: 1 for i in range(n)}:
            failures.append(f"{rid} ({kind}): ended OK with completes {dict(completes)} for n={n}")
    return status


def run_soak(streams: int = 300, concurrency: int = 16, seed: int = 0, sigterm: bool = False,
             time_limit_s: float = 600.0, drain_grace_s: float = 2.0, max_rss_growth_mb: float = 300.0,
             threads: int = 1, weights: dict | None = None) -> SoakReport:
    rng = random.Random(seed)
    weights = weights or {"complete": 30, "cancel": 10, "deadline": 10, "n>1": 8, "stop": 8, "logprobs": 8,
                          "abort": 8, "invalid": 9, "garbage": 9}
    plan = [(i, rng.choices(list(weights), list(weights.values()))[0], rng.randrange(2**32)) for i in range(streams)]
    report = SoakReport()
    server = Server(drain_grace_s, threads)
    lock = threading.Lock()
    try:
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.LongCatStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        greedy = pb.GenerateRequest(text=GREEDY_PROMPT,
                                    sampling=pb.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))

        def greedy_tokens() -> list[int]:
            return [t for r in stub.Generate(greedy, timeout=CALL_TIMEOUT_S) if r.WhichOneof("response") == "chunk"
                    for t in r.chunk.token_ids]

        greedy_before = greedy_tokens()
        rss_before = server.rss_mb()
        began = time.monotonic()
        signalled_at, exited_at = [None], [None]

        def watch_exit() -> None:
            server.proc.wait()
            exited_at[0] = time.monotonic()

        def task(item) -> None:
            index, kind, task_seed = item
            if time.monotonic() - began > time_limit_s:
                return
            if sigterm and index == streams // 2 and signalled_at[0] is None:
                signalled_at[0] = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                threading.Thread(target=watch_exit, daemon=True).start()
            failures: list[str] = []
            after_signal = signalled_at[0] is not None
            status = run_one(kind, random.Random(task_seed), stub, channel, index, failures)
            allowed = EXPECTED[kind] | {"RESOURCE_EXHAUSTED"}
            if signalled_at[0] is not None:  # draining: refused, or cut off at the end of the grace
                allowed |= {"UNAVAILABLE"}
            if after_signal:  # gRPC cancels calls that race the server's final close (after the drain)
                allowed |= {"CANCELLED"}
            details = [f for f in failures if f.startswith("(")]
            failures = [f for f in failures if not f.startswith("(")]
            if status not in allowed:
                failures.append(f"soak-{index} ({kind}): unexpected {status} {' '.join(details)}")
            with lock:
                report.by_kind[kind][status] += 1
                report.failures += failures

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(task, plan))
        report.seconds = time.monotonic() - began
        report.streams = sum(sum(c.values()) for c in report.by_kind.values())
        if sigterm:
            _check_sigterm(server, signalled_at[0], exited_at, drain_grace_s, report)
        else:
            _check_end_state(server, health, greedy_tokens, greedy_before, rss_before, max_rss_growth_mb, report)
        channel.close()
    finally:
        server.stop()
    return report


def _check_end_state(server, health, greedy_tokens, greedy_before, rss_before, max_growth_mb, report) -> None:
    end = time.monotonic() + 15  # the engine's load gauges follow its status messages: allow them to settle
    while True:
        m = server.metrics()
        settled = (m["longcat_running_requests"] == 0 and m["longcat_kv_cache_usage_ratio"] == 0
                   and m["longcat_queued_requests"] == 0)
        if settled or time.monotonic() > end:
            break
        time.sleep(0.2)
    if not settled:
        report.failures.append(f"not idle at the end: running {m['longcat_running_requests']}, KV usage "
                               f"{m['longcat_kv_cache_usage_ratio']}, queued {m['longcat_queued_requests']}")
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    if status != health_pb2.HealthCheckResponse.SERVING:
        report.failures.append(f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    greedy_after = greedy_tokens()
    if greedy_after != greedy_before:
        report.failures.append(f"greedy tokens changed: {greedy_before} -> {greedy_after}")
    report.rss_mb = (rss_before, server.rss_mb())
    if report.rss_mb[1] - rss_before > max_growth_mb:
        report.failures.append(f"RSS grew {report.rss_mb[1] - rss_before:.0f} MB (bound {max_growth_mb:.0f})")
    m = server.metrics()
    report.outcomes = {k.split('"')[1]: int(v) for k, v in m.items()
                       if k.startswith("longcat_requests_total{") and v}
    if report.outcomes.get("error", 0):
        report.failures.append(f"{report.outcomes['error']} request(s) counted as server errors")
    # Every call is counted once, except that a call whose deadline passed before its handler started (a 20 ms
    # deadline on a busy machine) never reaches the server's handler.
    calls = report.streams + 2  # + the two greedy checks
    client_deadlines = sum(counts.get("DEADLINE_EXCEEDED", 0) for counts in report.by_kind.values())
    unseen = calls - sum(report.outcomes.values())
    if not 0 <= unseen <= client_deadlines - report.outcomes.get("deadline", 0):
        report.failures.append(f"outcomes add up to {sum(report.outcomes.values())} for {calls} calls "
                               f"({client_deadlines} of them DEADLINE_EXCEEDED)")


def _check_sigterm(server, signalled_at, exited_at, drain_grace_s, report) -> None:
    from longcat_service.server.app import DRAIN_EPSILON_S

    if signalled_at is None:
        report.failures.append("SIGTERM was never sent")
        return
    try:
        code = server.proc.wait(timeout=drain_grace_s + 60)
    except subprocess.TimeoutExpired:
        report.failures.append("the server did not exit after SIGTERM")
        return
    report.exit_s = (exited_at[0] or time.monotonic()) - signalled_at
    if code != 0:
        report.failures.append(f"exit code {code} after SIGTERM:\n" + "".join(server.log[-20:]))
    bound = drain_grace_s + DRAIN_EPSILON_S + EXIT_ALLOWANCE_S
    if report.exit_s > bound:
        report.failures.append(f"exited {report.exit_s:.1f}s after SIGTERM (bound {bound:.1f}s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigterm", action="store_true", help="send SIGTERM half-way and check the drain")
    p.add_argument("--time-limit-s", type=float, default=600.0, help="start no stream after this")
    p.add_argument("--drain-grace-s", type=float, default=2.0)
    p.add_argument("--max-rss-growth-mb", type=float, default=300.0)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server (unless set)")
    args = p.parse_args(argv)
    report = run_soak(args.streams, args.concurrency, args.seed, args.sigterm, args.time_limit_s,
                      args.drain_grace_s, args.max_rss_growth_mb, args.threads)
    print(report.table())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
