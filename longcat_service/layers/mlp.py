"""Dense SwiGLU MLP, split across ranks on the intermediate dimension."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_service.kernels import fast_path_enabled
from longcat_service.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], dtype)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fast_path_enabled(gate_up):  # one Triton kernel instead of silu + mul; bit-identical
            from longcat_service.kernels.silu_mul import silu_and_mul

            act = silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return self.down_proj(act)
