"""Routed-expert weights in block FP8 (the FP8 twin of layers/moe.FusedExperts)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from longcat_service.distributed.parallel_state import get_tp_rank, get_tp_size
from longcat_service.layers.fp8_linear import check_block_aligned, quantize_into
from longcat_service.layers.weight_utils import WeightLoadError, check_shape, divide, make_param, read_narrow
from longcat_service.ops.fp8 import BLOCK, FP8_DTYPE, cdiv


class Fp8FusedExperts(nn.Module):
    """layers/moe.FusedExperts (same sharding, same loader arguments) with block-FP8 weights: w13 / w2 e4m3 and fp32 scales w13_scale [E, 2*ceil(I/tp/128), ceil(H/128)]
    (the gate part's block rows, then the up part's) and w2_scale [E, ceil(H/128), ceil(I/tp/128)]. Checkpoint
    scales arrive under `experts.<e>.<proj>.weight_scale_inv`; bf16/fp32 weights are quantized on load. Each rank's
    intermediate shard must be whole 128-blocks when tensor_parallel_size > 1 (ValueError otherwise)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.inter_per_rank = i_local = divide(intermediate_size, self.tp_size, "expert_ffn_hidden_size")
        check_block_aligned(i_local, self.tp_size, "expert_ffn_hidden_size")
        e, h, ib = num_experts, hidden_size, cdiv(i_local)
        self.w13 = make_param(e, 2 * i_local, h, dtype=FP8_DTYPE, loader=self._load_w13)
        self.w13_scale = make_param(e, 2 * ib, cdiv(h), dtype=torch.float32, loader=self._load_w13_scale)
        self.w2 = make_param(e, h, i_local, dtype=FP8_DTYPE, loader=self._load_w2)
        self.w2_scale = make_param(e, cdiv(h), ib, dtype=torch.float32, loader=self._load_w2_scale)
        self.w13.fp8_scale, self.w2.fp8_scale = self.w13_scale, self.w2_scale  # type: ignore[attr-defined]
        self.w13_parts = None if i_local % BLOCK == 0 else (i_local, i_local)  # see ops/fp8.py `parts`
        self.w8a8_reference = False  # see ops/fp8.fp8_expert_ffn

    def _check_expert(self, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise WeightLoadError(f"expert id {expert_id} out of range [0, {self.num_experts})")

    def _w13_part(self, expert_id: int, shard: str) -> int:
        self._check_expert(expert_id)
        if shard not in ("gate", "up"):
            raise WeightLoadError(f"w13 shard must be 'gate' or 'up', got {shard!r}")
        return 0 if shard == "gate" else 1

    @torch.no_grad()
    def _load_w13(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str) -> None:
        part = self._w13_part(expert_id, shard)
        check_shape(loaded, (self.intermediate_size, self.hidden_size))
        i_local, ib = self.inter_per_rank, cdiv(self.inter_per_rank)
        local = read_narrow(loaded, 0, self.tp_rank * i_local, i_local)
        rows = param[expert_id, part * i_local : (part + 1) * i_local]
        if local.dtype == FP8_DTYPE:
            rows.copy_(local)
        else:
            quantize_into(rows, self.w13_scale[expert_id, part * ib : (part + 1) * ib], local)

    @torch.no_grad()
    def _load_w13_scale(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str) -> None:
        part = self._w13_part(expert_id, shard)
        check_shape(loaded, (cdiv(self.intermediate_size), cdiv(self.hidden_size)), "weight_scale_inv")
        ib = cdiv(self.inter_per_rank)
        param[expert_id, part * ib : (part + 1) * ib].copy_(
            read_narrow(loaded, 0, self.tp_rank * self.inter_per_rank // BLOCK, ib))

    @torch.no_grad()
    def _load_w2(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str = "down") -> None:
        self._check_expert(expert_id)
        if shard != "down":
            raise WeightLoadError(f"w2 shard must be 'down', got {shard!r}")
        check_shape(loaded, (self.hidden_size, self.intermediate_size))
        i_local = self.inter_per_rank
        local = read_narrow(loaded, 1, self.tp_rank * i_local, i_local)
        if local.dtype == FP8_DTYPE:
            param[expert_id].copy_(local)
        else:
            quantize_into(param[expert_id], self.w2_scale[expert_id], local)

    @torch.no_grad()
    def _load_w2_scale(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str = "down") -> None:
        self._check_expert(expert_id)
        if shard != "down":
            raise WeightLoadError(f"w2 shard must be 'down', got {shard!r}")
        check_shape(loaded, (cdiv(self.hidden_size), cdiv(self.intermediate_size)), "weight_scale_inv")
        ib = cdiv(self.inter_per_rank)
        param[expert_id].copy_(read_narrow(loaded, 1, self.tp_rank * self.inter_per_rank // BLOCK, ib))
