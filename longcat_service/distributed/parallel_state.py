"""Tensor-parallel rank/size, the process group, and the two collectives the layers use.

At tp_size 1 (the default; no process group) every collective returns its input unchanged, so
single-device code never touches torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_TP_RANK = 0
_TP_SIZE = 1


def init_distributed(
    tp_size: int = 1,
    rank: int = 0,
    backend: str | None = None,
    init_method: str | None = None,
) -> None:
    """Join a tp_size-rank group (all ranks of the job). tp_size 1 only resets the state."""
    global _TP_GROUP, _TP_RANK, _TP_SIZE
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"init_distributed: need 0 <= rank < tp_size, got rank={rank}, tp_size={tp_size}")
    if tp_size == 1:
        _TP_GROUP, _TP_RANK, _TP_SIZE = None, 0, 1
        return
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, init_method=init_method or "env://", world_size=tp_size, rank=rank)
    if dist.get_world_size() != tp_size:
        raise ValueError(f"init_distributed: world size {dist.get_world_size()} != tp_size {tp_size}")
    _TP_GROUP, _TP_RANK, _TP_SIZE = dist.group.WORLD, rank, tp_size


def destroy_distributed() -> None:
    global _TP_GROUP, _TP_RANK, _TP_SIZE
    if _TP_SIZE > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP, _TP_RANK, _TP_SIZE = None, 0, 1


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def get_tp_group() -> dist.ProcessGroup | None:
    return _TP_GROUP


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the tp group, in place; returns the tensor."""
    if _TP_SIZE == 1:
        return tensor
    dist.all_reduce(tensor, group=_TP_GROUP)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's tensor along dim (rank order)."""
    if _TP_SIZE == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, tensor.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)
