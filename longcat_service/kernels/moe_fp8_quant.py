"""The activation quantization of the w8a8 MoE prefill fused with its neighbour (Triton), one pass each:

- gather_quant_fp8 = per_token_group_quant_fp8(gather_expert_rows(hidden, sorted_slots, top_k, num_rows)),
- silu_mul_quant_fp8 = per_token_group_quant_fp8(silu_and_mul(gate_up, num_rows)),
bit for bit on the rows below num_rows (the kernels share the unfused kernels' quantization and SwiGLU code). Each
reads its input once and writes only the e4m3 rows and their fp32 scales, instead of writing a bf16 [rows, H] or
[rows, I] temporary that the quantizer reads back. Specs: the unfused pairs, whose pure-PyTorch references are
gather_expert_rows_reference, silu_and_mul_reference and ops/fp8_reference.per_token_group_quant.

Rows at or past num_rows are unspecified, as in the unfused pairs (gather_expert_rows and silu_and_mul leave them
uninitialised, so the quantizer turned garbage into garbage): they are neither read nor written. The grouped GEMMs
do not use them (rows past expert_offsets[-1] belong to no expert) and each GEMM output row depends only on its own
input row and scales.
"""

from __future__ import annotations

import torch

from longcat_service.kernels.fp8_gemm import ACT_DTYPES, FP8_DTYPE, GROUP


def _check_num_rows(name: str, num_rows: torch.Tensor | None, device: torch.device) -> None:
    if num_rows is not None and (num_rows.numel() != 1 or num_rows.device != device
                                 or num_rows.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: num_rows must be one int32/int64 element on {device}")


def _outputs(rows: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, k, dtype=FP8_DTYPE, device=device),
            torch.empty(rows, -(-k // GROUP), dtype=torch.float32, device=device))


def gather_quant_fp8(
    hidden: torch.Tensor, sorted_slots: torch.Tensor, top_k: int, num_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, H] (bf16, fp16 or fp32, unit last stride), sorted_slots int32 [T*k], num_rows a one-element
    integer tensor -> (x8 e4m3 [T*k, H], x_scale fp32 [T*k, ceil(H/128)]): row r < num_rows is
    hidden[sorted_slots[r] // top_k] quantized per group of 128; later rows are unspecified."""
    if hidden.dim() != 2 or sorted_slots.dim() != 1:
        raise ValueError(f"gather_quant_fp8: hidden {tuple(hidden.shape)} must be [T, H], sorted_slots 1-D")
    if hidden.dtype not in ACT_DTYPES:
        raise ValueError(f"gather_quant_fp8: hidden dtype {hidden.dtype} is not one of {ACT_DTYPES}")
    if sorted_slots.dtype not in (torch.int32, torch.int64) or sorted_slots.device != hidden.device:
        raise ValueError(f"gather_quant_fp8: sorted_slots must be int32/int64 on {hidden.device}")
    if num_rows is None:
        raise ValueError("gather_quant_fp8: num_rows is required (the count of real-expert rows)")
    _check_num_rows("gather_quant_fp8", num_rows, hidden.device)
    if hidden.shape[1] > 1 and hidden.stride(1) != 1:
        raise ValueError("gather_quant_fp8: the last dimension of hidden must be contiguous")
    x8, x_scale = _outputs(sorted_slots.shape[0], hidden.shape[1], hidden.device)
    if x8.numel():
        from longcat_service.kernels._moe_fp8_quant_triton import launch_gather_quant

        launch_gather_quant(hidden, sorted_slots.contiguous(), int(top_k), num_rows, x8, x_scale)
    return x8, x_scale


def silu_mul_quant_fp8(
    gate_up: torch.Tensor, num_rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [N, 2I] (bf16, fp16 or fp32, unit last stride) -> (act8 e4m3 [N, I], act_scale fp32
    [N, ceil(I/128)]): silu(gate) * up rounded to gate_up's dtype, quantized per group of 128. num_rows: an optional
    one-element integer tensor on gate_up's device; rows at or past it are neither read nor written."""
    if gate_up.dim() != 2 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul_quant_fp8: gate_up {tuple(gate_up.shape)} must be [N, 2I]")
    if gate_up.dtype not in ACT_DTYPES:
        raise ValueError(f"silu_mul_quant_fp8: dtype {gate_up.dtype} is not one of {ACT_DTYPES}")
    _check_num_rows("silu_mul_quant_fp8", num_rows, gate_up.device)
    if gate_up.shape[1] > 1 and gate_up.stride(1) != 1:
        raise ValueError("silu_mul_quant_fp8: the last dimension of gate_up must be contiguous")
    act8, act_scale = _outputs(gate_up.shape[0], gate_up.shape[1] // 2, gate_up.device)
    if act8.numel():
        from longcat_service.kernels._moe_fp8_quant_triton import launch_silu_mul_quant

        launch_silu_mul_quant(gate_up, num_rows, act8, act_scale)
    return act8, act_scale
