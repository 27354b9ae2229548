"""Request-level behaviour of LLMEngine: stops, seeds, n > 1, deadlines, aborts, logprobs, validation, errors."""

import math
import time

import pytest
import torch

from longcat_service.engine.errors import PromptError
from longcat_service.sampling_params import SamplingParams, SamplingParamsError
from tests.engine_utils import (
    PROMPTS,
    assert_all_blocks_free,
    full_forward_logits,
    greedy,
    make_engine,
    run_to_completion,
)


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@pytest.fixture(autouse=True)
def blocks_free_after(engine):
    yield
    assert_all_blocks_free(engine)


def one(engine, prompt, params, rid="x"):
    final, stream = run_to_completion(engine, {rid: (prompt, params)})
    return final[rid], [o for o in stream if o.request_id == rid]


# ---- stop conditions ------------------------------------------------------------------------------
def test_stop_string_across_token_boundary(engine):
    base, _ = one(engine, PROMPTS[0], greedy(12))
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    tok = engine.tokenizer
    # a stop string made of the end of token 3's text and the start of token 4's text
    t3, t4 = tok.decode(ids[:4]), tok.decode(ids[:5])
    assert t4.startswith(t3) and len(t3) >= 1 and len(t4) > len(t3)
    stop = t3[-1:] + t4[len(t3) : len(t3) + 1]
    expected_cut = text.find(stop)
    assert 0 <= expected_cut < len(t4)
    out, stream = one(engine, PROMPTS[0], greedy(12, stop=[stop]))
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == text[:expected_cut]
    assert "".join(o.outputs[0].text_delta for o in stream) == comp.text  # the stop string was never streamed
    assert comp.token_ids == ids[: len(comp.token_ids)]


def test_stop_token_id_and_eos(engine):
    base, _ = one(engine, PROMPTS[1], greedy(6))
    ids = base.outputs[0].token_ids
    out, _ = one(engine, PROMPTS[1], greedy(6, stop_token_ids=[ids[2]]))
    first = ids.index(ids[2])
    assert out.outputs[0].token_ids == ids[: first + 1]  # the stop token is kept in the ids ...
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == ids[2]
    assert out.outputs[0].text == engine.tokenizer.decode(ids[:first])  # ... but not in the text
    # EOS forced by logit_bias stops at once unless ignore_eos
    eos = engine.eos_token_id
    out, _ = one(engine, PROMPTS[1], SamplingParams(temperature=0, max_tokens=5, logit_bias={eos: 100}))
    assert out.outputs[0].token_ids == [eos] and out.outputs[0].finish_reason == "stop"
    out, _ = one(engine, PROMPTS[1], greedy(3, logit_bias={eos: 100}))
    assert out.outputs[0].token_ids == [eos] * 3 and out.outputs[0].finish_reason == "length"


def test_min_tokens_defers_stop_token(engine):
    base, _ = one(engine, PROMPTS[3], greedy(1))
    first = base.outputs[0].token_ids[0]
    out, _ = one(engine, PROMPTS[3], greedy(10, stop_token_ids=[first]))
    assert out.outputs[0].token_ids == [first]
    out, _ = one(engine, PROMPTS[3], greedy(10, stop_token_ids=[first], min_tokens=4))
    toks = out.outputs[0].token_ids
    assert len(toks) >= 4 and first not in toks[:4]


def test_logit_bias_forces_token(engine):
    out, _ = one(engine, PROMPTS[0], greedy(4, logit_bias={300: 100.0}))
    assert out.outputs[0].token_ids == [300] * 4


def test_max_model_len_finishes_with_length():
    eng = make_engine(max_model_len=16)
    out, _ = one(eng, list(range(10, 24)), greedy(None))  # no max_tokens: until the context's end
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].finish_reason == "length"
    with pytest.raises(SamplingParamsError, match="max_tokens"):  # an explicit one that cannot fit is refused
        eng.add_request("too-long", list(range(10, 24)), greedy(100))


