"""Seeded requests in the device-side sampled spec step (issue 17; engine/seeded_draws.py, engine/spec_sampled.py),
on whole engines through the eager twin of the spec graphs (tests/spec_rows_twin.py): the rejection sampler with
hashed uniforms keeps the target's distribution (2000 seeds, MTP on against MTP off, chi-square on tokens 2..4, on
the device step and on the host path); a seed gives the same tokens alone, beside other seeded or unseeded rows, in
other bucket sets, on the host path and after an engine restart; and the hashed draws at the level of the
rejection sampler (verify_sampled, sample_drafts) follow their distributions.

False-alarm rate: each chi-square rejects at p < ALPHA = 1e-3 (9 tests: <= 0.9%); the seeds are fixed (per request,
and torch.manual_seed for the MTP-off generators' unseeded neighbours), so the outcome is deterministic."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from longcat_service.engine.seeded_draws import ACCEPT, DRAFT, TARGET, RowSeeds
from longcat_service.engine.spec_sampled import StepUniforms, option_rows, sample_drafts, verify_sampled
from longcat_service.sampling_params import SamplingParams
from tests.mtp_checkpoint import write_mtp_checkpoint
from tests.test_spec_decode_stats import chi_square_p_value
from tests.test_spec_sampled import PROMPTS, run

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 1e-3
NUM_SEEDS = 2000


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_seeded")
    return {"partial": write_mtp_checkpoint(root / "partial", "partial", seed=1),
            "noisy": write_mtp_checkpoint(root / "noisy", "noisy", seed=5, lm_head_scale=4.0)}


def seeded(max_tokens: int, seed: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=kw.pop("temperature", 1.0), max_tokens=max_tokens, ignore_eos=True, seed=seed,
                          **kw)


# ---- the rejection sampler with hashed uniforms ------------------------------------------------------------------
def test_seeded_drafts_follow_q():
    q = torch.tensor([0.5, 0.3, 0.2, 0.0])
    n = 6000
    seeds = RowSeeds.build(list(range(n)), "cpu")
    u = seeds.uniform(torch.full((n,), 17), DRAFT)
    tok, _ = sample_drafts(q.log().expand(n, 4), torch.tensor(option_rows([SamplingParams(temperature=1.0)] * n)),
                           seeds.seeded, u)
    want = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(3))
    assert chi_square_p_value(Counter(tok.tolist()), Counter(want.tolist())) > ALPHA
    assert 3 not in tok.tolist()
    torch.manual_seed(0)
    again, _ = sample_drafts(q.log().expand(n, 4), torch.tensor(option_rows([SamplingParams(temperature=1.0)] * n)),
                             seeds.seeded, u)
    assert torch.equal(tok, again)  # the default generator plays no part


def test_seeded_rejection_sampling_emits_the_target_distribution():
    """As test_spec_sampled's unseeded case: k = 2, 20000 sequences, each with its own seed and start position."""
    n, v = 20000, 5
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0], [0.1, 0.1, 0.5, 0.2, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.1, 0.1]])
    gen = torch.Generator().manual_seed(4)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen) for j in range(2)], dim=1)
    seeds = RowSeeds.build([1000 + i for i in range(n)], "cpu")
    uniforms = StepUniforms.of(seeds, torch.randint(3, 500, (n,), generator=gen), 2)
    accepted, tokens = verify_sampled(p.expand(n, 3, v), q.expand(n, 2, v), drafts, torch.full((n,), 2),
                                      torch.ones(n, 3, dtype=torch.bool), uniforms)
    first = accepted >= 1
    for j, got in ((0, tokens[:, 0]), (1, tokens[first, 1])):
        want = torch.multinomial(p[j], got.shape[0], replacement=True, generator=gen)
        assert chi_square_p_value(Counter(got.tolist()), Counter(want.tolist())) > ALPHA, j
    assert 4 not in tokens[:, 0].tolist()
    assert abs(first.double().mean().item() - torch.minimum(p[0], q[0]).sum().item()) < 0.02
    torch.manual_seed(9)  # the default generator plays no part in seeded rows
    assert torch.equal(verify_sampled(p.expand(n, 3, v), q.expand(n, 2, v), drafts, torch.full((n,), 2),
                                      torch.ones(n, 3, dtype=torch.bool), uniforms)[1], tokens)


def test_step_uniforms_are_the_hash_at_each_draws_position():
    """StepUniforms (one hash call per device step) holds, per sequence, the acceptance uniform of each draft and the
    residual / bonus uniform of each verify token at the position they decide, and the draft uniforms of the
    positions the next drafts can take."""
    k, seeds = 2, RowSeeds.build([5, None, 2**64 - 1], "cpu")
    start = torch.tensor([10, 0, 300])
    u = StepUniforms.of(seeds, start, k)
    for r in (0, 2):
        for j in range(k):
            assert u.accept[r, j] == seeds.uniform(start + 1 + j, ACCEPT)[r]
        for j in range(k + 1):
            assert u.target[r, j] == seeds.uniform(start + 1 + j, TARGET)[r]
    count, step = torch.tensor([3, 0, 1]), 2  # the second draft after 3 (0, 1) emitted tokens
    want = seeds.uniform(start + count + step, DRAFT)
    assert torch.equal(u.draft(count + step)[[0, 2]], want[[0, 2]])
    assert u.seeded.tolist() == [True, False, True]


