"""The transformers baseline of bench_decode.py: decode steps of transformers' own LongcatFlashForCausalLM (bf16,
random weights) on the same config, run in a child process after our model is freed (two 2-layer full-width
models do not fit together).

    python benchmarks/hf_baseline.py --device cuda --batches 1,64 --prompt-len 512 --warmup 3 --steps 10 [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from decode_driver import FULL_2L, TINY
from harness import ints, run_child, sync

MARKER = "HF_JSON "


def hf_decode_ms(raw: dict, device: torch.device, batches: list[int], prompt_len: int, steps: int,
                 warmup: int = 3) -> dict:
    """ms per decode step at each batch: the median of `steps` timed steps after `warmup` untimed ones."""
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
    for bsz in batches:
        ids = torch.randint(3, raw["vocab_size"], (bsz, prompt_len), generator=gen).to(device)
        with torch.inference_mode():
            o = model(input_ids=ids, use_cache=True)
            cache, nxt = o.past_key_values, o.logits[:, -1].argmax(-1)
            times = []
            for step in range(warmup + steps):
                sync(device)
                t0 = time.perf_counter()
                o = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
                nxt = o.logits[:, -1].argmax(-1)
                nxt.tolist()
                if step >= warmup:
                    times.append(time.perf_counter() - t0)
        out["decode"][bsz] = statistics.median(times) * 1e3
        print(f"transformers batch {bsz}: {out['decode'][bsz]:.2f} ms/step", flush=True)
        del o, cache
    return out


def run_hf_child(device: str, batches: str, prompt_len: int, steps: int, tiny: bool, warmup: int = 3) -> dict | None:
    """hf_decode_ms in a child process; None (and its error printed) when it fails."""
    argv = [__file__, "--device", device, "--batches", batches, "--prompt-len", str(prompt_len),
            "--steps", str(steps), "--warmup", str(warmup)] + (["--tiny"] if tiny else [])
    try:
        return run_child(argv, MARKER, echo=True)
    except RuntimeError as exc:
        print(f"transformers baseline failed: {str(exc)[-3000:]}", flush=True)
        return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed decode steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    res = hf_decode_ms(TINY if a.tiny else FULL_2L, torch.device(a.device), ints(a.batches), a.prompt_len, a.steps, a.warmup)
    print(MARKER + json.dumps(res), flush=True)


if __name__ == "__main__":
    sys.exit(main())
