"""The routed MoE block: an fp32 softmax router over real + zero (identity) experts, and stacked expert weights.

Tensor parallelism (default): experts are split on the intermediate dimension: rank r holds, for every expert,
gate rows and up rows [r*I/tp, (r+1)*I/tp) (w13 [E, 2*I/tp, H]: its gate rows, then its up rows) and the matching
w2 columns (w2 [E, H, I/tp]). Each rank's `moe_forward` gives a partial fp32 sum; rank 0 alone adds the identity
(zero-expert) term so that the single all-reduce counts it once.

Expert parallelism (`parallel_state.set_expert_parallel`): rank r holds whole experts, those the placement gives
it (w13 [E_r, 2I, H], w2 [E_r, H, I]; BF16 or block FP8, layers/expert_shard.py); tokens travel to their experts
and back (layers/moe_ep.py): with variable splits in eager steps, with fixed capacity per peer inside
`static_dispatch()` (CUDA-graph decode; distributed/ep_static_dispatch.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from longcat_service import ops
from longcat_service.config import ModelConfig, quantizes
from longcat_service.distributed import parallel_state
from longcat_service.distributed.ep_static_dispatch import (
    FixedCapacityDispatcher,
    capacity_per_peer,
    static_dispatch_active,
)
from longcat_service.distributed.expert_parallel import (
    AllToAllDispatcher,
    all_gather_token_shares,
    owned_token_range,
)
from longcat_service.distributed.parallel_state import all_reduce
from longcat_service.layers.expert_shard import ExpertShard
from longcat_service.layers.fp8_experts import Fp8FusedExperts
from longcat_service.layers.moe_ep import exchange_static, exchange_variable
from longcat_service.layers.router import TopkRouter
from longcat_service.layers.weight_utils import WeightLoadError, check_shape, make_param, read_narrow
from longcat_service.ops.fp8 import fp8_expert_ffn, moe_forward_fp8

EXPERT_SHARDS = ("gate", "up", "down")


class FusedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.shard = shard = ExpertShard(num_experts, intermediate_size)
        self.tp_rank, self.tp_size, self.placement = shard.tp_rank, shard.tp_size, shard.placement
        self.local_experts, self.inter_per_rank = shard.local_experts, shard.inter_per_rank
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        i_local = self.inter_per_rank
        self.w13 = make_param(shard.num_local, 2 * i_local, hidden_size, dtype=dtype, loader=self._load_w13)
        self.w2 = make_param(shard.num_local, hidden_size, i_local, dtype=dtype, loader=self._load_w2)

    @torch.no_grad()
    def _load_w13(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str) -> None:
        """shard 'gate' or 'up': an HF [I, H] gate_proj / up_proj weight of one expert."""
        row = self.shard.row(expert_id)
        if shard not in ("gate", "up"):
            raise WeightLoadError(f"w13 shard must be 'gate' or 'up', got {shard!r}")
        check_shape(loaded, (self.intermediate_size, self.hidden_size))
        if row is None:
            return
        i_local = self.inter_per_rank
        offset = 0 if shard == "gate" else i_local
        param[row, offset : offset + i_local].copy_(read_narrow(loaded, 0, self.shard.inter_start, i_local))

    @torch.no_grad()
    def _load_w2(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str = "down") -> None:
        """An HF [H, I] down_proj weight of one expert."""
        row = self.shard.row(expert_id)
        if shard != "down":
            raise WeightLoadError(f"w2 shard must be 'down', got {shard!r}")
        check_shape(loaded, (self.hidden_size, self.intermediate_size))
        if row is None:
            return
        param[row].copy_(read_narrow(loaded, 1, self.shard.inter_start, self.inter_per_rank))


class LongcatMoE(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, prefix: str = "mlp"):
        super().__init__()
        self.top_k = config.moe_topk
        self.routed_scaling_factor = config.routed_scaling_factor
        self.router = TopkRouter(config.hidden_size, config.num_router_experts)  # stays fp32, never quantized
        fp8 = quantizes(config, f"{prefix}.experts")
        experts_cls = Fp8FusedExperts if fp8 else FusedExperts
        self.experts = experts_cls(config.n_routed_experts, config.hidden_size, config.expert_ffn_hidden_size, dtype)
        self.dispatcher: AllToAllDispatcher | None = None
        if getattr(self.experts, "placement", None) is not None:
            group, world = parallel_state.get_tp_group(), self.experts.tp_size
            self.dispatcher = AllToAllDispatcher(group, world)
            self.static_dispatcher = FixedCapacityDispatcher(group, world)
            device = self.router.e_score_correction_bias.device
            self._owner = torch.tensor(self.experts.placement.owner, dtype=torch.int64, device=device)
            self._local_row = torch.tensor(self.experts.placement.local_index, dtype=torch.int64, device=device)
            # set by each fixed-capacity step (static_dispatch): this layer dropped slots (see capacity_overflowed)
            self.capacity_overflow = torch.zeros((), dtype=torch.bool, device=device)

        # tokens routed to each real expert (last entry: identity slots), counted only once enabled
        self.expert_load: torch.Tensor | None = None

    def enable_load_counting(self) -> None:
        """Count the slots routed to each expert from now on (for a static EP placement; see distributed/eplb.py).
        Adds a second router top-k and one index_add per layer and step (CUDA-graph safe)."""
        self.expert_load = torch.zeros(self.experts.num_experts + 1, dtype=torch.int64,
                                       device=self.router.e_score_correction_bias.device)

    def _count(self, ids: torch.Tensor) -> None:
        flat = ids.reshape(-1).long().clamp(max=self.experts.num_experts)
        self.expert_load.index_add_(0, flat, torch.ones_like(flat))

    def forward(self, x: torch.Tensor, x_f32: torch.Tensor | None = None, fp32_out: bool = False) -> torch.Tensor:
        """x: [T, H] model dtype (post_attention_layernorm[0] output) -> [T, H] model dtype (fp32_out: the fp32 sum
        before that cast, for a caller whose fused add casts it). x_f32: x.float() if the caller has it (router)."""
        if self.dispatcher is not None:
            return self._forward_expert_parallel(x, x_f32, fp32_out)
        add_identity = self.experts.tp_rank == 0
        logits, bias = self.router(x, x_f32), self.router.e_score_correction_bias
        if self.expert_load is not None:  # opt-in: the routing once more, only to count it
            self._count(ops.router_topk(logits, bias, self.top_k, self.routed_scaling_factor,
                                        self.experts.num_experts)[0])
        if isinstance(self.experts, Fp8FusedExperts):
            out = moe_forward_fp8(x, logits, bias, self.experts, self.top_k, self.routed_scaling_factor, add_identity)
        else:
            out = ops.moe_forward(x, logits, bias, self.experts.w13, self.experts.w2, self.top_k,
                                  self.routed_scaling_factor, add_identity=add_identity)
        # One all-reduce of the fp32 partial sums, then a single cast (HF accumulates in fp32 too).
        out = all_reduce(out)
        return out if fp32_out else out.to(x.dtype)

    def _forward_expert_parallel(self, x: torch.Tensor, x_f32: torch.Tensor | None = None,
                                 fp32_out: bool = False) -> torch.Tensor:
        """Route this rank's share of the tokens, send real-expert slots to their experts' ranks, run the local
        experts on what arrives, send the outputs back, combine in slot order, all-gather the shares. Inside
        `static_dispatch()` (CUDA-graph decode) with fixed capacity per peer, else with variable splits."""
        experts = self.experts
        rank, world = experts.tp_rank, experts.tp_size
        start, end = owned_token_range(x.shape[0], rank, world)
        share = x[start:end]
        share_f32 = None if x_f32 is None else x_f32[start:end]
        ids, weights, zero_weight = ops.router_topk(self.router(share, share_f32), self.router.e_score_correction_bias,
                                                    self.top_k, self.routed_scaling_factor, experts.num_experts)
        if self.expert_load is not None:
            self._count(ids)
        if static_dispatch_active():
            capacity = capacity_per_peer(x.shape[0], world, self.top_k, parallel_state.get_ep_capacity_factor())
            expert_out, slot_rows, overflow = exchange_static(
                share, ids, experts.num_experts, self._owner, self._local_row, self.top_k, experts.w13.shape[0],
                self.static_dispatcher, self._local_experts, capacity)
            self.capacity_overflow.copy_(overflow)
        else:
            expert_out, slot_rows = exchange_variable(share, ids, experts.num_experts, self._owner, self._local_row,
                                                      self.top_k, world, self.dispatcher, self._local_experts)
        out_share = ops.combine(expert_out, slot_rows, weights, share, zero_weight, True)
        out = all_gather_token_shares(out_share, x.shape[0], rank, world, parallel_state.get_tp_group())
        return out if fp32_out else out.to(x.dtype)

    def _local_experts(self, rows: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """This rank's experts on received rows (one slot each; local_expert >= E_local: no expert, output
        unspecified) -> [R, H] aligned with rows. BF16 or block-FP8 weights."""
        e = self.experts
        offsets, sorted_slots, slot_rows, active, num_active = ops.moe_align(
            local_expert.to(torch.int32).reshape(-1, 1), e.w13.shape[0])
        if isinstance(e, Fp8FusedExperts):
            y = fp8_expert_ffn(rows, e.w13, e.w13_scale, e.w2, e.w2_scale, offsets, sorted_slots, 1, active,
                               num_active, e.w13_parts, e.w8a8_reference)
        else:
            y = ops.expert_ffn(rows, e.w13, e.w2, offsets, sorted_slots, 1)
        return y.index_select(0, slot_rows.long().clamp(min=0))


def capacity_overflowed(model: nn.Module) -> Callable[[], bool] | None:
    """For a model with expert-parallel MoE layers: a function telling whether the last fixed-capacity step
    (static_dispatch) dropped slots in any layer (reads the device flags: a host sync). None without EP."""
    flags = [m.capacity_overflow for m in model.modules() if isinstance(m, LongcatMoE) and m.dispatcher is not None]
    if not flags:
        return None
    return lambda: bool(torch.stack(flags).any().item())
