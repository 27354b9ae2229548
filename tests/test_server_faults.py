"""Fault injection with the scripted fake engine: overload, slow readers, engine failures, an unhealthy
engine, duplicate ids, in-process drain, and the SDK's retry rule."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fake_engine import FakeEngine, Script

from longcat_service.client import (
    NO_RETRY,
    AlreadyExistsError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LongCatClient,
    ResourceExhaustedError,
    RetryPolicy,
    UnavailableError,
)
from longcat_service.server.app import DRAIN_EPSILON_S, ServerConfig
from longcat_service.server.background import BackgroundServer
from longcat_service.server.servicer import ServerOptions

FAST_RETRY = RetryPolicy(max_retries=3, initial_backoff_s=0.05, max_backoff_s=0.1)


def start(script: Script | None = None, **options) -> BackgroundServer:
    engine = FakeEngine(script or Script())
    return BackgroundServer(lambda: engine, ServerConfig(port=0, options=ServerOptions(**options))).start()


def wait_for(predicate, timeout_s: float = 15.0) -> bool:  # bounded polling: returns as soon as true
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_overload_is_resource_exhausted_with_retry_after_and_admitted_requests_finish():
    hold = asyncio.Event()
    srv = start(Script(hold=hold), max_queued_requests=3, max_queued_tokens=10_000)
    try:
        client = LongCatClient(srv.address, retry=FAST_RETRY)
        results = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, client.generate(f"prompt {i}", max_tokens=4))) for i in range(3)]
        for t in threads:
            t.start()
        assert wait_for(lambda: srv.server.admission.queued_requests == 3)
        with pytest.raises(ResourceExhaustedError) as err:
            LongCatClient(srv.address, retry=NO_RETRY).generate("one too many", max_tokens=4)
        assert err.value.retry_after_s is not None and 0.1 <= err.value.retry_after_s <= 60
        srv._loop.call_soon_threadsafe(hold.set)
        for t in threads:
            t.join(10)
        assert [r.finish_reason for r in results] == ["length"] * 3
        assert [len(r.token_ids) for r in results] == [4] * 3
        assert client.generate("now there is room", max_tokens=2).finish_reason == "length"
    finally:
        srv.stop()


def test_queued_prompt_tokens_are_bounded_but_a_lone_large_prompt_is_admitted():
    hold = asyncio.Event()
    srv = start(Script(hold=hold), max_queued_requests=10, max_queued_tokens=50)
    try:
        client = LongCatClient(srv.address, retry=NO_RETRY)
        first = threading.Thread(target=client.generate, args=("x" * 80,), kwargs={"max_tokens": 1})
        first.start()  # 80 tokens > 50, admitted because nothing else is queued
        assert wait_for(lambda: srv.server.admission.queued_tokens == 80)
        with pytest.raises(ResourceExhaustedError, match="prompt tokens"):
            client.generate("short", max_tokens=1)
        srv._loop.call_soon_threadsafe(hold.set)
        first.join(10)
        assert wait_for(lambda: srv.server.admission.queued_tokens == 0)
    finally:
        srv.stop()


def test_slow_reader_is_aborted_with_unavailable():
    # 64 KiB per token: the transport's flow-control window fills after a few tokens.
    srv = start(Script(token_text="z" * 65536), stream_buffer_size=2, slow_reader_timeout_s=0.5)
    try:
        client = LongCatClient(srv.address, channel_options=[("grpc.http2.bdp_probe", 0)])
        stream = client.generate_stream("hi", max_tokens=100_000, request_id="slow")
        next(stream)
        assert wait_for(lambda: "slow" in srv.engine.aborted), "the request must be aborted"
        with pytest.raises(UnavailableError, match="stopped reading"):
            for _ in stream:
                pass
        # the handler records the outcome after the client already has its status: poll, bounded
        assert wait_for(lambda: srv.engine.running == set())
        assert wait_for(lambda: srv.server.metrics.requests.labels("slow_reader")._value.get() == 1)
        produced = srv.engine.tokens_produced["slow"]
        print("tokens produced for the stalled stream:", produced)
        assert produced < 100, "a stalled stream must stop pulling from the engine (bounded buffer)"
    finally:
        srv.stop()


def test_client_cancel_aborts_the_engine_request():
    srv = start(Script(step_delay_s=0.01))
    try:
        client = LongCatClient(srv.address)
        with client.generate_stream("hi", max_tokens=100_000, request_id="bye") as stream:
            next(stream)
        assert wait_for(lambda: "bye" in srv.engine.aborted)
        assert wait_for(lambda: srv.engine.running == set())
    finally:
        srv.stop()


def test_engine_exception_is_internal_and_error_finish_is_internal():
    srv = start(Script(fail_after_tokens=2))
    try:
        client = LongCatClient(srv.address)
        with pytest.raises(InternalError, match="injected engine failure") as err:
            client.generate("hi", max_tokens=10)
        assert len(err.value.partial.token_ids) == 2
        srv.engine.script = Script(finish_with_error=True)
        with pytest.raises(InternalError) as err:
            client.generate("hi", max_tokens=10)
        assert err.value.partial.finish_reason == "error"
        assert client.health() == "SERVING"
    finally:
        srv.stop()


def test_unhealthy_engine_turns_health_not_serving_and_sdk_retries_unavailable():
    srv = start()
    try:
        srv.engine.healthy = False
        client = LongCatClient(srv.address, retry=RetryPolicy(max_retries=0))
        with pytest.raises(UnavailableError, match="not healthy"):
            client.generate("hi", max_tokens=2)
        assert wait_for(lambda: client.health() == "NOT_SERVING")
        # The SDK retries UNAVAILABLE before the first token: recover while it backs off.
        retrying = LongCatClient(srv.address, retry=RetryPolicy(max_retries=20, initial_backoff_s=0.05,
                                                                max_backoff_s=0.1))
        threading.Timer(0.3, lambda: setattr(srv.engine, "healthy", True)).start()
        assert retrying.generate("hi", max_tokens=2).finish_reason == "length"
    finally:
        srv.stop()


def test_sdk_never_retries_after_the_first_token():
    srv = start(Script(fail_after_tokens=1))
    try:
        calls = []
        srv.engine.generate = _counting(srv.engine.generate, calls)
        client = LongCatClient(srv.address, retry=FAST_RETRY)
        with pytest.raises(InternalError):
            client.generate("hi", max_tokens=5)
        assert len(calls) == 1
    finally:
        srv.stop()


def _counting(generate, calls):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return generate(*args, **kwargs)
    return wrapper


def test_duplicate_running_request_id_is_already_exists():
    srv = start(Script(step_delay_s=0.01))
    try:
        client = LongCatClient(srv.address)
        with client.generate_stream("hi", max_tokens=100_000, request_id="same") as stream:
            next(stream)
            with pytest.raises(AlreadyExistsError, match="request_id"):
                client.generate("again", request_id="same")
    finally:
        srv.stop()


def test_in_process_drain_finishes_in_flight_and_refuses_new_calls():
    srv = start(Script(step_delay_s=0.01))
    client = LongCatClient(srv.address, retry=RetryPolicy(max_retries=0))
    with client.generate_stream("hi", max_tokens=50) as stream:
        next(stream)
        drained = srv.submit(srv.server.state.drain(10.0))
        assert wait_for(lambda: client.health() == "NOT_SERVING")
        with pytest.raises(UnavailableError, match="draining"):
            client.generate("late", max_tokens=1)
        chunks = list(stream)
    assert chunks[-1].finish_reason == "length" and len(stream.result.token_ids) == 50
    assert drained.result(10) is True
    srv.stop()


def outcomes(srv) -> dict[str, float]:
    counter = srv.server.metrics.requests
    return {s.labels["outcome"]: s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")}


def test_request_outcomes_are_true_cancels_and_deadlines_are_not_errors():
    # Big chunks keep writes in flight, so a cancel or a deadline often lands while the server writes.
    srv = start(Script(step_delay_s=0.002, token_text="y" * 2000), max_queued_requests=1)
    try:
        client = LongCatClient(srv.address, retry=NO_RETRY)
        for _ in range(15):
            with client.generate_stream("hi", max_tokens=100_000) as stream:
                for _ in range(3):
                    next(stream)
        for _ in range(15):
            with pytest.raises(DeadlineExceededError):
                client.generate("hi", max_tokens=100_000, timeout=0.05)
        assert client.generate("hi", max_tokens=3).finish_reason == "length"
        with pytest.raises(InvalidArgumentError):
            client.generate("hi", max_tokens=3, top_p=7.0)
        hold = asyncio.Event()
        srv.engine.script = Script(hold=hold)
        queued = threading.Thread(target=client.generate, args=("queued",), kwargs={"max_tokens": 1})
        queued.start()
        assert wait_for(lambda: srv.server.admission.queued_requests == 1)
        with pytest.raises(ResourceExhaustedError):
            client.generate("over the limit", max_tokens=1)
        srv._loop.call_soon_threadsafe(hold.set)
        queued.join(10)
        assert wait_for(lambda: srv.server.state.in_flight == 0)
        counts = outcomes(srv)
        assert counts["error"] == 0, counts
        assert counts["cancelled"] == 15 and counts["deadline"] == 15, counts
        assert counts["ok"] == 2 and counts["invalid"] == 1 and counts["rejected"] == 1, counts
    finally:
        srv.stop()


def test_drain_grace_bounds_the_drain_and_streams_still_running_end_unavailable():
    srv = start(Script(step_delay_s=0.01))
    client = LongCatClient(srv.address, retry=NO_RETRY)
    streams = [client.generate_stream("hi", max_tokens=100_000) for _ in range(3)]
    for stream in streams:
        next(stream)
    grace_s = 1.0
    began = time.monotonic()
    finished = srv.run(srv.server.drain_and_stop(grace_s), 30)
    took = time.monotonic() - began
    counts = outcomes(srv)
    srv.server = None
    srv.stop()
    assert finished is False
    print(f"drain_and_stop({grace_s}) took {took:.2f}s")
    assert took <= grace_s + DRAIN_EPSILON_S, f"took {took:.2f}s"
    for stream in streams:
        with pytest.raises(UnavailableError, match="drain grace"):
            list(stream)
        assert len(stream.result.token_ids) >= 1  # what was streamed before stays delivered
    assert counts["shutdown"] == 3 and counts["error"] == 0, counts


def test_simultaneous_rejections_get_jittered_retry_hints():
    hold = asyncio.Event()
    srv = start(Script(hold=hold), max_queued_requests=1)
    try:
        client = LongCatClient(srv.address, retry=NO_RETRY)
        queued = threading.Thread(target=client.generate, args=("queued",), kwargs={"max_tokens": 1})
        queued.start()
        assert wait_for(lambda: srv.server.admission.queued_requests == 1)
        hints = []
        for _ in range(40):
            with pytest.raises(ResourceExhaustedError) as err:
                client.generate("rejected", max_tokens=1)
            hints.append(err.value.retry_after_s)
        srv._loop.call_soon_threadsafe(hold.set)
        queued.join(10)
        # nothing has started yet, so the base hint is the default 1 s; the jitter spreads it over [0.5, 1.5] x
        assert all(0.5 <= h <= 1.5 for h in hints), hints
        assert len(set(hints)) >= 30, sorted(hints)
    finally:
        srv.stop()
