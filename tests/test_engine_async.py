"""AsyncEngine: concurrent streams, early exit aborts, explicit abort, health, loop failure, shutdown.

Tests that reach into the engine (engine.engine) run the thread mode; those that only use the public API run
both modes (the process mode's own failure tests are in test_engine_process.py)."""

import asyncio
import os
import signal
import threading
import time

import pytest

from longcat_service.engine.async_engine import AsyncEngine, EngineDeadError, _ended_output, _Stream
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.errors import PromptError
from longcat_service.outputs import CompletionOutput, RequestOutput
from tests.engine_utils import PROMPTS, greedy, reference_greedy

ARGS = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=128, max_model_len=128, engine_mode="thread")
both_modes = pytest.mark.parametrize("mode", ["thread", "process"])


def run(coro_fn, **kw):
    """Start an engine, run coro_fn(engine), always shut down."""

    async def main():
        engine = AsyncEngine(EngineArgs(**{**ARGS, **kw}))
        await engine.start()
        try:
            return await coro_fn(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


async def collect(engine, prompt, params, rid):
    outs = [o async for o in engine.generate(prompt, params, rid)]
    return outs


async def wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def test_concurrent_generate_streams_and_matches_reference():
    async def body(engine):
        assert engine.is_healthy()
        results = await asyncio.gather(*[collect(engine, p, greedy(5), f"r{i}") for i, p in enumerate(PROMPTS)])
        model = engine.engine.runner.model
        for prompt, outs in zip(PROMPTS, results, strict=True):
            assert outs[-1].finished and not any(o.finished for o in outs[:-1])
            streamed = sum((o.outputs[0].new_token_ids for o in outs), [])
            assert streamed == outs[-1].outputs[0].token_ids == reference_greedy(model, prompt, 5)
        load = engine.load()
        assert (load.num_running, load.num_waiting) == (0, 0)

    run(body)


def test_early_aclose_aborts_and_frees_blocks():
    async def body(engine):
        bm = engine.engine.block_manager
        gen = engine.generate(PROMPTS[2], greedy(None), "long")
        first = await gen.__anext__()
        assert not first.finished
        assert bm.num_free_blocks < bm.num_blocks
        await gen.aclose()
        await wait_until(lambda: bm.num_free_blocks == bm.num_blocks and not engine.engine.has_unfinished_requests())

    run(body)


def test_cancelled_consumer_aborts():
    async def body(engine):
        bm = engine.engine.block_manager
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(PROMPTS[0], greedy(None), "c"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: bm.num_free_blocks == bm.num_blocks and not engine.engine.has_unfinished_requests())

    run(body)


@both_modes
def test_explicit_abort_ends_stream_with_abort(mode):
    async def body(engine):
        gen = engine.generate(PROMPTS[0], greedy(None), "x")
        await gen.__anext__()
        assert await engine.abort("x")
        outs = [o async for o in gen]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert not await engine.abort("x") and not await engine.abort("never-seen")

    run(body, engine_mode=mode)


@both_modes
def test_bad_prompt_raises_before_streaming(mode):
    async def body(engine):
        with pytest.raises(PromptError) as e:
            await collect(engine, [], greedy(1), "e")
        assert e.value.field == "prompt"
        assert engine.is_healthy()

    run(body, engine_mode=mode)


@both_modes
def test_deadline_through_async_engine(mode):
    async def body(engine):
        outs = [o async for o in engine.generate(PROMPTS[0], greedy(None), "d", deadline=time.monotonic() + 0.05)]
        assert outs[-1].outputs[0].finish_reason == "deadline"

    run(body, engine_mode=mode)


def test_loop_death_fails_requests_and_marks_unhealthy():
    async def body(engine):
        gen = engine.generate(PROMPTS[0], greedy(None), "victim")
        await gen.__anext__()

        def broken(now):
            raise RuntimeError("scheduler bug")

        engine.engine.scheduler.schedule = broken
        outs = [o async for o in gen]
        assert outs[-1].outputs[0].finish_reason == "error" and "scheduler bug" in outs[-1].error
        await wait_until(lambda: not engine.is_healthy())
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[1], greedy(1), "after")

    run(body)


def test_slow_step_marks_unhealthy():
    async def body(engine):
        real = engine.engine.step

        def slow_step():
            time.sleep(0.6)
            return real()

        engine.engine.step = slow_step
        gen = engine.generate(PROMPTS[0], greedy(3), "slow")
        task = asyncio.create_task(gen.__anext__())
        await wait_until(lambda: not engine.is_healthy(), timeout=5)
        await task
        await gen.aclose()

    run(body, step_timeout_s=0.2)


@both_modes
def test_shutdown_ends_open_streams(mode):
    async def main():
        engine = AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": mode}))
        await engine.start()
        gen = engine.generate(PROMPTS[0], greedy(None), "open")
        await gen.__anext__()
        await engine.shutdown()
        assert not engine.is_healthy()
        outs = [o async for o in gen]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"

    asyncio.run(main())


async def take_tokens(gen, count: int) -> list[int]:
    """Read outputs until at least `count` tokens have been streamed; the stream stays open."""
    streamed = []
    while len(streamed) < count:
        out = await gen.__anext__()
        streamed += out.outputs[0].new_token_ids
    return streamed


