"""The device-side spec step for plain-sampled rows (engine/spec_sampled.py, issue 17): the predicate, the target
distribution against Sampler.probabilities, the rejection sampler's output distribution on hand-made p / q, and
whole engines (through the eager twin of the spec graphs, tests/spec_rows_twin.py) whose batches of plain-greedy and
plain-sampled rows take the device-side step: greedy rows equal MTP off, sampled rows keep the target's
distribution (chi-square against MTP off), ineligible rows send their batch to the host path, stop / length limits
inside an accepted run, blocks freed, acceptance metrics filled.

False-alarm rate of the statistical tests: each chi-square rejects at p < ALPHA = 1e-3 (5 in all: 0.5%); the
acceptance-rate comparison of the engine test allows ~3 standard errors (0.3%); the rejection test's acceptance-rate
bound 0.02 is ~6 standard errors. Seeds are fixed (torch.manual_seed: the device step draws from torch's default
generator), so the outcome is deterministic."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from longcat_service.engine.sampler import Sampler, SamplingRow
from longcat_service.engine.spec_sampled import option_rows, plain_probabilities, sample_drafts, verify_sampled
from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint
from tests.spec_rows_twin import EagerSpecRows, install_uncaptured_spec_graphs, interpreted_triton_only
from tests.test_spec_decode_stats import chi_square_p_value

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 2
ALPHA = 1e-3

# ---- the predicate -----------------------------------------------------------------------------------------------
SAMPLED = [
    (dict(temperature=1.0), 0),
    (dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05), 0),
    (dict(temperature=1.0, min_tokens=3), 3),  # min_tokens reached
    (dict(temperature=1.0, min_tokens=3, ignore_eos=True), 0),  # nothing to mask
    (dict(temperature=1.0, seed=3), 0),  # hashed uniforms (engine/seeded_draws.py)
    (dict(temperature=0.8, top_k=5, seed=2**64 - 1), 0),
]
NOT_SAMPLED = [
    (dict(temperature=0.0), 0),  # greedy: plain_greedy's
    (dict(temperature=1.0, logprobs=0), 0),
    (dict(temperature=1.0, logit_bias={1: 1.0}), 0),
    (dict(temperature=1.0, repetition_penalty=1.1), 0),
    (dict(temperature=1.0, frequency_penalty=0.1), 0),
    (dict(temperature=1.0, presence_penalty=0.1), 0),
    (dict(temperature=1.0, min_tokens=3), 2),
]


@pytest.mark.parametrize(("kw", "outputs"), SAMPLED)
def test_plain_sampled_rows(kw, outputs):
    assert Sampler(16, EOS, "cpu").plain_sampled(SamplingParams(**kw), outputs)


@pytest.mark.parametrize(("kw", "outputs"), NOT_SAMPLED)
def test_other_rows_are_not_plain_sampled(kw, outputs):
    assert not Sampler(16, EOS, "cpu").plain_sampled(SamplingParams(**kw), outputs)


# ---- the target distribution --------------------------------------------------------------------------------------
OPTION_SETS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.5, top_k=3),
               dict(temperature=1.3, top_p=0.6), dict(temperature=0.9, min_p=0.2),
               dict(temperature=0.8, top_k=7, top_p=0.8, min_p=0.05), dict(temperature=1.0, top_k=0, top_p=1.0),
               dict(temperature=2.0, top_k=40), dict(temperature=1e-4), dict(temperature=1.0, top_k=1)]


def test_plain_probabilities_equal_the_samplers():
    """Row by row against Sampler.probabilities (one row per call: the sampler's own option skipping applies), with
    ties, -inf entries and non-finite rows."""
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(32, EOS, "cpu")
    params = [SamplingParams(**kw) for kw in OPTION_SETS]
    logits = torch.randn(len(params), 32, generator=gen) * 2
    logits[2, :4] = logits[2].max() + 1.0  # ties at the top-k boundary
    logits[3, 5] = float("-inf")
    bad = logits.clone()
    bad[0, 3], bad[1, 4], bad[4] = float("nan"), float("inf"), float("-inf")
    for lg in (logits, bad):
        probs, finite = plain_probabilities(lg, torch.tensor(option_rows(params)))
        for i, p in enumerate(params):
            want = sampler.probabilities(lg[i : i + 1], [SamplingRow(p, [1], [])])[0]
            torch.testing.assert_close(probs[i], want, atol=1e-6, rtol=0, equal_nan=True)
            assert bool(finite[i]) == bool(torch.isfinite(lg[i].max()))


def test_drafts_top_k_1_and_greedy_rows_are_the_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=gen)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=1)] * 32
    torch.manual_seed(0)
    tok, q = sample_drafts(logits, torch.tensor(option_rows(params)))
    assert torch.equal(tok, logits.argmax(dim=-1))
    assert torch.equal(q, torch.zeros_like(q).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0))
    logits[5] = float("nan")
    assert sample_drafts(logits, torch.tensor(option_rows(params)))[0][5] == 0


def test_sampled_drafts_follow_q():
    q = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = q.log().expand(6000, 4)
    torch.manual_seed(2)
    tok, dist = sample_drafts(logits, torch.tensor(option_rows([SamplingParams(temperature=1.0)] * 6000)))
    torch.testing.assert_close(dist[0], q)
    want = torch.multinomial(q, 6000, replacement=True, generator=torch.Generator().manual_seed(3))
    assert chi_square_p_value(Counter(tok.tolist()), Counter(want.tolist())) > ALPHA
    assert 3 not in tok.tolist()


def test_rejection_sampling_emits_the_target_distribution():
    """k = 2, 20000 sequences: drafts drawn from q, verified against p; the first emitted token follows p_0, the
    second (where emitted) p_1 (here independent of the first token); the accepted count is what
    Leviathan's rule gives: P(first accepted) = sum min(p_0, q_0)."""
    n, v = 20000, 5
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0], [0.1, 0.1, 0.5, 0.2, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.1, 0.1]])
    gen = torch.Generator().manual_seed(4)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen) for j in range(2)], dim=1)
    torch.manual_seed(5)
    accepted, tokens = verify_sampled(p.expand(n, 3, v), q.expand(n, 2, v), drafts, torch.full((n,), 2),
                                      torch.ones(n, 3, dtype=torch.bool))
    first = accepted >= 1
    # token 1 is emitted only after an accepted draft 0; p_1 does not depend on that token, so it follows p_1
    for j, got in ((0, tokens[:, 0]), (1, tokens[first, 1])):
        want = torch.multinomial(p[j], got.shape[0], replacement=True, generator=gen)
        assert chi_square_p_value(Counter(got.tolist()), Counter(want.tolist())) > ALPHA, j
    assert 4 not in tokens[:, 0].tolist()  # p_0(4) = 0: never emitted, not even as an accepted draft
    rate = (accepted >= 1).double().mean().item()
    assert abs(rate - torch.minimum(p[0], q[0]).sum().item()) < 0.02
    # accepted drafts are the drafts
    assert torch.equal(tokens[first, 0], drafts[first, 0])


