"""AsyncEngine process mode: the engine core in a spawned child. Outputs equal the thread mode's; a step's
message carries deltas only; the child's death or hang is seen by is_healthy() and ends the streams; validation
stays synchronous in the parent; the child never outlives the parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from longcat_service.engine.async_engine import AsyncEngine, EngineDeadError
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.engine_core_process import (
    OutputRebuilder,
    StepDelta,
    encode_output,
    resolve_engine_mode,
)
from longcat_service.engine.errors import EngineArgsError, PromptError
from longcat_service.outputs import CompletionOutput, Logprob, RequestOutput
from longcat_service.sampling_params import SamplingParams, SamplingParamsError
from tests.engine_utils import PROMPTS, greedy

ARGS = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=128, max_model_len=128)
REPO = Path(__file__).resolve().parents[1]


def run(coro_fn, **kw):
    async def main():
        engine = AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": "process", **kw}))
        await engine.start()
        try:
            return await coro_fn(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


async def wait_until(cond, timeout=15.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


# ---- hooks run in the child (module functions: they travel by reference) -------------------------------------
def break_scheduler_after_first_step(engine):
    real = engine.scheduler.schedule
    calls = [0]

    def schedule(now):
        calls[0] += 1
        if calls[0] > 2:
            raise RuntimeError("scheduler bug")
        return real(now)

    engine.scheduler.schedule = schedule


def _delay_steps_after_the_first_token(engine, delay_s: float):
    real = engine.step
    produced = [False]

    def step():
        if produced[0]:
            time.sleep(delay_s)
        outputs = real()
        produced[0] = produced[0] or any(c.new_token_ids for o in outputs for c in o.outputs)
        return outputs

    engine.step = step


def slow_steps_after_the_first_token(engine):
    _delay_steps_after_the_first_token(engine, 1.0)


def hang_steps_after_the_first_token(engine):
    _delay_steps_after_the_first_token(engine, 600)


# ---- equivalence and deltas ----------------------------------------------------------------------------------
def streams(mode: str, requests):
    async def main():
        engine = AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": mode}))
        await engine.start()
        try:
            async def one(rid, prompt, params):
                return [o async for o in engine.generate(prompt, params, rid)]

            # one at a time: the same batches in both modes, so the floats match exactly
            return [await one(rid, p, sp) for rid, (p, sp) in requests.items()]
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_process_mode_streams_what_the_thread_mode_streams():
    requests = {
        "greedy": (PROMPTS[0], greedy(6, logprobs=2, prompt_logprobs=1)),
        "sampled_n2": (PROMPTS[2], SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=5, ignore_eos=True)),
        "stop_string": (PROMPTS[4], greedy(12, stop=["e"])),
    }
    thread, process = streams("thread", requests), streams("process", requests)
    for t_outs, p_outs in zip(thread, process, strict=True):
        assert [o.finished for o in p_outs] == [o.finished for o in t_outs]
        for t, p in zip(t_outs, p_outs, strict=True):
            assert p.request_id == t.request_id and p.prompt_token_ids == t.prompt_token_ids
            assert p.prompt_logprobs == t.prompt_logprobs and p.num_cached_tokens == t.num_cached_tokens
            for tc, pc in zip(t.outputs, p.outputs, strict=True):
                assert (pc.index, pc.new_token_ids, pc.text_delta, pc.new_logprobs, pc.finish_reason, pc.stop_reason) \
                    == (tc.index, tc.new_token_ids, tc.text_delta, tc.new_logprobs, tc.finish_reason, tc.stop_reason)
                if pc.finished:  # totals on a sample's final output
                    assert (pc.token_ids, pc.text, pc.logprobs) == (tc.token_ids, tc.text, tc.logprobs)
        final = p_outs[-1]
        assert final.metrics.time_to_first_token_s is not None and final.metrics.finished_time is not None
    assert process[2][-1].outputs[0].stop_reason == "e"  # the stop-string case did stop on it
    assert process[0][-1].prompt_logprobs is not None and len(process[1][-1].outputs) == 2


def test_step_delta_leaves_the_history_behind():
    history = list(range(1000))
    lp = Logprob(7, -0.5, {7: -0.5})
    out = RequestOutput("k", [1, 2], [CompletionOutput(
        index=0, token_ids=history + [7], text="x" * 1000 + "y", logprobs=[lp] * 1001, new_token_ids=[7],
        text_delta="y", new_logprobs=[lp])])
    d = encode_output(out, set())
    assert d.samples == [(0, [7], "y", [(7, -0.5, {7: -0.5})], None, None)]


def test_rebuilder_fills_totals_on_the_final_output_only():
    rb = OutputRebuilder("r", [1], 1)
    metrics = (0.0, None, None, None, None)
    first = rb.rebuild(StepDelta("k", False, 0, metrics, None, None, [(0, [5], "a", [(5, -1.0, {})], None, None)]))
    last = rb.rebuild(StepDelta("k", True, 0, metrics, None, None, [(0, [6], "b", [(6, -2.0, {})], "length", None)]))
    assert first.outputs[0].token_ids == [] and first.outputs[0].new_token_ids == [5]
    c = last.outputs[0]
    assert (c.token_ids, c.text, [x.logprob for x in c.logprobs]) == ([5, 6], "ab", [-1.0, -2.0])
    assert last.finished and c.finish_reason == "length"


def test_rebuilder_end_keeps_the_totals_delivered_and_a_sample_finished_earlier():
    rb = OutputRebuilder("r", [1, 2], 2)
    metrics = (1.0, 0.5, None, None, None)
    rb.rebuild(StepDelta("k", False, 4, metrics, None, None,
                         [(0, [5], "a", None, "stop", 7), (1, [6], "b", None, None, None)]))
    rb.rebuild(StepDelta("k", False, 4, metrics, None, None, [(0, [], "", None, "stop", 7), (1, [8], "c", None, None, None)]))
    end = rb.end("error", "engine core died")
    done, open_ = end.outputs
    assert (done.token_ids, done.finish_reason, done.stop_reason, done.new_token_ids) == ([5], "stop", 7, [])
    assert (open_.token_ids, open_.text, open_.finish_reason, open_.new_token_ids) == ([6, 8], "bc", "error", [])
    assert end.finished and end.error == "engine core died" and end.num_cached_tokens == 4
    assert end.metrics.queue_time_s == 0.5


# ---- lifecycle, validation, load ------------------------------------------------------------------------------
def test_validation_errors_are_raised_in_the_parent_naming_the_field():
    async def body(engine):
        assert engine.engine is None and engine.mode == "process"
        with pytest.raises(PromptError) as e:
            await anext(engine.generate([5, 10**9], greedy(1), "bad"))
        assert e.value.field == "token_ids"
        with pytest.raises(PromptError, match="max_model_len"):
            await anext(engine.generate([5] * 200, greedy(1), "long"))
        with pytest.raises(SamplingParamsError) as e:
            await anext(engine.generate([5], SamplingParams(stop_token_ids=[10**9]), "sp"))
        assert e.value.field == "stop_token_ids"
        assert engine.is_healthy() and engine.max_model_len == 128 and engine.tokenizer is not None
        assert engine.model_config.vocab_size > 0

    run(body)


def test_start_failure_raises_the_engines_error():
    async def main():
        await AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": "process", "max_model_len": 10**6})).start()

    with pytest.raises(EngineArgsError) as e:
        asyncio.run(main())
    assert e.value.field == "max_model_len"


def test_an_unpicklable_engine_hook_in_process_mode_is_an_error_naming_the_field():
    """The hook travels to the spawned child by pickle: a lambda or closure fails there with a pickling error
    that names nothing; it is refused up front, before any process is spawned."""
    def local_hook(engine):
        pass

    for hook in (lambda engine: None, local_hook):
        with pytest.raises(EngineArgsError, match="picklable") as e:
            AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": "process", "engine_hook": hook}))
        assert e.value.field == "engine_hook"
    AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": "thread", "engine_hook": local_hook}))  # no pickling there
    AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": "process", "engine_hook": slow_steps_after_the_first_token}))


def test_early_aclose_aborts_and_the_child_frees_its_blocks():
    async def body(engine):
        gen = engine.generate(PROMPTS[2], greedy(None), "long")
        await anext(gen)
        await wait_until(lambda: engine.load().kv_cache_usage > 0)
        await gen.aclose()
        await wait_until(lambda: engine.load().kv_cache_usage == 0 and engine.load().num_running == 0)
        outs = [o async for o in engine.generate(PROMPTS[2], greedy(2), "long")]  # the id is free again
        assert outs[-1].outputs[0].finish_reason == "length"

    run(body)


def test_engine_mode_auto_keeps_the_thread_under_torchrun(monkeypatch):
    assert resolve_engine_mode(EngineArgs()) == "process"
    assert resolve_engine_mode(EngineArgs(tensor_parallel_size=2)) == "thread"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_engine_mode(EngineArgs()) == "thread"
    with pytest.raises(EngineArgsError, match="engine_mode"):
        resolve_engine_mode(EngineArgs(engine_mode="process"))
    with pytest.raises(EngineArgsError, match="engine_mode"):
        EngineArgs(engine_mode="fork")


# ---- failures --------------------------------------------------------------------------------------------------
def test_child_killed_fails_open_streams_and_refuses_new_ones():
    async def body(engine):
        gen = engine.generate(PROMPTS[0], greedy(None), "victim")
        await anext(gen)
        os.kill(engine._core.process.pid, signal.SIGKILL)
        outs = [o async for o in gen]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "error"
        assert "exit code -9" in outs[-1].error
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError):
            await anext(engine.generate(PROMPTS[1], greedy(1), "after"))

    run(body)


def test_loop_death_in_the_child_ends_streams_with_its_error():
    async def body(engine):
        outs = [o async for o in engine.generate(PROMPTS[0], greedy(None), "victim")]
        assert outs[-1].outputs[0].finish_reason == "error" and "scheduler bug" in outs[-1].error
        await wait_until(lambda: not engine.is_healthy())
        with pytest.raises(EngineDeadError, match="scheduler bug"):
            await anext(engine.generate(PROMPTS[1], greedy(1), "after"))

    run(body, engine_hook=break_scheduler_after_first_step)


def test_a_failing_reader_thread_ends_the_streams_instead_of_hanging():
    """The parent's reader thread fails on a child message (a bug, an unreadable message): nobody would deliver
    the child's outputs any more, so the engine must count as dead and every open stream end with the error."""
    async def body(engine):
        gen = engine.generate(PROMPTS[0], greedy(None), "victim")
        await anext(gen)
        real = engine._core._on_message

        def broken(msg):
            if msg[0] == "step" and msg[2]:
                raise RuntimeError("reader bug")
            real(msg)

        engine._core._on_message = broken
        outs = await asyncio.wait_for(_drain(gen), timeout=15)
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "error" and "reader bug" in outs[-1].error
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError, match="reader bug"):
            await anext(engine.generate(PROMPTS[1], greedy(1), "after"))

    run(body)


