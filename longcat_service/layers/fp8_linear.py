"""Block-FP8 twins of the linear layers in linear.py (same constructor arguments, same sharding).

Each holds this rank's `weight` (float8_e4m3fn [rows, cols]) and `weight_scale_inv` (fp32, one value per 128 x 128
block). The weight loader takes either an e4m3 checkpoint tensor (its scale arrives under `<name>.weight_scale_inv`)
or a bf16/fp32 one, which it quantizes into the same format (`--quantization fp8`, dummy weights); which one a
checkpoint may hold is the model loader's decision. A merged layer keeps one scale block-row range per part, so
parts need not be whole 128-row blocks (fp8.standard_layout says when that is also the kernels' layout).

Tensor parallelism: a rank's shard must start on a block boundary so that its scales are a slice of the
checkpoint's; with tensor_parallel_size > 1 a sharded dimension that is not a multiple of 128 per rank is refused
at construction (ValueError naming the layer, the size and the tensor-parallel size).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from longcat_service.distributed.parallel_state import all_reduce, get_tp_rank, get_tp_size
from longcat_service.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from longcat_service.layers.weight_utils import (
    WeightLoadError,
    check_shape,
    divide,
    make_param,
    read_full,
    read_narrow,
)
from longcat_service.ops.fp8 import BLOCK, FP8_DTYPE, cdiv, fp8_linear, standard_layout
from longcat_service.ops.fp8_reference import block_quant


def check_block_aligned(size_per_rank: int, tp_size: int, what: str) -> None:
    if tp_size > 1 and size_per_rank % BLOCK:
        raise ValueError(
            f"{what}: {size_per_rank} per rank at tensor_parallel_size {tp_size} is not a multiple of the FP8 "
            f"{BLOCK}-wide scale block, so the block scales cannot be split with the weight; use a tensor-parallel "
            "size that keeps every shard a whole number of blocks (or an unquantized checkpoint)"
        )


def quantize_into(w8: torch.Tensor, scale: torch.Tensor, loaded: torch.Tensor) -> None:
    """Quantize a bf16/fp32 tensor into (w8, scale) views of the same block-aligned region."""
    q, s = block_quant(loaded.to(w8.device))
    w8.copy_(q)
    scale.copy_(s)


class Fp8Linear(nn.Module):
    """Shared body. shard_dim: 0 = rows split across ranks (column-parallel), 1 = columns (row-parallel),
    None = replicated. output_sizes: the full rows of each checkpoint part (one part unless merged)."""

    def __init__(self, input_size: int, output_sizes: list[int], dtype: torch.dtype, bias: bool,
                 shard_dim: int | None, name: str):
        super().__init__()
        self.tp_rank, self.tp_size = (get_tp_rank(), get_tp_size()) if shard_dim is not None else (0, 1)
        self.shard_dim = shard_dim
        self.input_size, self.output_sizes = input_size, list(output_sizes)
        self.output_size = sum(output_sizes)
        if shard_dim == 0:
            self.part_rows = [divide(s, self.tp_size, f"{name} output size") for s in output_sizes]
            for rows in self.part_rows:
                check_block_aligned(rows, self.tp_size, f"{name} output rows")
            self.cols = input_size
        else:
            self.part_rows = list(output_sizes)
            self.cols = divide(input_size, self.tp_size, f"{name} input size") if shard_dim == 1 else input_size
            check_block_aligned(self.cols, self.tp_size, f"{name} input columns")
        self.weight = make_param(sum(self.part_rows), self.cols, dtype=FP8_DTYPE, loader=self._load_weight)
        self.weight_scale_inv = make_param(sum(cdiv(r) for r in self.part_rows), cdiv(self.cols),
                                           dtype=torch.float32, loader=self._load_scale)
        self.weight.fp8_scale = self.weight_scale_inv  # type: ignore[attr-defined]  (checkpoint_targets)
        self.parts = None if standard_layout(self.part_rows) else tuple(self.part_rows)
        self.w8a8_reference = False  # see ops/fp8.fp8_linear; set by LongcatFlashForCausalLM.use_w8a8_reference
        local_bias = self.part_rows if shard_dim == 0 else self.output_sizes
        self.bias = make_param(sum(local_bias), dtype=dtype, loader=self._load_bias) if bias else None

    # ---- loading -------------------------------------------------------------------------------
    def _local(self, loaded: Any, part: int, block: int) -> torch.Tensor:
        """This rank's piece of a full checkpoint tensor of `part` (block 1: the weight, BLOCK: its scale)."""
        if self.shard_dim is None or self.tp_size == 1:
            return read_full(loaded)
        size = self.part_rows[part] if self.shard_dim == 0 else self.cols
        return read_narrow(loaded, self.shard_dim, self.tp_rank * size // block, cdiv(size, block))

    def _rows(self, part: int, block: int) -> slice:
        start = sum(cdiv(r, block) for r in self.part_rows[:part])
        return slice(start, start + cdiv(self.part_rows[part], block))

    def _check_part(self, part: int) -> None:
        if not 0 <= part < len(self.output_sizes):
            raise WeightLoadError(f"shard_id {part} out of range for {len(self.output_sizes)} parts")

    @torch.no_grad()
    def _load_weight(self, param: torch.Tensor, loaded: Any, part: int = 0) -> None:
        self._check_part(part)
        check_shape(loaded, (self.output_sizes[part], self.input_size))
        local = self._local(loaded, part, 1)
        if local.dtype == FP8_DTYPE:
            param[self._rows(part, 1)].copy_(local)
        else:
            quantize_into(param[self._rows(part, 1)], self.weight_scale_inv[self._rows(part, BLOCK)], local)

    @torch.no_grad()
    def _load_scale(self, param: torch.Tensor, loaded: Any, part: int = 0) -> None:
        self._check_part(part)
        check_shape(loaded, (cdiv(self.output_sizes[part]), cdiv(self.input_size)), "weight_scale_inv")
        param[self._rows(part, BLOCK)].copy_(self._local(loaded, part, BLOCK))

    @torch.no_grad()
    def _load_bias(self, param: torch.Tensor, loaded: Any, part: int = 0) -> None:
        self._check_part(part)
        check_shape(loaded, (self.output_sizes[part],), "bias")
        if self.shard_dim == 0:
            param[self._rows(part, 1)].copy_(read_narrow(loaded, 0, self.tp_rank * self.part_rows[part],
                                                         self.part_rows[part]))
        else:
            start = sum(self.output_sizes[:part])
            param[start : start + self.output_sizes[part]].copy_(read_full(loaded))

    # ---- compute -------------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.parts, self.w8a8_reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out + self.bias if self.bias is not None else out


class Fp8ReplicatedLinear(Fp8Linear):
    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, bias: bool = False):
        super().__init__(input_size, [output_size], dtype, bias, None, "ReplicatedLinear")


