"""bench_tp.py speed: LLMEngine decode steps at each TP size (one child process per size), TP=1 also eager."""

from __future__ import annotations

import json
import time

import torch
from harness import engine_decode_ms, ints
from tp_common import DEFAULT_DTYPE, MODELS, OVERRIDES, fitting, run_bench_tp_child


def engine_child(a) -> dict:
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.engine.llm_engine import LLMEngine

    batches = ints(a.batches)
    blocks = max(batches) * -(-(a.prompt_len + a.new_tokens + 8) // 16) + 16
    eargs = EngineArgs(
        model=a.model_dir,
        dtype=a.dtype,
        device=a.device,
        load_format="dummy",
        block_size=16,
        num_kv_blocks=blocks,
        max_num_seqs=max(batches),
        max_num_batched_tokens=16384,
        enable_prefix_caching=False,
        max_model_len=a.prompt_len + a.new_tokens + 32,
        tensor_parallel_size=a.tp,
        hf_overrides=json.loads(a.overrides) or None,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(eargs)
    out = {
        "tp": a.tp,
        "load_s": time.perf_counter() - t0,
        "graphs": engine.runner.graph_runner is not None,
        "decode_ms": {},
        "eager_ms": {},
    }
    c = engine.runner.model.config
    gen = torch.Generator().manual_seed(0)
    try:
        for b in batches:
            prompts = torch.randint(3, c.vocab_size, (b, a.prompt_len), generator=gen).tolist()
            out["decode_ms"][b] = engine_decode_ms(engine, prompts, a.new_tokens)
            print(f"tp {a.tp} batch {b}: {out['decode_ms'][b]:.2f} ms/step", flush=True)
        if a.tp == 1 and out["graphs"] or a.tp == 1 and a.device == "cpu":
            # TP ranks run eager steps without chained decode: TP=1 the same way, for the like-for-like column
            engine.runner.graph_runner, engine.runner.supports_chained_decode = None, False
            for b in batches:
                prompts = torch.randint(3, c.vocab_size, (b, a.prompt_len), generator=gen).tolist()
                out["eager_ms"][b] = engine_decode_ms(engine, prompts, a.new_tokens)
                print(f"tp 1 eager batch {b}: {out['eager_ms'][b]:.2f} ms/step", flush=True)
    finally:
        close = getattr(engine.runner, "close", None)
        if a.tp > 1 and close:
            close()
    return out


def cmd_speed(a) -> dict:
    skipped: list = []
    dtype = a.dtype or DEFAULT_DTYPE[a.model]
    res = {
        "model": a.model,
        "dtype": dtype,
        "device": a.device,
        "skipped": skipped,
        "by_tp": {},
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
    }
    for tp in fitting(ints(a.tp_sizes), a.device, skipped):
        try:
            res["by_tp"][tp] = run_bench_tp_child(
                [
                    "_engine",
                    "--model-dir",
                    str(MODELS[a.model]),
                    "--tp",
                    str(tp),
                    "--device",
                    a.device,
                    "--dtype",
                    dtype,
                    "--batches",
                    a.batches,
                    "--prompt-len",
                    str(a.prompt_len),
                    "--new-tokens",
                    str(a.new_tokens),
                    "--overrides",
                    json.dumps(OVERRIDES[a.model]),
                ],
                a.rank_timeout,
            )
        except Exception as e:
            res["by_tp"][tp] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        print(f"tp {tp}: {json.dumps(res['by_tp'][tp])}", flush=True)
    return res


