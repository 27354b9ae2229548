"""RMSNorm exactly as transformers' LongcatFlashRMSNorm computes it, and its fused residual-add form."""

from __future__ import annotations

import torch
import torch.nn as nn

from longcat_service.kernels import fast_path_enabled
from longcat_service.layers.weight_utils import make_param


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = make_param(hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_path_enabled(x):  # one Triton kernel instead of ~7 eager ones; same rounding
            from longcat_service.kernels.rmsnorm import rms_norm

            return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # The weight multiplies after the cast back (a model-dtype product), as in transformers.
        return self.weight * normed.to(x.dtype)

    def add_norm(self, residual: torch.Tensor, *addends: torch.Tensor) -> torch.Tensor:
        """residual += addends (in place, in order, each cast to residual's dtype and each sum rounded: eager
        `residual + a + b`), then the norm of it. The caller must own `residual` (nothing else may read the old
        value). On CUDA one Triton kernel (kernels/rmsnorm.fused_add_rms_norm) instead of the adds + the norm."""
        return self._add_norm(residual, addends, False)[0]

    def add_norm_fp32(self, residual: torch.Tensor, *addends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """add_norm, and the normed output's exact fp32 copy (the fp32 router's input), from the same kernel."""
        out, out32 = self._add_norm(residual, addends, True)
        return out, out32 if out32 is not None else out.float()

    def _add_norm(self, residual: torch.Tensor, addends: tuple[torch.Tensor, ...], fp32_copy: bool):
        if addends and fast_path_enabled(residual) and residual.dim() == 2:
            from longcat_service.kernels.rmsnorm import fused_add_rms_norm

            return fused_add_rms_norm(residual, addends, self.weight, self.eps, fp32_copy)
        for a in addends:
            residual.add_(a.to(residual.dtype))
        return self.forward(residual), None

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
