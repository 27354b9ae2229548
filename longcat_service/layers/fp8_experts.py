"""Routed-expert weights in block FP8 (the FP8 twin of layers/moe.FusedExperts)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from longcat_service.layers.expert_shard import ExpertShard
from longcat_service.layers.fp8_linear import check_block_aligned, quantize_into
from longcat_service.layers.weight_utils import WeightLoadError, check_shape, make_param, read_narrow
from longcat_service.ops.fp8 import BLOCK, FP8_DTYPE, cdiv


class Fp8FusedExperts(nn.Module):
    """layers/moe.FusedExperts (same sharding through ExpertShard, same loader arguments) with block-FP8 weights:
    w13 / w2 e4m3 and fp32 scales w13_scale [E_local, 2*ceil(I_local/128), ceil(H/128)] (the gate part's block
    rows, then the up part's) and w2_scale [E_local, ceil(H/128), ceil(I_local/128)]. Checkpoint scales arrive
    under `experts.<e>.<proj>.weight_scale_inv`; bf16/fp32 weights are quantized on load. Under tensor parallelism
    each rank's intermediate shard must be whole 128-blocks (ValueError otherwise); under expert parallelism a rank
    holds whole experts (weights and scales of the experts it owns only), so any intermediate size works."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.shard = shard = ExpertShard(num_experts, intermediate_size)
        self.tp_rank, self.tp_size, self.placement = shard.tp_rank, shard.tp_size, shard.placement
        self.local_experts, self.inter_per_rank = shard.local_experts, shard.inter_per_rank
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        i_local = self.inter_per_rank
        if shard.intermediate_split:
            check_block_aligned(i_local, self.tp_size, "expert_ffn_hidden_size")
        e, h, ib = shard.num_local, hidden_size, cdiv(i_local)
        self.w13 = make_param(e, 2 * i_local, h, dtype=FP8_DTYPE, loader=self._load_w13)
        self.w13_scale = make_param(e, 2 * ib, cdiv(h), dtype=torch.float32, loader=self._load_w13_scale)
        self.w2 = make_param(e, h, i_local, dtype=FP8_DTYPE, loader=self._load_w2)
        self.w2_scale = make_param(e, cdiv(h), ib, dtype=torch.float32, loader=self._load_w2_scale)
        self.w13.fp8_scale, self.w2.fp8_scale = self.w13_scale, self.w2_scale  # type: ignore[attr-defined]
        self.w13_parts = None if i_local % BLOCK == 0 else (i_local, i_local)  # see ops/fp8.py `parts`
        self.w8a8_reference = False  # see ops/fp8.fp8_expert_ffn

    def _w13_row(self, expert_id: int, shard: str) -> tuple[int | None, int]:
        """(row of the expert here or None, part: 0 gate / 1 up)."""
        row = self.shard.row(expert_id)
        if shard not in ("gate", "up"):
            raise WeightLoadError(f"w13 shard must be 'gate' or 'up', got {shard!r}")
        return row, 0 if shard == "gate" else 1

    def _w2_row(self, expert_id: int, shard: str) -> int | None:
        row = self.shard.row(expert_id)
        if shard != "down":
            raise WeightLoadError(f"w2 shard must be 'down', got {shard!r}")
        return row

    @torch.no_grad()
    def _load_w13(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str) -> None:
        row, part = self._w13_row(expert_id, shard)
        check_shape(loaded, (self.intermediate_size, self.hidden_size))
        if row is None:  # another rank's expert (EP): not read
            return
        i_local, ib = self.inter_per_rank, cdiv(self.inter_per_rank)
        local = read_narrow(loaded, 0, self.shard.inter_start, i_local)
        rows = param[row, part * i_local : (part + 1) * i_local]
        if local.dtype == FP8_DTYPE:
            rows.copy_(local)
        else:
            quantize_into(rows, self.w13_scale[row, part * ib : (part + 1) * ib], local)

    @torch.no_grad()
    def _load_w13_scale(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str) -> None:
        row, part = self._w13_row(expert_id, shard)
        check_shape(loaded, (cdiv(self.intermediate_size), cdiv(self.hidden_size)), "weight_scale_inv")
        if row is None:
            return
        ib = cdiv(self.inter_per_rank)
        param[row, part * ib : (part + 1) * ib].copy_(read_narrow(loaded, 0, self.shard.inter_start // BLOCK, ib))

    @torch.no_grad()
    def _load_w2(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str = "down") -> None:
        row = self._w2_row(expert_id, shard)
        check_shape(loaded, (self.hidden_size, self.intermediate_size))
        if row is None:
            return
        local = read_narrow(loaded, 1, self.shard.inter_start, self.inter_per_rank)
        if local.dtype == FP8_DTYPE:
            param[row].copy_(local)
        else:
            quantize_into(param[row], self.w2_scale[row], local)

    @torch.no_grad()
    def _load_w2_scale(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str = "down") -> None:
        row = self._w2_row(expert_id, shard)
        check_shape(loaded, (cdiv(self.hidden_size), cdiv(self.intermediate_size)), "weight_scale_inv")
        if row is None:
            return
        ib = cdiv(self.inter_per_rank)
        param[row].copy_(read_narrow(loaded, 1, self.shard.inter_start // BLOCK, ib))
