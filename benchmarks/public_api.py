"""bench_decode.py through the public API with every engine setting at its default (what a user of LLM gets):
the model it builds, a prefill / decode timing of single prompts (--public-api-defaults) and the per-step decode
time of batches (the report's defaults column)."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import ROOT, sync


def default_llm(raw: dict, device: torch.device, tiny: bool, quantization: str | None = None):
    """(LLM with no engine setting given, its model path, seconds to ready) on benchmarks/configs/longcat-flash-2l
    (or the tiny config), dummy bf16 weights (FP8 with quantization="fp8"), router correction bias zeroed as in
    bench_decode's tuned run."""
    from longcat_service.llm import LLM

    if tiny:
        model = Path(tempfile.mkdtemp(prefix="lc_tiny_"))
        (model / "config.json").write_text(json.dumps(dict(raw, model_type="longcat_flash")))
    else:
        model = ROOT / "benchmarks" / "configs" / "longcat-flash-2l"
    t0 = time.perf_counter()
    llm = LLM(model=str(model), load_format="dummy", dtype="bfloat16", device=str(device), quantization=quantization)
    ready_s = time.perf_counter() - t0
    with torch.no_grad():  # the dummy bias would send every token to the same experts (see bench_ours)
        for layer in llm.engine.runner.model.model.layers:
            layer.mlp.router.e_score_correction_bias.zero_()
    return llm, model, ready_s


def timed_generate(llm, prompts: list[list[int]], max_tokens: int, device: torch.device) -> float:
    """Wall seconds of one greedy llm.generate(prompts) of max_tokens new tokens each (ignore_eos)."""
    from longcat_service.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    sync(device)
    return time.perf_counter() - t0


def random_prompts(gen: torch.Generator, vocab_size: int, n: int, length: int) -> list[list[int]]:
    return torch.randint(3, vocab_size, (n, length), generator=gen).tolist()


def defaults_decode_ms(llm, raw: dict, batches: list[int], prompt_len: int, new_tokens: int,
                       device: torch.device) -> dict[int, float]:
    """ms per decode step at each batch: (t(new_tokens) - t(1)) / (new_tokens - 1) of generate(), medians of 3,
    after one untimed call per batch (graph capture, kernel builds). Fresh random prompts every call, so a
    prefix-cache hit never shortens one of the two prefills."""
    if new_tokens < 2:
        raise ValueError(f"the defaults column needs --new-tokens >= 2, got {new_tokens}")
    gen = torch.Generator().manual_seed(1)
    out = {}
    for bsz in batches:
        def run(n: int, bsz=bsz) -> float:
            return timed_generate(llm, random_prompts(gen, raw["vocab_size"], bsz, prompt_len), n, device)

        run(new_tokens)
        one = statistics.median(run(1) for _ in range(3))
        full = statistics.median(run(new_tokens) for _ in range(3))
        out[bsz] = (full - one) / (new_tokens - 1) * 1e3
        print(f"defaults batch {bsz}: {out[bsz]:.2f} ms/step", flush=True)
    return out


def bench_public_api_defaults(args, raw: dict, device: torch.device) -> dict:
    """LLM.generate as a user calls it: no engine setting given (the step budget, cache size, graphs and warm-up
    are the defaults for the device). Times a prefill_len-token prompt (max_tokens=1) and a decode of new_tokens."""
    llm, model, ready_s = default_llm(raw, device, args.tiny)
    engine, steps = llm.engine, [0]
    real_step = engine.step

    def counted_step():
        steps[0] += 1
        return real_step()

    engine.step = counted_step
    gen = torch.Generator().manual_seed(0)

    def timed(prompt_len: int, max_tokens: int) -> tuple[float, int]:
        steps[0] = 0
        t = timed_generate(llm, random_prompts(gen, raw["vocab_size"], 1, prompt_len), max_tokens, device)
        return t, steps[0]

    timed(args.prefill_len, 1)  # the first call after start-up (still timed below on fresh prompts)
    prefill_runs = [timed(args.prefill_len, 1) for _ in range(5)]
    decode_runs = [timed(args.prompt_len, args.new_tokens) for _ in range(3)]
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
