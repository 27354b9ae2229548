"""MTP speculative decoding in the engine: greedy tokens and logprobs equal MTP off (k = 1, 2, 3; drafts never,
always and sometimes accepted, in one batch too), every request option, stops and lengths inside an accepted
run, abort, preemption, prefix caching, n > 1, seeds, and the sampled distribution (chi-square)."""

from __future__ import annotations

import pytest
import torch

from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread

PROMPTS = [
    [5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23],
    [101, 102],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [60, 61, 62, 63, 64, 65, 66],
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return {mode: write_mtp_checkpoint(root / mode, mode, seed=1) for mode in ("random", "exact", "partial")}


@pytest.fixture(scope="module")
def off_partial_30(ckpts):
    off, _ = run(ckpts["partial"], None, {f"r{i}": (prompt, greedy(30)) for i, prompt in enumerate(PROMPTS)})
    return off


@pytest.fixture(scope="module")
def off_greedy(ckpts):
    """MTP-off outputs of the parametrized greedy test, per model."""
    requests = {f"r{i}": (p, greedy(18)) for i, p in enumerate(PROMPTS)}
    return {mode: run(path, None, requests)[0] for mode, path in ckpts.items()}


def spec(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, **kw)


def run(path, k: int | None, requests: dict, **engine_kw):
    engine = make_engine(model=path, speculative_config=spec(k) if k else None, **engine_kw)
    final, _ = run_to_completion(engine, requests)
    assert_all_blocks_free(engine)
    return final, engine


def assert_same(off: dict, on: dict) -> None:
    assert off.keys() == on.keys()
    for rid in off:
        for a, b in zip(off[rid].outputs, on[rid].outputs, strict=True):
            assert a.token_ids == b.token_ids, rid
            assert a.finish_reason == b.finish_reason and a.stop_reason == b.stop_reason, rid
            assert (a.logprobs is None) == (b.logprobs is None)
            for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert x.token_id == y.token_id
                assert abs(x.logprob - y.logprob) < 1e-4
                assert x.top.keys() == y.top.keys()


def accepted(final: dict) -> float:
    drafts = sum(o.metrics.num_draft_tokens for o in final.values())
    return sum(o.metrics.num_accepted_tokens for o in final.values()) / drafts


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["random", "exact", "partial"])
def test_greedy_tokens_and_logprobs_equal_mtp_off(ckpts, off_greedy, mode, k):
    requests = {f"r{i}": (p, greedy(18)) for i, p in enumerate(PROMPTS)}
    on, _ = run(ckpts[mode], k, requests)
    assert_same(off_greedy[mode], on)
    rate = accepted(on)
    if mode == "random":
        assert rate < 0.2
    elif mode == "exact":
        assert rate == 1.0
        assert all(o.metrics.spec_mean_accepted_length > k for o in on.values())
    else:  # some drafts accepted, some not: both paths ran in the same batches
        assert 0.1 < rate < 0.9


def test_sampling_options_greedy_equal_mtp_off(ckpts):
    """Penalties (counting accepted drafts), logit_bias, min_tokens with a stop id, on a model whose drafts are
    often right: the draft distribution and the verification both apply them."""
    p = ckpts["partial"]
    requests = {
        "pen": (PROMPTS[0], greedy(20, repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4)),
        "bias": (PROMPTS[1], greedy(20, logit_bias={7: 3.0, 9: -50.0})),
        "min": (PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=20, min_tokens=12, stop_token_ids=[5, 6, 7],
                                           logprobs=0)),
        "plain": (PROMPTS[3], greedy(20)),
    }
    off, _ = run(p, None, requests)
    for k in (1, 3):
        on, _ = run(p, k, requests)
        assert_same(off, on)


def test_stop_id_and_max_tokens_inside_an_accepted_run(ckpts):
    p = ckpts["exact"]
    base = {f"r{i}": (prompt, greedy(30)) for i, prompt in enumerate(PROMPTS)}
    off, _ = run(p, None, base)
    requests = {}
    for i, prompt in enumerate(PROMPTS):  # stop on the 6th token, a length limit of 5 (inside a k=3 run)
        stop = off[f"r{i}"].outputs[0].token_ids[5]
        requests[f"s{i}"] = (prompt, greedy(30, stop_token_ids=[stop]))
        requests[f"m{i}"] = (prompt, greedy(5))
    off, _ = run(p, None, requests)
    on, engine = run(p, 3, requests)
    assert_same(off, on)
    assert all(len(on[f"m{i}"].outputs[0].token_ids) == 5 for i in range(len(PROMPTS)))
    assert any(on[f"s{i}"].outputs[0].finish_reason == "stop" for i in range(len(PROMPTS)))


