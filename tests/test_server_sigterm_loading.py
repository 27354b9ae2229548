"""SIGTERM while the model is loading (Kubernetes stops pods that are still starting): health stays NOT_SERVING,
the load is abandoned (the engine-core child is killed; a thread-mode load is waited for) and the server exits 0
without a traceback, leaving no child process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from longcat_service.client import LongCatClient

REPO = Path(__file__).resolve().parents[1]

# Runs longcat-serve with LLMEngine.__init__ slowed down. The spawned engine-core child imports this script as
# __mp_main__, so the patch (module level) applies there too; the loader prints its pid once it starts.
SLOW_SERVE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from longcat_service.engine.llm_engine import LLMEngine

    _real_init = LLMEngine.__init__

    def _slow_init(self, *args, **kwargs):
        print(f"LOADING {{os.getpid()}}", flush=True)
        time.sleep(float(os.environ["SLOW_LOAD_S"]))
        _real_init(self, *args, **kwargs)

    LLMEngine.__init__ = _slow_init

    if __name__ == "__main__":
        from longcat_service.server.cli import main
        sys.exit(main())
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode,load_s,max_exit_s", [("process", 300, 10), ("thread", 2, 20)])
def test_sigterm_during_model_loading_exits_zero(tmp_path, mode, load_s, max_exit_s):
    script = tmp_path / "slow_serve.py"
    script.write_text(SLOW_SERVE.format(repo=str(REPO)))
    port = _free_port()
    env = dict(os.environ, SLOW_LOAD_S=str(load_s))
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--http-port", "0", "--device", "cpu", "--engine-mode", mode,
         "--log-level", "INFO"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        lines = []
        while not any("LOADING" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "server exited before loading:\n" + "".join(lines)
            lines.append(line)
        loader_pid = int(re.search(r"LOADING (\d+)", lines[-1]).group(1))
        assert (loader_pid != proc.pid) == (mode == "process")
        client = LongCatClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 10
        while True:  # the gRPC port opens just before the load starts
            try:
                assert client.health() == "NOT_SERVING"
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out, _ = proc.communicate(timeout=max_exit_s)
        output = "".join(lines) + out
        assert proc.returncode == 0, output
        assert time.monotonic() - started < max_exit_s
        assert "Traceback" not in output and "longcat-serve listening on" not in output, output
        assert "signal received while loading the model" in output
        assert not _alive(loader_pid), "the engine-core child outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
