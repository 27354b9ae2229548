"""MTP speculative decoding samples exactly the target's distribution: the 2nd, 3rd and 4th output tokens of
2000 seeded requests with MTP on (k = 2, drafts from a distribution near the target's, accepted ~2/3 of the
time) against 2000
with MTP off, by a chi-square test of homogeneity per position.

False-alarm rate: each test rejects at p < 0.001, so under the null (correct rejection sampling) a run fails
with probability <= 3 x 0.001 per sampling setting, 0.6% for both; the seeds are fixed, so the outcome is
deterministic (it does not flake). Bins whose pooled count is below 10 are merged into one.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread

NUM_SEEDS = 2000
ALPHA = 1e-3
PROMPT = [11, 12, 13]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_mtp_checkpoint(tmp_path_factory.mktemp("stats"), "noisy", seed=5, lm_head_scale=4.0)


def sample(path, k: int | None, **options) -> list[list[int]]:
    engine = make_engine(model=path, speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None,
                         num_kv_blocks=2048, max_num_seqs=256, max_model_len=64)
    requests = {f"s{i}": (PROMPT, SamplingParams(max_tokens=4, ignore_eos=True, seed=10_000 + i, **options))
                for i in range(NUM_SEEDS)}
    final, _ = run_to_completion(engine, requests)
    return [final[f"s{i}"].outputs[0].token_ids for i in range(NUM_SEEDS)]


def chi_square_p_value(a: Counter, b: Counter) -> float:
    """Homogeneity of two samples' categorical counts (2 x bins table)."""
    keys = sorted(set(a) | set(b))
    rows = [[a[x] for x in keys], [b[x] for x in keys]]
    small = [j for j, x in enumerate(keys) if rows[0][j] + rows[1][j] < 10]
    if small:
        rows = [[r[j] for j in range(len(keys)) if j not in small] + [sum(r[j] for j in small)] for r in rows]
    t = torch.tensor(rows, dtype=torch.float64)
    expected = t.sum(1, keepdim=True) * t.sum(0, keepdim=True) / t.sum()
    stat = ((t - expected) ** 2 / expected).sum()
    df = t.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=1.0, top_k=6, top_p=0.8)],
                         ids=["t1", "topk_topp"])
def test_output_distribution_matches_mtp_off(ckpt, options):
    off = sample(ckpt, None, **options)
    on = sample(ckpt, 2, **options)
    for pos in (1, 2, 3):
        p = chi_square_p_value(Counter(t[pos] for t in off), Counter(t[pos] for t in on))
        assert p > ALPHA, (pos, p)
    # the test has power: the first tokens are drawn by the same sampler either way; later tokens differ per seed
    assert sum(a != b for a, b in zip(off, on, strict=True)) > NUM_SEEDS // 4


def test_chi_square_detects_a_different_distribution():
    """The statistic rejects two clearly different samples of this size (sanity check of the helper)."""
    g = torch.Generator().manual_seed(0)
    a = Counter(torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), NUM_SEEDS, True, generator=g).tolist())
    b = Counter(torch.multinomial(torch.tensor([0.45, 0.3, 0.25]), NUM_SEEDS, True, generator=g).tolist())
    c = Counter(torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), NUM_SEEDS, True, generator=g).tolist())
    assert chi_square_p_value(a, b) < ALPHA
    assert chi_square_p_value(a, c) > ALPHA