def test_abort_mid_run_frees_every_block(ckpts, off_partial_30):
    p = ckpts["partial"]
    requests = {f"r{i}": (prompt, greedy(30)) for i, prompt in enumerate(PROMPTS)}
    off = off_partial_30
    engine = make_engine(model=p, speculative_config=spec(2))
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    final = {}
    for step in range(200):
        if step == 3:
            assert engine.abort_request("r1")
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert final["r1"].outputs[0].finish_reason == "abort"
    assert final["r1"].outputs[0].token_ids == off["r1"].outputs[0].token_ids[: len(final["r1"].outputs[0].token_ids)]
    assert_same({r: off[r] for r in final if r != "r1"}, {r: final[r] for r in final if r != "r1"})
    assert_all_blocks_free(engine)


def test_preemption_and_small_budget_equal_mtp_off(ckpts, off_partial_30):
    p = ckpts["partial"]
    requests = {f"r{i}": (prompt, greedy(30)) for i, prompt in enumerate(PROMPTS)}
    engine = make_engine(model=p, speculative_config=spec(3), num_kv_blocks=16, max_model_len=64)
    preempt = engine.scheduler._preempt
    count = []
    engine.scheduler._preempt = lambda seq: (count.append(seq), preempt(seq))
    on, _ = run_to_completion(engine, requests)
    assert count  # the small cache did preempt
    assert_all_blocks_free(engine)
    assert_same(off_partial_30, on)
    on, _ = run(p, 2, requests, max_num_batched_tokens=5)  # drafts cut to the token budget, chunked prompts
    assert_same(off_partial_30, on)


def test_prefix_cache_hit_and_n_samples_equal_mtp_off(ckpts):
    p = ckpts["partial"]
    shared = list(range(20, 38))
    first = {"a": (shared + [3], greedy(12))}
    second = {"b": (shared + [4, 5], greedy(12)), "c": (shared[:9], SamplingParams(
        n=3, temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1))}
    results = []
    for k in (None, 2):
        engine = make_engine(model=p, speculative_config=spec(k) if k else None)
        out1, _ = run_to_completion(engine, first)
        cached = sorted(engine.block_manager.cached.values())
        before = [c[cached].clone() for c in engine.runner.kv_caches]
        out2, _ = run_to_completion(engine, second)
        assert out2["b"].num_cached_tokens > 0
        # the recomputed last cached token (MTP needs its hidden state) never rewrites the shared block
        assert all(torch.equal(b, c[cached]) for b, c in zip(before, engine.runner.kv_caches, strict=True))
        if k:  # ... its entry went to the scratch block past the pool (bitwise-equal values on CPU hide a rewrite)
            assert engine.runner.kv_caches[0][engine.runner.num_blocks].abs().sum() > 0
        assert_all_blocks_free(engine)
        results.append({**out1, **out2})
    assert_same(results[0], results[1])


def test_seeded_sampling_is_deterministic_and_batch_independent(ckpts):
    p = ckpts["partial"]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, ignore_eos=True, seed=1234, n=2)
    alone, _ = run(p, 2, {"x": (PROMPTS[0], params)})
    crowd = {"x": (PROMPTS[0], params)}
    crowd.update({f"o{i}": (pr, SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True))
                  for i, pr in enumerate(PROMPTS)})
    batched, _ = run(p, 2, crowd)
    assert [c.token_ids for c in alone["x"].outputs] == [c.token_ids for c in batched["x"].outputs]
    other, _ = run(p, 2, {"x": (PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16,
                                                           ignore_eos=True, seed=99, n=2))})
    assert [c.token_ids for c in alone["x"].outputs] != [c.token_ids for c in other["x"].outputs]


def test_request_metrics_report_acceptance(ckpts):
    on, _ = run(ckpts["exact"], 2, {"r": (PROMPTS[0], greedy(13))})
    m = on["r"].metrics
    assert m.num_draft_tokens > 0 and m.num_accepted_tokens == m.num_draft_tokens
    assert m.spec_acceptance_rate == 1.0 and m.spec_mean_accepted_length == 3.0
    off, _ = run(ckpts["exact"], None, {"r": (PROMPTS[0], greedy(13))})
    assert off["r"].metrics.spec_acceptance_rate is None and off["r"].metrics.num_draft_tokens == 0


