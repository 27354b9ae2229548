"""RMSNorm (Triton), with the reference that matches layers/layernorm.py exactly.

transformers' rounding, kept bit for bit: the norm is computed in fp32 and rounded to the model dtype; only then
is it multiplied by the weight (a model-dtype product). One kernel launch per call instead of the ~7 elementwise
kernels eager PyTorch runs.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] (last dim contiguous) -> [N, H] in x's dtype."""
    if x.dim() != 2 or weight.shape != (x.shape[-1],):
        raise ValueError(f"x {tuple(x.shape)} must be [N, H] and weight {tuple(weight.shape)} [H]")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} and weight dtype {weight.dtype} differ")
    from longcat_service.kernels._rmsnorm_triton import launch

    return launch(x, weight, eps)
