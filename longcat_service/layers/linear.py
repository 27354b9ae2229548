"""Linear layers that shard themselves across tensor-parallel ranks (nano-vllm / vLLM naming).

Column-parallel layers split the output rows, row-parallel layers split the input columns and all-reduce
the partial sums. Each weight's `weight_loader` takes this rank's shard from the full checkpoint tensor.
All of them multiply through `linear`, which takes the dense GEMV kernel for decode batches when enabled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_service import envs, ops
from longcat_service.distributed.parallel_state import all_reduce, get_tp_rank, get_tp_size
from longcat_service.layers.weight_utils import (
    WeightLoadError,
    check_shape,
    divide,
    loaded_shape,
    make_param,
    read_narrow,
)
from longcat_service.ops import extension

# Decode batches of up to LONGCAT_DENSE_GEMV_ROWS rows (default 2; bf16/fp16 on CUDA) multiply with the
# weight-streaming GEMV (csrc/cuda/dense_gemv.cu) instead of cuBLAS. On the H200 (benchmarks/RESULTS.md, session 4)
# it beat cuBLAS on every LongCat projection at 1 and 2 rows (fused q_a+kv_a 8.5 vs 12.1 us, dense down 37 vs
# 44 us, o_proj 25.7 vs 27.2) and lost from 4 rows (13.5 vs 12.3 us ...).
_DENSE_GEMV_BUILT = ops.ACTIVE_BACKEND == "extension cpu+cuda"
_DENSE_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the dense GEMV for a decode batch. Decided from shapes, dtypes, the env and the build only
    (never device values), so it is CUDA-graph safe; the GEMV itself falls back to F.linear on layouts it
    does not take (ops.extension.dense_gemv_supported)."""
    if (
        _DENSE_GEMV_BUILT
        and bias is None
        and x.is_cuda
        and x.dim() == 2
        and x.dtype in _DENSE_GEMV_DTYPES
        and x.shape[1] % 8 == 0
        and 1 <= x.shape[0] <= extension.DENSE_GEMV_MAX_ROWS
        and x.shape[0] <= envs.LONGCAT_DENSE_GEMV_ROWS  # read last: only decode-sized batches pay the env lookup
    ):
        return extension.dense_gemv(x, weight)
    return F.linear(x, weight, bias)


class ReplicatedLinear(nn.Module):
    """Every rank holds the whole weight."""

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = make_param(output_size, input_size, dtype=dtype)
        self.bias = make_param(output_size, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output rows split evenly; rank r holds rows [r*out/tp, (r+1)*out/tp). No gather: callers use the shard."""

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_rank = divide(output_size, self.tp_size, "ColumnParallelLinear output size")
        self.weight = make_param(self.output_size_per_rank, input_size, dtype=dtype, loader=self._load_rows)
        self.bias = make_param(self.output_size_per_rank, dtype=dtype, loader=self._load_rows) if bias else None

    @torch.no_grad()
    def _load_rows(self, param: torch.Tensor, loaded: Any) -> None:
        full = (self.output_size, *param.shape[1:])
        check_shape(loaded, full)
        param.copy_(read_narrow(loaded, 0, self.tp_rank * param.shape[0], param.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel outputs in one weight (gate+up); each rank holds its rows of each part, in order.

    The loader takes `shard_id`, the index of the part the checkpoint tensor belongs to.
    """

    def __init__(self, input_size: int, output_sizes: list[int], dtype: torch.dtype):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size, self.output_sizes = input_size, list(output_sizes)
        self.sizes_per_rank = [divide(s, self.tp_size, "MergedColumnParallelLinear output size") for s in output_sizes]
        self.weight = make_param(sum(self.sizes_per_rank), input_size, dtype=dtype, loader=self._load_part)

    @torch.no_grad()
    def _load_part(self, param: torch.Tensor, loaded: Any, shard_id: int) -> None:
        if not 0 <= shard_id < len(self.output_sizes):
            raise WeightLoadError(f"shard_id {shard_id} out of range for {len(self.output_sizes)} parts")
        check_shape(loaded, (self.output_sizes[shard_id], self.input_size))
        rows = self.sizes_per_rank[shard_id]
        offset = sum(self.sizes_per_rank[:shard_id])
        param[offset : offset + rows].copy_(read_narrow(loaded, 0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """Input columns split evenly; partial products are summed across ranks (bias added once, on rank 0)."""

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_rank = divide(input_size, self.tp_size, "RowParallelLinear input size")
        self.weight = make_param(output_size, self.input_size_per_rank, dtype=dtype, loader=self._load_cols)
        self.bias = make_param(output_size, dtype=dtype) if bias else None

    @torch.no_grad()
    def _load_cols(self, param: torch.Tensor, loaded: Any) -> None:
        check_shape(loaded, (self.output_size, self.input_size))
        cols = self.input_size_per_rank
        param.copy_(read_narrow(loaded, 1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return all_reduce(linear(x, self.weight, bias))


__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "linear",
    "loaded_shape",
]
