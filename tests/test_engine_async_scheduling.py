"""Async scheduling (EngineArgs.async_scheduling): a decode step is launched from the in-flight step's sampled
tokens on the device, before they are read back. Every request's output must equal the engine without it,
including when a sequence stops on the in-flight token, crosses into a new KV block (scratch block, then
copied), is preempted, aborted or hits a deadline."""

from __future__ import annotations

import random

import pytest

from tests.engine_utils import PROMPTS, assert_all_blocks_free, greedy, make_engine
from tests.test_engine_overlap import exact_part, logprob_values, make_workload, run_workload


class ChainSpy:
    """Counts chained launches, scratch-block adoptions and chained rows whose sequence stopped meanwhile."""

    def __init__(self, engine):
        self.chained = self.adopted = self.dropped = self.chained_while_waiting = 0
        launch_chained, adopt = engine._launch_chained, engine._adopt_scratch_blocks

        def spy_launch(inflight, finalize):
            waiting = bool(engine.scheduler.waiting)
            out = launch_chained(inflight, finalize)
            self.chained += out is not None
            self.chained_while_waiting += out is not None and waiting
            return out

        def spy_adopt(chained):
            self.dropped += sum(s.seq.is_finished for s in chained.batch)
            self.adopted += sum(s.block_table_override is not None and not s.seq.is_finished for s in chained.batch)
            adopt(chained)

        engine._launch_chained, engine._adopt_scratch_blocks = spy_launch, spy_adopt


def run(monkeypatch, workload, async_scheduling: bool, spies: list, **engine_kwargs):
    """The overlap tests' workload driver (6 seats, a small KV cache, a step clock), overlap on."""
    return run_workload(monkeypatch, workload, overlap=True, preemptions=[], async_scheduling=async_scheduling,
                        on_engine=lambda engine: spies.append(ChainSpy(engine)), **engine_kwargs)


def chainable_workload(seed: int, num_requests: int = 12):
    """make_workload's mix (seeds, n > 1, stop strings and ids, logprobs, min_tokens, deadlines, prefix hits)
    (penalties included: the sampler counts the in-flight token on the device), arriving in the first calls:
    decode steps chain between the arrivals."""
    rng = random.Random(seed)
    reqs = []
    for rid, prompt, params, _, deadline, abort_after in make_workload(seed, aborts=False, deadlines=True,
                                                                       num_requests=num_requests):
        params.max_tokens = rng.randint(8, 30)
        reqs.append((rid, prompt, params, rng.randint(0, 3), deadline, abort_after))
    return reqs


