"""Tensor-parallel serving as real processes: two torchrun "nodes" on one machine (c10d and static rendezvous)
answer a gRPC request end to end, SIGTERM on rank 0 shuts every rank down with exit 0; a SIGKILLed worker makes
the server exit non-zero (clients see UNAVAILABLE, not a hang); a SIGKILLed rank 0 makes the workers exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from longcat_service.client import NO_RETRY, LongCatClient
from longcat_service.client.errors import LongCatError
from tests.tp_harness import free_port

REPO = Path(__file__).resolve().parents[1]
SERVE_ARGS = ["--no-http", "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "256",
              "--log-level", "INFO"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
HEARTBEAT_TIMEOUT_S = "3"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", LONGCAT_TP_HEARTBEAT_TIMEOUT_S=HEARTBEAT_TIMEOUT_S)


class Proc:
    """A subprocess whose merged output is collected by a thread (readable while it runs)."""

    def __init__(self, argv: list[str]):
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                  cwd=REPO, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True).start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.text):
                return m
            if self.p.poll() is not None:
                time.sleep(0.2)
                if m := re.search(pattern, self.text):
                    return m
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout_s}s (exit {self.p.poll()}):\n{self.text[-4000:]}")

    def kill_group(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=10)


def _pid_of_rank(rank: int, procs: list[Proc]) -> int:
    """The pid of the CLI process with RANK=rank among the agents' children (torchrun sets RANK per worker)."""
    for proc in procs:
        for child in _children(proc.p.pid):
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"longcat_service.server.cli" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
    raise AssertionError(f"no process with RANK={rank}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _agents(rendezvous: str, grpc_port: int) -> list[Proc]:
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "0"]
    if rendezvous == "c10d":
        args = [common + ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tp-test"]
                for _ in range(2)]
    else:  # static: node rank from the pod index, rank 0's node is the master (as deploy/ does)
        args = [common + ["--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port)]
                for n in range(2)]
    cli = ["-m", "longcat_service.server.cli", "--port", str(grpc_port), *SERVE_ARGS]
    return [Proc(TORCHRUN + a + cli) for a in args]


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_serve_then_sigterm_stops_all_ranks(rendezvous):
    grpc_port = free_port()
    agents = _agents(rendezvous, grpc_port)
    try:
        serving = None
        deadline = time.monotonic() + 120
        while serving is None and time.monotonic() < deadline:
            serving = next((a for a in agents if "longcat-serve listening" in a.text), None)
            assert all(a.p.poll() is None for a in agents), "\n".join(a.text[-3000:] for a in agents)
            time.sleep(0.2)
        assert serving is not None, "\n".join(a.text[-3000:] for a in agents)
        with LongCatClient(f"127.0.0.1:{grpc_port}", retry=NO_RETRY) as client:
            assert client.health() == "SERVING"
            assert client.model_info().tensor_parallel_size == 2
            result = client.generate([5, 17, 200, 31, 9], max_tokens=6, temperature=0.0, ignore_eos=True)
            assert len(result.outputs[0].token_ids) == 6
        follower = next(a for a in agents if a is not serving)
        assert "[rank 1]" in follower.text and "longcat-serve listening" not in follower.text

        os.kill(_pid_of_rank(0, agents), signal.SIGTERM)
        codes = [a.p.wait(timeout=60) for a in agents]
        assert codes == [0, 0], "\n".join(a.text[-3000:] for a in agents)
        assert "all ranks shut down" in serving.text and "rank 1: shut down" in follower.text
    finally:
        for a in agents:
            a.kill_group()


def test_rank0_killed_workers_exit():
    grpc_port = free_port()
    agents = _agents("static", grpc_port)
    try:
        agents[0].wait_for("longcat-serve listening", 120)
        start = time.monotonic()
        os.kill(_pid_of_rank(0, agents), signal.SIGKILL)
        assert agents[1].p.wait(timeout=30) != 0
        assert time.monotonic() - start < 20
        # gloo reports the closed connection at once; the heartbeat covers a silent (hung / partitioned) rank 0
        assert re.search(r"rank 0 is gone|worker loop failed; exiting", agents[1].text), agents[1].text[-3000:]
    finally:
        for a in agents:
            a.kill_group()


def test_worker_killed_mid_stream_server_exits_nonzero_and_clients_get_unavailable():
    server = Proc([sys.executable, "-m", "longcat_service.server.cli", "--port", "0",
                   "--tensor-parallel-size", "2", *SERVE_ARGS])
    try:
        port = int(server.wait_for(r"longcat-serve listening on [\d.]+:(\d+)", 120).group(1))
        worker = _spawned_worker(server)
        errors: list[BaseException] = []
        got_tokens = threading.Event()

        def stream():
            with LongCatClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
                try:
                    for _ in client.generate_stream([5, 17, 200], max_tokens=200, temperature=0.0, ignore_eos=True):
                        got_tokens.set()
                except BaseException as e:
                    errors.append(e)

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert got_tokens.wait(30)
        statuses: list[str] = []

        def watch_health():  # the window between the loss and the exit must report NOT_SERVING
            with LongCatClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
                while server.p.poll() is None:
                    try:
                        statuses.append(client.health(timeout=1))
                    except LongCatError:
                        pass
                    time.sleep(0.1)

        start = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        threading.Thread(target=watch_health, daemon=True).start()
        code = server.p.wait(timeout=30)
        elapsed = time.monotonic() - start
        t.join(timeout=30)
        assert not t.is_alive(), "the client hung"
        assert code == 3, server.text[-3000:]
        assert elapsed < 15
        assert "tensor-parallel group lost" in server.text
        assert f"(pid {worker}) exited with code -9" in server.text  # the signal, not None (reaped first)
        assert "NOT_SERVING" in statuses, statuses
        assert len(errors) == 1 and isinstance(errors[0], LongCatError), errors
        assert errors[0].code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(LongCatError) as new_call, LongCatClient(f"127.0.0.1:{port}", retry=NO_RETRY) as c:
            c.generate([1, 2], max_tokens=2, timeout=5)
        assert new_call.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.kill_group()


def _spawned_worker(server: Proc) -> int:
    return next(c for c in _children(server.p.pid) if b"spawn" in Path(f"/proc/{c}/cmdline").read_bytes())


def test_local_rank0_killed_spawned_worker_exits():
    server = Proc([sys.executable, "-m", "longcat_service.server.cli", "--port", "0",
                   "--tensor-parallel-size", "2", *SERVE_ARGS])
    try:
        server.wait_for(r"longcat-serve listening", 120)
        worker = _spawned_worker(server)
        os.kill(server.p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            status = Path(f"/proc/{worker}/stat").read_text().split()[2] if Path(f"/proc/{worker}").exists() else "X"
            if status == "Z":  # exited; its parent (killed) cannot reap it
                break
            time.sleep(0.1)
        stat = Path(f"/proc/{worker}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z", "the worker outlived rank 0"
    finally:
        server.kill_group()


def test_local_tp2_sigterm_drains_in_flight_request_then_all_ranks_exit_0():
    server = Proc([sys.executable, "-m", "longcat_service.server.cli", "--port", "0",
                   "--tensor-parallel-size", "2", *SERVE_ARGS])
    try:
        port = int(server.wait_for(r"longcat-serve listening on [\d.]+:(\d+)", 120).group(1))
        worker = _spawned_worker(server)
        with LongCatClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
            stream = client.generate_stream([5, 17, 200], max_tokens=40, temperature=0.0, ignore_eos=True)
            tokens = list(next(iter(stream)).token_ids)
            server.p.send_signal(signal.SIGTERM)
            for chunk in stream:  # the in-flight request finishes during the drain
                tokens += chunk.token_ids
        assert len(tokens) == 40
        assert server.p.wait(timeout=60) == 0, server.text[-3000:]
        assert "rank 1: shut down" in server.text and "all ranks shut down" in server.text
        assert not Path(f"/proc/{worker}").exists() or Path(f"/proc/{worker}/stat").read_text().split()[2] == "Z"
    finally:
        server.kill_group()
