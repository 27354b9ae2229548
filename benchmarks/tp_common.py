"""What the tensor-parallel benchmarks (bench_tp.py) share: the models, their TP-invariant dummy weights with the
router correction bias at 0, a real checkpoint of the tiny one, test prompts, and running a function on N ranks.

Importing this module sets the router correction bias to 0 in the library's dummy init: spawned TP ranks import
bench_tp.py as __mp_main__ (which imports this module), so they get it too. Zero correction bias spreads tokens
over the experts as the real, trained bias does (bench_decode does the same).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from harness import ROOT, run_child

from longcat_service.config import ModelConfig
from longcat_service.distributed.local_ranks import run_on_local_ranks
from longcat_service.model import loader
from longcat_service.model.dummy_weights import dummy_tensor, init_dummy

MODELS = {"tiny": ROOT / "benchmarks/configs/longcat-flash-tiny", "2l": ROOT / "benchmarks/configs/longcat-flash-2l"}
# The tiny config has 4 heads: 8 heads so that it splits over TP=8 too (every size compares the same model).
OVERRIDES = {"tiny": {"num_attention_heads": 8, "num_key_value_heads": 8}, "2l": {}}
DEFAULT_DTYPE = {"tiny": "float32", "2l": "bfloat16"}
# pass thresholds: fp32 tiny (reduction order only) and bf16 2L (bf16 rounding of partial sums)
LOGIT_REL_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}
BENCH_TP = ROOT / "benchmarks" / "bench_tp.py"


def virtual_tensor(key: str, c: ModelConfig, seed: int, device) -> torch.Tensor:
    return dummy_tensor(key, c, seed, device, bias_std=0.0)


loader._init_dummy = functools.partial(init_dummy, bias_std=0.0)


def write_checkpoint(model: str, out: Path, seed: int = 0, dtype: str = "float32", mtp: bool = False) -> Path:
    """config.json (with the overrides) + model.safetensors holding the virtual tensors (small configs only); mtp:
    the MTP block's keys too (random weights: drafts mostly rejected, which speculative checks compare all the same)."""
    from safetensors.torch import save_file

    raw = {**json.loads((MODELS[model] / "config.json").read_text()), **OVERRIDES[model]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    c = ModelConfig.from_pretrained(out / "config.json")
    with torch.device("meta"):
        model_meta = loader.LongcatFlashForCausalLM(c, torch.float32)
        if mtp:
            model_meta.enable_mtp()
        keys = list(model_meta.checkpoint_targets())
    save_file(
        {k: virtual_tensor(k, c, seed, "cpu").to(loader.DTYPES[dtype]).contiguous() for k in keys},
        str(out / "model.safetensors"),
    )
    return out


def run_ranks(world: int, device_type: str, fn, *args, timeout_s: float = 900.0):
    """fn(*args) on `world` spawned ranks (NCCL on cuda:rank, else gloo); rank 0's result. World 1 also runs in a
    child, so the caller never holds device memory."""
    return run_on_local_ranks(world, fn, *args, device_type=device_type, timeout_s=timeout_s)


def run_bench_tp_child(argv: list[str], timeout_s: float) -> dict:
    """python bench_tp.py <argv> (a child mode: _llm, _engine) in a fresh process; its 'RESULT ' line."""
    return run_child([str(BENCH_TP), *argv], "RESULT ", timeout_s)


def prompts_for(vocab: int, n: int = 4, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = [5, 19, 2, 40][:n]
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lens]


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fitting(sizes: list[int], device: str, skipped: list) -> list[int]:
    n = gpu_count() if device == "cuda" else 1 << 30
    ok = [s for s in sizes if s <= n]
    skipped += [{"tp": s, "why": f"needs {s} GPUs, {n} visible"} for s in sizes if s > n]
    return ok


