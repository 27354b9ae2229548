"""`longcat-serve` as a subprocess serving gRPC and HTTP from one engine: both ports printed, SIGTERM drains both
(in-flight HTTP and gRPC streams finish, new HTTP requests get 503 and /health turns 503), then exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from longcat_service.client import NO_RETRY, LongCatClient

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve_process():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "longcat_service.server.cli", "--port", "0", "--device", "cpu", "--drain-grace-s", "120",
         "--log-level", "WARNING", "--served-model-name", "demo"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines, ports = [], {}
    deadline = time.monotonic() + 120
    while "http" not in ports and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"listening on [\d.]+:(\d+)", line):
            ports["grpc"] = int(m.group(1))
        if m := re.search(r"HTTP API and playground on http://[\d.]+:(\d+)/", line):
            ports["http"] = int(m.group(1))
    assert "http" in ports and "grpc" in ports, "server did not start:\n" + "".join(lines)
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    yield proc, ports, lines
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_drains_http_and_grpc_streams_then_exits_zero(serve_process):
    proc, ports, lines = serve_process
    base = f"http://127.0.0.1:{ports['http']}"
    grpc_client = LongCatClient(f"127.0.0.1:{ports['grpc']}", retry=NO_RETRY)
    body = {"model": "demo", "messages": [{"role": "user", "content": "drain me"}], "max_tokens": 40, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=60) as http, http.stream("POST", base + "/v1/chat/completions", json=body) as response, \
            grpc_client.generate_stream("drain me too", max_tokens=40, ignore_eos=True) as grpc_stream:
        assert response.status_code == 200
        events = response.iter_lines()
        next(grpc_stream)
        next(line for line in events if line.startswith("data:"))
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(base + "/health").json() == {"status": "draining"}
        late = httpx.post(base + "/v1/completions", json={"model": "demo", "prompt": "too late", "max_tokens": 1})
        assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable_error"
        assert grpc_client.health() == "NOT_SERVING"
        data = [line[len("data: "):] for line in events if line.startswith("data:")]
        rest = list(grpc_stream)
    assert data[-1] == "[DONE]"
    usage = json.loads(data[-2])["usage"]
    assert usage["completion_tokens"] == 40
    assert rest[-1].finish_reason == "length" and len(grpc_stream.result.token_ids) == 40
    assert proc.wait(timeout=30) == 0, "".join(lines)


def test_http_port_flags():
    from longcat_service.server.cli import build_parser, server_config_from

    def config(*argv):
        return server_config_from(build_parser().parse_args(list(argv)))

    assert config().http_port == 8000 and config().http_host is None
    assert config("--port", "0").http_port == 0  # an ephemeral gRPC port makes the default HTTP port ephemeral
    assert config("--port", "0", "--http-port", "9001", "--http-host", "0.0.0.0").http_port == 9001
    assert config("--no-http").http_port is None
    assert config("--reasoning-parser", "longcat").reasoning_parser == "longcat"
    assert config("--served-model-name", "cat").options.model_name == "cat"
