"""The sampled rows of a device-side spec step (engine/spec_greedy.py; issue 17): rejection sampling without a host read.

A "plain sampled" row (Sampler.plain_sampled: temperature, top-k, top-p, min-p, seeded or not)
draws from a distribution that needs only four numbers per row, so a CUDA graph can compute it from a static
[4, rows] buffer that the host fills per step (OPTIONS: temperature, top_k, top_p, min_p; temperature 0 marks a
greedy row of a mixed batch). plain_probabilities is Sampler.probabilities for such rows, on those tensors.

Verification (Leviathan et al. 2023, as SpecDecoder._verify): draft d_j is accepted with probability
min(1, p_j(d) / q_j(d)), q_j the distribution it was drawn from at the previous step; at the first rejection the
token is drawn from normalize(max(p_j - q_j, 0)) (p_j where that is all zero), and a bonus token from p after the
last draft. Greedy rows keep the exact argmax rule. The randomness of unseeded rows comes from torch's default
generator of the device (torch.rand / exponential_), which CUDA graphs support: each replay advances its philox
offset. Rows with a seed take every uniform from a hash of (seed, token position, kind of draw) instead
(engine/seeded_draws.py; seed keys and positions from the graph's static buffers, one hash call per step:
StepUniforms, one Triton launch on CUDA) and draw by inverse CDF, so their tokens depend on the seed and the logits
only, not on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_service.engine.seeded_draws import (
    ACCEPT,
    DRAFT,
    NUM_KINDS,
    TARGET,
    RowSeeds,
    hashed_uniforms_at,
    inverse_cdf,
)

OPTIONS = ("temperature", "top_k", "top_p", "min_p")


def option_rows(params_list) -> list[list[float]]:
    """Per-row sampling parameters -> the [4, rows] OPTIONS columns (greedy rows: temperature 0)."""
    return [[0.0 if p.greedy else float(p.temperature) for p in params_list],
            [float(p.top_k) for p in params_list],
            [float(p.top_p) for p in params_list],
            [float(p.min_p) for p in params_list]]


def plain_probabilities(logits: torch.Tensor, options: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [R, V] raw logits, options [4, R] -> (probabilities [R, V], finite [R]): Sampler.probabilities of plain
    rows (a greedy row is the point mass at its argmax; a non-finite row is all NaN), with every option read from
    the device. Unlike the sampler it cannot skip an unused option on the host, so it sorts every row (twice);
    a row's unused option changes nothing: top_k <= 0 or >= V keeps all, top_p >= 1 drops nothing (the sampler
    skips top-p when no row of the batch asks for it), min_p 0 drops nothing."""
    logits = logits.float()
    temperature, top_k, top_p, min_p = options[0], options[1], options[2], options[3]
    greedy = temperature == 0
    vocab = logits.shape[-1]
    # Sampler._sampling_probs: shift by the row max, divide by the temperature (1 for greedy rows)
    x = (logits - logits.amax(dim=-1, keepdim=True)) / torch.where(greedy, 1.0, temperature)[:, None]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab).to(torch.long)
    kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop_sorted[:, 0] = False
    probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
    probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    point = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    probs = torch.where(greedy[:, None], point, probs)
    finite = torch.isfinite(logits.amax(dim=-1))
    return torch.where(finite[:, None], probs, float("nan")), finite


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalised) probabilities: the exponential race argmax(p / E), E ~ Exp(1), as the
    sampler draws, from the device's default generator."""
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


_STEP_COUNTERS: dict[tuple[int, str], torch.Tensor] = {}


def _step_counters(k: int, device: torch.device) -> torch.Tensor:
    """seeded_draws.counter(start + offset, kind) - 4 * start for a step's 4k + 2 draws (StepUniforms), cached: built
    once (on the device, by fills: no host copy, also inside a CUDA-graph capture)."""
    key = (k, str(device))
    if key not in _STEP_COUNTERS:
        parts = [torch.arange(1, m + 1, device=device) * NUM_KINDS + kind
                 for m, kind in ((k, ACCEPT), (k + 1, TARGET), (2 * k + 1, DRAFT))]
        _STEP_COUNTERS[key] = torch.cat(parts)
    return _STEP_COUNTERS[key]


