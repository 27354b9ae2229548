"""bench_tp.py check: the logits of one prefill and greedy generation through LLM at every TP size against TP=1, and
the collectives a B-token forward issues with their timed replay on the TP group."""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import ints
from tp_common import (
    DEFAULT_DTYPE,
    LOGIT_REL_TOL,
    MODELS,
    OVERRIDES,
    fitting,
    prompts_for,
    run_bench_tp_child,
    run_ranks,
    write_checkpoint,
)

from longcat_service.config import ModelConfig
from longcat_service.model import loader


class CollectiveRecorder:
    """Records (op, shape, dtype) of every torch.distributed.all_reduce / all_gather while active."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls = dist, []

    def __enter__(self):
        d = self.dist
        self._ar, self._ag = d.all_reduce, d.all_gather

        def all_reduce(tensor, *a, **k):
            self.calls.append(("all_reduce", tuple(tensor.shape), str(tensor.dtype)))
            return self._ar(tensor, *a, **k)

        def all_gather(parts, tensor, *a, **k):
            self.calls.append(("all_gather", tuple(tensor.shape), str(tensor.dtype)))
            return self._ag(parts, tensor, *a, **k)

        d.all_reduce, d.all_gather = all_reduce, all_gather
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce, self.dist.all_gather = self._ar, self._ag


def time_collectives(calls, device, reps: int = 30, warmup: int = 5) -> float:
    """Median ms of replaying `calls` back to back on the TP group (CUDA events on cuda, wall clock on cpu)."""
    import torch.distributed as dist

    from longcat_service.distributed import parallel_state

    group, world = parallel_state.get_tp_group(), parallel_state.get_tp_size()
    bufs = []
    for op, shape, dtype in calls:
        t = torch.ones(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
        bufs.append((op, t, [torch.empty_like(t) for _ in range(world)] if op == "all_gather" else None))

    def once():
        for op, t, parts in bufs:
            if op == "all_reduce":
                dist.all_reduce(t, group=group)
            else:
                dist.all_gather(parts, t, group=group)

    for _ in range(warmup):
        once()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            dist.barrier(group=parallel_state.get_cpu_group())
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            once()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            dist.barrier(group=parallel_state.get_cpu_group())
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rank_check(
    model_dir: str,
    load_format: str,
    overrides: dict,
    dtype: str,
    device_type: str,
    tokens: list,
    comm_batches: list,
    vocab: int,
    expert_parallel: bool = False,
) -> dict:
    """On every rank: load (this rank's shards), logits of one prefill of `tokens`; per batch B the collectives of
    a B-token forward and their timed replay. Rank 0's dict comes back."""
    from longcat_service.distributed import parallel_state
    from tests.engine_utils import full_forward_logits

    parallel_state.set_expert_parallel(expert_parallel)

    rank, world = parallel_state.get_tp_rank(), parallel_state.get_tp_size()
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    t0 = time.perf_counter()
    model = loader.load_model(
        model_dir, dtype=dtype, device=device, load_format=load_format, hf_overrides=overrides or None
    )
    load_s = time.perf_counter() - t0
    logits = full_forward_logits(model, tokens)
    out = {"load_s": load_s, "logits": logits.cpu().numpy(), "comm": {}}
    gen = torch.Generator().manual_seed(1)
    for b in comm_batches:
        toks = torch.randint(3, vocab, (b,), generator=gen).tolist()
        with CollectiveRecorder() as rec:
            full_forward_logits(model, toks)
        entry = {
            "calls": len(rec.calls),
            "bytes": sum(
                math.prod(s) * torch.tensor([], dtype=getattr(torch, d.removeprefix("torch."))).element_size()
                for _, s, d in rec.calls
            ),
            "ops": sorted({f"{op}{list(s)}:{d.removeprefix('torch.')}" for op, s, d in rec.calls}),
        }
        if world > 1:
            entry["ms"] = time_collectives(rec.calls, device)
        out["comm"][b] = entry
    if device_type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def llm_child(a) -> dict:
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams

    c = ModelConfig.from_pretrained(Path(a.model_dir) / "config.json")
    prompts = prompts_for(c.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, logprobs=1)
    kw = dict(
        dtype=a.dtype,
        device=a.device,
        load_format=a.load_format,
        max_model_len=128,
        num_kv_blocks=64,
        block_size=16,
        enable_prefix_caching=False,
        hf_overrides=json.loads(a.overrides) or None,
    )
    t0 = time.perf_counter()
    if a.expert_parallel and a.tp > 1 and a.ep_capacity_factor is not None:
        kw["ep_capacity_factor"] = a.ep_capacity_factor
    if a.speculative_k:
        kw["speculative_config"] = {"method": "mtp", "num_speculative_tokens": a.speculative_k}
    llm = LLM(model=a.model_dir, tensor_parallel_size=a.tp, enable_expert_parallel=a.expert_parallel, **kw)
    load_s = time.perf_counter() - t0
    runner = llm.engine.runner
    try:
        outs = llm.generate(prompts, params)
    finally:
        close = getattr(llm.engine.runner, "close", None)
        if a.tp > 1 and close:
            close()
    return {
        "load_s": load_s,
        # decode CUDA graphs captured on rank 0 (0: eager), and EP graph steps re-run eagerly for overflow
        "graphs": len(runner.graph_runner.graphs) if runner.graph_runner is not None else 0,
        "ep_capacity_overflows": getattr(runner, "ep_capacity_overflows", None),
        # MTP: the spec-step CUDA graphs captured on rank 0 (0: eager spec steps)
        "spec_graphs": len(spec_graphs.graphs) if (spec_graphs := getattr(runner.spec_decoder, "graphs", None)) else 0,
        "tokens": [o.outputs[0].token_ids for o in outs],
        "logprobs": [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs],
    }


# ---- check -------------------------------------------------------------------------------------------------
def cmd_check(a) -> dict:
    dtype = a.dtype or DEFAULT_DTYPE[a.model]
    skipped: list = []
    sizes = fitting(ints(a.tp_sizes), a.device, skipped)
    if 1 not in sizes:
        sizes = [1] + sizes
    tmp = Path(tempfile.mkdtemp(prefix="bench_tp_"))
    if a.model == "tiny":  # a real checkpoint on disk, loaded with the stock loader at every size
        model_dir = str(write_checkpoint("tiny", tmp / "tiny", dtype=dtype, mtp=a.speculative_k > 0))
        load_format, overrides = "auto", {}
    elif a.speculative_k:
        raise SystemExit("--speculative-k: the tiny model only (its checkpoint is written with MTP weights)")
    else:
        model_dir, load_format, overrides = str(MODELS[a.model]), "dummy", OVERRIDES[a.model]
    c = ModelConfig.from_dict({**json.loads((Path(model_dir) / "config.json").read_text()), **overrides})
    tokens = prompts_for(c.vocab_size, 1, seed=7)[0][:5] + list(range(3, 3 + a.prompt_len - 5))
    tokens = [t % c.vocab_size for t in tokens]
    res: dict = {
        "model": a.model,
        "dtype": dtype,
        "device": a.device,
        "load_format": load_format,
        "tp_sizes": sizes,
        "skipped": skipped,
        "by_tp": {},
        "tolerance_rel": LOGIT_REL_TOL[dtype],
        "expert_parallel": a.expert_parallel,
        "speculative_k": a.speculative_k,
    }
    ref = None
    for tp in sizes:
        r = {}
        t0 = time.perf_counter()
        try:
            out = run_ranks(
                tp,
                a.device,
                rank_check,
                model_dir,
                load_format,
                overrides,
                dtype,
                a.device,
                tokens,
                ints(a.batches),
                c.vocab_size,
                a.expert_parallel,
                timeout_s=a.rank_timeout,
            )
            logits = torch.from_numpy(out.pop("logits"))
            if tp == 1:
                ref = logits
            r.update(out)
            if ref is not None:
                diff = (logits - ref).float()
                r["logits_max_abs"] = diff.abs().max().item()
                r["logits_rel"] = (diff.norm() / ref.norm()).item()
                r["top1_agree"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
                r["logits_ok"] = r["logits_rel"] <= LOGIT_REL_TOL[dtype]
        except Exception as e:  # one size failing must not hide the others
            r["error"] = f"{type(e).__name__}: {e}"[-3000:]
        if a.llm:
            try:
                r["llm"] = run_bench_tp_child(
                    [
                        "_llm",
                        "--model-dir",
                        model_dir,
                        "--load-format",
                        load_format,
                        "--tp",
                        str(tp),
                        "--device",
                        a.device,
                        "--dtype",
                        dtype,
                        "--max-tokens",
                        str(a.max_tokens),
                        "--overrides",
                        json.dumps(overrides),
                        *(["--expert-parallel"] if a.expert_parallel else []),
                        *(["--ep-capacity-factor", str(a.ep_capacity_factor)] if a.ep_capacity_factor else []),
                        *(["--speculative-k", str(a.speculative_k)] if a.speculative_k else []),
                    ],
                    a.rank_timeout,
                )
            except Exception as e:
                r["llm_error"] = f"{type(e).__name__}: {e}"[-3000:]
        r["wall_s"] = time.perf_counter() - t0
        res["by_tp"][tp] = r
        print(f"tp {tp}: " + json.dumps({k: v for k, v in r.items() if k != "llm"}), flush=True)
    base = res["by_tp"].get(1, {}).get("llm")
    for r in res["by_tp"].values():
        if base and "llm" in r:
            g = r["llm"]
            r["greedy_equal"] = g["tokens"] == base["tokens"]
            r["greedy_token_agree"] = statistics.mean(
                float(x == y)
                for gt, bt in zip(g["tokens"], base["tokens"], strict=True)
                for x, y in zip(gt, bt, strict=True)
            )
            r["logprob_max_abs"] = max(
                abs(x - y)
                for gl, bl in zip(g["logprobs"], base["logprobs"], strict=True)
                for x, y in zip(gl, bl, strict=True)
            )
    if a.crosscheck_dummy and a.model == "tiny":  # the virtual init == loading its safetensors file
        out = run_ranks(
            1,
            a.device,
            rank_check,
            str(MODELS["tiny"]),
            "dummy",
            OVERRIDES["tiny"],
            dtype,
            a.device,
            tokens,
            [],
            c.vocab_size,
        )
        res["dummy_vs_checkpoint_max_abs"] = (torch.from_numpy(out["logits"]) - ref).abs().max().item()
    return res


