"""Server throughput measures (behaviour only; the measured rates are in benchmarks/RESULTS.md): chunks that
pile up behind a lagging writer are coalesced into one message without losing, reordering or mixing tokens,
and the engine hands each step's outputs to the event loop in one callback."""

from __future__ import annotations

import asyncio
import threading

import pytest

from longcat_service.client import LongCatClient
from longcat_service.engine.async_engine import AsyncEngine, _Stream
from longcat_service.outputs import CompletionOutput, Logprob, RequestOutput
from longcat_service.server import servicer as servicer_mod
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from longcat_service.server.generated import longcat_pb2 as pb
from tests.fake_engine import FakeEngine

NUM_TOKENS = 300
BURST = 16


def chunk(index: int, ids: list[int], text: str) -> pb.GenerateResponse:
    c = pb.Chunk(token_ids=ids, text=text)
    for t in ids:
        c.logprobs.append(pb.TokenLogprob(token_id=t, logprob=-float(t)))
    return pb.GenerateResponse(request_id="r", index=index, chunk=c)


def test_coalesce_merges_same_sample_chunks_in_order_and_stops_at_anything_else():
    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        for item in [chunk(0, [2], "b"), chunk(0, [3, 4], "cd"), chunk(1, [9], "z"), chunk(0, [5], "e")]:
            queue.put_nowait(item)
        first = chunk(0, [1], "a")
        held = servicer_mod._coalesce(first, queue)
        return first, held, [queue.get_nowait() for _ in range(queue.qsize())]

    first, held, rest = asyncio.run(run())
    assert list(first.chunk.token_ids) == [1, 2, 3, 4] and first.chunk.text == "abcd"
    assert [lp.token_id for lp in first.chunk.logprobs] == [1, 2, 3, 4]
    assert held.index == 1 and list(held.chunk.token_ids) == [9]  # another sample's chunk is not merged
    assert len(rest) == 1 and list(rest[0].chunk.token_ids) == [5]  # and nothing after it is taken


def test_coalesce_respects_the_message_bounds(monkeypatch):
    monkeypatch.setattr(servicer_mod, "MAX_COALESCED_TOKENS", 3)

    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        for t in range(2, 6):
            queue.put_nowait(chunk(0, [t], "x"))
        first = chunk(0, [1], "x")
        return first, servicer_mod._coalesce(first, queue), queue.qsize()

    first, held, left = asyncio.run(run())
    assert list(first.chunk.token_ids) == [1, 2, 3]
    assert list(held.chunk.token_ids) == [4] and left == 1


class BurstEngine(FakeEngine):
    """Yields BURST outputs back to back (no await between them), so they pile up behind the writer."""

    async def generate(self, prompt_token_ids, sampling_params, request_id, deadline=None):
        n = sampling_params.max_tokens
        seq = CompletionOutput(index=0)
        out = RequestOutput(request_id, list(prompt_token_ids), [seq])
        for t in range(n):
            seq.new_token_ids, seq.text_delta = [t % 256], f"{t},"
            seq.new_logprobs = [Logprob(t % 256, -t / 10, {t % 256: -t / 10})]
            seq.token_ids.append(t % 256)
            if t == n - 1:
                seq.finish_reason = "length"
            out.finished = seq.finished
            yield out
            if t % BURST == BURST - 1:
                await asyncio.sleep(0)


@pytest.fixture(scope="module")
def client():
    with BackgroundServer(BurstEngine, ServerConfig(port=0)) as srv, LongCatClient(srv.address, timeout=30) as c:
        yield c


def test_coalesced_stream_concatenates_to_the_exact_tokens_text_and_logprobs(client):
    with client.generate_stream([1, 2, 3], max_tokens=NUM_TOKENS, logprobs=1) as stream:
        chunks = list(stream)
    token_chunks = [c for c in chunks if c.token_ids]
    assert [t for c in token_chunks for t in c.token_ids] == [t % 256 for t in range(NUM_TOKENS)]
    assert "".join(c.text for c in chunks) == "".join(f"{t}," for t in range(NUM_TOKENS))
    logprobs = [lp for c in token_chunks for lp in c.logprobs]
    assert [lp.logprob for lp in logprobs] == pytest.approx([-t / 10 for t in range(NUM_TOKENS)])
    assert len(token_chunks) < NUM_TOKENS  # bursts were merged into fewer messages
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == NUM_TOKENS


def test_engine_delivers_a_step_in_one_event_loop_callback():
    calls = []

    class Loop:
        def call_soon_threadsafe(self, fn, *args):
            calls.append((fn, args))

    async def run():
        engine = AsyncEngine.__new__(AsyncEngine)  # only the delivery path: no model
        engine._lock = threading.Lock()
        loop, queues = Loop(), {rid: asyncio.Queue() for rid in "abc"}
        engine._streams = {f"{rid}#0": _Stream(loop, q, [1], 1, rid) for rid, q in queues.items()}
        outputs = [RequestOutput(f"{rid}#0", [1], [CompletionOutput(index=0)]) for rid in ["a", "b", "gone", "c"]]
        engine._deliver_step(outputs)
        assert len(calls) == 1
        fn, args = calls[0]
        fn(*args)
        return {rid: q.get_nowait().request_id for rid, q in queues.items()}

    assert asyncio.run(run()) == {"a": "a", "b": "b", "c": "c"}

