"""The counter-based uniforms of seeded spec-decode rows (engine/seeded_draws.py): equal to a plain-integer
reference of the hash (its spec), no int64 overflow in any intermediate, uniform (Kolmogorov-Smirnov and chi-square,
also the low bits), independent across adjacent positions, adjacent seeds (n > 1 sequences of one request) and the
kinds of draw (2-d chi-square and correlation), full avalanche; and the inverse-CDF draw: exact on a grid of
uniforms, never a zero-probability token.

False-alarm rate: the statistical tests reject at p < ALPHA = 1e-3 each (10 tests: <= 1%); their inputs are fixed,
so the outcome is deterministic."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from longcat_service.engine import seeded_draws as sd
from longcat_service.engine.seeded_draws import ACCEPT, DRAFT, TARGET, RowSeeds, inverse_cdf

ALPHA = 1e-3
M32 = 0xFFFFFFFF


# ---- the spec: the hash on Python integers ----------------------------------------------------------------------
def ref_fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def ref_keys(seed: int) -> list[int]:
    keys = []
    for stream in range(4):
        h = (0x9E3779B9 * (stream + 1)) & M32
        for w in (seed & M32, seed >> 32):
            h = ref_fmix32(h ^ w)
        keys.append(h)
    return keys


def ref_uniform(seed: int, position: int, kind: int) -> float:
    k = ref_keys(seed)
    c = (4 * position + kind) & M32
    a = ref_fmix32(ref_fmix32(k[0] ^ c) ^ k[2])
    b = ref_fmix32(ref_fmix32(k[1] ^ c) ^ k[3])
    return ((a >> 5) * 2**26 + (b >> 6)) / 2**53


def uniforms(seeds, positions: torch.Tensor, kind) -> torch.Tensor:
    """[len(seeds), ...] hashed uniforms: row r with seed seeds[r] at positions[r, ...]."""
    return RowSeeds.build(list(seeds), "cpu").uniform(positions, kind)


def test_hash_equals_the_integer_reference():
    gen = torch.Generator().manual_seed(0)
    seeds = [0, 1, M32, M32 + 1, 2**63, 2**64 - 1] + torch.randint(0, 2**62, (30,), generator=gen).tolist()
    positions = [0, 1, 2**29, 2**30 - 1, 2**30 + 5] + torch.randint(0, 2**20, (30,), generator=gen).tolist()
    for s in seeds:
        assert sd.seed_keys(s) == ref_keys(s)
    for kind in (ACCEPT, TARGET, DRAFT):
        got = uniforms(seeds, torch.tensor(positions).expand(len(seeds), -1), kind)
        assert got.dtype == torch.float64 and got.shape == (len(seeds), len(positions))
        assert got.tolist() == [[ref_uniform(s, p, kind) for p in positions] for s in seeds]
    kinds = torch.tensor([[ACCEPT, TARGET, DRAFT]])  # a kind per column, as the device step asks
    got = uniforms(seeds[:3], torch.tensor([[7, 7, 9]] * 3), kinds)
    assert got.tolist() == [[ref_uniform(s, 7, ACCEPT), ref_uniform(s, 7, TARGET), ref_uniform(s, 9, DRAFT)]
                            for s in seeds[:3]]


class Tracked(int):
    """An int that records the largest magnitude of every value computed from it."""

    peak = 0

    def _wrap(self, v: int) -> Tracked:
        Tracked.peak = max(Tracked.peak, abs(v))
        return Tracked(v)

    def __mul__(self, o):
        return self._wrap(int(self) * int(o))

    def __add__(self, o):
        return self._wrap(int(self) + int(o))

    def __and__(self, o):
        return self._wrap(int(self) & int(o))

    def __xor__(self, o):
        return self._wrap(int(self) ^ int(o))

    def __lshift__(self, o):
        return self._wrap(int(self) << int(o))

    def __rshift__(self, o):
        return self._wrap(int(self) >> int(o))


def test_no_intermediate_overflows_int64():
    """The torch code's arithmetic run on tracked Python ints: every intermediate stays below 2^63 in magnitude (so
    int64 tensors never overflow, whatever torch does on overflow), and the result is the 32-bit product / mix."""
    gen = torch.Generator().manual_seed(1)
    Tracked.peak = 0
    for x in [0, 1, M32, 2**31, 2**31 - 1] + torch.randint(0, 2**32, (200,), generator=gen).tolist():
        assert int(sd._fmix32(Tracked(x))) == ref_fmix32(x)
        for c in (0x85EBCA6B, 0xC2B2AE35, M32, 2**31 - 1, 2**31 + 1):
            assert int(sd._mul32(Tracked(x), c)) == (x * c) & M32
    assert 2**62 < Tracked.peak < 2**63  # the bound is tight: the products do come close


def test_int64_tensor_products_stay_exact():
    """On int64 tensors the largest products equal Python's exact ones (no wraparound happened)."""
    x = torch.tensor([M32, 2**31, 12345], dtype=torch.int64)
    for c in (0x85EBCA6B, 0xC2B2AE35):
        c2 = c - 2**32
        assert (x * c2).tolist() == [v * c2 for v in x.tolist()]
        assert sd._mul32(x, c).tolist() == [(v * c) & M32 for v in x.tolist()]


