"""Counter-based randomness for seeded requests in speculative decoding (issue 17): every uniform a seeded row uses
is a hash of (its seed, the token position it decides, the kind of draw), computed with torch integer ops, so it
runs inside a CUDA graph from static buffers, and a request's tokens depend only on its seed and its logits: not on
the batch, the bucket, the other rows, which path (device step or host verification) ran the step, or how many
uniforms earlier steps drew (a torch.Generator's state would). Unseeded rows keep torch's generators.

Kinds of draw at token position P: ACCEPT (the uniform that accepts or rejects the draft at P), TARGET (the token
emitted at P by the residual or bonus draw) and DRAFT (the MTP draft at P). Each is used for at most one decision
that reaches the output: the draft at P is verified once (accepted, or rejected with the residual drawn at P), and
a draft drawn again at P (after a rejection before it) replaces one that decided nothing. So the draws are fresh
and Leviathan's rejection sampling keeps the target's distribution exactly.

The hash: two independent 32-bit chains (different stream constants), h <- fmix32(h ^ word) over the words
(P low, P high, seed low, seed high), fmix32 being MurmurHash3's finaliser (a bijection with full avalanche); their
top 27 and 26 bits make a 53-bit uniform in [0, 1). All values are held in int64 tensors but stay below 2^49:
products are split into 16-bit halves of the constant (_mul32), so no multiply ever overflows int64. torch wraps
an overflowing int64 multiply in practice (two's complement, CPU and CUDA), but that is signed overflow in C++,
which torch does not promise, so the hash never relies on it; the low 32 bits it keeps are the same either way.

A seeded draw from a distribution is by inverse CDF (one uniform per draw; the exponential race would need one per
vocab entry): the first token whose float64 cumulative probability exceeds u * total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACCEPT, TARGET, DRAFT = 0, 1, 2  # kinds of draw at one token position

_M32 = 0xFFFFFFFF
_FMIX = (0x85EBCA6B, 0xC2B2AE35)  # MurmurHash3 fmix32 multipliers


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32: x * (c mod 2^16) + ((x * (c >> 16)) mod 2^16) << 16, every term < 2^49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX[0])
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX[1])
    return h ^ (h >> 16)


def _stream(kind: int, half: int) -> int:
    """A distinct 32-bit starting value per (kind, half): the golden-ratio sequence (never 0)."""
    return (0x9E3779B9 * (2 * kind + half + 1)) & _M32


def _chain(start: int, words: list[torch.Tensor]) -> torch.Tensor:
    h = torch.full_like(words[0], start)
    for w in words:
        h = _fmix32(h ^ w)
    return h


def hashed_uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, position: torch.Tensor, kind: int) -> torch.Tensor:
    """float64 uniforms in [0, 1) with 53 random bits, one per element of the broadcast shape of the int64 inputs:
    seed_lo / seed_hi the two 32-bit halves of a row's seed (0 <= each < 2^32), position >= 0 the token position."""
    position = position.to(torch.int64)
    words = torch.broadcast_tensors(position & _M32, (position >> 32) & _M32, seed_lo.to(torch.int64),
                                    seed_hi.to(torch.int64))
    a = _chain(_stream(kind, 0), list(words))
    b = _chain(_stream(kind, 1), list(words))
    return ((a >> 5) * (1 << 26) + (b >> 6)).to(torch.float64) * 2.0**-53


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalised) probabilities [R, V] given uniforms u [R] in [0, 1): the first index
    whose float64 cumulative sum exceeds u * total. A zero-probability token is never returned: where rounding
    (u * total rounding up to the total, or a parallel scan's order) lands on one, the row's argmax instead (a
    change of the distribution at the 1e-16 level). A non-finite row returns an index in range."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    x = (u.to(torch.float64) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, x, right=True).clamp(max=probs.shape[-1] - 1)
    positive = probs.gather(1, idx)[:, 0] > 0
    return torch.where(positive, idx[:, 0], probs.argmax(dim=-1))


def row_seed(seed: int | None, index: int) -> int | None:
    """The key of one sequence of a request: seed + its index in the request (n > 1), as MTP off seeds its
    generators (ModelRunner._sampling_row), mod 2^64."""
    return None if seed is None else (seed + index) % 2**64


def seed_columns(seeds: list[int | None]) -> list[list[int]]:
    """row_seed per row -> the [3, rows] columns of a RowSeeds buffer: seeded (0/1), seed low, seed high 32 bits."""
    return [[int(s is not None) for s in seeds], [(s or 0) & _M32 for s in seeds], [(s or 0) >> 32 for s in seeds]]


@dataclass(frozen=True)
class RowSeeds:
    """Per row: whether it has a seed, and the seed's 32-bit halves (device tensors [R])."""

    seeded: torch.Tensor  # bool
    lo: torch.Tensor  # int64
    hi: torch.Tensor  # int64

    @classmethod
    def from_columns(cls, cols: torch.Tensor) -> RowSeeds:
        """A [3, R] int64 tensor of seed_columns (a static buffer of the sampled graph)."""
        return cls(cols[0] > 0, cols[1], cols[2])

    @classmethod
    def build(cls, seeds: list[int | None], device) -> RowSeeds | None:
        """row_seed per row -> RowSeeds on device, or None when no row has a seed."""
        if all(s is None for s in seeds):
            return None
        return cls.from_columns(torch.tensor(seed_columns(seeds), dtype=torch.int64, device=device))

    def uniform(self, position: torch.Tensor, kind: int) -> torch.Tensor:
        """Hashed uniforms for positions [R] or [R, m] (row r's seed for row r)."""
        shape = (-1,) + (1,) * (position.dim() - 1)
        return hashed_uniform(self.lo.view(shape), self.hi.view(shape), position, kind)

    def where(self, position: torch.Tensor, kind: int, other: torch.Tensor) -> torch.Tensor:
        """float64: the hashed uniform where the row is seeded, `other` elsewhere."""
        shape = (-1,) + (1,) * (position.dim() - 1)
        return torch.where(self.seeded.view(shape), self.uniform(position, kind), other.to(torch.float64))

    def draw(self, probs: torch.Tensor, position: torch.Tensor, kind: int, unseeded: torch.Tensor) -> torch.Tensor:
        """Tokens [R] of probs [R, V]: seeded rows by inverse CDF on their hashed uniform at `position` [R],
        the others `unseeded` (their draw from torch's generator)."""
        return torch.where(self.seeded, inverse_cdf(probs, self.uniform(position, kind)), unseeded)
