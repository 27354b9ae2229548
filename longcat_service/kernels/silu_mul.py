"""SwiGLU activation in one pass (Triton): silu(gate) * up from the [N, 2I] output of a gate+up GEMM.

Rounding kept bit for bit from the eager torch code `F.silu(gate) * up`: torch computes silu in fp32
(x / (1 + exp(-x)), IEEE division, CUDA's expf) and rounds it once to the model dtype; the product of two
model-dtype values is computed in fp32 and rounded once. The kernel does the same, in one launch that reads
gate_up once and writes [N, I], instead of a silu kernel, a mul kernel and an [N, I] temporary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The eager code the kernel replaces (and the CPU path): gate columns [0, I), up columns [I, 2I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor, num_rows: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [N, 2I] (last dim contiguous) -> silu(gate_up[:, :I]) * gate_up[:, I:], a new [N, I] tensor.

    num_rows: an optional one-element integer tensor on gate_up's device; rows at or past its value are
    neither read nor written (their output is uninitialised). It is read by the kernel, not the host, so
    the call stays free of host syncs (the MoE passes expert_offsets[-1:], its count of real rows).
    """
    if gate_up.dim() != 2 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: gate_up {tuple(gate_up.shape)} must be [N, 2I]")
    if gate_up.dtype not in DTYPES:
        raise ValueError(f"silu_and_mul: dtype {gate_up.dtype} is not one of {DTYPES}")
    if num_rows is not None and (num_rows.numel() != 1 or num_rows.device != gate_up.device
                                 or num_rows.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"silu_and_mul: num_rows must be one int32/int64 element on {gate_up.device}")
    from longcat_service.kernels._silu_mul_triton import launch

    return launch(gate_up, num_rows)