def ks_p_value(u: torch.Tensor) -> float:
    """One-sample Kolmogorov-Smirnov test against U(0, 1) (asymptotic distribution; n large)."""
    u = u.flatten().sort().values.double()
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max((i / n - u).max().item(), (u - (i - 1) / n).max().item())
    t = d * math.sqrt(n)
    return min(1.0, max(0.0, 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * t * t) for j in range(1, 101))))


def chi_square_uniform_p(counts: torch.Tensor) -> float:
    counts = counts.double().flatten()
    expected = counts.sum() / counts.numel()
    stat = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64), stat / 2))


# 1000 consecutive seeds x 200 consecutive positions: the structured inputs a serving run produces
SEEDS = torch.arange(10_000, 11_000, dtype=torch.int64)[:, None]
POSITIONS = torch.arange(5, 205, dtype=torch.int64)[None, :]


def grid(kind: int, seed_offset: int = 0, position_offset: int = 0) -> torch.Tensor:
    return uniforms((SEEDS[:, 0] + seed_offset).tolist(), (POSITIONS + position_offset).expand(SEEDS.shape[0], -1),
                    kind)


@pytest.mark.parametrize("kind", [ACCEPT, TARGET, DRAFT])
def test_uniforms_are_uniform(kind):
    u = grid(kind)
    assert ((u >= 0) & (u < 1)).all()
    assert ks_p_value(u) > ALPHA
    assert chi_square_uniform_p(torch.bincount((u * 256).long().flatten(), minlength=256)) > ALPHA
    low = (u * 2.0**53).long() & 255  # the lowest 8 of the 53 bits (from the second chain)
    assert chi_square_uniform_p(torch.bincount(low.flatten(), minlength=256)) > ALPHA


def independence_p(a: torch.Tensor, b: torch.Tensor, bins: int = 16) -> float:
    cells = (a * bins).long().flatten() * bins + (b * bins).long().flatten()
    return chi_square_uniform_p(torch.bincount(cells, minlength=bins * bins))


PAIRS = {
    "adjacent positions": (grid(TARGET), grid(TARGET, position_offset=1)),
    "adjacent seeds": (grid(TARGET), grid(TARGET, seed_offset=1)),
    "accept vs target": (grid(ACCEPT), grid(TARGET)),
    "target vs draft": (grid(TARGET), grid(DRAFT)),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_uniforms_are_independent(name):
    a, b = PAIRS[name]
    assert independence_p(a, b) > ALPHA
    corr = torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1].item()
    assert abs(corr) < 4 / math.sqrt(a.numel())  # 4 standard errors
    assert not torch.equal(a, b)