class Fp8ColumnParallelLinear(Fp8Linear):
    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, bias: bool = False):
        super().__init__(input_size, [output_size], dtype, bias, 0, "ColumnParallelLinear")
        self.output_size_per_rank = self.part_rows[0]


class Fp8MergedColumnParallelLinear(Fp8Linear):
    def __init__(self, input_size: int, output_sizes: list[int], dtype: torch.dtype):
        super().__init__(input_size, output_sizes, dtype, False, 0, "MergedColumnParallelLinear")
        self.sizes_per_rank = self.part_rows


class Fp8RowParallelLinear(Fp8Linear):
    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, bias: bool = False):
        super().__init__(input_size, [output_size], dtype, bias, 1, "RowParallelLinear")
        self.input_size_per_rank = self.cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        if self.bias is not None and self.tp_rank == 0:
            out = out + self.bias
        return all_reduce(out)


FP8_TWINS: dict[type, type] = {
    ReplicatedLinear: Fp8ReplicatedLinear,
    ColumnParallelLinear: Fp8ColumnParallelLinear,
    MergedColumnParallelLinear: Fp8MergedColumnParallelLinear,
    RowParallelLinear: Fp8RowParallelLinear,
}


def linear_class(cls: type, fp8: bool) -> type:
    """`cls` (a layer of linear.py), or its block-FP8 twin when fp8."""
    return FP8_TWINS[cls] if fp8 else cls