@dataclass(frozen=True)
class StepUniforms:
    """The hashed uniforms of a step's seeded sequences (seeded_draws.py), all from one hash call: per sequence the
    acceptance uniforms of its drafts [b, k], the residual / bonus uniforms of verify tokens 0..k [b, k+1], and the
    draft uniforms of positions start + 1 .. start + 2k + 1 [b, 2k+1] (a draft after `count` emitted tokens, number
    `step`, sits at start + count + step)."""

    seeded: torch.Tensor  # [b] bool
    accept: torch.Tensor
    target: torch.Tensor
    drafts: torch.Tensor

    @classmethod
    def of(cls, seeds: RowSeeds, start: torch.Tensor, k: int) -> StepUniforms:
        """start [b]: the position of each sequence's verify token 0 (verify token j decides position start + j + 1)."""
        u = hashed_uniforms_at(seeds.keys, start, _step_counters(k, start.device))  # one launch on CUDA
        return cls(seeds.seeded, u[:, :k], u[:, k : 2 * k + 1], u[:, 2 * k + 1 :])

    def draft(self, offset: torch.Tensor) -> torch.Tensor:
        """[b] the uniforms of the drafts at positions start + offset (1 <= offset <= 2k+1)."""
        return self.drafts.gather(1, (offset - 1)[:, None])[:, 0]


def sample_drafts(logits: torch.Tensor, options: torch.Tensor, seeded: torch.Tensor | None = None,
                  u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP logits [R, V] -> (draft token [R], the distribution q it was drawn from [R, V]): greedy rows their argmax,
    sampled rows a draw from plain_probabilities (rows where `seeded` [R]: by inverse CDF on u [R]); a non-finite row
    drafts token 0 (as the eager draft sampler)."""
    q, finite = plain_probabilities(logits, options)
    drawn = draw(q)
    if seeded is not None:
        drawn = torch.where(seeded, inverse_cdf(q, u), drawn)
    token = torch.where(options[0] == 0, logits.argmax(dim=-1), drawn)
    return torch.where(finite, token, 0), q


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor,
                   finite: torch.Tensor, seeded: StepUniforms | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling of b sequences' drafts. p [b, k+1, V]: the target distributions at verify tokens 0..k;
    q [b, k, V]: the distributions drafts [b, k] were drawn from; num_drafts [b] (rows past it are padding);
    finite [b, k+1]; seeded: the hashed uniforms of the seeded sequences. -> (accepted drafts [b], tokens [b, k+1]:
    the first accepted + 1 are the emitted ones)."""
    b, k = drafts.shape
    dev = p.device
    j = torch.arange(k, device=dev)
    valid = j[None, :] < num_drafts[:, None]
    pd = p[:, :k].gather(2, drafts[:, :, None])[:, :, 0]
    qd = q.gather(2, drafts[:, :, None])[:, :, 0]
    uniform = torch.rand(b, k, device=dev)
    if seeded is not None:
        uniform = torch.where(seeded.seeded[:, None], seeded.accept, uniform.to(torch.float64))
    accept = valid & finite[:, :k] & (uniform * qd < pd)
    accepted = ((~accept).to(torch.long).cumsum(dim=1) == 0).sum(dim=1)
    # past the drafts q is 0 (whatever the buffer holds there), so the residual there (the bonus row) is p itself
    q_ext = torch.cat((torch.where(valid[:, :, None], q, 0.0), torch.zeros_like(q[:, :1])), dim=1)
    residual = (p - q_ext).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p).reshape(b * (k + 1), -1)
    drawn = draw(residual)
    if seeded is not None:
        drawn = torch.where(seeded.seeded[:, None].expand(b, k + 1).reshape(-1),
                            inverse_cdf(residual, seeded.target.reshape(-1)), drawn)
    jj = torch.arange(k + 1, device=dev)
    drafts_ext = torch.cat((drafts, torch.zeros_like(drafts[:, :1])), dim=1)
    return accepted, torch.where(jj[None, :] < accepted[:, None], drafts_ext, drawn.view(b, k + 1))
