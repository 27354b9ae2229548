"""Overlapped steps (EngineArgs.overlap_steps): step N's host work runs after step N+1 is launched, and every
request's output is exactly that of the plain engine (the same workload run with overlap off)."""

from __future__ import annotations

import random
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

from longcat_service.engine import llm_engine as llm_engine_module
from longcat_service.engine.sampler import Sampler, SamplingRow
from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import PROMPTS, assert_all_blocks_free, greedy, make_engine

STOP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


class StepClock:
    """time.monotonic for the engine module: advances one second per step() call, so deadlines expire at the
    same step in both modes whatever the machine's speed."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def random_params(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "seeded", "seeded", "penalties"])
    kw: dict = dict(max_tokens=rng.randint(1, 18), n=rng.choice([1, 1, 1, 2, 3]))
    if kind == "greedy":
        kw["temperature"] = 0.0
    else:  # seeded: the draws do not depend on what else is in the batch
        kw.update(temperature=rng.choice([0.7, 1.0, 1.3]), seed=rng.randint(0, 10_000),
                  top_k=rng.choice([0, 5, 50]), top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.05]))
        if kind == "penalties":
            kw.update(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2)
    if kw["n"] > 1 and "seed" not in kw:
        kw["n"] = 1  # greedy samples of one request are identical anyway
    if rng.random() < 0.4:
        kw["stop"] = rng.sample(list(STOP_CHARS), 12) + ["".join(rng.sample(STOP_CHARS, 2))]
    if rng.random() < 0.3:
        kw["stop_token_ids"] = rng.sample(range(3, 512), 8)
    if rng.random() < 0.3:
        kw["logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.15:
        kw["prompt_logprobs"] = rng.choice([0, 3])
    if rng.random() < 0.3:
        kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
    kw["ignore_eos"] = rng.random() < 0.5
    return SamplingParams(**kw)


def make_workload(seed: int, aborts: bool, deadlines: bool, num_requests: int = 28):
    rng = random.Random(seed)
    shared = [rng.randrange(3, 512) for _ in range(12)]  # a common prefix: prefix-cache hits
    reqs = []
    for i in range(num_requests):
        tail = [rng.randrange(3, 512) for _ in range(rng.randint(1, 20))]
        prompt = shared[: rng.choice([0, 4, 8, 12])] + tail
        arrival_call = rng.randint(0, 25)
        deadline = arrival_call + rng.randint(2, 12) if rng.random() < 0.15 else None
        abort_after = rng.randint(1, 6) if rng.random() < 0.15 else None  # abort once this many tokens are seen
        deadline = deadline if deadlines else None
        abort_after = abort_after if aborts else None
        reqs.append((f"r{i}", prompt, random_params(rng), arrival_call, deadline, abort_after))
    return reqs


def run_workload(monkeypatch, workload, overlap: bool, preemptions: list, async_scheduling: bool = False,
                 on_engine=None, **engine_kwargs):
    """async_scheduling is off by default here: these tests assert that overlap alone changes no batch."""
    clock = StepClock()
    monkeypatch.setattr(llm_engine_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    kwargs = dict(num_kv_blocks=24, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=64)
    engine = make_engine(**{**kwargs, **engine_kwargs}, overlap_steps=overlap, async_scheduling=async_scheduling)
    if on_engine is not None:
        on_engine(engine)
    real_preempt = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq: (preemptions.append(seq.request_id), real_preempt(seq))[-1]
    streamed: dict[str, dict] = {}
    final = {}
    pending = sorted(workload, key=lambda r: r[3])
    aborted = set()
    for call in range(2000):
        clock.now = 1000.0 + call
        while pending and pending[0][3] <= call:
            rid, prompt, params, _, deadline, _ = pending.pop(0)
            engine.add_request(rid, prompt, params, deadline=None if deadline is None else 1000.0 + deadline)
        if not pending and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            acc = streamed.setdefault(out.request_id, {})
            for c in out.outputs:
                toks, text = acc.get(c.index, ([], ""))
                acc[c.index] = (toks + c.new_token_ids, text + c.text_delta)
            if out.finished:
                assert out.request_id not in final, "a request finished twice"
                final[out.request_id] = out
        for rid, _, _, _, _, abort_after in workload:
            seen = max((len(t) for t, _ in streamed.get(rid, {}).values()), default=0)
            if abort_after is not None and rid not in final and rid not in aborted and seen >= abort_after:
                aborted.add(rid)
                assert engine.abort_request(rid)
    assert not engine.has_unfinished_requests() and engine._inflight is None
    assert_all_blocks_free(engine)
    for rid, out in final.items():  # the stream's deltas add up to the final output
        for c in out.outputs:
            assert streamed[rid][c.index] == (c.token_ids, c.text), (rid, c.index)
    return final


def summary(out):
    return dict(
        completions=[(c.index, c.token_ids, c.text, c.logprobs, c.finish_reason, c.stop_reason) for c in out.outputs],
        num_cached_tokens=out.num_cached_tokens,
        prompt_logprobs=out.prompt_logprobs,
        error=out.error,
    )


def exact_part(out):
    """Everything but the logprob values."""
    return dict(
        completions=[(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason,
                      None if c.logprobs is None else [(lp.token_id, sorted(lp.top)) for lp in c.logprobs])
                     for c in out.outputs],
        num_cached_tokens=out.num_cached_tokens,
        prompt_logprobs=None if out.prompt_logprobs is None else [lp and lp.token_id for lp in out.prompt_logprobs],
        error=out.error,
    )


def logprob_values(out):
    vals = [v for c in out.outputs for lp in (c.logprobs or []) for v in lp.top.values()]
    return vals + [v for lp in (out.prompt_logprobs or []) if lp for v in lp.top.values()]


def run_both(monkeypatch, workload):
    preempted_plain, preempted_overlap = [], []
    plain = run_workload(monkeypatch, workload, overlap=False, preemptions=preempted_plain)
    overlapped = run_workload(monkeypatch, workload, overlap=True, preemptions=preempted_overlap)
    assert set(plain) == set(overlapped) == {r[0] for r in workload}
    # the workload really covers what it claims to (so the equality checks mean something)
    assert preempted_plain and preempted_overlap, "the small KV cache should force preemption"
    assert any(o.num_cached_tokens > 0 for o in plain.values()), "the shared prefix should hit the prefix cache"
    return plain, overlapped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_workload_identical_with_and_without_overlap(monkeypatch, seed):
    """Stop strings, stop ids, min_tokens, n > 1, logprobs, chunked prefill, preemption, prefix caching and
    deadlines: the overlapped engine schedules exactly the same batches, so every output is bit-identical."""
    plain, overlapped = run_both(monkeypatch, make_workload(seed, aborts=False, deadlines=True))
    for rid in plain:
        assert summary(overlapped[rid]) == summary(plain[rid]), rid
    reasons = {c.finish_reason for o in plain.values() for c in o.outputs}
    assert {"length", "stop", "deadline"} <= reasons
    assert any(isinstance(c.stop_reason, str) for o in plain.values() for c in o.outputs)


@pytest.mark.parametrize("seed", [0, 1])
def test_aborts_mid_flight_keep_outputs_identical(monkeypatch, seed):
    """Aborts issued when the client has seen k tokens: with overlap the request is already in the next step's
    batch, whose token is dropped. Tokens, text, finish reasons and cached tokens stay identical; that one extra
    batch row changes other rows' float rounding on the CPU model (not batch-invariant), so logprob values
    agree to rounding only."""
    plain, overlapped = run_both(monkeypatch, make_workload(seed, aborts=True, deadlines=False))
    assert any(c.finish_reason == "abort" for o in plain.values() for c in o.outputs)
    for rid in plain:
        assert exact_part(overlapped[rid]) == exact_part(plain[rid]), rid
        assert logprob_values(overlapped[rid]) == pytest.approx(logprob_values(plain[rid]), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("overlap", [True, False])
def test_next_step_is_launched_before_the_previous_steps_host_work(overlap):
    engine = make_engine(overlap_steps=overlap)
    events = []
    launch, on_token = engine.runner.launch, engine.output_processor.on_token
    engine.runner.launch = lambda batch, **kw: (events.append("launch"), launch(batch, **kw))[1]
    engine.output_processor.on_token = lambda *a: (events.append("host"), on_token(*a))[1]
    engine.add_request("a", PROMPTS[0], greedy(3))
    while engine.has_unfinished_requests():
        engine.step()
    # plain: launch, host, launch, host, ...; overlapped: the second launch precedes the first token's work
    expected = ["launch", "launch", "host", "launch", "host", "host"] if overlap else ["launch", "host"] * 3
    assert events == expected


def test_abort_while_a_step_is_in_flight_drops_its_token_and_frees_blocks():
    engine = make_engine(overlap_steps=True)
    engine.add_request("a", PROMPTS[0], greedy(10))
    engine.add_request("b", PROMPTS[1], greedy(4))
    first = engine.step()  # launches the prefill; its tokens come back with the next call
    assert first == [] and engine._inflight is not None
    second = {o.request_id: o for o in engine.step()}  # step 1's tokens; step 2 (both requests) in flight
    assert len(second["a"].outputs[0].token_ids) == 1
    assert engine.abort_request("a")
    assert all(s.seq.request_id == "a" or s.seq.request_id == "b" for s in engine._inflight.batch)
    outs = engine.step()
    final_a = [o for o in outs if o.request_id == "a"]
    assert len(final_a) == 1 and final_a[0].outputs[0].finish_reason == "abort"
    assert final_a[0].outputs[0].token_ids == second["a"].outputs[0].token_ids  # the in-flight token is dropped
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert all(o.request_id == "b" for o in outs)
    assert_all_blocks_free(engine)


class _HostSyncSpy(TorchFunctionMode):
    """Records tensor methods that read device values back to the host."""

    SYNCS = {"tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_sampler_launch_reads_nothing_back():
    sampler = Sampler(64, 2, "cpu", seed=0)
    logits = torch.randn(4, 64)
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logprobs=2), [5, 6], [7]),
        SamplingRow(SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=3, logit_bias={4: 1.0}),
                    [5], [], sampler.make_generator(3)),
        SamplingRow(SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5,
                                   presence_penalty=0.1, min_tokens=3, stop_token_ids=[9]), [1, 2], [3, 3]),
        SamplingRow(SamplingParams(temperature=0.5, logprobs=0), [8], []),
    ]
    spy = _HostSyncSpy()
    with spy:
        launched = sampler.launch(logits, rows)
    assert spy.calls == []
    tokens, logprobs = sampler.collect(launched)
    assert len(tokens) == 4 and logprobs[1] is None and logprobs[2] is None
    assert logprobs[0].token_id == tokens[0] == int(logits[0].argmax())
    assert tokens[0] in logprobs[0].top and len(logprobs[0].top) == 2  # greedy: the top-2 include the token


def test_execute_only_runner_is_not_deferred_a_step():
    """A runner without launch (benchmarks/fake_compute.py, fault-injecting wrappers) has computed the step when
    execute returns: its tokens come out of that same step() call, not one call (one step duration) later."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fake_compute.py"
    spec = importlib.util.spec_from_file_location("fake_compute", path)
    fake_compute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_compute)
    engine = make_engine(overlap_steps=True)
    fake_compute.install(engine, step_ms=0.0, host_ms=0.0)
    engine.add_request("a", PROMPTS[0], greedy(2))
    first = engine.step()
    assert [len(o.outputs[0].new_token_ids) for o in first] == [1]
    second = engine.step()
    assert len(second) == 1 and second[0].finished and len(second[0].outputs[0].token_ids) == 2
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(engine)


