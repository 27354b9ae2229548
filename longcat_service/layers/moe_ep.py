"""The expert-parallel exchange of one MoE layer: this rank's routed slots go to their experts' ranks, the local
experts run on what arrives, the outputs come back. Two interchangeable paths with equal results:
- `exchange_variable`: exactly the rows each peer needs (split sizes learnt on the host; eager steps);
- `exchange_static`: fixed capacity per peer, static shapes, no host sync (CUDA-graph decode steps), with an
  overflow flag that tells the caller to run the step again through the variable path.
Both return (expert_out, slot_rows): slot s's expert output is expert_out[slot_rows[s]], -1 for a zero-expert slot
(never sent: the token's owner adds its identity term in ops.combine).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longcat_service.distributed.ep_static_dispatch import FixedCapacityDispatcher
from longcat_service.distributed.expert_parallel import ExpertDispatcher

# rows [R, H], local expert of each row [R] (ids >= the local expert count: no expert) -> outputs [R, H]
LocalExperts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def exchange_variable(share: torch.Tensor, ids: torch.Tensor, num_experts: int, owner: torch.Tensor,
                      local_row: torch.Tensor, top_k: int, world: int, dispatcher: ExpertDispatcher,
                      local_experts: LocalExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """share [S, H], ids [S, k] routed expert ids (>= num_experts: zero experts)."""
    flat = ids.reshape(-1).long()
    real_slots = torch.nonzero(flat < num_experts).flatten()  # zero-expert slots stay here
    expert_of_slot = flat[real_slots]
    dest = owner[expert_of_slot]
    order = torch.sort(dest, stable=True).indices  # rows for rank r contiguous, slot order within
    send_counts = torch.bincount(dest, minlength=world).tolist()
    rows = share.index_select(0, torch.div(real_slots[order], top_k, rounding_mode="floor"))
    recv_rows, recv_expert, handle = dispatcher.dispatch(rows, local_row[expert_of_slot[order]], send_counts)
    back = dispatcher.combine(local_experts(recv_rows, recv_expert), handle)
    expert_out = torch.empty_like(back)
    expert_out[order] = back  # back to the order of real_slots
    slot_rows = torch.full((flat.numel(),), -1, dtype=torch.int32, device=share.device)
    slot_rows[real_slots] = torch.arange(real_slots.numel(), dtype=torch.int32, device=share.device)
    return expert_out, slot_rows


def exchange_static(share: torch.Tensor, ids: torch.Tensor, num_experts: int, owner: torch.Tensor,
                    local_row: torch.Tensor, top_k: int, num_local: int, dispatcher: FixedCapacityDispatcher,
                    local_experts: LocalExperts, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """exchange_variable with `capacity` rows per peer; also returns the overflow flag ([] bool, same on every
    rank: when set, some slots were dropped and the results must not be used)."""
    flat = ids.reshape(-1).long()
    real = flat < num_experts
    expert = flat.clamp(max=num_experts - 1)
    dest = torch.where(real, owner[expert], torch.full_like(flat, dispatcher.world_size))
    recv_rows, recv_expert, handle = dispatcher.dispatch(share, dest, local_row[expert], top_k, capacity)
    recv_expert = torch.where(recv_expert >= 0, recv_expert, torch.full_like(recv_expert, num_local))
    back = dispatcher.combine(local_experts(recv_rows, recv_expert), handle)
    return back, handle.slot_rows, handle.overflow
