"""Tensor-parallel rank/size, the process groups, and the two collectives the layers use.

At tp_size 1 (the default; no process group) every collective returns its input unchanged, so
single-device code never touches torch.distributed.

Two groups over the same ranks: the model group (NCCL on CUDA, gloo on CPU) carries the layers' all-reduce /
all-gather; the control group (always gloo, CPU tensors) carries rank 0's per-step broadcast of the step inputs.
Idle workers wait in the control group's broadcast for as long as no request arrives, so it gets a very long
timeout; liveness is the heartbeat's job (longcat_service/distributed/heartbeat.py), not the timeout's.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

MODEL_GROUP_TIMEOUT = timedelta(minutes=30)  # first collective waits for the slowest rank's model load
CONTROL_GROUP_TIMEOUT = timedelta(days=30)

_TP_GROUP: dist.ProcessGroup | None = None
_CPU_GROUP: dist.ProcessGroup | None = None
_TP_RANK = 0
_TP_SIZE = 1
# Expert parallelism (distributed/expert_parallel.py): set before the model is built, read by the MoE layers.
_EP_ENABLED = False
_EP_PLACEMENT_SPEC: object = None  # None (contiguous), a {expert: rank} dict, or a JSON file path
_EP_CAPACITY_FACTOR: float | None = None  # CUDA-graph decode steps' rows per peer (ep_static_dispatch.py)


def init_distributed(
    tp_size: int = 1,
    rank: int = 0,
    backend: str | None = None,
    init_method: str | None = None,
    store: dist.Store | None = None,
    timeout: timedelta = MODEL_GROUP_TIMEOUT,
) -> None:
    """Join a tp_size-rank group (all ranks of the job). tp_size 1 only resets the state.

    Rendezvous through `store` when given, else `init_method` (default "env://", as torchrun sets up).
    backend: "nccl" or "gloo"; None picks nccl when CUDA is available.
    """
    global _TP_GROUP, _CPU_GROUP, _TP_RANK, _TP_SIZE
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"init_distributed: need 0 <= rank < tp_size, got rank={rank}, tp_size={tp_size}")
    if tp_size == 1:
        _TP_GROUP, _CPU_GROUP, _TP_RANK, _TP_SIZE = None, None, 0, 1
        return
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"init_distributed: backend must be 'nccl' or 'gloo', got {backend!r}")
        where = {"store": store} if store is not None else {"init_method": init_method or "env://"}
        dist.init_process_group(backend, world_size=tp_size, rank=rank, timeout=timeout, **where)
    if dist.get_world_size() != tp_size:
        raise ValueError(f"init_distributed: world size {dist.get_world_size()} != tp_size {tp_size}")
    if dist.get_rank() != rank:
        raise ValueError(f"init_distributed: this process is rank {dist.get_rank()}, not {rank}")
    _TP_GROUP, _TP_RANK, _TP_SIZE = dist.group.WORLD, rank, tp_size
    # A separate gloo group even on gloo: its own (long) timeout, and its traffic never mixes with the model's.
    _CPU_GROUP = dist.new_group(backend="gloo", timeout=CONTROL_GROUP_TIMEOUT)


def destroy_distributed() -> None:
    global _TP_GROUP, _CPU_GROUP, _TP_RANK, _TP_SIZE
    if _TP_SIZE > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP, _CPU_GROUP, _TP_RANK, _TP_SIZE = None, None, 0, 1
    set_expert_parallel(False)


def set_expert_parallel(enabled: bool, placement: object = None, capacity_factor: float | None = None) -> None:
    """Split the routed experts as whole experts over the tp ranks (instead of every expert's intermediate
    dimension). placement: None (contiguous groups), a {expert: rank} dict or a JSON file path. capacity_factor:
    see ep_static_dispatch.capacity_per_peer (None: buffers that never overflow). A no-op at tp 1."""
    global _EP_ENABLED, _EP_PLACEMENT_SPEC, _EP_CAPACITY_FACTOR
    _EP_ENABLED, _EP_PLACEMENT_SPEC, _EP_CAPACITY_FACTOR = bool(enabled), placement, capacity_factor


def expert_parallel_enabled() -> bool:
    return _EP_ENABLED and _TP_SIZE > 1


def get_expert_placement_spec() -> object:
    return _EP_PLACEMENT_SPEC


def get_ep_capacity_factor() -> float | None:
    return _EP_CAPACITY_FACTOR


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def get_tp_group() -> dist.ProcessGroup | None:
    return _TP_GROUP


def get_cpu_group() -> dist.ProcessGroup | None:
    """The gloo control group (None at tp_size 1)."""
    return _CPU_GROUP


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
