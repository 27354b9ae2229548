"""The Triton side of moe_gather.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import next_pow2

MAX_BLOCK = 2048


@triton.jit
def _gather_rows_kernel(
    h_ptr, slots_ptr, num_rows_ptr, out_ptr, hidden, top_k, s_h, s_o, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    if row < tl.load(num_rows_ptr):
        token = (tl.load(slots_ptr + row) // top_k).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        vals = tl.load(h_ptr + token * s_h + cols, mask=mask)
        tl.store(out_ptr + row.to(tl.int64) * s_o + cols, vals, mask=mask)


def launch(hidden: torch.Tensor, sorted_slots: torch.Tensor, top_k: int, num_rows: torch.Tensor) -> torch.Tensor:
    num_slots, width = sorted_slots.shape[0], hidden.shape[1]
    if hidden.stride(-1) != 1:
        raise ValueError("gather_expert_rows: the last dimension of hidden must be contiguous")
    out = torch.empty(num_slots, width, dtype=hidden.dtype, device=hidden.device)
    if num_slots == 0 or width == 0:
        return out
    block = min(next_pow2(width), MAX_BLOCK)
    _gather_rows_kernel[(num_slots, triton.cdiv(width, block))](
        hidden, sorted_slots.contiguous(), num_rows, out, width, top_k, hidden.stride(0), out.stride(0),
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return out
