"""RMSNorm and fused residual-add + RMSNorm (Triton), with references that match layers/layernorm.py exactly.

transformers' rounding, kept bit for bit: the sum x + residual is rounded to the model dtype; the norm is
computed in fp32 and rounded to the model dtype; only then is it multiplied by the weight (a model-dtype
product). One kernel launch per call instead of the ~7 elementwise kernels eager PyTorch runs.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual), x + residual)."""
    total = x + residual
    return rms_norm_reference(total, weight, eps), total


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[-1],):
        raise ValueError(f"x {tuple(x.shape)} must be [N, H] and weight {tuple(weight.shape)} [H]")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} and weight dtype {weight.dtype} differ")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] (last dim contiguous) -> [N, H] in x's dtype."""
    _check(x, weight)
    from longcat_service.kernels._rmsnorm_triton import launch

    return launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual), x + residual), one pass over the rows."""
    _check(x, weight, residual)
    from longcat_service.kernels._rmsnorm_triton import launch

    return launch(x, residual, weight, eps)