def test_failed_in_flight_step_does_not_fail_a_new_request_reusing_an_aborted_id():
    """Request "a" is aborted while its step is in flight and a new request takes the id; that step then fails
    at collect. Only the batch's own (aborted) request was in it: the new "a" must run normally."""
    engine = make_engine(overlap_steps=True)
    engine.add_request("a", PROMPTS[0], greedy(4))
    assert engine.step() == [] and engine._inflight is not None
    assert engine.abort_request("a")
    engine.add_request("a", PROMPTS[1], greedy(3))
    real_collect = engine.runner.collect
    calls = [0]

    def collect(handle):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("device fault in the in-flight step")
        return real_collect(handle)

    engine.runner.collect = collect
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert [(o.outputs[0].finish_reason, o.error) for o in finals] == [("abort", None), ("length", None)]
    assert finals[1].prompt_token_ids == PROMPTS[1] and len(finals[1].outputs[0].token_ids) == 3
    assert_all_blocks_free(engine)


def test_runner_turning_execute_only_mid_flight_keeps_the_in_flight_tokens():
    """A wrapper installed on runner.execute while a launched step is in flight (fault injection): the next call
    collects that step and runs the new one to completion; both steps' tokens get their host work."""
    engine = make_engine(overlap_steps=True)
    engine.add_request("a", PROMPTS[0], greedy(3, logprobs=0))
    assert engine.step() == [] and engine._inflight is not None
    real_execute = engine.runner.execute
    engine.runner.execute = lambda batch: real_execute(batch)
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    (final,) = finals
    assert len(final.outputs[0].token_ids) == 3
    assert [lp.token_id for lp in final.outputs[0].logprobs] == final.outputs[0].token_ids
