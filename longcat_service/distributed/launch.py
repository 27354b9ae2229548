"""Where this process sits in a tensor-parallel job, and the rendezvous store it meets the others through.

Two ways a job starts:
- torchrun (one or several nodes, c10d or static rendezvous): RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
  MASTER_PORT are in the environment; global rank 0 serves, the others run the worker loop.
- local (`--tensor-parallel-size N` without torchrun): rank 0 is the main process; it hosts a TCPStore on
  127.0.0.1 and spawns ranks 1..N-1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

STORE_TIMEOUT = timedelta(minutes=10)  # how long a rank waits for the others to reach the rendezvous
HEARTBEAT_STORE_TIMEOUT = timedelta(seconds=10)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool = False  # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); else rank 0 does


def torchrun_env(environ: Mapping[str, str] | None = None) -> RankInfo | None:
    """The RankInfo torchrun put in the environment, or None outside torchrun. Bad values raise naming the variable."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None

    def number(name: str, default: str | None = None) -> int:
        raw = env.get(name, default)
        if raw is None:
            raise ValueError(f"{name}: must be set when RANK and WORLD_SIZE are (torchrun sets it)")
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {raw!r}") from None

    rank, world = number("RANK"), number("WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK: need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    local_rank = number("LOCAL_RANK", "0")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK: must be >= 0, got {local_rank}")
    master_addr = env.get("MASTER_ADDR", "127.0.0.1" if world == 1 else None)
    if not master_addr:
        raise ValueError("MASTER_ADDR: must be set when WORLD_SIZE > 1 (torchrun sets it)")
    port = number("MASTER_PORT", "29500" if world == 1 else None)
    return RankInfo(rank, world, local_rank, master_addr, port, env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def open_store(info: RankInfo, timeout: timedelta = STORE_TIMEOUT) -> dist.TCPStore:
    """The job's TCPStore (the server side on rank 0 unless torchrun's agent hosts it). Port 0 on the hosting
    rank picks a free port (read it back from `.port`)."""
    is_master = info.rank == 0 and not info.agent_store
    return dist.TCPStore(
        info.master_addr, info.master_port, info.world_size, is_master,
        timeout=timeout, wait_for_workers=False, multi_tenant=is_master,
    )  # fmt: skip


def open_heartbeat_store(info: RankInfo, port: int) -> dist.TCPStore:
    """A second client connection to the job's store, so heartbeats never queue behind a blocking wait()."""
    return dist.TCPStore(info.master_addr, port, info.world_size, False, timeout=HEARTBEAT_STORE_TIMEOUT)


def local_device(device_type: str, info: RankInfo) -> str:
    """One GPU per local rank; CPU ranks share the host."""
    return f"cuda:{info.local_rank}" if device_type == "cuda" else device_type


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def torchrun_job(tensor_parallel_size: int, environ: Mapping[str, str] | None = None) -> RankInfo | None:
    """The torchrun job this process belongs to (None: not under torchrun, or a single rank).

    Every rank of the job is one tensor-parallel rank: a --tensor-parallel-size other than 1 (the default) must
    equal WORLD_SIZE."""
    info = torchrun_env(environ)
    if info is None or info.world_size == 1:
        return None
    if tensor_parallel_size not in (1, info.world_size):
        raise ValueError(f"--tensor-parallel-size: {tensor_parallel_size} does not match the {info.world_size} "
                         "ranks torchrun started (WORLD_SIZE)")
    return info
