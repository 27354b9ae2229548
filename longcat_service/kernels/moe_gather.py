"""Row gather of the MoE prefill path (Triton): the hidden row of each real-expert row, in expert order.

The grouped-GEMM path needs x[r] = hidden[sorted_slots[r] // k] for the rows r < expert_offsets[-1]; rows
past it (as many as there are zero-expert slots) belong to no expert. index_select copies all T*k rows;
this kernel reads the row count on the device (no host sync) and copies only the real rows, leaving the
rest of the output uninitialised.
"""

from __future__ import annotations

import torch


def gather_expert_rows_reference(
    hidden: torch.Tensor, sorted_slots: torch.Tensor, top_k: int, num_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """All T*k rows (rows past the real ones repeat token 0; num_rows is ignored)."""
    tokens = torch.div(sorted_slots.clamp(min=0), top_k, rounding_mode="floor")
    return hidden.index_select(0, tokens)


def gather_expert_rows(
    hidden: torch.Tensor, sorted_slots: torch.Tensor, top_k: int, num_rows: torch.Tensor
) -> torch.Tensor:
    """hidden [T, H] (last dim contiguous), sorted_slots int32 [T*k], num_rows a one-element int tensor
    -> [T*k, H] whose rows r < num_rows are hidden[sorted_slots[r] // top_k]; later rows are unspecified."""
    if hidden.dim() != 2 or sorted_slots.dim() != 1:
        raise ValueError(f"gather_expert_rows: hidden {tuple(hidden.shape)} must be [T, H], sorted_slots 1-D")
    if num_rows.numel() != 1 or num_rows.device != hidden.device or sorted_slots.device != hidden.device:
        raise ValueError("gather_expert_rows: num_rows (one element) and sorted_slots must be on hidden's device")
    from longcat_service.kernels._moe_gather_triton import launch

    return launch(hidden, sorted_slots, int(top_k), num_rows)