def test_stop_string_inside_an_accepted_run(ckpts, tmp_path):
    """A stop string completed by a token in the middle of an accepted run: text cut, later tokens dropped."""
    import shutil

    from longcat_service.demo_model import ensure_demo_model

    path = tmp_path / "with_tokenizer"
    shutil.copytree(ckpts["exact"], path)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a byte-level vocabulary covering ids < 128
        shutil.copy(ensure_demo_model() / name, path / name)
    base = {f"r{i}": (prompt, greedy(24, skip_special_tokens=False)) for i, prompt in enumerate(PROMPTS)}
    off, _ = run(path, None, base)
    requests = {}
    for i, prompt in enumerate(PROMPTS):
        text = off[f"r{i}"].outputs[0].text
        if len(text) >= 8:
            requests[f"s{i}"] = (prompt, greedy(24, stop=[text[5:7]], skip_special_tokens=False))
    assert requests
    off, _ = run(path, None, requests)
    on, _ = run(path, 3, requests)
    assert_same(off, on)
    for rid in requests:
        assert on[rid].outputs[0].text == off[rid].outputs[0].text
        assert on[rid].outputs[0].finish_reason == "stop"


def test_sampled_logprobs_are_the_targets_for_every_emitted_token(ckpts):
    """Accepted drafts, corrections and bonus tokens alike carry the target's raw logprob (and top-n) at their
    position, as a full recompute of the final sequence gives them."""
    from tests.engine_utils import full_forward_logits

    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=14, ignore_eos=True, seed=3, logprobs=3, n=2)
    on, engine = run(ckpts["partial"], 3, {"r": (PROMPTS[0], params), "s": (PROMPTS[2], params)})
    assert 0 < accepted(on) < 1
    for rid, prompt in (("r", PROMPTS[0]), ("s", PROMPTS[2])):
        for out in on[rid].outputs:
            ref = torch.log_softmax(full_forward_logits(engine.runner.model, prompt + out.token_ids), dim=-1)
            for j, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
                row = ref[len(prompt) - 1 + j]
                assert lp.token_id == tok and abs(lp.logprob - float(row[tok])) < 1e-4
                top = row.topk(3)
                assert set(top.indices.tolist()) <= set(lp.top)


def test_trained_demo_model_mtp_head_drafts_well_and_changes_nothing():
    """The shipped demo checkpoint's trained MTP head (same conventions as model/mtp.py): greedy output equal to
    MTP off, and most drafts accepted (its trainer measured 71% greedy agreement on held-out text)."""
    from longcat_service.demo import DEMO_CHECKPOINT_DIR

    texts = ["And God said", "Hello, how are you?", "The king of Israel"]
    outs = {}
    for k in (None, 1, 3):
        engine = make_engine(model=str(DEMO_CHECKPOINT_DIR), max_model_len=None, num_kv_blocks=256,
                             speculative_config=spec(k) if k else None)
        requests = {t: (engine.tokenizer.encode(t, add_special_tokens=True), greedy(40)) for t in texts}
        outs[k], _ = run_to_completion(engine, requests)
        assert_all_blocks_free(engine)
    assert_same(outs[None], outs[1])
    assert_same(outs[None], outs[3])
    assert accepted(outs[1]) > 0.6


def test_fp8_target_and_mtp_greedy_equal_mtp_off(ckpts):
    """quantization='fp8': the MTP block's linears are block-FP8 too; greedy output still equals MTP off."""
    requests = {f"r{i}": (p, greedy(12)) for i, p in enumerate(PROMPTS)}
    off, _ = run(ckpts["partial"], None, requests, quantization="fp8")
    on, engine = run(ckpts["partial"], 2, requests, quantization="fp8")
    from longcat_service.layers.fp8_linear import Fp8Linear

    assert isinstance(engine.runner.model.mtp.eh_proj, Fp8Linear)
    assert_same(off, on)
    assert accepted(on) > 0.1


