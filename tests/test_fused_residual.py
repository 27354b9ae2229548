"""LONGCAT_FUSED_RESIDUAL=1: the decoder layer's residual adds fused into the following RMSNorms give the
same model outputs as the unfused layer (bit-identical with the pure-PyTorch add+norm; within rounding
with the Triton kernel, run in the CPU interpreter without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from longcat_service.config import ModelConfig  # noqa: E402
from longcat_service.model import longcat_flash as model_mod  # noqa: E402
from longcat_service.model.attention_metadata import AttentionMetadata  # noqa: E402
from longcat_service.model.kv_cache import allocate_kv_caches  # noqa: E402
from longcat_service.model.loader import load_model  # noqa: E402
from tests.tiny_config import TINY_CONFIG  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
TINY = TINY_CONFIG


def _run(model, config, dtype):
    """Prefill two prompts, then one decode step of both; returns (prefill hidden, decode logits)."""
    caches = allocate_kv_caches(config, 12, 4, dtype, DEVICE)
    prompts, tables = [[5, 9, 11, 3, 8, 1, 4], [2, 60, 7]], [[0, 1], [4]]
    with torch.inference_mode():
        pre = []
        for p, t in zip(prompts, tables, strict=True):
            meta = AttentionMetadata.build([len(p)], [len(p)], [t], 4, DEVICE)
            pre.append(model(torch.tensor(p, device=DEVICE), torch.arange(len(p), device=DEVICE), meta, caches))
        lens = [len(p) + 1 for p in prompts]
        meta = AttentionMetadata.build([1, 1], lens, tables, 4, DEVICE)
        hidden = model(torch.tensor([3, 7], device=DEVICE), torch.tensor([n - 1 for n in lens], device=DEVICE),
                       meta, caches)
        return torch.cat(pre), model.compute_logits(hidden)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_layer_equals_unfused(monkeypatch, dtype):
    config = ModelConfig.from_dict(TINY)
    model = load_model(config, dtype=dtype, device=DEVICE, load_format="dummy", seed=1)
    monkeypatch.delenv("LONGCAT_FUSED_RESIDUAL", raising=False)
    base_pre, base_logits = _run(model, config, dtype)
    monkeypatch.setenv("LONGCAT_FUSED_RESIDUAL", "1")
    if not ON_GPU:  # first the pure-PyTorch add+norm: the rewiring alone must not change a single bit
        monkeypatch.setattr(model_mod, "fast_path_enabled", lambda t: False)
        pre, logits = _run(model, config, dtype)
        assert torch.equal(pre, base_pre) and torch.equal(logits, base_logits)
        pytest.importorskip("triton")
        monkeypatch.setattr(model_mod, "fast_path_enabled", lambda t: True)  # interpreted Triton kernel
    pre, logits = _run(model, config, dtype)
    tol = 1e-5 if dtype == torch.float32 else 0.03
    assert _rel(pre, base_pre) < tol and _rel(logits, base_logits) < tol


def test_fused_residual_is_opt_in(monkeypatch):
    monkeypatch.delenv("LONGCAT_FUSED_RESIDUAL", raising=False)
    assert not model_mod.fused_residual_enabled()
    monkeypatch.setenv("LONGCAT_FUSED_RESIDUAL", "1")
    assert model_mod.fused_residual_enabled()
