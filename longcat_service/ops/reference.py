"""Pure-PyTorch reference of the longcat ops: the spec of every C++/CUDA kernel and the CPU fallback.

Conventions shared by all implementations:
- E real (FFN) experts, Z zero (identity) experts; ids >= E are zero experts.
- Expert weights are stacked: w13 [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up), w2 [E, H, I].
- A "slot" is one (token, choice) pair, flat index t * k + j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def router_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    routed_scaling_factor: float,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 router logits [T, E+Z] -> (ids int32 [T,k], weights fp32 [T,k], zero_weight fp32 [T]).

    Softmax over all E+Z logits; the correction bias changes only which experts are selected;
    weights are the unbiased probabilities times the routed scaling factor (no renormalisation).
    Ties go to the lower index. Slots are ordered by descending biased score.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    scores = probs + correction_bias.float()
    num_tokens, width = scores.shape
    if num_tokens == 0:
        ids = torch.empty(0, top_k, dtype=torch.int64, device=logits.device)
    else:
        # torch.topk does not promise lower-index-first on ties; a stable descending sort does.
        ids = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, ids) * routed_scaling_factor
    zero_weight = torch.where(ids >= num_experts, weights, torch.zeros_like(weights)).sum(-1)
    del width
    return ids.to(torch.int32), weights, zero_weight


def moe_align(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group real-expert slots by expert; zero-expert slots get no row.

    Returns (all int32, sizes fixed by T, k and E so that no host sync is needed):
    - expert_offsets [E+1]: CSR offsets of each expert's rows in the permuted space;
    - sorted_slots [T*k]: slot index of each permuted row (entries past the last row are -1);
    - slot_rows [T*k]: permuted row of each slot, -1 for zero-expert slots;
    - active_experts [E]: ids of experts with at least one row, ascending, then -1;
    - num_active [1]: how many experts are active.
    Within one expert, rows keep ascending slot order.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    num_slots = flat.numel()
    is_real = flat < num_experts
    counts = torch.bincount(flat[is_real], minlength=num_experts)[:num_experts]
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    expert_offsets[1:] = torch.cumsum(counts, 0)
    # Stable sort by expert id; zero-expert slots (key = E) sort to the end.
    keys = torch.where(is_real, flat, torch.full_like(flat, num_experts))
    order = torch.sort(keys, stable=True).indices
    num_rows = int(is_real.sum())
    sorted_slots = torch.full((num_slots,), -1, dtype=torch.int64, device=device)
    sorted_slots[:num_rows] = order[:num_rows]
    slot_rows = torch.full((num_slots,), -1, dtype=torch.int64, device=device)
    slot_rows[order[:num_rows]] = torch.arange(num_rows, device=device)
    active = torch.nonzero(counts > 0).flatten()
    active_experts = torch.full((num_experts,), -1, dtype=torch.int64, device=device)
    active_experts[: active.numel()] = active
    num_active = torch.tensor([active.numel()], dtype=torch.int32, device=device)
    return (
        expert_offsets.to(torch.int32),
        sorted_slots.to(torch.int32),
        slot_rows.to(torch.int32),
        active_experts.to(torch.int32),
        num_active,
    )


def expert_ffn(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """SwiGLU of each real-expert row: y [T*k, H] in hidden's dtype, in permuted row order.

    Row r holds expert e's output for token sorted_slots[r] // k, where e is the expert whose
    offsets range contains r. Rows at or past expert_offsets[-1] (the zero-expert slots' share) are
    unspecified: implementations may leave them uninitialised (the CUDA prefill path does), and combine
    never reads them. This reference writes zeros there.
    """
    num_slots = sorted_slots.numel()
    out = torch.zeros(num_slots, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    offsets = expert_offsets.tolist()
    inter = w2.shape[-1]
    for expert in range(w13.shape[0]):
        start, end = offsets[expert], offsets[expert + 1]
        if start == end:
            continue
        tokens = sorted_slots[start:end].long() // top_k
        x = hidden[tokens]
        gate_up = x @ w13[expert].t()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out[start:end] = act @ w2[expert].t()
    return out


def combine(
    expert_out: torch.Tensor,
    slot_rows: torch.Tensor,
    topk_weights: torch.Tensor,
    hidden: torch.Tensor,
    zero_weight: torch.Tensor,
    add_identity: bool,
) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * y[row(t,j)] (+ zero_weight[t] * x[t]); fp32 [T, H].

    Uses only the rows of real-expert slots (slot_rows >= 0), so expert_out's unspecified rows (at or
    past expert_offsets[-1]) never reach the output, whatever they hold (NaN included). Accumulated in
    fp32 in slot order j = 0..k-1, then the identity term, so that every implementation adds in the same
    order.
    """
    num_tokens, top_k = topk_weights.shape
    out = torch.zeros(num_tokens, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    rows = slot_rows.reshape(num_tokens, top_k).long()
    for j in range(top_k):
        row = rows[:, j]
        real = row >= 0
        contrib = expert_out[row.clamp(min=0)].float() * topk_weights[:, j : j + 1].float()
        out += torch.where(real[:, None], contrib, torch.zeros_like(contrib))
    if add_identity:
        out += zero_weight[:, None].float() * hidden.float()
    return out


def moe_forward(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    routed_scaling_factor: float,
    add_identity: bool = True,
) -> torch.Tensor:
    """The whole routed MoE of one layer: fp32 [T, H] (the caller casts once, after any all-reduce)."""
    num_experts = w13.shape[0]
    ids, weights, zero_weight = router_topk(
        router_logits, correction_bias, top_k, routed_scaling_factor, num_experts
    )
    offsets, sorted_slots, slot_rows, _, _ = moe_align(ids, num_experts)
    expert_out = expert_ffn(hidden, w13, w2, offsets, sorted_slots, top_k)
    return combine(expert_out, slot_rows, weights, hidden, zero_weight, add_identity)


def dense_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T -> [M, N] in x's dtype, accumulated in fp32: the decode-batch GEMV (M <= 8) that
    streams a dense weight once. Implementations may add in any order (fp32 rounding differences only)."""
    return (x.float() @ w.float().t()).to(x.dtype)
