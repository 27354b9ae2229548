"""Fixed-capacity expert-parallel dispatch / combine: static shapes, no host sync, so a decode step under expert
parallelism can be captured in a CUDA graph.

The variable-split path (expert_parallel.AllToAllDispatcher) sends exactly the rows each peer needs, but it must
learn the split sizes on the host first. Here every rank instead sends `capacity` rows to every peer (all_to_all_single
with equal splits): a slot's row goes to position `pos` of its expert owner's block, where pos counts the earlier
slots (slot order) bound for the same peer, so each expert sees its rows in the variable path's order and computes
the same values. Unused positions carry local expert -1 (the receiver gives them no expert row); zero-expert
slots are never placed (dest == world_size). A peer bound for more than `capacity` rows is an overflow: those
slots are dropped, so the step's output is wrong, and every rank learns it (one all-reduce of the largest count
per layer): the caller must then run the step again with variable splits (engine/model_runner.py does, counting it
in longcat_ep_capacity_overflow_total).

`static_dispatch()` switches the MoE layers to this path; the CUDA-graph runner enters it around warm-up and capture.
A DeepEP-style low-latency backend (fixed per-peer buffers too) would replace `FixedCapacityDispatcher`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

_STATIC = False


@contextlib.contextmanager
def static_dispatch(enabled: bool = True):
    """Within: expert-parallel MoE layers use the fixed-capacity path (a no-op without expert parallelism)."""
    global _STATIC
    before, _STATIC = _STATIC, enabled
    try:
        yield
    finally:
        _STATIC = before


def static_dispatch_active() -> bool:
    return _STATIC


def capacity_per_peer(num_tokens: int, world_size: int, top_k: int, capacity_factor: float | None = None) -> int:
    """Rows each rank sends to each peer for a step of num_tokens tokens. Default (capacity_factor None): the
    largest token share x top_k, which no routing exceeds (never overflows; the buffers are world_size times
    what a uniform routing needs). capacity_factor f: f times a uniform routing's rows per peer, at most that
    bound (smaller all-to-all; a skewed step overflows and runs again eagerly). At least 1."""
    bound = -(-num_tokens // world_size) * top_k
    if capacity_factor is None:
        return max(1, bound)
    return max(1, min(bound, math.ceil(capacity_factor * bound / world_size)))


@dataclass
class StaticHandle:
    """What combine needs, and where each of the sender's slots finds its expert output afterwards."""

    capacity: int
    slot_rows: torch.Tensor  # [slots] int32: row of the slot's output in combine's result, -1 (not sent)
    overflow: torch.Tensor  # [] bool, equal on every rank: some peer was bound for more than `capacity` rows


class FixedCapacityDispatcher:
    """all_to_all_single with equal splits of `capacity` rows per peer (NCCL on CUDA, gloo on CPU)."""

    def __init__(self, group: dist.ProcessGroup | None, world_size: int):
        self.group, self.world_size = group, world_size

    def dispatch(self, tokens: torch.Tensor, dest: torch.Tensor, local_expert: torch.Tensor, top_k: int,
                 capacity: int) -> tuple[torch.Tensor, torch.Tensor, StaticHandle]:
        """tokens [S, H]; per slot (flat t * top_k + j): dest [S*k] the rank of its expert, world_size for a slot
        that is not sent (zero expert); local_expert [S*k] the expert's row on that rank.
        -> (rows [world*capacity, H], their local expert [world*capacity] int64 (-1: unused position), handle)."""
        n, slots = self.world_size, dest.numel()
        dest = dest.long()
        # position of each slot among the earlier slots bound for the same rank (comparison, not one_hot: no sync)
        hits = (dest[:, None] == torch.arange(n + 1, device=dest.device)).to(torch.int32)
        pos = (hits.cumsum(0) - hits).gather(1, dest[:, None])[:, 0].long()
        sent = (dest < n) & (pos < capacity)
        buffer_rows = n * capacity
        send_row = torch.where(sent, dest * capacity + pos, torch.full_like(dest, buffer_rows))
        # the slot filling each buffer row (-1: unused); the extra last row takes every slot not sent
        filler = torch.full((buffer_rows + 1,), -1, dtype=torch.int64, device=dest.device)
        filler.index_copy_(0, send_row, torch.arange(slots, dtype=torch.int64, device=dest.device))
        filler = filler[:buffer_rows]
        used = filler >= 0
        slot = filler.clamp(min=0)
        if slots:
            send = tokens.index_select(0, torch.div(slot, top_k, rounding_mode="floor"))
            send_expert = torch.where(used, local_expert.long().reshape(-1)[slot], torch.full_like(slot, -1))
        else:  # no token share on this rank (fewer tokens than ranks): only unused positions
            send = tokens.new_zeros(buffer_rows, tokens.shape[1])
            send_expert = torch.full((buffer_rows,), -1, dtype=torch.int64, device=dest.device)

        # overflow: the largest number of slots any rank had for any peer, over all ranks
        largest = hits[:, :n].sum(0).max().to(torch.int64).reshape(1)
        if n > 1:
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.group)
        recv = self._exchange(send)
        recv_expert = self._exchange(send_expert)
        slot_rows = torch.where(sent, send_row, torch.full_like(send_row, -1)).to(torch.int32)
        return recv, recv_expert, StaticHandle(capacity, slot_rows, largest[0] > capacity)

    def combine(self, expert_rows: torch.Tensor, handle: StaticHandle) -> torch.Tensor:
        """expert_rows [world*capacity, H] (the outputs of the rows dispatch delivered, same positions) -> the
        outputs of this rank's sent rows [world*capacity, H]; slot s's is row handle.slot_rows[s]."""
        return self._exchange(expert_rows)

    def _exchange(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=self.group)
        return out
