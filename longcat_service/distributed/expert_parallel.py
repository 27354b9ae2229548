"""Expert parallelism: which rank owns which routed expert, and the token dispatch / combine between ranks.

With `enable_expert_parallel`, attention and the dense MLPs stay tensor-parallel (every rank holds all T tokens
after their all-reduce), while the routed experts are split as whole experts over the ranks. Each MoE layer then:
1. cuts the T tokens into one contiguous share per rank (`owned_token_range`); a rank routes only its share;
2. sends one row per real-expert slot to the expert's owner (`ExpertDispatcher.dispatch`): zero (identity)
   experts are never sent, their term is added by the token's owner;
3. runs its local experts on the rows it received and sends the outputs back (`ExpertDispatcher.combine`);
4. adds each token's k slots in slot order (ops.combine, the same order as without EP, so results do not depend
   on the number of ranks) and all-gathers the shares so that every rank holds all T outputs again.

`ExpertDispatcher` is the one interface a DeepEP-style backend would implement; `AllToAllDispatcher` is
torch.distributed's all_to_all_single with variable splits (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist


class ExpertPlacementError(ValueError):
    """A placement that does not give every expert exactly one valid owner (message names the problem)."""


@dataclass(frozen=True)
class ExpertPlacement:
    """owner[e]: the rank holding routed expert e; local_index[e]: its row in that rank's stacked weights."""

    owner: tuple[int, ...]
    world_size: int

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """N contiguous groups of whole experts; when E % N != 0 the first E % N ranks hold one more."""
        if world_size < 1:
            raise ExpertPlacementError(f"world size must be >= 1, got {world_size}")
        if num_experts < world_size:
            raise ExpertPlacementError(f"{num_experts} routed experts cannot be split over {world_size} ranks "
                                       "(expert parallelism needs at least one expert per rank)")
        base, extra = divmod(num_experts, world_size)
        owner: list[int] = []
        for rank in range(world_size):
            owner += [rank] * (base + (1 if rank < extra else 0))
        return cls(tuple(owner), world_size)

    @classmethod
    def from_mapping(cls, mapping: dict, num_experts: int, world_size: int, source: str = "placement") -> ExpertPlacement:
        """A static map {expert id: rank} (JSON keys may be strings) covering every expert exactly once."""
        if not isinstance(mapping, dict):
            raise ExpertPlacementError(f"{source}: must be a JSON object mapping expert id -> rank")
        owner = [-1] * num_experts
        for key, rank in mapping.items():
            try:
                expert = int(key)
            except (TypeError, ValueError):
                raise ExpertPlacementError(f"{source}: expert id {key!r} is not an integer") from None
            if not 0 <= expert < num_experts:
                raise ExpertPlacementError(f"{source}: expert id {expert} out of range [0, {num_experts})")
            if not isinstance(rank, int) or not 0 <= rank < world_size:
                raise ExpertPlacementError(f"{source}: expert {expert} -> rank {rank!r}, not in [0, {world_size})")
            owner[expert] = rank
        missing = [e for e, r in enumerate(owner) if r < 0]
        if missing:
            raise ExpertPlacementError(f"{source}: expert {missing[0]} has no rank ({len(missing)} experts missing)")
        empty = sorted(set(range(world_size)) - set(owner))
        if empty:
            raise ExpertPlacementError(f"{source}: rank {empty[0]} owns no expert")
        return cls(tuple(owner), world_size)

    @classmethod
    def resolve(cls, spec: str | Path | dict | None, num_experts: int, world_size: int) -> ExpertPlacement:
        """spec: None (contiguous), a dict, or the path of a JSON file holding the map."""
        if spec is None:
            return cls.contiguous(num_experts, world_size)
        if isinstance(spec, dict):
            return cls.from_mapping(spec, num_experts, world_size)
        path = Path(spec)
        try:
            mapping = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExpertPlacementError(f"expert placement file {path}: {exc}") from None
        return cls.from_mapping(mapping, num_experts, world_size, source=str(path))

    def experts_of(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.owner) if r == rank]

    @property
    def local_index(self) -> tuple[int, ...]:
        seen = [0] * self.world_size
        index = []
        for rank in self.owner:
            index.append(seen[rank])
            seen[rank] += 1
        return tuple(index)


def owned_token_range(num_tokens: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's contiguous share of T tokens: the first T % N ranks get one more."""
    base, extra = divmod(num_tokens, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class DispatchHandle:
    """What combine needs to send expert outputs back: the row counts each way."""

    send_counts: list[int]
    recv_counts: list[int]


class ExpertDispatcher(Protocol):
    """Moves rows to the rank of their expert and back. Rows sent to rank r are contiguous, in rank order."""

    def dispatch(self, rows: torch.Tensor, local_expert: torch.Tensor, send_counts: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]: ...

    def combine(self, expert_rows: torch.Tensor, handle: DispatchHandle) -> torch.Tensor: ...


class AllToAllDispatcher:
    """torch.distributed all_to_all_single with variable splits. The split sizes are exchanged first (host
    sync), so this backend is for eager steps; CUDA-graph decode steps use ep_static_dispatch.py."""

    def __init__(self, group: dist.ProcessGroup | None, world_size: int):
        self.group, self.world_size = group, world_size
        self.last_send_counts: list[int] = []  # for tests and metrics: rows this rank sent in the last dispatch

    def _exchange_counts(self, send_counts: list[int], device: torch.device) -> list[int]:
        send = torch.tensor(send_counts, dtype=torch.int64, device=device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    def dispatch(self, rows, local_expert, send_counts):
        self.last_send_counts = list(send_counts)
        recv_counts = self._exchange_counts(send_counts, rows.device)
        total = sum(recv_counts)
        recv_rows = rows.new_empty(total, rows.shape[1])
        dist.all_to_all_single(recv_rows, rows.contiguous(), recv_counts, send_counts, group=self.group)
        recv_expert = local_expert.new_empty(total)
        dist.all_to_all_single(recv_expert, local_expert.contiguous(), recv_counts, send_counts, group=self.group)
        return recv_rows, recv_expert, DispatchHandle(list(send_counts), recv_counts)

    def combine(self, expert_rows, handle):
        back = expert_rows.new_empty(sum(handle.send_counts), expert_rows.shape[1])
        dist.all_to_all_single(back, expert_rows.contiguous(), handle.send_counts, handle.recv_counts,
                               group=self.group)
        return back


def all_gather_token_shares(share: torch.Tensor, num_tokens: int, rank: int, world_size: int,
                            group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's owned_token_range rows of [T, H], concatenated in rank order (shares differ by one row at most,
    so they are padded to the largest for the collective)."""
    if world_size == 1:
        return share
    width = -(-num_tokens // world_size)
    padded = share.new_zeros(width, *share.shape[1:])
    padded[: share.shape[0]] = share
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded, group=group)
    sizes = [end - start for start, end in (owned_token_range(num_tokens, r, world_size) for r in range(world_size))]
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])
