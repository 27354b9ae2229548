"""Python SDK: import without torch, request building, error mapping, retry policy, async client,
and the longcat-client CLI (against a fake-engine server)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from fake_engine import FakeEngine

from longcat_service.client import (
    AsyncLongCatClient,
    DeadlineExceededError,
    InvalidArgumentError,
    LongCatError,
    ResourceExhaustedError,
    RetryPolicy,
    UnavailableError,
)
from longcat_service.client.cli import main as client_main
from longcat_service.client.errors import from_rpc_error
from longcat_service.client.request import generate_request
from longcat_service.client.types import GenerationChunk, Usage
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from tests.scripted_client import scripted_client

REPO = Path(__file__).resolve().parents[1]


def test_sdk_imports_without_torch():
    code = ("import sys; import longcat_service.client, longcat_service.client.cli; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})


def test_generate_request_maps_arguments_and_leaves_unset_fields_unset():
    req = generate_request("hi", max_tokens=5, temperature=0.0, stop="END", logit_bias={3: -1.5}, request_id="r1")
    assert req.text == "hi" and req.request_id == "r1"
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert not req.sampling.HasField("top_p")
    assert list(req.sampling.stop) == ["END"] and dict(req.sampling.logit_bias) == {3: -1.5}
    assert list(generate_request([1, 2, 3]).token_ids.ids) == [1, 2, 3]
    chat = generate_request(messages=[{"role": "user", "content": "yo"}], timeout_ms=50)
    assert chat.messages.messages[0].content == "yo" and chat.timeout_ms == 50
    with pytest.raises(TypeError, match="tempreature"):
        generate_request("hi", tempreature=0.5)
    with pytest.raises(TypeError, match="exactly one"):
        generate_request("hi", messages=[{"role": "user", "content": "x"}])


def test_errors_map_status_codes_to_types():
    err = from_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1], got 2")
    assert isinstance(err, InvalidArgumentError) and err.field == "sampling.top_p"
    err = from_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "1500"),))
    assert isinstance(err, ResourceExhaustedError) and err.retry_after_s == 1.5
    assert isinstance(from_rpc_error(grpc.StatusCode.UNAVAILABLE, "x"), UnavailableError)
    partial = object()
    err = from_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "late", partial=partial)
    assert isinstance(err, DeadlineExceededError) and err.partial is partial
    unknown = from_rpc_error(grpc.StatusCode.DATA_LOSS, "?")
    assert type(unknown) is LongCatError and unknown.code == grpc.StatusCode.DATA_LOSS


def test_retry_policy_only_unavailable_only_before_first_token_with_bounded_jitter():
    policy = RetryPolicy(max_retries=2, initial_backoff_s=0.5, max_backoff_s=1.0)
    assert policy.should_retry(grpc.StatusCode.UNAVAILABLE, 0)
    assert not policy.should_retry(grpc.StatusCode.UNAVAILABLE, 0, streamed_anything=True)
    assert not policy.should_retry(grpc.StatusCode.UNAVAILABLE, 2)
    assert not policy.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)
    assert not policy.should_retry(grpc.StatusCode.INTERNAL, 0)
    samples = [policy.backoff_s(3) for _ in range(200)]
    assert all(0.0 <= s <= 1.0 for s in samples) and len(set(samples)) > 100  # capped, jittered


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(FakeEngine, ServerConfig(port=0)) as srv:
        yield srv


def test_async_client_stream_and_early_exit_cancels(server):
    async def run():
        async with AsyncLongCatClient(server.address) as client:
            result = await client.generate("hi", max_tokens=4)
            async with client.generate_stream("hi", max_tokens=100_000, request_id="async-bye") as stream:
                async for _ in stream:
                    break
            info = await client.model_info()
            return result, info, await client.health(), await client.tokenize("hey")

    result, info, health, ids = asyncio.run(run())
    assert result.text == "xxxx" and result.finish_reason == "length"
    assert info.config.vocab_size == 256 and health == "SERVING" and ids == [104, 101, 121]
    end = time.monotonic() + 15
    while "async-bye" not in server.engine.aborted and time.monotonic() < end:
        time.sleep(0.01)
    assert "async-bye" in server.engine.aborted


def test_cli_streams_text(server, capsys):
    assert client_main(["--address", server.address, "--max-tokens", "3", "hello"]) == 0
    out = capsys.readouterr()
    assert out.out == "xxx\n" and "length" in out.err


def test_cli_json_mode_and_stdin(server, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("from stdin"))
    assert client_main(["--address", server.address, "--chat", "--json", "--max-tokens", "2"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["text"] for e in events[:-1]] == ["x", "x"]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 2


def test_cli_stops_quietly_when_its_reader_goes_away(server):
    """`longcat-client ... | head -1`: the closed pipe ends the CLI with 141 (128 + SIGPIPE), no traceback."""
    cmd = [sys.executable, "-m", "longcat_service.client.cli", "--address", server.address, "--json",
           "--max-tokens", "100000", "hi"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    try:
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    assert json.loads(first)["text"] == "x"
    assert code == 141 and "Traceback" not in err, err


def test_cli_reports_errors(server, capsys):
    assert client_main(["--address", server.address, "--json", "--top-p", "5", "hi"]) == 1
    event = json.loads(capsys.readouterr().out.strip())
    assert event["error"] == "INVALID_ARGUMENT" and event["details"].startswith("sampling.top_p")


def _chunk(index, text, reason=None, tokens=0):
    return GenerationChunk(request_id="r", index=index, text=text, finish_reason=reason,
                           usage=Usage(completion_tokens=tokens) if reason else None)


# the chunks of n=2 completions interleaved, as the server sends them
INTERLEAVED = [_chunk(1, "Good"), _chunk(0, "Once"), _chunk(1, "bye", "stop", 2), _chunk(0, " upon"),
               _chunk(0, "", "length", 2)]


def test_cli_prints_several_completions_whole_in_index_order(monkeypatch, capsys):
    monkeypatch.setattr("longcat_service.client.cli.LongCatClient", scripted_client(INTERLEAVED))
    assert client_main(["-n", "2", "hi"]) == 0
    out = capsys.readouterr()
    assert out.out == "Once upon\nGoodbye\n"  # streamed as they came it read "GoodOncebye upon"
    assert out.err.splitlines() == ["[0: length, 2 tokens]", "[1: stop, 2 tokens]"]


def test_cli_bad_root_cert_and_timeout_are_one_line_exit_2(capsys, tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    assert client_main(["--tls", "--root-cert", str(missing), "hi"]) == 2
    assert capsys.readouterr().err.strip() == f"longcat-client: --root-cert {missing}: No such file or directory"
    with pytest.raises(SystemExit) as exit_info:
        client_main(["--timeout", "-1", "hi"])
    assert exit_info.value.code == 2 and "argument --timeout: must be > 0, got -1" in capsys.readouterr().err
