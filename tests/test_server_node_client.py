"""A second-language client: Node (@grpc/grpc-js + @grpc/proto-loader) streams a completion using only
the .proto file, and gets the same greedy tokens as the Python SDK."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from longcat_service.client import LongCatClient
from longcat_service.engine.async_engine import AsyncEngine
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
NODE_CLIENT = REPO / "tests" / "node_client"
PROTO = REPO / "proto" / "longcat" / "v1" / "longcat.proto"


@pytest.fixture(scope="module")
def node_client_dir() -> Path:
    """tests/node_client with its npm packages installed in a cache dir keyed by package.json."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (needed for the Node.js client test)")
    package = (NODE_CLIENT / "package.json").read_bytes()
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longcat-service"
    target = cache_root / f"node_client-{hashlib.sha256(package).hexdigest()[:12]}"
    if not (target / "node_modules" / "@grpc" / "grpc-js").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        (target / "package.json").write_bytes(package)
        result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=target,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"npm install failed in {target}:\n{result.stdout}\n{result.stderr}"
    shutil.copy(NODE_CLIENT / "stream_completion.js", target / "stream_completion.js")
    return target


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(lambda: AsyncEngine(EngineArgs(device="cpu")), ServerConfig(port=0)) as srv:
        yield srv


def test_node_client_streams_a_completion(node_client_dir, server):
    result = subprocess.run(["node", "stream_completion.js", server.address, str(PROTO), "Hello from Node", "12"],
                            cwd=node_client_dir, capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 0, result.stdout + result.stderr
    assert events[-1] == {"status": "OK"}
    chunks = [e for e in events[:-1] if e.get("response") == "chunk"]
    completes = [e for e in events[:-1] if e.get("response") == "complete"]
    assert len(chunks) > 1 and len(completes) == 1
    assert completes[0]["complete"]["finish_reason"] == "FINISH_REASON_LENGTH"
    node_tokens = [t for c in chunks for t in c["chunk"]["token_ids"]]
    expected = LongCatClient(server.address).generate("Hello from Node", max_tokens=12, temperature=0.0,
                                                      ignore_eos=True)
    assert node_tokens == expected.token_ids
    assert "".join(c["chunk"]["text"] for c in chunks) == expected.text