# ---- whole engines -----------------------------------------------------------------------------------------------
def tokens(final: dict, rid: str) -> list[list[int]]:
    return [c.token_ids for c in final[rid].outputs]


def test_seeded_rows_keep_the_target_distribution(ckpts):
    """2000 seeds, one prompt, temperature 1 with top-k 6 ("noisy" drafts, k = 2): tokens 2, 3 and 4 with MTP on
    (device step; host path) against MTP off (per-request generators) by a chi-square test of homogeneity. MTP on
    gives other tokens than MTP off for the same seed, and the device step the same as the host path."""
    requests = {f"r{i}": ([11, 12, 13], seeded(4, 10_000 + i, top_k=6)) for i in range(NUM_SEEDS)}
    # every prompt in the first step: the decode steps that follow are pure (the device step takes all of them)
    kw = dict(num_kv_blocks=4096, max_num_seqs=NUM_SEEDS, max_model_len=32, max_num_batched_tokens=4 * NUM_SEEDS)
    buckets = (1, 2, 4, 8, 16, 32, 64, NUM_SEEDS)
    off, _ = run(ckpts["noisy"], None, requests, **kw)
    on, twin = run(ckpts["noisy"], 2, requests, buckets=buckets, **kw)
    host, host_twin = run(ckpts["noisy"], 2, requests, buckets=buckets, fused=False, **kw)
    assert twin.calls["sampled"] > 0 and twin.calls["verify"] == 0 and twin.calls["seeded_rows"] >= 2 * NUM_SEEDS
    assert host_twin.calls["sampled"] == 0 and host_twin.calls["verify"] > 0
    for final in (on, host):
        for pos in (1, 2, 3):
            p = chi_square_p_value(Counter(off[r].outputs[0].token_ids[pos] for r in requests),
                                   Counter(final[r].outputs[0].token_ids[pos] for r in requests))
            assert p > ALPHA, (pos, p)
    differ = sum(tokens(off, r) != tokens(on, r) for r in requests)
    assert differ > NUM_SEEDS // 2
    # the host path computes p and q with Sampler.probabilities, the device step with plain_probabilities (equal to
    # ~1e-7): a decision that close to its threshold may go the other way, nothing else
    same = sum(tokens(host, r) == tokens(on, r) for r in requests)
    assert same >= 0.99 * NUM_SEEDS, same
    drafts = sum(o.metrics.num_draft_tokens for o in on.values())
    assert 0.1 < sum(o.metrics.num_accepted_tokens for o in on.values()) / drafts < 0.95


@pytest.mark.parametrize("k", [1, 3])
def test_same_seed_same_tokens_in_any_batch(ckpts, k):
    """A seeded request (n = 2: seeds s and s + 1) gives the same tokens alone, beside other seeded requests, beside
    unseeded ones (another global torch seed), in other bucket sets (padded to 8 or 16), on the host path (every
    step: a penalised neighbour) and in a fresh engine; another seed gives other tokens."""
    path = ckpts["partial"]
    params = seeded(16, 1234, top_p=0.9, n=2)
    x = {"x": (PROMPTS[0], params)}
    others_seeded = {f"s{i}": (p, seeded(10 + i, 50 + i, top_k=20)) for i, p in enumerate(PROMPTS[1:])}
    others_unseeded = {f"u{i}": (p, SamplingParams(temperature=0.8, max_tokens=12 + i, ignore_eos=True))
                       for i, p in enumerate(PROMPTS[1:])}
    penalised = {"pen": (PROMPTS[1], SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True,
                                                    repetition_penalty=1.2))}
    alone, twin = run(path, k, x)
    want = tokens(alone, "x")
    assert twin.calls["seeded_rows"] > 0 and twin.calls["verify"] == 0
    assert len(want) == 2 and want[0] != want[1] and all(len(t) == 16 for t in want)
    cases = {"restart": dict(requests=x, seed=7), "seeded": dict(requests=x | others_seeded),
             "unseeded": dict(requests=x | others_unseeded, seed=3),
             "bucket 8": dict(requests=x | others_seeded, buckets=(8,)),
             "bucket 16": dict(requests=x | others_unseeded, buckets=(16,)),
             "host path": dict(requests=x | penalised)}
    for name, case in cases.items():
        final, t = run(path, k, case.pop("requests"), **case)
        assert tokens(final, "x") == want, name
        if name == "host path":  # the penalised neighbour outlives x: every step of x verified on the host
            assert t.calls["verify"] > 0 and t.calls["seeded_rows"] == 0
        else:
            assert t.calls["seeded_rows"] > 0 and t.calls["verify"] == 0, name
    other, _ = run(path, k, {"x": (PROMPTS[0], seeded(16, 1235, top_p=0.9, n=2))})
    assert tokens(other, "x")[0] == want[1]  # seed 1235's first sequence is seed 1234's second (seed + index)
    assert tokens(other, "x")[1] != want[1]
