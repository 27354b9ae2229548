"""Which routed experts, and which slice of their intermediate dimension, this rank holds (BF16 and FP8 alike).

Tensor parallelism: every expert, intermediate rows [r*I/tp, (r+1)*I/tp). Expert parallelism: the whole experts
that the placement gives rank r (distributed/expert_parallel.py), full intermediate width.
"""

from __future__ import annotations

from longcat_service.distributed import parallel_state
from longcat_service.distributed.expert_parallel import ExpertPlacement
from longcat_service.distributed.parallel_state import get_tp_rank, get_tp_size
from longcat_service.layers.weight_utils import WeightLoadError, divide


class ExpertShard:
    def __init__(self, num_experts: int, intermediate_size: int):
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.placement: ExpertPlacement | None = None
        if parallel_state.expert_parallel_enabled():
            self.placement = ExpertPlacement.resolve(parallel_state.get_expert_placement_spec(), num_experts,
                                                     self.tp_size)
            self.local_experts = self.placement.experts_of(self.tp_rank)
            self._local_index = self.placement.local_index
            self.inter_per_rank, self.num_local, self.shard_rank = intermediate_size, len(self.local_experts), 0
        else:
            self.local_experts = list(range(num_experts))
            self.inter_per_rank = divide(intermediate_size, self.tp_size, "expert_ffn_hidden_size")
            self.num_local, self.shard_rank = num_experts, self.tp_rank

    @property
    def intermediate_split(self) -> bool:
        """Is each expert's intermediate dimension split over the ranks (tensor parallelism at tp > 1)?"""
        return self.placement is None and self.tp_size > 1

    @property
    def inter_start(self) -> int:
        """First intermediate row of this rank's slice."""
        return self.shard_rank * self.inter_per_rank

    def row(self, expert_id: int) -> int | None:
        """The row of expert_id in this rank's stacked weights; None for an expert another rank holds (under EP its
        tensors are never read here)."""
        if not 0 <= expert_id < self.num_experts:
            raise WeightLoadError(f"expert id {expert_id} out of range [0, {self.num_experts})")
        if self.placement is None:
            return expert_id
        return self._local_index[expert_id] if self.placement.owner[expert_id] == self.tp_rank else None