def stop_on_seen_tokens(monkeypatch, seed: int, num_requests: int = 16):
    """Greedy requests whose stop ids are tokens the plain engine produces for them (found by a first run), so
    sequences really stop mid-decode, often while their next step is already chained."""
    from longcat_service.sampling_params import SamplingParams

    rng = random.Random(seed)
    base = []
    for i in range(num_requests):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randint(1, 14))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(10, 30), ignore_eos=True,
                                logprobs=rng.choice([None, 0, 2]))
        base.append((f"g{i}", prompt, params, rng.randint(0, 2), None, None))
    first = run(monkeypatch, base, False, [])
    reqs = []
    for rid, prompt, params, arrival, _, _ in base:
        toks = first[rid].outputs[0].token_ids
        if rng.random() < 0.7:  # stop on the token at a random later position (and wherever it occurs first)
            params = SamplingParams(**{**params.__dict__, "stop_token_ids": [toks[rng.randrange(2, len(toks))]]})
        reqs.append((rid, prompt, params, arrival, None, None))
    return reqs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_workload_identical_with_and_without_async_scheduling(monkeypatch, seed):
    workload = chainable_workload(seed)
    spies: list[ChainSpy] = []
    plain = run(monkeypatch, workload, False, spies)
    chained = run(monkeypatch, workload, True, spies)
    assert spies[0].chained == 0 and spies[1].chained > 0
    assert set(plain) == set(chained) == {r[0] for r in workload}
    reasons = {c.finish_reason for o in plain.values() for c in o.outputs}
    assert {"length", "stop"} <= reasons
    for rid in plain:  # tokens, text, reasons, cached tokens exact; logprob values to CPU rounding (batch rows)
        assert exact_part(chained[rid]) == exact_part(plain[rid]), rid
        assert logprob_values(chained[rid]) == pytest.approx(logprob_values(plain[rid]), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_overload_queue_chains_and_keeps_tokens(monkeypatch, seed):
    """Sixteen requests at once for six seats: steps chain while requests wait. A sequence that stops on the
    in-flight token frees its seat one step late (its replacement starts a step later than without async
    scheduling), which changes later batches but no request's tokens, text or finish reason."""
    workload = [(rid, prompt, params, 0, None, None)
                for rid, prompt, params, _, _, _ in chainable_workload(seed, num_requests=16)]
    spies: list[ChainSpy] = []
    roomy = dict(num_kv_blocks=256, max_num_batched_tokens=64)  # seats, not memory, are the limit
    plain = run(monkeypatch, workload, False, spies, **roomy)
    chained = run(monkeypatch, workload, True, spies, **roomy)
    assert spies[1].chained_while_waiting > 0
    for rid in plain:
        assert exact_part(chained[rid]) == exact_part(plain[rid]), rid
        assert logprob_values(chained[rid]) == pytest.approx(logprob_values(plain[rid]), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_stops_on_the_in_flight_token_and_new_blocks_keep_outputs_identical(monkeypatch, seed):
    """Many stop ids (sequences stop while their next step is already chained) and block_size 4 (a chained token
    starts a new block every 4 steps: scratch block, then copied to the block the plain engine allocates)."""
    workload = stop_on_seen_tokens(monkeypatch, seed)
    spies: list[ChainSpy] = []
    plain = run(monkeypatch, workload, False, spies)
    chained = run(monkeypatch, workload, True, spies)
    spy = spies[1]
    assert spy.chained > 10 and spy.adopted > 0 and spy.dropped > 0, vars(spy)
    assert any(c.finish_reason == "stop" for o in plain.values() for c in o.outputs)
    for rid in plain:  # an extra (dropped) batch row changes other rows' CPU float rounding, not their tokens
        assert exact_part(chained[rid]) == exact_part(plain[rid]), rid
        assert logprob_values(chained[rid]) == pytest.approx(logprob_values(plain[rid]), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_aborts_with_async_scheduling_keep_outputs_identical(monkeypatch, seed):
    workload = [(rid, prompt, params, arrival, None, abort_after) for rid, prompt, params, arrival, _, abort_after
                in chainable_workload(seed)]
    for i, (rid, prompt, params, arrival, _, _) in enumerate(workload):
        if i % 3 == 0:
            workload[i] = (rid, prompt, params, arrival, None, 2 + i % 5)
    spies: list[ChainSpy] = []
    plain = run(monkeypatch, workload, False, spies)
    chained = run(monkeypatch, workload, True, spies)
    assert spies[1].chained > 0
    for rid in plain:
        assert exact_part(chained[rid]) == exact_part(plain[rid]), rid


def test_decode_steps_chain_and_read_back_one_step_behind():
    engine = make_engine(async_scheduling=True)
    spy = ChainSpy(engine)
    engine.add_request("a", PROMPTS[0], greedy(12))
    engine.add_request("b", PROMPTS[1], greedy(5))
    tokens = {"a": [], "b": []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens[o.request_id] += o.outputs[0].new_token_ids
    # prefill, first decode (scheduled normally), then every decode step chained until b's length ends
    assert spy.chained >= 9
    reference = make_engine(async_scheduling=False, overlap_steps=False)
    ref = {}
    for rid, prompt, n in (("a", PROMPTS[0], 12), ("b", PROMPTS[1], 5)):
        reference.add_request(rid, prompt, greedy(n))
    while reference.has_unfinished_requests():
        for o in reference.step():
            ref.setdefault(o.request_id, []).extend(o.outputs[0].new_token_ids)
    assert tokens == ref and len(tokens["a"]) == 12 and len(tokens["b"]) == 5
    assert_all_blocks_free(engine)


def _run_all(engine, requests):
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.outputs[0].new_token_ids)
    return out


def test_penalised_requests_chain_and_match_the_plain_engine():
    from longcat_service.sampling_params import SamplingParams

    penalised = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.4, presence_penalty=0.2, min_tokens=3, stop_token_ids=[7])
    requests = [("p", PROMPTS[0], penalised), ("q", PROMPTS[1], penalised)]
    engine = make_engine(async_scheduling=True)
    spy = ChainSpy(engine)
    got = _run_all(engine, requests)
    assert spy.chained >= 5
    assert got == _run_all(make_engine(async_scheduling=False, overlap_steps=False), requests)
    assert_all_blocks_free(engine)


def test_waiting_requests_chain_while_every_seat_is_taken_and_fall_back_when_one_frees():
    """With the only seat taken, steps chain although "w" waits; when the running request's in-flight token is its
    last (by length) the engine schedules normally, so "w" starts exactly when it would without async scheduling."""
    engine = make_engine(async_scheduling=True, max_num_seqs=1)
    attempts = []
    real = engine._launch_chained

    def launch_chained(inflight, finalize):
        waiting = bool(engine.scheduler.waiting)
        out = real(inflight, finalize)
        attempts.append((waiting, out is not None))
        return out

    engine._launch_chained = launch_chained
    requests = [("a", PROMPTS[0], greedy(6)), ("w", PROMPTS[1], greedy(6))]  # "w" waits for the only seat
    got = _run_all(engine, requests)
    assert (True, True) in attempts and (True, False) in attempts and (False, True) in attempts
    assert got == _run_all(make_engine(async_scheduling=False, overlap_steps=False, max_num_seqs=1), requests)
    assert_all_blocks_free(engine)


def test_runner_reserves_scratch_blocks_outside_the_engine_pool():
    engine = make_engine(async_scheduling=True, max_num_seqs=8, num_kv_blocks=32, max_model_len=64)
    assert engine.runner.num_blocks == engine.block_manager.num_blocks == 32
    assert engine.runner.num_scratch_blocks == 8
    assert engine.runner.kv_caches[0].shape[0] == 40
    off = make_engine(async_scheduling=False, max_num_seqs=8, num_kv_blocks=32, max_model_len=64)
    assert off.runner.num_scratch_blocks == 0 and off.runner.kv_caches[0].shape[0] == 32
