"""The SDK's retry against a fake server that rejects with RESOURCE_EXHAUSTED + retry-after-ms N times, then
accepts: it waits at least the server's hint plus a growing jittered backoff (sleep injected: no real waiting)."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest

from longcat_service.client import AsyncLongCatClient, LongCatClient, ResourceExhaustedError, RetryPolicy
from longcat_service.server.generated import longcat_pb2 as pb
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc

HINTS_MS = [300, 1700, 900]  # what the fake server asks for, one per rejection


class RejectingServicer(pb_grpc.LongCatServicer):
    """Rejects the first len(hints) calls of each method (None: no hint), then answers."""

    def __init__(self, hints):
        self.hints = list(hints)
        self.calls = {"Generate": 0, "Tokenize": 0}
        self._lock = threading.Lock()

    def _reject_or_pass(self, method: str, context) -> None:
        with self._lock:
            attempt = self.calls[method]
            self.calls[method] += 1
        if attempt < len(self.hints):
            hint = self.hints[attempt]
            if hint is not None:
                context.set_trailing_metadata((("retry-after-ms", str(hint)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded: fake")

    def Generate(self, request, context):
        self._reject_or_pass("Generate", context)
        yield pb.GenerateResponse(request_id="r", chunk=pb.Chunk(token_ids=[7], text="x"))
        yield pb.GenerateResponse(request_id="r", complete=pb.Complete(finish_reason=pb.FINISH_REASON_LENGTH))

    def Tokenize(self, request, context):
        self._reject_or_pass("Tokenize", context)
        return pb.TokenizeResponse(token_ids=[1, 2])


def serve(hints):
    servicer = RejectingServicer(hints)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_LongCatServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, f"127.0.0.1:{port}"


def policy(pauses, max_retries=5):
    return RetryPolicy(max_retries=max_retries, initial_backoff_s=0.1, max_backoff_s=0.4, sleep=pauses.append)


def assert_honours_hints(pauses, hints_ms, policy_):
    assert len(pauses) == len(hints_ms)
    for attempt, (pause, hint_ms) in enumerate(zip(pauses, hints_ms, strict=True)):
        cap = min(policy_.max_backoff_s, policy_.initial_backoff_s * policy_.multiplier**attempt)
        assert hint_ms / 1000 <= pause <= hint_ms / 1000 + cap, (attempt, pause, hint_ms)


def test_sync_client_retries_rejections_after_the_servers_hint():
    server, servicer, address = serve(HINTS_MS)
    try:
        pauses = []
        retry = policy(pauses)
        with LongCatClient(address, retry=retry) as client:
            result = client.generate("hi", max_tokens=1)
            assert result.token_ids == [7] and result.finish_reason == "length"
            assert servicer.calls["Generate"] == len(HINTS_MS) + 1
            assert_honours_hints(pauses, HINTS_MS, retry)
            pauses.clear()
            assert client.tokenize("ab") == [1, 2]
            assert_honours_hints(pauses, HINTS_MS, retry)
    finally:
        server.stop(0)


def test_async_client_retries_rejections_after_the_servers_hint():
    server, servicer, address = serve(HINTS_MS)
    pauses = []

    async def record(seconds):
        pauses.append(seconds)

    retry = RetryPolicy(max_retries=5, initial_backoff_s=0.1, max_backoff_s=0.4, sleep=record)

    async def run():
        async with AsyncLongCatClient(address, retry=retry) as client:
            result = await client.generate("hi", max_tokens=1)
            tokens = await client.tokenize("ab")
            return result, tokens

    try:
        result, tokens = asyncio.run(run())
    finally:
        server.stop(0)
    assert result.token_ids == [7] and tokens == [1, 2]
    assert_honours_hints(pauses[:3], HINTS_MS, retry)
    assert_honours_hints(pauses[3:], HINTS_MS, retry)


def test_retries_run_out_and_a_rejection_without_a_hint_is_not_retried():
    server, servicer, address = serve(HINTS_MS)
    try:
        pauses = []
        with LongCatClient(address, retry=policy(pauses, max_retries=2)) as client, \
                pytest.raises(ResourceExhaustedError) as err:
            client.generate("hi", max_tokens=1)
        assert servicer.calls["Generate"] == 3 and len(pauses) == 2
        assert err.value.retry_after_s == HINTS_MS[2] / 1000
    finally:
        server.stop(0)
    server, servicer, address = serve([None])
    try:
        pauses = []
        with LongCatClient(address, retry=policy(pauses)) as client, pytest.raises(ResourceExhaustedError):
            client.generate("hi", max_tokens=1)
        assert servicer.calls["Generate"] == 1 and pauses == []
    finally:
        server.stop(0)


def test_a_hint_longer_than_the_deadline_is_not_waited_for():
    server, servicer, address = serve([60_000])
    try:
        pauses = []
        with LongCatClient(address, retry=policy(pauses), timeout=5) as client, \
                pytest.raises(ResourceExhaustedError):
            client.generate("hi", max_tokens=1)
        assert pauses == []
    finally:
        server.stop(0)


def test_backoff_grows_exponentially_with_full_jitter_on_top_of_the_hint():
    retry = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=10.0, multiplier=2.0)
    for attempt in range(4):
        cap = 0.1 * 2**attempt
        samples = [retry.backoff_s(attempt, retry_after_s=1.0) for _ in range(300)]
        assert all(1.0 <= s <= 1.0 + cap for s in samples)
        assert max(samples) > 1.0 + 0.8 * cap and min(samples) < 1.0 + 0.2 * cap  # spread over the range
        assert len(set(samples)) > 250