async def _drain(gen):
    return [o async for o in gen]


def test_slow_step_marks_unhealthy_until_the_child_speaks_again():
    async def body(engine):
        gen = engine.generate(PROMPTS[0], greedy(3), "slow")
        await anext(gen)
        await wait_until(lambda: not engine.is_healthy(), timeout=5)
        outs = [o async for o in gen]
        assert outs[-1].outputs[0].finish_reason == "length"
        await wait_until(engine.is_healthy, timeout=5)

    run(body, step_timeout_s=0.3, engine_hook=slow_steps_after_the_first_token)


def test_shutdown_kills_a_child_hung_in_a_step():
    async def main():
        engine = AsyncEngine(EngineArgs(**{**ARGS, "engine_mode": "process", "step_timeout_s": 0.3,
                                           "engine_hook": hang_steps_after_the_first_token}))
        await engine.start()
        gen = engine.generate(PROMPTS[0], greedy(None), "hung")
        await anext(gen)
        await wait_until(lambda: not engine.is_healthy(), timeout=5)
        await asyncio.wait_for(engine.shutdown(), 30)
        outs = [o async for o in gen]
        assert outs[-1].outputs[0].finish_reason == "abort"
        assert not engine._core.process.is_alive() and not engine.is_healthy()

    asyncio.run(main())


def test_the_child_exits_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(REPO)!r})
        from longcat_service.engine.async_engine import AsyncEngine
        from longcat_service.engine.engine_args import EngineArgs

        async def main():
            engine = AsyncEngine(EngineArgs(**{ARGS!r}, engine_mode="process"))
            await engine.start()
            print(engine._core.process.pid, flush=True)
            await asyncio.sleep(600)

        if __name__ == "__main__":
            asyncio.run(main())
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        end = time.monotonic() + 15
        while _alive(child_pid):
            assert time.monotonic() < end, "the engine core outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
