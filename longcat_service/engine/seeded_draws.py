"""Counter-based randomness for seeded requests in speculative decoding (issue 17): every uniform a seeded row uses
is a hash of (its seed, the token position it decides, the kind of draw), computed with integer ops on the device
(torch's, or one Triton kernel on CUDA), so it runs inside a CUDA graph from static buffers, and a request's tokens depend only on its seed and its logits: not on
the batch, the bucket, the other rows, which path (device step or host verification) ran the step, or how many
uniforms earlier steps drew (a torch.Generator's state would). Unseeded rows keep torch's generators.

Kinds of draw at token position P: ACCEPT (the uniform that accepts or rejects the draft at P), TARGET (the token
emitted at P by the residual or bonus draw) and DRAFT (the MTP draft at P). Each is used for at most one decision
that reaches the output: the draft at P is verified once (accepted, or rejected with the residual drawn at P), and
a draft drawn again at P (after a rejection before it) replaces one that decided nothing. So the draws are fresh
and Leviathan's rejection sampling keeps the target's distribution exactly.

The hash. The host turns a row's 64-bit seed into four 32-bit keys (seed_keys: chains h <- fmix32(h ^ word) over
the seed's halves from four stream constants; fmix32 is MurmurHash3's finaliser, a bijection with full avalanche).
The device hashes the counter c = 4 P + kind per half: h = fmix32(fmix32(k1 ^ c) ^ k2), two rounds (one would
make two seeds whose k1 differ by d collide at counters c and c ^ d), with the keys (k1, k2) of half a and of half
b; a's top 27 bits and b's top 26 make a 53-bit uniform in [0, 1). Counters repeat only past P = 2^30 tokens.
The torch code below (31 small elementwise int64 kernels on a GPU) is the spec and the CPU path; on CUDA
hashed_uniforms_at computes the same bits in one Triton launch (kernels/counter_hash.py), for all rows and all
counters of a call: the device-side sampled step makes one call per step (spec_sampled.StepUniforms: all draws of
its verification and drafts), whether or not a row of its batch has a seed.

No int64 overflow: every value is a 32-bit value held in int64, and a multiply by a 32-bit constant c is done as
x * c' with c' = c or c - 2^32 (the one with |c'| <= 2^31), so |x * c'| < 2^63, then & (2^32 - 1): the same low
32 bits as x * c. torch wraps an overflowing int64 multiply in practice (two's complement, CPU and CUDA), but that is
signed overflow in C++, which torch does not promise, so the hash never relies on it. The same code runs on Python
ints (the host's seed_keys), where nothing overflows either.

A seeded draw from a distribution is by inverse CDF (one uniform per draw; the exponential race would need one per
vocab entry): the first token whose float64 cumulative probability exceeds u * total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_service.kernels import fast_path_enabled
from longcat_service.layers.host_to_device import to_device

ACCEPT, TARGET, DRAFT = 0, 1, 2  # kinds of draw at one token position
NUM_KINDS = 4  # counter = 4 * position + kind

_M32 = 0xFFFFFFFF
_FMIX = (0x85EBCA6B, 0xC2B2AE35)  # MurmurHash3 fmix32 multipliers


def _mul32(x, c: int):
    """(x * c) mod 2^32 for 0 <= x < 2^32 (an int64 tensor or a Python int): x times c or c - 2^32, whichever has
    magnitude <= 2^31, so the product stays below 2^63 in magnitude; & keeps its low 32 bits (two's complement)."""
    return (x * (c if c < 2**31 else c - 2**32)) & _M32


def _fmix32(h):
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX[0])
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX[1])
    return h ^ (h >> 16)


def seed_keys(seed: int) -> list[int]:
    """A 64-bit seed -> its four 32-bit keys (k1 of halves a and b, then k2 of a and b), on the host."""
    keys = []
    for stream in range(4):
        h = (0x9E3779B9 * (stream + 1)) & _M32  # the golden-ratio sequence: distinct, never 0
        for word in (seed & _M32, seed >> 32):
            h = _fmix32(h ^ word)
        keys.append(h)
    return keys


