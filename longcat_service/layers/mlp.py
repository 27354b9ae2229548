"""Dense SwiGLU MLP, split across ranks on the intermediate dimension."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_service.config import QuantConfig
from longcat_service.kernels import fast_path_enabled
from longcat_service.layers.fp8_linear import linear_class
from longcat_service.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class DenseMLP(nn.Module):
    """quant / prefix: block-FP8 projections where `quant` covers `<prefix>.gate_proj` / `<prefix>.down_proj`
    (gate_proj decides for the merged gate+up weight)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 quant: QuantConfig | None = None, prefix: str = "mlp"):
        super().__init__()

        def fp8(name: str) -> bool:
            return quant is not None and quant.quantizes(f"{prefix}.{name}")

        merged = linear_class(MergedColumnParallelLinear, fp8("gate_proj"))
        self.gate_up_proj = merged(hidden_size, [intermediate_size, intermediate_size], dtype)
        self.down_proj = linear_class(RowParallelLinear, fp8("down_proj"))(intermediate_size, hidden_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fast_path_enabled(gate_up):  # one Triton kernel instead of silu + mul; bit-identical
            from longcat_service.kernels.silu_mul import silu_and_mul

            act = silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return self.down_proj(act)