# ---- sampling -----------------------------------------------------------------------------------
def test_seeded_sampling_reproducible_and_batch_independent(engine):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=1234, ignore_eos=True)
    alone, _ = one(engine, PROMPTS[0], params)
    requests = {f"o{i}": (p, SamplingParams(temperature=0.9, max_tokens=7)) for i, p in enumerate(PROMPTS)}
    requests["seeded"] = (PROMPTS[0], params)
    final, _ = run_to_completion(engine, requests)
    assert final["seeded"].outputs[0].token_ids == alone.outputs[0].token_ids
    other, _ = one(engine, PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=10, seed=99, ignore_eos=True))
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_samples(engine):
    out, stream = one(engine, PROMPTS[2], SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:  # the streamed deltas add up per sample
        assert sum((o.outputs[c.index].new_token_ids for o in stream), []) == c.token_ids
    g, _ = one(engine, PROMPTS[2], greedy(5, n=2))
    assert g.outputs[0].token_ids == g.outputs[1].token_ids


# ---- deadlines, aborts, errors --------------------------------------------------------------------
def test_deadline_finishes_with_partial_output(engine):
    engine.add_request("late", PROMPTS[0], greedy(200), deadline=time.monotonic() - 1)
    outs = engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in outs] == [("late", "deadline")]
    engine.add_request("d", PROMPTS[0], greedy(200), deadline=time.monotonic() + 3600)
    for _ in range(3):
        engine.step()
    engine.scheduler.groups["d"].deadline = time.monotonic()  # expire it mid-decode
    final = [o for o in engine.step() if o.finished]
    assert final[0].outputs[0].finish_reason == "deadline"
    assert len(final[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("when", ["waiting", "prefill", "decode"])
def test_abort_frees_blocks(when):
    eng = make_engine(max_num_batched_tokens=4)
    eng.add_request("a", PROMPTS[2], greedy(50))
    eng.add_request("b", PROMPTS[1], greedy(50))
    if when != "waiting":
        eng.step()  # first 4-token chunk of a's 19-token prompt; b still waits
        assert eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    if when == "decode":
        while not eng.states["a"].group.seqs[0].output_token_ids:
            eng.step()
    assert eng.abort_request("a") and eng.abort_request("b")
    assert not eng.abort_request("a")
    assert_all_blocks_free(eng)
    outs = eng.step()
    assert {o.request_id: o.outputs[0].finish_reason for o in outs} == {"a": "abort", "b": "abort"}
    assert not eng.has_unfinished_requests()


def test_step_exception_fails_batch_and_engine_keeps_serving(engine, monkeypatch):
    real = engine.runner.execute
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return real(batch)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    engine.add_request("bad", PROMPTS[0], greedy(3))
    outs = engine.step()
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "error"
    assert "simulated device fault" in outs[0].error
    out, _ = one(engine, PROMPTS[0], greedy(3))
    assert out.outputs[0].finish_reason == "length"


# ---- logprobs and metrics -------------------------------------------------------------------------
def test_logprobs_and_prompt_logprobs_match_log_softmax(engine):
    prompt = PROMPTS[4]
    out, _ = one(engine, prompt, greedy(3, logprobs=4, prompt_logprobs=2))
    comp = out.outputs[0]
    full = torch.log_softmax(full_forward_logits(engine.runner.model, prompt + comp.token_ids), -1)
    assert len(comp.logprobs) == 3
    for k, lp in enumerate(comp.logprobs):
        row = full[len(prompt) - 1 + k]
        assert lp.token_id == comp.token_ids[k]
        assert math.isclose(lp.logprob, row[lp.token_id].item(), abs_tol=1e-4)
        assert list(lp.top)[:4] == row.topk(4).indices.tolist()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        lp = out.prompt_logprobs[pos]
        assert lp.token_id == prompt[pos]
        assert math.isclose(lp.logprob, full[pos - 1, prompt[pos]].item(), abs_tol=1e-4)
        assert len(lp.top) in (2, 3)


def test_metrics_and_usage(engine):
    out, stream = one(engine, PROMPTS[0], greedy(5))
    m = out.metrics
    assert m.queue_time_s is not None and m.queue_time_s >= 0
    assert m.time_to_first_token_s >= m.queue_time_s
    assert m.mean_time_per_output_token_s > 0
    assert m.finished_time >= m.arrival_time
    assert [len(o.outputs[0].new_token_ids) for o in stream] == [1] * 5
    assert "".join(o.outputs[0].text_delta for o in stream) == out.outputs[0].text


# ---- validation -----------------------------------------------------------------------------------
def test_prompt_validation_names_the_field(engine):
    with pytest.raises(PromptError) as e:
        engine.add_request("v", [], greedy(1))
    assert e.value.field == "prompt"
    with pytest.raises(PromptError) as e:
        engine.add_request("v", [1] * engine.max_model_len, greedy(1))
    assert e.value.field == "prompt"
    with pytest.raises(PromptError) as e:
        engine.add_request("v", [1, engine.vocab_size], greedy(1))
    assert e.value.field == "token_ids"
    with pytest.raises(PromptError) as e:
        engine.add_request("v", [1, -2], greedy(1))
    assert e.value.field == "token_ids"
    with pytest.raises(SamplingParamsError) as e:
        engine.add_request("v", [1, 2], SamplingParams(stop_token_ids=[engine.vocab_size + 5]))
    assert e.value.field == "stop_token_ids"
    assert not engine.has_unfinished_requests()
