"""Decode / prefill benchmark of LongCat-Flash-2L (the real config, 2 layers, dummy weights) against its
memory-bandwidth floor and transformers.

    python benchmarks/bench_decode.py                       # H200: ours (graphs + eager), floors, transformers
    python benchmarks/bench_decode.py --device cpu --tiny   # smoke test of the same code on a tiny config
    python benchmarks/bench_decode.py --public-api-defaults # LLM.generate with every engine default (what a user gets)

Ours runs through engine.ModelRunner.execute (CUDA-graph replay for decode, sampler read-back included);
the transformers baseline runs in a child process after our model is freed (two 2-layer full-width models do
not fit together). The floor of a decode step is the bytes it must read (the experts its router actually
hit, attention, dense MLPs, router, lm_head, KV cache) over the device-to-device copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--eager-steps", type=int, default=6, help="eager decode steps per batch (0 = skip)")
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--hf-batches", default="1,64", help="transformers baseline batches ('' = skip)")
    p.add_argument("--hf-steps", type=int, default=8)
    p.add_argument("--profile-batches", default="1,64", help="torch.profiler tables for these batches")
    p.add_argument("--profile-prefill", action="store_true", help="torch.profiler table of one prefill")
    p.add_argument("--out-dir", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "out")))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--public-api-defaults", action="store_true",
                   help="only time LLM.generate (a --prefill-len prompt, then a short decode) with every engine "
                        "setting at its default, on benchmarks/configs/longcat-flash-2l (or --tiny), dummy bf16")
    p.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)  # child process mode
    return p.parse_args(argv)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- ceilings -----------------------------------------------------------------------------------------
def measure_ceilings(device: torch.device, tiny: bool) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, counting read + write; bf16 matmul FLOP/s), medians of timed repeats."""
    n_bytes = (2 << 30) if device.type == "cuda" and not tiny else (64 << 20)
    src = torch.randn(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t_copy = _median_time(lambda: dst.copy_(src), device, reps=10)
    m = 8192 if device.type == "cuda" and not tiny else 512
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t_mm = _median_time(lambda: a @ b, device, reps=10)
    return 2 * n_bytes / t_copy, 2 * m**3 / t_mm


def _median_time(fn, device, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- driving the model runner -------------------------------------------------------------------------
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


def engine_decode_ms(engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Median wall time of LLMEngine.step() while every request decodes (after all prompts are in, before any
    finishes): what a user of the engine sees per token, host work and read-back included."""
    from longcat_service.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench{i}", p, params)
    counts = dict.fromkeys(range(len(prompts)), 0)
    times, phases = [], []
    saved_trace = engine.trace
    trace_file = Path(tempfile.mkdtemp(prefix="steps_")) / "steps.jsonl"
    from longcat_service.engine.step_trace import StepTrace

    engine.trace = StepTrace(str(trace_file))  # perf_counter marks only: a few us per step
    try:
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            steady = all(c >= 2 for c in counts.values()) and not any(o.finished for o in outs)
            for o in outs:
                counts[int(o.request_id[5:])] = len(o.outputs[0].token_ids)
            if steady:
                times.append(dt)
                phases.append(True)
            else:
                phases.append(False)
    finally:
        engine.trace.close()
        engine.trace = saved_trace
    rows = [json.loads(line) for line in trace_file.read_text().splitlines() if line.strip()]
    steady_rows = [r for r, keep in zip(rows, phases, strict=False) if keep]
    steady_rows = steady_rows[3:] if len(steady_rows) > 6 else steady_rows
    ENGINE_PHASES.clear()
    for key in sorted({k for r in steady_rows for k in r if k.endswith("_ms")}):
        ENGINE_PHASES[key] = statistics.median(r.get(key, 0.0) for r in steady_rows)
    timed = times[3:] if len(times) > 6 else times
    return statistics.median(timed) * 1e3 if timed else float("nan")


# median per-phase host times (ms) of the last engine_decode_ms call's steady steps (engine/step_trace.py):
# collect = waiting for the device; when it is near 0 the engine is host-bound
ENGINE_PHASES: dict[str, float] = {}


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


def profile_step(fn, path: Path, title: str, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    # The Chrome trace keeps each kernel's stream and start time: benchmarks/trace_timeline.py reads it for
    # the critical path, the gaps and the side-stream overlap that the summed table cannot show.
    trace_dir = path.parent / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)
    trace = trace_dir / (re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") + ".json")
    prof.export_chrome_trace(str(trace))
    with open(path, "a") as fh:
        fh.write(f"\n=== {title} ===\n{table}\n")
    return table


def gpu_timeline(fn, device) -> dict:
    """Where the wall time of fn goes on the device: a CUDA-only profile (no CPU-op recording, so the host runs
    at nearly its normal speed) -> wall ms, ms from the call to the first kernel, the kernel window, the time
    with a kernel running (busy) and without (idle gaps inside the window)."""
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trace_timeline import load_kernels, union_length

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    path = Path(tempfile.mkdtemp(prefix="gpu_tl_")) / "trace.json"
    prof.export_chrome_trace(str(path))
    kernels = load_kernels(path)
    if not kernels:
        return {"wall_ms": wall * 1e3}
    start, end = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
    busy = union_length([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
    return {"wall_ms": wall * 1e3, "kernel_window_ms": (end - start) / 1e3, "busy_ms": busy / 1e3,
            "idle_in_window_ms": (end - start - busy) / 1e3, "outside_window_ms": wall * 1e3 - (end - start) / 1e3,
            "kernels": len(kernels)}


def profile_decode(drv, runner, prompts, cap: int, bsz: int, path: Path, device) -> None:
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


# ---- our model ----------------------------------------------------------------------------------------
def bench_ours(args, raw: dict, device: torch.device, ceil_bw: float, ceil_flops: float, out_dir: Path) -> dict:
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.engine.llm_engine import LLMEngine

    batches = _ints(args.batches)
    cap = args.new_tokens + args.eager_steps + 2
    seq_blocks = -(-(args.prompt_len + cap) // 16)
    num_blocks = max(batches) * seq_blocks + -(-(args.prefill_len + 2) // 16) + 8
    tmp = Path(tempfile.mkdtemp(prefix="lc2l_"))
    (tmp / "config.json").write_text(json.dumps(dict(raw, model_type="longcat_flash")))
    eargs = EngineArgs(model=str(tmp), dtype="bfloat16", device=str(device), load_format="dummy", block_size=16,
                       quantization=getattr(args, "quantization", None),
                       num_kv_blocks=num_blocks, max_num_seqs=max(batches),
                       max_model_len=max(args.prompt_len + cap, args.prefill_len + 2) + 16)
    t0 = time.perf_counter()
    # The LLMEngine owns the runner: the Driver below times the runner alone, engine_decode_ms the whole engine
    # loop (scheduler, overlap, async scheduling) on the same model. Prefix caching off: both share the blocks.
    eargs = dataclasses.replace(eargs, enable_prefix_caching=False,
                                max_num_batched_tokens=16384)
    engine = LLMEngine(eargs)
    runner = engine.runner
    print(f"model ready in {time.perf_counter() - t0:.1f}s; graphs: {runner.graph_runner is not None}", flush=True)
    model, drv = runner.model, Driver(runner, 16)
    with torch.no_grad():
        # The dummy correction bias, N(0, 0.01), dwarfs softmax probabilities of ~1/768, so every token would
        # pick the same experts; the real bias balances load. Zero bias spreads tokens like spec §4's D(B).
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.zero_()
    pb = param_bytes(model)
    entry_bytes = raw["kv_lora_rank"] + raw["qk_rope_head_dim"]
    n_sub = 2 * raw["num_layers"]
    gen = torch.Generator().manual_seed(0)
    res: dict = {"decode": {}, "prefill": None}
    profile_set = set(_ints(args.profile_batches))

    # prefill first, in the fresh process: one prompt of prefill_len tokens, one chunk (3 timed runs)
    times, probe_slots = [], None
    for rep in range(4):
        prompt = torch.randint(3, raw["vocab_size"], (args.prefill_len,), generator=gen).tolist()
        seq = drv.new_seq(prompt, 1)
        if rep == 0:
            with RouterProbe(model) as probe:
                drv.prefill([seq], max_tokens=args.prefill_len)
            probe_slots = probe.real_slots
        else:
            sync(device)
            t0 = time.perf_counter()
            drv.prefill([seq], max_tokens=args.prefill_len)
            times.append(time.perf_counter() - t0)
        drv.release([seq])
    if device.type == "cuda":
        prompt = torch.randint(3, raw["vocab_size"], (args.prefill_len,), generator=gen).tolist()
        seq = drv.new_seq(prompt, 1)
        prefill_gpu = gpu_timeline(lambda: drv.prefill([seq], max_tokens=args.prefill_len), device)
        drv.release([seq])
        print(f"prefill GPU timeline: {json.dumps(prefill_gpu)}", flush=True)
        # and where the host spends the call (cProfile: slows Python, so only for the ranking)
        import cProfile
        import io
        import pstats

        seq = drv.new_seq(prompt, 1)
        sync(device)
        host_prof = cProfile.Profile()
        host_prof.enable()
        drv.prefill([seq], max_tokens=args.prefill_len)
        host_prof.disable()
        drv.release([seq])
        text = io.StringIO()
        pstats.Stats(host_prof, stream=text).sort_stats("tottime").print_stats(30)
        (out_dir / "prefill_host_profile.txt").write_text(text.getvalue())
    else:
        prefill_gpu = None
    if args.profile_prefill:
        prompt = torch.randint(3, raw["vocab_size"], (args.prefill_len,), generator=gen).tolist()
        seq = drv.new_seq(prompt, 1)
        table = profile_step(lambda: drv.prefill([seq], max_tokens=args.prefill_len), out_dir / "profiles.txt",
                             f"prefill of {args.prefill_len} tokens", rows=60)
        print(f"--- prefill {args.prefill_len}: top kernels ---\n{table}", flush=True)
        drv.release([seq])
    s, c = args.prefill_len, raw
    expert_params = 3 * c["hidden_size"] * c["expert_ffn_hidden_size"]
    dense_params = pb["dense_params"]
    attn = n_sub * 2 * c["num_attention_heads"] * (s * s / 2) * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
                                                                  + c["v_head_dim"])
    flops = 2 * dense_params * s + 2 * expert_params * sum(probe_slots) + attn + 2 * c["vocab_size"] * c["hidden_size"]
    t = statistics.median(times)
    res["prefill"] = {"tokens": s, "seconds": t, "tokens_per_s": s / t, "tflops": flops / t / 1e12,
                      "share_of_matmul": flops / t / ceil_flops, "gpu_timeline": prefill_gpu,
                      "all_seconds": times}
    print(f"prefill: {json.dumps(res['prefill'])}", flush=True)

    for bsz in batches:
        prompts = torch.randint(3, raw["vocab_size"], (bsz, args.prompt_len), generator=gen).tolist()
        seqs = [drv.new_seq(p, cap) for p in prompts]
        drv.prefill(seqs, max_tokens=16384)
        eager_times, distinct = [], []
        if args.eager_steps:
            saved, runner.graph_runner = runner.graph_runner, None
            for _ in range(args.eager_steps):
                with RouterProbe(model) as probe:
                    eager_times.append(drv.decode(seqs))
                distinct.append(probe.distinct)
            runner.graph_runner = saved
        step_times = [drv.decode(seqs) for _ in range(args.new_tokens)]
        timed = step_times[3:] if len(step_times) > 6 else step_times  # the first steps capture the graph
        gpu_ms = None
        gr = runner.graph_runner
        if gr is not None:
            from longcat_service.engine.cuda_graph_runner import bucket_for

            graph = gr.graphs[bucket_for(bsz, gr.buckets)]
            gpu_ms = _median_time(graph.replay, device, reps=20) * 1e3
        # floor: bytes of this step (KV read at the median step's length)
        kv_tokens = sum(s.num_tokens for s in seqs) - bsz * (len(step_times) // 2)
        hit = statistics.median(sum(d) for d in distinct) if distinct else float("nan")
        floor_bytes = pb["dense"] + hit * pb["per_expert"] + kv_tokens * entry_bytes * 2 * n_sub
        floor_ms = floor_bytes / ceil_bw * 1e3
        step_ms = statistics.median(timed) * 1e3
        drv.release(seqs)
        seqs = []
        engine_ms = engine_decode_ms(engine, prompts, args.new_tokens)
        res["decode"][bsz] = {
            "engine_ms": engine_ms, "engine_phases_ms": dict(ENGINE_PHASES), "step_ms": step_ms,
            "gpu_replay_ms": gpu_ms,
            "eager_ms": statistics.median(eager_times[1:] or eager_times) * 1e3 if eager_times else None,
            "experts_hit_per_layer": [statistics.median(x) for x in zip(*distinct, strict=True)] if distinct else None,
            "floor_gb": floor_bytes / 1e9, "floor_ms": floor_ms, "ratio": engine_ms / floor_ms,
        }
        print(f"batch {bsz}: {json.dumps(res['decode'][bsz])}", flush=True)
        if bsz in profile_set:  # after every timing of this batch: the profiler leaves CUDA launches slower
            profile_decode(drv, runner, prompts, cap, bsz, out_dir / "profiles.txt", device)

    return res  # the caller frees the model (gc + empty_cache) before the transformers child starts


# ---- transformers baseline (child process) ------------------------------------------------------------
def hf_only(args, raw: dict, device: torch.device) -> dict:
    import transformers
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    cfg_kwargs = dict(raw)
    cfg_kwargs.pop("mla_scale_q_lora"), cfg_kwargs.pop("mla_scale_kv_lora")
    if int(transformers.__version__.split(".")[0]) >= 5:
        cfg_kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg_kwargs.pop("rope_theta")}
    cfg = LongcatFlashConfig(**cfg_kwargs)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: an fp32 build would not fit
    with torch.device(device):
        model = LongcatFlashForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # our own init on the device (norms 1, bias 0, N(0, 0.02))
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "bias" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.zero_()
    out = {"transformers": transformers.__version__, "decode": {}}
    gen = torch.Generator().manual_seed(0)
    for bsz in _ints(args.hf_batches):
        ids = torch.randint(3, raw["vocab_size"], (bsz, args.prompt_len), generator=gen).to(device)
        with torch.inference_mode():
            o = model(input_ids=ids, use_cache=True)
            cache, nxt = o.past_key_values, o.logits[:, -1].argmax(-1)
            times = []
            for _ in range(args.hf_steps):
                sync(device)
                t0 = time.perf_counter()
                o = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
                nxt = o.logits[:, -1].argmax(-1)
                nxt.tolist()
                times.append(time.perf_counter() - t0)
        out["decode"][bsz] = statistics.median(times[1:] if len(times) > 2 else times) * 1e3
        print(f"transformers batch {bsz}: {out['decode'][bsz]:.2f} ms/step", flush=True)
        del o, cache
    return out


def run_hf_child(args) -> dict | None:
    cmd = [sys.executable, __file__, "--hf-only", "--device", args.device, "--hf-batches", args.hf_batches,
           "--prompt-len", str(args.prompt_len), "--hf-steps", str(args.hf_steps)] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        print(f"transformers baseline failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("HF_JSON "):
            return json.loads(line[len("HF_JSON "):])
    return None


# ---- report -------------------------------------------------------------------------------------------
def report(args, ours: dict, hf: dict | None, bw: float, flops: float, device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    commit = os.environ.get("LONGCAT_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | {gpu} | commit {commit} | torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/bench_decode.py {' '.join(sys.argv[1:])}`"
        f" ({'tiny config' if args.tiny else 'LongCat-Flash-2L'}, dummy bf16 weights, prompt {args.prompt_len},"
        f" {args.new_tokens} new tokens, ignore_eos).",
        f"Measured ceilings: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s.",
        "",
        "| batch | ours ms/step (engine) | runner execute ms | graph replay ms | eager ms | floor ms | ours/floor "
        "| experts hit/layer | transformers ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for bsz, r in ours["decode"].items():
        hf_ms = (hf or {}).get("decode", {}).get(str(bsz)) or (hf or {}).get("decode", {}).get(bsz)
        lines.append(f"| {bsz} | {f(r.get('engine_ms'))} | {r['step_ms']:.2f} | {f(r['gpu_replay_ms'])} | {f(r['eager_ms'])} | "
                     f"{r['floor_ms']:.2f} | {r['ratio']:.2f} | {f(r['experts_hit_per_layer'], '{}')} | {f(hf_ms)} |")
    p = ours["prefill"]
    lines += ["", f"Prefill {p['tokens']} tokens: {p['tokens_per_s']:.0f} tokens/s, {p['tflops']:.0f} TFLOP/s = "
                  f"{100 * p['share_of_matmul']:.0f}% of the measured bf16 matmul rate."]
    if hf:
        lines.append(f"transformers {hf['transformers']} (its own LongcatFlashForCausalLM, bf16, random weights).")
    return "\n".join(lines) + "\n"


def bench_public_api_defaults(args, raw: dict, device: torch.device) -> dict:
    """LLM.generate as a user calls it: no engine setting given (the step budget, cache size, graphs and warm-up
    are the defaults for the device). Times a prefill_len-token prompt (max_tokens=1) and a decode of new_tokens."""
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams

    if args.tiny:
        model = Path(tempfile.mkdtemp(prefix="lc_tiny_"))
        (model / "config.json").write_text(json.dumps(dict(raw, model_type="longcat_flash")))
    else:
        model = ROOT / "benchmarks" / "configs" / "longcat-flash-2l"
    t0 = time.perf_counter()
    llm = LLM(model=str(model), load_format="dummy", dtype="bfloat16", device=str(device))
    ready_s = time.perf_counter() - t0
    with torch.no_grad():  # as bench_ours: zero correction bias, so that tokens spread over the experts
        for layer in llm.engine.runner.model.model.layers:
            layer.mlp.router.e_score_correction_bias.zero_()
    engine, steps = llm.engine, [0]
    real_step = engine.step

    def counted_step():
        steps[0] += 1
        return real_step()

    engine.step = counted_step
    gen = torch.Generator().manual_seed(0)

    def timed(prompt_len: int, params: SamplingParams) -> tuple[float, int]:
        prompt = torch.randint(3, raw["vocab_size"], (prompt_len,), generator=gen).tolist()
        steps[0] = 0
        sync(device)
        t = time.perf_counter()
        llm.generate([prompt], params)
        sync(device)
        return time.perf_counter() - t, steps[0]

    prefill = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    decode = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    timed(args.prefill_len, prefill)  # the first call after start-up (still timed below on fresh prompts)
    prefill_runs = [timed(args.prefill_len, prefill) for _ in range(5)]
    decode_runs = [timed(args.prompt_len, decode) for _ in range(3)]
    res = {
        "model": str(model), "device": str(device), "ready_s": ready_s,
        "max_num_batched_tokens": engine.args.max_num_batched_tokens,
        "prefill_tokens": args.prefill_len,
        "prefill_chunks": -(-args.prefill_len // engine.args.max_num_batched_tokens),
        "prefill_engine_step_calls": prefill_runs[0][1],  # chunks, plus the call that collects the last one
        "prefill_ms": statistics.median(t for t, _ in prefill_runs) * 1e3,
        "prefill_all_ms": [t * 1e3 for t, _ in prefill_runs],
        "decode_prompt_tokens": args.prompt_len, "decode_new_tokens": args.new_tokens,
        "decode_ms_per_token": statistics.median(t for t, _ in decode_runs) * 1e3 / args.new_tokens,
    }
    print(f"public API defaults: {json.dumps(res)}", flush=True)
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    raw = TINY if args.tiny else FULL_2L
    device = torch.device(args.device)
    if args.public_api_defaults:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        res = bench_public_api_defaults(args, raw, device)
        (out_dir / "bench_public_api_defaults.json").write_text(json.dumps(res, indent=1))
        return
    if args.hf_only:
        print("HF_JSON " + json.dumps(hf_only(args, raw, device)), flush=True)
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bw, flops = measure_ceilings(device, args.tiny)
    print(f"ceilings: copy {bw / 1e12:.3f} TB/s, bf16 matmul {flops / 1e12:.1f} TFLOP/s", flush=True)
    ours = bench_ours(args, raw, device, bw, flops, out_dir)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        print(f"GPU memory still allocated before transformers: {torch.cuda.memory_allocated() / 1e9:.2f} GB")
    hf = run_hf_child(args) if args.hf_batches else None
    text = report(args, ours, hf, bw, flops, device)
    (out_dir / "bench_decode.json").write_text(json.dumps({"ours": ours, "hf": hf, "copy_Bps": bw,
                                                            "matmul_flops": flops}, indent=1))
    with open(args.results_md, "a") as fh:
        fh.write("\n" + text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