def test_rejection_sampling_masks_padding_and_non_finite_rows():
    p = torch.tensor([[[0.0, 1.0, 0.0]] * 3] * 2)
    q = torch.full((2, 2, 3), float("nan"))  # never read past the drafts
    q[0, 0] = torch.tensor([0.0, 1.0, 0.0])
    drafts = torch.tensor([[1, 1], [1, 1]])
    finite = torch.ones(2, 3, dtype=torch.bool)
    finite[1, 0] = False
    accepted, tokens = verify_sampled(p, q, drafts, torch.tensor([1, 0]), finite)
    assert accepted.tolist() == [1, 0]  # seq 0: its one draft (p = q = point mass); seq 1: no draft
    assert tokens[0, :2].tolist() == [1, 1] and tokens[1, 0].item() == 1


# ---- whole engines ------------------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 26)), [60, 61, 62, 63],
           [90, 3, 3, 8], [44], [120, 121, 122]]
BUCKETS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_sampled")
    return {mode: write_mtp_checkpoint(root / mode, mode, seed=1) for mode in ("partial", "noisy")}


def run(path, k: int | None, requests: dict, seed: int = 0, buckets=BUCKETS, fused: bool = True, **engine_kw):
    engine = make_engine(model=path, speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None,
                         **engine_kw)
    twin = None
    if k:
        twin = engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, k, buckets)
        engine.runner.spec_decoder.fuse_sampled = fused
    torch.manual_seed(seed)
    final, _ = run_to_completion(engine, requests)
    assert_all_blocks_free(engine)
    assert engine.runner.spec_decoder is None or engine.runner.spec_decoder.draft_probs == {}
    return final, twin


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def sampled(max_tokens, **kw):
    return SamplingParams(temperature=kw.pop("temperature", 1.0), max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.mark.parametrize("k", [1, 2])
def test_mixed_batches_take_the_device_step_and_greedy_rows_equal_mtp_off(ckpts, k):
    requests = {f"g{i}": (p, greedy(8 + 2 * i)) for i, p in enumerate(PROMPTS[:4])}
    requests |= {f"s{i}": (p, sampled(10, top_k=8, top_p=0.9)) for i, p in enumerate(PROMPTS[4:])}
    off, _ = run(ckpts["partial"], None, requests)
    on, twin = run(ckpts["partial"], k, requests)
    assert twin.calls["sampled"] > 0 and twin.calls["verify"] == 0 and twin.calls["greedy"] > 0  # greedy: at the end
    for rid in requests:
        a, b = off[rid].outputs[0], on[rid].outputs[0]
        assert len(b.token_ids) == requests[rid][1].max_tokens
        assert all(0 <= t < 128 for t in b.token_ids)
        if rid.startswith("g"):
            assert a.token_ids == b.token_ids, rid
    drafts = sum(o.metrics.num_draft_tokens for o in on.values())
    accepted = sum(o.metrics.num_accepted_tokens for o in on.values())
    assert drafts > 0 and 0 < accepted < drafts


def test_a_batch_with_a_penalised_row_takes_the_host_path(ckpts):
    requests = {"s": (PROMPTS[0], sampled(12)), "g": (PROMPTS[1], greedy(12)),
                "seeded": (PROMPTS[2], sampled(14, seed=9)), "pen": (PROMPTS[3], sampled(6, repetition_penalty=1.2))}
    on, twin = run(ckpts["partial"], 2, requests)
    off, _ = run(ckpts["partial"], None, requests)
    assert twin.calls["verify"] > 0 and twin.calls["sampled"] > 0  # the host path, then (pen done) the device step
    assert twin.calls["seeded_rows"] > 0
    assert on["g"].outputs[0].token_ids == off["g"].outputs[0].token_ids
    # a seeded row's tokens depend neither on the engine's randomness nor on which path verified which step
    alone, alone_twin = run(ckpts["partial"], 2, {"seeded": requests["seeded"]}, seed=1)
    assert alone_twin.calls["verify"] == 0
    assert on["seeded"].outputs[0].token_ids == alone["seeded"].outputs[0].token_ids


def test_stop_ids_and_max_tokens_inside_an_accepted_run(ckpts):
    """top_k = 1 sampling is the argmax: the sampled step must give MTP off's greedy tokens, stop ids and lengths."""
    base, _ = run(ckpts["partial"], None, {f"r{i}": (p, greedy(20)) for i, p in enumerate(PROMPTS[:4])})
    requests = {}
    for i, p in enumerate(PROMPTS[:4]):
        requests[f"s{i}"] = (p, sampled(20, top_k=1, stop_token_ids=[base[f"r{i}"].outputs[0].token_ids[5]]))
        requests[f"m{i}"] = (p, sampled(5, top_k=1))
    on, twin = run(ckpts["partial"], 3, requests)
    assert twin.calls["sampled"] > 0 and twin.calls["verify"] == 0
    for i in range(4):
        want = base[f"r{i}"].outputs[0].token_ids
        assert on[f"m{i}"].outputs[0].token_ids == want[:5]
        s = on[f"s{i}"].outputs[0]
        assert s.finish_reason == "stop" and s.token_ids == want[: len(s.token_ids)]


NUM_SAMPLES = 2000


def test_sampled_rows_keep_the_target_distribution(ckpts):
    """2000 unseeded requests (one prompt) with MTP on (k = 2, noisy drafts) against MTP off: tokens 2 and 3 by a
    chi-square test of homogeneity (torch.manual_seed fixes the draws)."""
    requests = {f"r{i}": ([11, 12, 13], sampled(3, top_k=6, top_p=0.9)) for i in range(NUM_SAMPLES)}
    kw = dict(num_kv_blocks=4096, max_num_seqs=NUM_SAMPLES, max_model_len=32)
    off, _ = run(ckpts["noisy"], None, requests, **kw)
    on, twin = run(ckpts["noisy"], 2, requests, buckets=(1, 2, 4, 8, 16, 32, 64, NUM_SAMPLES), **kw)
    assert twin.calls["sampled"] > 0 and twin.calls["verify"] == 0
    for pos in (1, 2):
        p = chi_square_p_value(Counter(off[r].outputs[0].token_ids[pos] for r in requests),
                               Counter(on[r].outputs[0].token_ids[pos] for r in requests))
        assert p > ALPHA, (pos, p)
    # the stored draft distributions reach the device step (the twin checks each loaded q gave its draft a positive
    # probability) and its acceptance rate is the host-verified path's: ~2000 drafts each, 0.045 is ~3 standard
    # errors of the difference (a point mass in place of q would still be exact, but accept less)
    host, host_twin = run(ckpts["noisy"], 2, requests, buckets=(1, 2, 4, 8, 16, 32, 64, NUM_SAMPLES), fused=False,
                          **kw)
    assert host_twin.calls["sampled"] == 0 and host_twin.calls["verify"] > 0
    rates = []
    for final in (on, host):
        drafts = sum(o.metrics.num_draft_tokens for o in final.values())
        rates.append(sum(o.metrics.num_accepted_tokens for o in final.values()) / drafts)
    assert 0.1 < rates[0] < 0.95 and abs(rates[0] - rates[1]) < 0.045, rates
    assert twin.calls["q_checked"] > 200  # (most decode steps share their batch with prompt chunks: eager)


@pytest.mark.slow
@interpreted_triton_only
def test_the_production_graph_runner_uncaptured_runs_sampled_steps(ckpts, monkeypatch):
    """SpecGraphRunner itself (its static buffers, the Triton decode kernels interpreted, no capture) runs the
    sampled steps of a batch of a greedy row and a seeded top_k = 1 sampled row (its seed through the static seed
    buffer): every token equals greedy MTP off."""
    from longcat_service.engine.seeded_draws import seed_keys

    p = ckpts["partial"]
    off, _ = run(p, None, {"a": (PROMPTS[0], greedy(5)), "b": (PROMPTS[1], greedy(3))})
    engine = make_engine(model=p, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    r = engine.runner
    graphs = install_uncaptured_spec_graphs(engine, monkeypatch, 2)
    sizes = []
    sampled_step = graphs.sampled_step
    monkeypatch.setattr(graphs, "sampled_step", lambda *a: (sizes.append(len(a[0])), sampled_step(*a))[1])
    on, _ = run_to_completion(engine, {"a": (PROMPTS[0], sampled(5, top_k=1, seed=3)), "b": (PROMPTS[1], greedy(3))})
    assert_all_blocks_free(engine)
    assert r.spec_decoder.draft_probs == {}
    for rid in ("a", "b"):
        assert on[rid].outputs[0].token_ids == off[rid].outputs[0].token_ids
    assert 2 in sizes and not graphs.use_graphs
    assert graphs.sample_seeds[:, 0].tolist() == [1, *seed_keys(3)]  # row a: seed 3 + index 0