def hashed_uniform(keys: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """keys [4, *S] int64 (seed_keys, broadcastable against counter), counter (int64, 0 <= c < 2^32) -> float64
    uniforms in [0, 1) with 53 random bits, one per element of the broadcast shape."""
    h = _fmix32(_fmix32(keys[:2] ^ counter) ^ keys[2:])
    return ((h[0] >> 5) * (1 << 26) + (h[1] >> 6)).to(torch.float64) * 2.0**-53


def hashed_uniforms_at_reference(keys: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """keys [4, R] int64 (seed_keys per row), base [R] int64 (a token position per row), offsets [C] int64 ->
    float64 [R, C]: the uniforms of the counters (NUM_KINDS * base[r] + offsets[j]) mod 2^32 (offsets 4 d + kind:
    the draw of that kind at position base[r] + d). The spec of the one-launch kernel (kernels/counter_hash.py)."""
    return hashed_uniform(keys[:, :, None], (base[:, None] * NUM_KINDS + offsets[None, :]) & _M32)


def hashed_uniforms_at(keys: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """hashed_uniforms_at_reference, in one Triton launch on CUDA (the same bits)."""
    if fast_path_enabled(keys):
        from longcat_service.kernels.counter_hash import hashed_uniforms_at as kernel

        return kernel(keys, base, offsets)
    return hashed_uniforms_at_reference(keys, base, offsets)


def counter(position: torch.Tensor, kind) -> torch.Tensor:
    return (position.to(torch.int64) * NUM_KINDS + kind) & _M32


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalised) probabilities [R, V] given uniforms u [R] in [0, 1): the first index
    whose float64 cumulative sum exceeds u * total. A zero-probability token is never returned: where rounding
    (u * total rounding up to the total, or a parallel scan's order) lands on one, the row's argmax instead (a
    change of the distribution at the 1e-16 level). A non-finite row returns an index in range."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    x = (u * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, x, right=True).clamp(max=probs.shape[-1] - 1)
    positive = probs.gather(1, idx)[:, 0] > 0
    return torch.where(positive, idx[:, 0], probs.argmax(dim=-1))


def row_seed(seed: int | None, index: int) -> int | None:
    """The key of one sequence of a request: seed + its index in the request (n > 1), as MTP off seeds its
    generators (ModelRunner._sampling_row), mod 2^64."""
    return None if seed is None else (seed + index) % 2**64


def seed_columns(seeds: list[int | None]) -> list[list[int]]:
    """row_seed per row -> the [5, rows] columns of a RowSeeds buffer: seeded (0/1), then the four seed_keys."""
    keys = [seed_keys(s) if s is not None else [0, 0, 0, 0] for s in seeds]
    return [[int(s is not None) for s in seeds]] + [[k[i] for k in keys] for i in range(4)]


@dataclass(frozen=True)
class RowSeeds:
    """Per row: whether it has a seed, and its seed_keys (device tensors [R] and [4, R])."""

    seeded: torch.Tensor  # bool
    keys: torch.Tensor  # int64

    @classmethod
    def from_columns(cls, cols: torch.Tensor) -> RowSeeds:
        """A [5, R] int64 tensor of seed_columns (a static buffer of the sampled graph)."""
        return cls(cols[0] > 0, cols[1:])

    @classmethod
    def build(cls, seeds: list[int | None], device) -> RowSeeds | None:
        """row_seed per row -> RowSeeds on device, or None when no row has a seed."""
        if all(s is None for s in seeds):
            return None
        return cls.from_columns(to_device(seed_columns(seeds), torch.int64, torch.device(device)))

    def uniforms_at(self, base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Hashed uniforms [R, C] of the counters NUM_KINDS * base[r] + offsets[j] (hashed_uniforms_at: one launch on
        CUDA); base int64 [R], offsets int64 [C] (a kind: the draw of that kind at position base[r])."""
        return hashed_uniforms_at(self.keys, base, offsets)

    def uniform(self, position: torch.Tensor, kind) -> torch.Tensor:
        """Hashed uniforms [R, ...] for row r's token positions position[r, ...] (int64 [R] or [R, m]) and kind (an
        int, or an int64 tensor broadcastable against position), by the torch code: the general form (the tests of
        the hash's statistics use it; the engine calls uniforms_at)."""
        keys = self.keys.view(4, -1, *(1,) * (position.dim() - 1))
        return hashed_uniform(keys, counter(position, kind))

    def draw(self, probs: torch.Tensor, u: torch.Tensor, unseeded: torch.Tensor) -> torch.Tensor:
        """Tokens [R] of probs [R, V]: seeded rows by inverse CDF on their uniform u [R], the others `unseeded`
        (their draw from torch's generator)."""
        return torch.where(self.seeded, inverse_cdf(probs, u), unseeded)
