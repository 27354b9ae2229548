"""Run a function on N gloo ranks in spawned processes (CPU tensor-parallel tests).

`run_on_ranks(world, fn, *args)` returns rank 0's result. fn is called as fn(*args) after the rank joined the
group; it must be importable (module level) and return something picklable without shared memory (numpy,
lists), since the rank exits right after.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args, results) -> None:
    import torch
    import torch.distributed as dist

    from longcat_service.distributed import parallel_state

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0, wait_for_workers=False)
        parallel_state.init_distributed(world, rank, backend="gloo", store=store)
        out = fn(*args)
        results.put((rank, "ok", out if rank == 0 else None))
        parallel_state.destroy_distributed()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_on_ranks(world: int, fn, *args, timeout_s: float = 120.0):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, results), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    outcome = {}
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout_s)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            outcome[rank] = value
    except queue.Empty:
        raise AssertionError(f"ranks did not finish within {timeout_s}s (got {sorted(outcome)})") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return outcome[0]


def model_logits(checkpoints: list[str], tokens: list[int], identity_on_every_rank: bool = False) -> list:
    """On every rank: load each checkpoint (fp32, CPU, this rank's shards), one prefill of `tokens` -> rank's
    logits (numpy) and the local shapes of a few sharded weights. identity_on_every_rank: the bug the tests
    must catch (the zero-expert term added by every rank before the all-reduce)."""
    from longcat_service.model.loader import load_model
    from tests.engine_utils import full_forward_logits

    out = []
    for ckpt in checkpoints:
        model = load_model(ckpt, dtype="float32", device="cpu")
        if identity_on_every_rank:
            for layer in model.model.layers:
                layer.mlp.experts.tp_rank = 0
        attn, layer0 = model.model.layers[0].self_attn[0], model.model.layers[0]
        shapes = {
            "q_b_proj": tuple(attn.q_b_proj.weight.shape), "o_proj": tuple(attn.o_proj.weight.shape),
            "mlp_down": tuple(layer0.mlps[0].down_proj.weight.shape), "w13": tuple(layer0.mlp.experts.w13.shape),
            "lm_head": tuple(model.lm_head.weight.shape),
        }  # fmt: skip
        out.append((full_forward_logits(model, tokens).numpy(), shapes))
    return out