def test_every_input_bit_flips_half_the_output_bits():
    gen = torch.Generator().manual_seed(2)
    seeds = torch.randint(0, 2**62, (2000,), generator=gen)
    pos = torch.randint(0, 2**20, (2000,), generator=gen)

    def bits(s, p):
        return (uniforms(s.tolist(), p, TARGET) * 2.0**53).long()

    base = bits(seeds, pos)
    flips = [bits(seeds ^ (1 << i), pos) for i in range(62)] + [bits(seeds, pos ^ (1 << i)) for i in range(30)]  # counters: P < 2^30
    for i, f in enumerate(flips):
        x = base ^ f
        changed = sum(((x >> j) & 1).sum().item() for j in range(53)) / (53 * x.numel())
        assert 0.48 < changed < 0.52, i


def test_row_seeds_give_each_row_its_own_stream():
    seeds = [7, None, 2**64 - 1, 7]
    rs = RowSeeds.build(seeds, "cpu")
    assert rs.seeded.tolist() == [True, False, True, True]
    pos = torch.tensor([[3, 4], [3, 4], [3, 4], [9, 10]])
    u = rs.uniform(pos, DRAFT)
    for r, s in enumerate(seeds):
        for c in range(2):
            if s is not None:  # (an unseeded row's hashed uniforms are never used)
                assert u[r, c].item() == ref_uniform(s, pos[r, c].item(), DRAFT)
    assert u[0].tolist() != u[3].tolist()  # one seed, other positions
    assert RowSeeds.build([None, None], "cpu") is None
    assert sd.seed_columns([None, 5]) == [[0, 1], *[[0, k] for k in ref_keys(5)]]
    assert sd.row_seed(2**64 - 1, 1) == 0 and sd.row_seed(-1, 0) == 2**64 - 1 and sd.row_seed(None, 3) is None


# ---- the inverse-CDF draw ---------------------------------------------------------------------------------------
def test_inverse_cdf_is_exact_on_a_grid_of_uniforms():
    """u = (i + 0.5) / N for N a multiple of the probabilities' denominator: each token gets exactly N p of them."""
    p = torch.tensor([0.0, 0.25, 0.0, 0.125, 0.5, 0.125, 0.0])
    n = 4096
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tok = inverse_cdf(p.expand(n, -1), u)
    counts = Counter(tok.tolist())
    assert counts == {1: n // 4, 3: n // 8, 4: n // 2, 5: n // 8}
    unnormalised = inverse_cdf((p * 3).expand(n, -1), u)  # the total need not be 1
    assert torch.equal(tok, unnormalised)


def test_inverse_cdf_never_draws_a_zero_probability_token():
    p = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0], [1e-30, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    extremes = torch.tensor([0.0, 2.0**-53, 0.3, 1 - 2.0**-53], dtype=torch.float64)
    for u in extremes:
        tok = inverse_cdf(p, u.expand(3))
        assert (p.gather(1, tok[:, None]) > 0).all(), u
    assert inverse_cdf(p, torch.tensor([1 - 2.0**-53] * 3, dtype=torch.float64)).tolist() == [2, 4, 4]
    assert inverse_cdf(p, torch.zeros(3, dtype=torch.float64)).tolist() == [1, 0, 4]
    nan = torch.full((2, 5), float("nan"))
    assert ((inverse_cdf(nan, torch.tensor([0.1, 0.9])) >= 0) & (inverse_cdf(nan, torch.tensor([0.1, 0.9])) < 5)).all()


def test_seeded_draws_follow_the_distribution():
    """RowSeeds.draw over 20000 seeds: the tokens follow p (chi-square against torch.multinomial); unseeded rows
    keep the given draw."""
    p = torch.tensor([0.05, 0.4, 0.0, 0.3, 0.25])
    n = 20000
    seeds = [None if i % 10 == 0 else 31 * i for i in range(n)]
    rs = RowSeeds.build(seeds, "cpu")
    unseeded = torch.full((n,), 2)
    tok = rs.draw(p.expand(n, -1), rs.uniform(torch.arange(n) % 97, TARGET), unseeded)
    assert (tok[::10] == 2).all()
    got = tok[rs.seeded]
    assert 2 not in got.tolist()
    want = torch.multinomial(p, got.numel(), replacement=True, generator=torch.Generator().manual_seed(3))
    from tests.test_spec_decode_stats import chi_square_p_value

    assert chi_square_p_value(Counter(got.tolist()), Counter(want.tolist())) > ALPHA
