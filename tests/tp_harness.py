"""Run a function on N gloo ranks in spawned processes (CPU tensor-parallel tests).

`run_on_ranks(world, fn, *args)` returns rank 0's result. fn is called as fn(*args) after the rank joined the
group; it must be importable (module level) and return something picklable without shared memory (numpy,
lists), since the rank exits right after.
"""

from __future__ import annotations

from longcat_service.distributed.local_ranks import RankFailure, free_port, run_on_local_ranks

__all__ = ["free_port", "run_on_ranks", "model_logits"]


def run_on_ranks(world: int, fn, *args, timeout_s: float = 120.0):
    """gloo ranks with one thread each; a rank's failure fails the test (AssertionError with its traceback)."""
    try:
        return run_on_local_ranks(world, fn, *args, threads_per_rank=1, timeout_s=timeout_s)
    except RankFailure as e:
        raise AssertionError(str(e)) from None


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
