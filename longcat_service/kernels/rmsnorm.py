"""RMSNorm and the fused residual-add + RMSNorm (Triton), with references that match layers/layernorm.py exactly.

transformers' rounding, kept bit for bit: the norm is computed in fp32 and rounded to the model dtype; only then
is it multiplied by the weight (a model-dtype product). One kernel launch per call instead of the ~7 elementwise
kernels eager PyTorch runs.

fused_add_rms_norm replaces `residual = residual + a (+ b); out = rms_norm(residual)` (vLLM's fused_add_rms_norm,
with an optional second addend for the decoder's `h + mlp_out + moe_out`): one launch instead of one or two adds
and a norm, the residual updated in place. Each addend is first rounded to the residual's dtype (an fp32 MoE sum
is cast as `.to(dtype)` would) and each sum is rounded to that dtype, as eager torch's adds round; the norm is the
plain kernel's row routine on the same tile, so on a GPU the result equals add(s) + rms_norm bit for bit.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_residual_reference(residual: torch.Tensor, *addends: torch.Tensor) -> torch.Tensor:
    """residual += each addend in turn (cast to residual's dtype first), in place; returns residual."""
    for a in addends:
        residual.add_(a.to(residual.dtype))
    return residual


def fused_add_rms_norm_reference(residual: torch.Tensor, addends: tuple[torch.Tensor, ...], weight: torch.Tensor,
                                 eps: float) -> torch.Tensor:
    """The spec of fused_add_rms_norm: the eager adds, in place, then the reference norm."""
    return rms_norm_reference(add_residual_reference(residual, *addends), weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] (last dim contiguous) -> [N, H] in x's dtype."""
    if x.dim() != 2 or weight.shape != (x.shape[-1],):
        raise ValueError(f"x {tuple(x.shape)} must be [N, H] and weight {tuple(weight.shape)} [H]")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} and weight dtype {weight.dtype} differ")
    from longcat_service.kernels._rmsnorm_triton import launch

    return launch(x, weight, eps)


def fused_add_rms_norm(residual: torch.Tensor, addends: tuple[torch.Tensor, ...], weight: torch.Tensor, eps: float,
                       fp32_copy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """residual [N, H] += addends (one or two [N, H], any float dtype; in place), then (rms_norm(residual), its
    exact fp32 copy or None). Unit last strides; rows may be strided."""
    if residual.dim() != 2 or weight.shape != (residual.shape[-1],):
        raise ValueError(f"residual {tuple(residual.shape)} must be [N, H] and weight {tuple(weight.shape)} [H]")
    if residual.dtype != weight.dtype:
        raise ValueError(f"residual dtype {residual.dtype} and weight dtype {weight.dtype} differ")
    if not 1 <= len(addends) <= 2:
        raise ValueError(f"fused_add_rms_norm takes one or two addends, got {len(addends)}")
    for a in addends:
        if a.shape != residual.shape or not a.is_floating_point() or a.device != residual.device:
            raise ValueError(f"addend {a.dtype} {tuple(a.shape)} on {a.device} does not match the residual "
                             f"{tuple(residual.shape)} on {residual.device}")
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (residual, *addends)):
        raise ValueError("fused_add_rms_norm: the last dimension of the residual and addends must be contiguous")
    from longcat_service.kernels._rmsnorm_triton import launch_fused_add

    return launch_fused_add(residual, addends[0], addends[1] if len(addends) == 2 else None, weight, eps, fp32_copy)
