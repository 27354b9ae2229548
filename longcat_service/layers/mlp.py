"""Dense SwiGLU MLP, split across ranks on the intermediate dimension."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_service.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], dtype)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