def test_non_finite_logits_fail_the_request_and_the_engine_goes_on(ckpts):
    """As without MTP (the sampler's rule): a request whose logits are not finite fails with an error, its blocks
    come back, and the next request is served as MTP off serves it."""
    p = ckpts["partial"]
    requests = {"ok": (PROMPTS[0], greedy(10))}
    off, _ = run(p, None, requests)
    engine = make_engine(model=p, speculative_config=spec(2))
    model = engine.runner.model
    model.compute_logits = lambda h: torch.full((h.shape[0], 128), float("nan"))  # instance attribute
    engine.add_request("bad", [5, 6, 7], greedy(10))
    bad = [o for _ in range(5) for o in engine.step() if o.finished]
    assert bad and bad[0].outputs[0].finish_reason == "error" and "not finite" in bad[0].error
    del model.compute_logits  # the class method again
    final, _ = run_to_completion(engine, requests)
    assert_all_blocks_free(engine)
    assert_same(off, final)


def test_overlapped_spec_steps_equal_sequential_and_an_abort_in_flight_leaves_nothing(ckpts, off_partial_30):
    """overlap_steps: each spec step is collected (verified, drafted) by the next engine call, after the host work
    of the one before. Outputs equal the sequential engine; a request aborted while its step is in flight gets
    no token from it, and no block or draft distribution outlives the run."""
    p = ckpts["partial"]
    requests = {f"r{i}": (prompt, greedy(30)) for i, prompt in enumerate(PROMPTS)}
    sequential, _ = run(p, 2, requests, overlap_steps=False)
    assert_same(off_partial_30, sequential)
    sampled = SamplingParams(temperature=0.9, max_tokens=30, ignore_eos=True, seed=3)
    requests["s"] = (PROMPTS[0], sampled)
    engine = make_engine(model=p, speculative_config=spec(2))
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    final, aborted_in_flight = {}, False
    for step in range(200):
        if step == 4:
            assert engine._inflight is not None  # the step launched by the last call is not collected yet
            assert any(s.seq.request_id == "r1" for s in engine._inflight.batch)
            tokens_before = len(engine.states["r1"].group.seqs[0].output_token_ids)
            aborted_in_flight = engine.abort_request("r1") and engine.abort_request("s")  # s: sampled drafts
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert aborted_in_flight and final["r1"].outputs[0].finish_reason == "abort"
    assert len(final["r1"].outputs[0].token_ids) == tokens_before
    assert_same({r: off_partial_30[r] for r in off_partial_30 if r != "r1"},
                {r: final[r] for r in off_partial_30 if r != "r1"})
    assert final["s"].outputs[0].finish_reason == "abort"
    assert engine.runner.spec_decoder.draft_probs == {}  # s's in-flight step stored no draft distribution
    assert_all_blocks_free(engine)


def test_start_up_warm_up_with_mtp_leaves_the_engine_unchanged(ckpts, off_partial_30, monkeypatch):
    """The warm-up (run at start-up on CUDA) also runs eager spec steps: prompts, a verify of k drafts beside a
    prompt, MTP passes and drafting on borrowed blocks (k positions further than the prompts). Every position it
    computes (target and MTP forwards) lies inside the model's context: on CUDA cos/sin are gathered from a table of
    max_position_embeddings rows (an index past it is a device-side assert; the CPU path computes any position), and
    its longest prompt fills the whole context (no drafts past it). Afterwards every block is free, no draft
    distribution is left, and outputs are unchanged."""
    from longcat_service.layers.rotary import RotaryEmbedding

    engine = make_engine(model=ckpts["partial"], speculative_config=spec(3))
    seen: list[int] = []
    cos_sin = RotaryEmbedding.cos_sin

    def recording_cos_sin(self, positions, dtype):
        seen.append(int(positions.max()))
        return cos_sin(self, positions, dtype)

    monkeypatch.setattr(RotaryEmbedding, "cos_sin", recording_cos_sin)
    free_before = engine.block_manager.num_free_blocks
    assert engine.runner.warm_up_prefill()
    max_pos = engine.runner.config.max_position_embeddings
    assert max(seen) == max_pos - 1  # the longest prompt reaches the end of the context, never past it
    monkeypatch.undo()
    assert engine.block_manager.num_free_blocks == free_before
    assert engine.runner.spec_decoder.draft_probs == {}
    final, _ = run_to_completion(engine, {f"r{i}": (prompt, greedy(30)) for i, prompt in enumerate(PROMPTS)})
    assert_same(off_partial_30, final)
    assert_all_blocks_free(engine)