@both_modes
def test_shutdown_reports_the_tokens_it_streamed_and_the_cached_prompt(mode):
    """An engine-wide abort (shutdown) ends an open stream with the totals it delivered: the final output's token_ids
    and logprobs (the usage a server reports) are those streamed, and num_cached_tokens the prompt's cached part."""

    async def main():
        engine = AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": mode}))
        await engine.start()
        await collect(engine, PROMPTS[2], greedy(1), "warm")  # leaves the prompt's full blocks as a cached prefix
        gen = engine.generate(PROMPTS[2], greedy(None, logprobs=1), "open")
        first = await gen.__anext__()
        streamed = first.outputs[0].new_token_ids + await take_tokens(gen, 3)
        await engine.shutdown()
        rest = [o async for o in gen]
        streamed += sum((o.outputs[0].new_token_ids for o in rest), [])
        final = rest[-1]
        assert final.finished and final.outputs[0].finish_reason == "abort"
        assert len(streamed) >= 4 and final.outputs[0].token_ids == streamed
        assert len(final.outputs[0].logprobs) == len(streamed)
        assert final.prompt_token_ids == PROMPTS[2]
        assert first.num_cached_tokens == 16  # 4 full blocks of 4 of the 19-token prompt
        assert final.num_cached_tokens == 16

    asyncio.run(main())


@both_modes
def test_engine_death_reports_the_tokens_it_streamed(mode):
    async def main():
        engine = AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": mode}))
        await engine.start()
        try:
            gen = engine.generate(PROMPTS[0], greedy(None), "victim")
            streamed = await take_tokens(gen, 3)
            if mode == "thread":
                def broken(now):
                    raise RuntimeError("scheduler bug")

                engine.engine.scheduler.schedule = broken
            else:
                os.kill(engine._core.process.pid, signal.SIGKILL)
            rest = [o async for o in gen]
            streamed += sum((o.outputs[0].new_token_ids for o in rest), [])
            assert rest[-1].outputs[0].finish_reason == "error"
            assert len(streamed) >= 3 and rest[-1].outputs[0].token_ids == streamed
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_thread_mode_end_keeps_a_sample_finished_earlier():
    stream = _Stream(None, None, [1, 2], 2, "r")
    last = RequestOutput("r", [1, 2], [CompletionOutput(0, [5], "a", finish_reason="stop", stop_reason=7),
                                       CompletionOutput(1, [6, 8], "bc", new_token_ids=[8], text_delta="c")],
                         num_cached_tokens=4)
    done, open_ = _ended_output(stream, last, "abort", None).outputs
    assert (done.token_ids, done.finish_reason, done.stop_reason, done.new_token_ids) == ([5], "stop", 7, [])
    assert (open_.token_ids, open_.text, open_.finish_reason, open_.new_token_ids) == ([6, 8], "bc", "abort", [])
    nothing_yet = _ended_output(stream, None, "error", "died")
    assert [c.token_ids for c in nothing_yet.outputs] == [[], []] and nothing_yet.error == "died"


def test_reused_request_id_gets_only_its_own_outputs():
    """A caller leaves request "x" while a step that computes it is in flight and at once reuses the id: that
    step's output (and the old request's abort) belong to the old request, never to the new stream."""

    async def body(engine):
        gen_old = engine.generate(PROMPTS[2], greedy(None), "x")
        await gen_old.__anext__()
        real_step, in_step, release = engine.engine.step, threading.Event(), threading.Event()

        def gated_step():
            in_step.set()
            release.wait(10)
            return real_step()

        engine.engine.step = gated_step
        await wait_until(in_step.is_set)  # the loop thread is inside a step that computes the old "x"
        await gen_old.aclose()
        new = asyncio.create_task(collect(engine, PROMPTS[0], greedy(3), "x"))
        await wait_until(lambda: engine.load().num_waiting == 1)  # the new stream is registered, its add queued
        engine.engine.step = real_step
        release.set()
        outs = await asyncio.wait_for(new, 30)
        assert all(o.request_id == "x" and o.prompt_token_ids == PROMPTS[0] for o in outs)
        assert outs[-1].outputs[0].finish_reason == "length"
        assert outs[-1].outputs[0].token_ids == reference_greedy(engine.engine.runner.model, PROMPTS[0], 3)
        await wait_until(lambda: not engine.engine.has_unfinished_requests())

    run(body)


def test_shutdown_does_not_wait_forever_for_a_hung_step():
    """SIGTERM on a server whose engine step hangs (a stuck device or collective) must still finish: shutdown
    stops waiting for the loop thread once the step is past step_timeout_s, and ends every open stream."""

    async def main():
        engine = AsyncEngine(EngineArgs(**{**ARGS, "step_timeout_s": 0.3}))
        await engine.start()
        gen = engine.generate(PROMPTS[0], greedy(None), "hung")
        await gen.__anext__()
        real_step, in_step, release = engine.engine.step, threading.Event(), threading.Event()

        def hung_step():
            in_step.set()
            release.wait(60)
            return real_step()

        engine.engine.step = hung_step
        try:
            await wait_until(in_step.is_set)
            await asyncio.wait_for(engine.shutdown(), 30)
            outs = [o async for o in gen]
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
            assert not engine.is_healthy()
        finally:
            release.set()

    asyncio.run(main())


def test_loop_death_while_a_request_is_being_validated_fails_it_instead_of_hanging():
    async def body(engine):
        real_validate = engine.engine.validate_request

        def validate_while_the_loop_dies(prompt, params):
            real_validate(prompt, params)

            def broken():
                raise RuntimeError("loop bug")

            engine.engine.has_unfinished_requests = broken
            engine._wake.set()
            engine._thread.join(10)  # the loop thread is gone (and has failed every stream it knew) before we return

        engine.engine.validate_request = validate_while_the_loop_dies
        with pytest.raises(EngineDeadError, match="loop bug"):
            await asyncio.wait_for(collect(engine, PROMPTS[0], greedy(2), "late"), 10)

    run(body)
