"""Run a function on N local ranks in spawned processes (tensor-parallel tests, benchmarks, debugging).

`run_on_local_ranks(world, fn, *args)` returns rank 0's result. fn is called as fn(*args) after the rank joined
the model group (NCCL on cuda:rank, else gloo); it must be importable (module level) and return something
picklable without shared memory (numpy, lists), since the rank exits right after.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import traceback


class RankFailure(RuntimeError):
    """A rank raised, or the ranks did not all finish in time; the message carries the rank's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, device_type: str, threads: int, fn, args, results) -> None:
    import torch
    import torch.distributed as dist

    from longcat_service.distributed import parallel_state

    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(threads)
        if world > 1:
            store = dist.TCPStore("127.0.0.1", port, world, rank == 0, wait_for_workers=False)
            backend = "nccl" if device_type == "cuda" else "gloo"
            parallel_state.init_distributed(world, rank, backend=backend, store=store)
        out = fn(*args)
        results.put((rank, "ok", out if rank == 0 else None))
        parallel_state.destroy_distributed()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_on_local_ranks(world: int, fn, *args, device_type: str = "cpu", threads_per_rank: int | None = None,
                       timeout_s: float = 120.0):
    """fn(*args) on `world` spawned ranks; rank 0's result. CPU ranks get threads_per_rank threads (default: the
    cores shared out), also as OMP_NUM_THREADS while they start. Raises RankFailure."""
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, device_type, threads, fn, args, results),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    outcome = {}
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout_s)
            if status == "error":
                raise RankFailure(f"rank {rank} failed:\n{value}")
            outcome[rank] = value
    except queue.Empty:
        raise RankFailure(f"ranks did not finish within {timeout_s}s (got {sorted(outcome)})") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return outcome[0]
