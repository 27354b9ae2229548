"""LongCat-Flash-2L for the decode benchmarks: its config, a driver that feeds ModelRunner.execute the way the
scheduler does, a probe of the experts each router hits, and the floors (bytes of a decode step, FLOPs of a prefill)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from harness import profile_step, sync

FULL_2L = dict(  # spec §1, 560B column, num_layers=2
    vocab_size=131072, hidden_size=6144, num_layers=2, num_attention_heads=64, num_key_value_heads=64,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, head_dim=64, v_head_dim=128,
    ffn_hidden_size=12288, expert_ffn_hidden_size=2048, n_routed_experts=512, zero_expert_num=256, moe_topk=12,
    routed_scaling_factor=6.0, rope_theta=1e7, max_position_embeddings=131072, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, mla_scale_q_lora=True, mla_scale_kv_lora=True,
)  # fmt: skip
TINY = dict(
    FULL_2L, vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, head_dim=4, v_head_dim=8, ffn_hidden_size=96,
    expert_ffn_hidden_size=16, n_routed_experts=6, zero_expert_num=3, moe_topk=3, max_position_embeddings=8192,
)  # fmt: skip


class Driver:
    """Feeds ModelRunner.execute the way the scheduler does, without the scheduler's own host cost."""

    def __init__(self, runner, block_size: int):
        from longcat_service.engine.scheduler import ScheduledSeq
        from longcat_service.engine.sequence import Sequence, SequenceGroup
        from longcat_service.sampling_params import SamplingParams

        self.runner, self.block_size = runner, block_size
        self._mk = (ScheduledSeq, Sequence, SequenceGroup, SamplingParams)
        self.free = list(range(runner.num_blocks))
        self.count = 0

    def new_seq(self, prompt: list[int], capacity: int):
        _, Sequence, SequenceGroup, SamplingParams = self._mk
        self.count += 1
        params = SamplingParams(temperature=0.0, max_tokens=capacity, ignore_eos=True)
        seq = Sequence(SequenceGroup(f"r{self.count}", prompt, params, time.monotonic()), 0)
        nblocks = -(-(len(prompt) + capacity) // self.block_size)
        if nblocks > len(self.free):
            raise RuntimeError(f"out of KV blocks: need {nblocks}, {len(self.free)} free")
        seq.block_table = [self.free.pop() for _ in range(nblocks)]
        return seq

    def release(self, seqs) -> None:
        for s in seqs:
            self.free.extend(s.block_table)
            s.block_table = []

    def prefill(self, seqs, max_tokens: int) -> None:
        ScheduledSeq = self._mk[0]
        i = 0
        while i < len(seqs):
            batch, total = [], 0
            while i < len(seqs) and (not batch or total + seqs[i].num_tokens <= max_tokens):
                batch.append(ScheduledSeq(seqs[i], seqs[i].num_tokens, 0))
                total += seqs[i].num_tokens
                i += 1
            trace = getattr(self.runner, "trace", None)
            if trace is not None:
                trace.mark("schedule")
            self._apply(batch, self.runner.execute(batch))

    def decode(self, seqs) -> float:
        ScheduledSeq = self._mk[0]
        batch = [ScheduledSeq(s, 1, s.num_tokens - 1) for s in seqs]
        t0 = time.perf_counter()
        results = self.runner.execute(batch)  # ends with the sampler's read-back (a sync)
        dt = time.perf_counter() - t0
        self._apply(batch, results)
        return dt

    @staticmethod
    def _apply(batch, results) -> None:
        for s, r in zip(batch, results, strict=True):
            if r.token_id is not None:
                s.seq.append_token(r.token_id)


def traced_prefill(drv: Driver, seq, sync) -> dict:
    """The prefill of `seq` (a Driver.new_seq) through Driver.prefill with the runner's step trace on: its wall ms
    and the host ms of each phase (engine/step_trace.py: schedule, prepare = host inputs and their copies, forward
    = the model's kernels enqueued, sample = logits and sampling enqueued, wait = for the device, readback =
    results to host lists; they add up to wall_ms). `sync()` runs first, so the device is idle when it starts."""
    from longcat_service.engine.step_trace import StepTrace

    trace = StepTrace(keep=True)
    saved, drv.runner.trace = drv.runner.trace, trace
    try:
        sync()
        trace.start()
        drv.prefill([seq], max_tokens=seq.num_tokens)
        trace.end()
    finally:
        drv.runner.trace = saved
    return {k: round(v, 3) for k, v in trace.records[0].items() if k.endswith("_ms")}


def gpu_alone_prefill(drv: Driver, seq, sleep_ms: float = 80.0) -> dict:
    """traced_prefill of `seq` queued behind a sleep kernel (CUDA): the host enqueues the whole step while the GPU
    sleeps, so the time from the sleep's end to the step's last kernel is the GPU's work alone, with no launch gap,
    and the phases before the wait are host time alone. wall - gpu_alone_ms is what the host adds."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sync_then_sleep():
        torch.cuda.synchronize()
        torch.cuda._sleep(int(sleep_ms * 2e6))  # cycles: sleep_ms or longer at clocks up to 2 GHz
        start.record()

    phases = traced_prefill(drv, seq, sync_then_sleep)  # returns after the read-back, so after the last kernel
    end.record()
    torch.cuda.synchronize()
    host = {k: v for k, v in phases.items() if k not in ("wall_ms", "wait_ms")}
    return {"gpu_alone_ms": round(start.elapsed_time(end), 3), "host_ms": host}


class RouterProbe:
    """Forward hooks on every router: distinct real experts and real-expert slots per layer of one forward."""

    def __init__(self, model):
        from longcat_service.ops.reference import router_topk

        self.model, self.router_topk = model, router_topk
        self.distinct: list[int] = []
        self.real_slots: list[int] = []
        self.handles = []

    def __enter__(self):
        for layer in self.model.model.layers:
            moe = layer.mlp
            self.handles.append(moe.router.register_forward_hook(self._hook(moe)))
        return self

    def _hook(self, moe):
        def fn(module, inputs, logits):
            e = moe.experts.num_experts
            ids, _, _ = self.router_topk(logits, module.e_score_correction_bias, moe.top_k, 1.0, e)
            real = ids[ids < e]
            self.distinct.append(int(torch.unique(real).numel()))
            self.real_slots.append(int(real.numel()))

        return fn

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def param_bytes(model) -> dict[str, int]:
    """Bytes of the weights a decode step reads regardless of routing, and of one expert (block-FP8 scales
    included); dense_params: parameters of the dense matmuls (everything but embeddings, lm_head and experts)."""
    dense, dense_params = 0, 0
    for name, p in model.named_parameters():
        if ".experts." in name or name.startswith("model.embed_tokens"):
            continue
        dense += p.numel() * p.element_size()
        if not name.startswith("lm_head") and not name.endswith("weight_scale_inv"):
            dense_params += p.numel()
    ex = model.model.layers[0].mlp.experts
    per_expert = (ex.w13[0].numel() + ex.w2[0].numel()) * ex.w13.element_size()
    for scale in (getattr(ex, "w13_scale", None), getattr(ex, "w2_scale", None)):
        if scale is not None:
            per_expert += scale[0].numel() * scale.element_size()
    return {"dense": dense, "per_expert": per_expert, "dense_params": dense_params}


def decode_floor_bytes(pb: dict[str, int], experts_hit: float, kv_tokens: int, raw: dict) -> float:
    """Bytes one decode step must read: the routing-independent weights (param_bytes' dense), each expert hit once,
    and the bf16 MLA cache entry ([kv_lora_rank | rope dims]) of every cached token in each of the 2 attention
    sublayers per layer."""
    entry_bytes = (raw["kv_lora_rank"] + raw["qk_rope_head_dim"]) * 2
    return pb["dense"] + experts_hit * pb["per_expert"] + kv_tokens * entry_bytes * 2 * raw["num_layers"]


def prefill_flops(pb: dict[str, int], raw: dict, tokens: int, expert_rows: int) -> float:
    """Matmul FLOPs of one causal prefill of `tokens`: every dense parameter (param_bytes' dense_params) per token,
    3 expert matrices per routed row, causal attention (QK^T and PV over the causal half) in the 2 sublayers per
    layer, and the lm_head for the last token only."""
    c = raw
    expert_params = 3 * c["hidden_size"] * c["expert_ffn_hidden_size"]
    attn = 2 * c["num_layers"] * 2 * c["num_attention_heads"] * (tokens * tokens / 2) * (
        c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"])
    return 2 * pb["dense_params"] * tokens + 2 * expert_params * expert_rows + attn + 2 * c["vocab_size"] * c["hidden_size"]


def profile_decode(drv: Driver, runner, prompts, cap: int, bsz: int, path: Path, device) -> None:
    """torch.profiler tables (and traces) of one eager decode step and of 3 CUDA-graph replays at batch bsz."""
    seqs = [drv.new_seq(p, cap) for p in prompts]
    drv.prefill(seqs, max_tokens=16384)
    saved, runner.graph_runner = runner.graph_runner, None
    drv.decode(seqs)  # first eager step of these sequences outside the profile
    table = profile_step(lambda: drv.decode(seqs), path, f"eager decode step (Triton kernels, no graph), batch {bsz}")
    print(f"--- eager decode step, batch {bsz}: top kernels ---\n{table}", flush=True)
    runner.graph_runner = saved
    gr = runner.graph_runner
    if gr is not None:
        from longcat_service.engine.cuda_graph_runner import bucket_for

        drv.decode(seqs)  # fills the graph's inputs with these sequences
        graph = gr.graphs[bucket_for(bsz, gr.buckets)]
        profile_step(lambda: [graph.replay() for _ in range(3)] and sync(device), path,
                     f"3 CUDA-graph replays, batch {bsz}")
    drv.release(seqs)
