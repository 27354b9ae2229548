"""Test helpers for the MoE ops: routing-input generators and an independent naive HF-semantics loop.

The naive loop follows the architecture spec §4 token by token and slot by slot in float64, sharing no
code with reference.py, so that the reference (the spec of every kernel) is itself checked.
"""

from __future__ import annotations

import math

import torch


def make_router_inputs(
    num_tokens: int,
    num_experts: int,
    num_zero: int,
    *,
    zero_share: str = "mixed",
    ties: bool = False,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [T, E+Z] and correction bias [E+Z].

    zero_share: "mixed" (roughly a third of the slots on zero experts), "all" (every selected slot is a
    zero expert when k <= Z), "none" (no slot is). ties=True draws logits from a few integer levels and
    a zero bias, so many probabilities tie exactly.
    """
    width = num_experts + num_zero
    g = generator
    if ties:
        logits = torch.randint(0, 3, (num_tokens, width), generator=g).float()
        bias = torch.zeros(width)
    else:
        logits = torch.randn(num_tokens, width, generator=g) * 2.0
        bias = torch.randn(width, generator=g) * 1e-3
    # The bias only steers selection (weights stay the unbiased probabilities), so a +-1 shift of the
    # zero experts' bias forces every slot onto them or off them without changing the weights.
    if zero_share == "all":
        bias[num_experts:] += 1.0
    elif zero_share == "none":
        bias[num_experts:] -= 1.0
    elif zero_share == "mixed" and not ties and num_zero:
        logits[:, num_experts:] += math.log(max(num_experts, 1) / (2.0 * num_zero))
    return logits.to(device), bias.to(device)


def make_expert_weights(
    num_experts: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] and w2 [E, H, I] scaled so activations stay O(1)."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=generator) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, generator=generator) / math.sqrt(inter)
    return w13.to(device=device, dtype=dtype), w2.to(device=device, dtype=dtype)


def naive_moe(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    bias: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    scale: float,
) -> tuple[list[list[int]], torch.Tensor]:
    """HF LongcatFlash MoE, one token and one slot at a time, in float64. Returns (ids per token, out [T, H])."""
    num_experts, inter = w13.shape[0], w2.shape[-1]
    x64, l64 = hidden.double().cpu(), logits.double().cpu()
    b64 = bias.double().cpu()
    w13_64, w2_64 = w13.double().cpu(), w2.double().cpu()
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    all_ids = []
    for t in range(hidden.shape[0]):
        row = l64[t]
        exps = [math.exp(v - float(row.max())) for v in row.tolist()]
        total = sum(exps)
        probs = [v / total for v in exps]
        scores = [p + float(b) for p, b in zip(probs, b64.tolist(), strict=True)]
        ids = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_k]
        all_ids.append(ids)
        for e in ids:
            weight = probs[e] * scale
            if e < num_experts:
                gate_up = w13_64[e] @ x64[t]
                gate, up = gate_up[:inter], gate_up[inter:]
                y = w2_64[e] @ (gate / (1.0 + torch.exp(-gate)) * up)
            else:
                y = x64[t]
            out[t] += weight * y
    return all_ids, out
