"""The routed MoE block: an fp32 softmax router over real + zero (identity) experts, and stacked expert weights.

Experts are split on the intermediate dimension: rank r holds, for every expert, gate rows and up rows
[r*I/tp, (r+1)*I/tp) (w13 [E, 2*I/tp, H]: its gate rows, then its up rows) and the matching w2 columns
(w2 [E, H, I/tp]). Each rank's `moe_forward` gives a partial fp32 sum; rank 0 alone adds the identity
(zero-expert) term so that the single all-reduce counts it once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from longcat_service import ops
from longcat_service.config import ModelConfig, quantizes
from longcat_service.distributed.parallel_state import all_reduce, get_tp_rank, get_tp_size
from longcat_service.layers.fp8_experts import Fp8FusedExperts
from longcat_service.layers.router import TopkRouter
from longcat_service.layers.weight_utils import WeightLoadError, check_shape, divide, make_param, read_narrow
from longcat_service.ops.fp8 import moe_forward_fp8

EXPERT_SHARDS = ("gate", "up", "down")


class FusedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.inter_per_rank = divide(intermediate_size, self.tp_size, "expert_ffn_hidden_size")
        i_local = self.inter_per_rank
        self.w13 = make_param(num_experts, 2 * i_local, hidden_size, dtype=dtype, loader=self._load_w13)
        self.w2 = make_param(num_experts, hidden_size, i_local, dtype=dtype, loader=self._load_w2)

    def _check_expert(self, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise WeightLoadError(f"expert id {expert_id} out of range [0, {self.num_experts})")

    @torch.no_grad()
    def _load_w13(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str) -> None:
        """shard 'gate' or 'up': an HF [I, H] gate_proj / up_proj weight of one expert."""
        self._check_expert(expert_id)
        if shard not in ("gate", "up"):
            raise WeightLoadError(f"w13 shard must be 'gate' or 'up', got {shard!r}")
        check_shape(loaded, (self.intermediate_size, self.hidden_size))
        i_local = self.inter_per_rank
        offset = 0 if shard == "gate" else i_local
        param[expert_id, offset : offset + i_local].copy_(read_narrow(loaded, 0, self.tp_rank * i_local, i_local))

    @torch.no_grad()
    def _load_w2(self, param: torch.Tensor, loaded: Any, expert_id: int, shard: str = "down") -> None:
        """An HF [H, I] down_proj weight of one expert."""
        self._check_expert(expert_id)
        if shard != "down":
            raise WeightLoadError(f"w2 shard must be 'down', got {shard!r}")
        check_shape(loaded, (self.hidden_size, self.intermediate_size))
        i_local = self.inter_per_rank
        param[expert_id].copy_(read_narrow(loaded, 1, self.tp_rank * i_local, i_local))


class LongcatMoE(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, prefix: str = "mlp"):
        super().__init__()
        self.top_k = config.moe_topk
        self.routed_scaling_factor = config.routed_scaling_factor
        self.router = TopkRouter(config.hidden_size, config.num_router_experts)  # stays fp32, never quantized
        experts_cls = Fp8FusedExperts if quantizes(config, f"{prefix}.experts") else FusedExperts
        self.experts = experts_cls(config.n_routed_experts, config.hidden_size, config.expert_ffn_hidden_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] model dtype (post_attention_layernorm[0] output) -> [T, H] model dtype."""
        add_identity = self.experts.tp_rank == 0
        logits, bias = self.router(x), self.router.e_score_correction_bias
        if isinstance(self.experts, Fp8FusedExperts):
            out = moe_forward_fp8(x, logits, bias, self.experts, self.top_k, self.routed_scaling_factor, add_identity)
        else:
            out = ops.moe_forward(x, logits, bias, self.experts.w13, self.experts.w2, self.top_k,
                                  self.routed_scaling_factor, add_identity=add_identity)
        # One all-reduce of the fp32 partial sums, then a single cast (HF accumulates in fp32 too).
        return all_reduce(out).to(x.dtype)
