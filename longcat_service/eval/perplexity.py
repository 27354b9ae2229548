"""Perplexity of a model on held-out text, computed through the serving engine (prompt logprobs).

    python -m longcat_service.eval.perplexity                          # demo model, held-out split, fp32 and bf16
    python -m longcat_service.eval.perplexity --dtype bfloat16 --llm-kwargs '{"quantization": "fp8"}'
    python -m longcat_service.eval.perplexity --model /ckpt --text-file eval.txt --max-tokens 100000

The text is tokenized once, cut into windows of --window tokens, and each window is one prompt with
prompt_logprobs=0 (1 output token): the engine's own prefill path, kernels and dtype decide the numbers, so
comparing runs compares dtypes, quantization or kernel changes. Perplexity = exp(mean NLL) over every token of
every window except each window's first.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longcat_service.sampling_params import SamplingParams


def window_ids(token_ids: Sequence[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive windows of `window` tokens (a shorter last one if it has >= 2 tokens), up to max_tokens in all."""
    if window < 2:
        raise ValueError(f"window: must be >= 2 tokens, got {window}")
    ids = list(token_ids[:max_tokens] if max_tokens else token_ids)
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


def perplexity(llm: Any, texts: Sequence[str], window: int = 256, max_tokens: int | None = None) -> dict[str, float]:
    """NLL/perplexity of `texts` (joined in order) under `llm` (a longcat_service.LLM)."""
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("the model has no tokenizer.json: perplexity on text needs one")
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text, add_special_tokens=False))
    windows = window_ids(ids, window, max_tokens)
    if not windows:
        raise ValueError("texts: fewer than 2 tokens to score")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params)
    seconds = time.perf_counter() - start
    nll, count = 0.0, 0
    for w, out in zip(windows, outs, strict=True):
        plp = out.prompt_logprobs
        if plp is None or len(plp) != len(w):
            raise RuntimeError(f"engine returned {None if plp is None else len(plp)} prompt logprobs for {len(w)} tokens")
        for pos in range(1, len(w)):
            lp = plp[pos]
            if lp is None or lp.token_id != w[pos]:
                raise RuntimeError(f"prompt logprob {pos} missing or for the wrong token")
            nll -= lp.logprob
            count += 1
    return {"nll": nll / count, "ppl": math.exp(nll / count), "tokens": count, "windows": len(windows),
            "seconds": seconds}


def demo_heldout_texts() -> list[str]:
    from longcat_service.demo.train import heldout_texts

    return heldout_texts()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="Perplexity through the engine (prompt logprobs).")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the built-in demo model)")
    p.add_argument("--dtype", action="append", help="repeatable; default: float32 and bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--text-file", type=Path, help="UTF-8 text to score (default: the demo corpus's held-out split)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--llm-kwargs", type=json.loads, default={}, help='extra LLM(...) kwargs as JSON, e.g. {"quantization": "fp8"}')
    p.add_argument("--json", action="store_true", help="print one JSON object per dtype")
    args = p.parse_args(argv)

    from longcat_service.llm import LLM

    texts = [args.text_file.read_text(encoding="utf-8")] if args.text_file else demo_heldout_texts()
    results = []
    for dtype in args.dtype or ["float32", "bfloat16"]:
        llm = LLM(model=args.model, dtype=dtype, device=args.device, **args.llm_kwargs)
        res = {"model": args.model or "demo", "dtype": dtype, **args.llm_kwargs,
               **perplexity(llm, texts, args.window, args.max_tokens)}
        results.append(res)
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            extra = f" {args.llm_kwargs}" if args.llm_kwargs else ""
            print(f"{res['model']} {dtype}{extra}: ppl {res['ppl']:.3f} (nll {res['nll']:.4f}) over {res['tokens']} tokens, "
                  f"{res['windows']} windows of <= {args.window}, {res['seconds']:.1f}s", flush=True)
        del llm
    return results


if __name__ == "__main__":
    main()
