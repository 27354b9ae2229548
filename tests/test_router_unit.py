"""TopkRouter's contract beyond the bf16x3 numerics (tests/test_moe_prefill.py): fp32 parameters whatever the model
dtype, the checkpoint names, the threshold's lower edge, and the fallback to the fp32 GEMM (with one warning, for
the rest of the process) when the GPU's torch has no mm with out_dtype. The CPU's aten::mm.dtype is missing, which
is exactly that failure."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from longcat_service.layers import router as router_mod
from longcat_service.layers.router import TopkRouter


class FakeCudaInput:
    """Enough of a CUDA bf16 activation for TopkRouter._use_bf16x3 (which reads only metadata)."""

    is_cuda = True
    dtype = torch.bfloat16

    def __init__(self, tokens):
        self.shape = (tokens, 64)

    def dim(self):
        return 2


def test_parameters_are_fp32_under_a_bf16_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as transformers does while it builds a bf16 model
    try:
        router = TopkRouter(64, 24)
    finally:
        torch.set_default_dtype(previous)
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in router.state_dict().items()}
    assert shapes == {"classifier.weight": ((24, 64), torch.float32), "e_score_correction_bias": ((24,), torch.float32)}


def test_threshold_of_one_token_sends_every_batch_to_bf16x3(monkeypatch):
    if not router_mod._HAS_MM_OUT_DTYPE:
        pytest.skip("this torch has no mm with out_dtype")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(TopkRouter, "_bf16x3_failed", False)
    monkeypatch.setenv("LONGCAT_ROUTER_BF16X3_MIN_TOKENS", "1")
    assert TopkRouter(64, 24)._use_bf16x3(FakeCudaInput(1))


def test_missing_mm_out_dtype_falls_back_to_the_fp32_gemm_for_good(monkeypatch, caplog):
    monkeypatch.setattr(TopkRouter, "_bf16x3_failed", False)
    router = TopkRouter(64, 24)
    with torch.no_grad():
        router.classifier.weight.copy_(torch.randn(24, 64, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(8, 64).to(torch.bfloat16)
    monkeypatch.setattr(TopkRouter, "_use_bf16x3", lambda self, x: True)  # as for a large CUDA batch
    with caplog.at_level(logging.WARNING, logger=router_mod.__name__):
        out = router(x)
    assert out.dtype == torch.float32 and torch.equal(out, F.linear(x.float(), router.classifier.weight))
    assert TopkRouter._bf16x3_failed is True
    [record] = caplog.records
    assert isinstance(record.args[0], NotImplementedError)
    assert record.getMessage() == f"router: bf16x3 GEMM unavailable ({record.args[0]}); using the fp32 GEMM"
    monkeypatch.undo()  # the real check, with the failure remembered (undo resets the flag: set it again)
    monkeypatch.setattr(TopkRouter, "_bf16x3_failed", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("LONGCAT_ROUTER_BF16X3_MIN_TOKENS", "16")
    assert not router._use_bf16x3(FakeCudaInput(4096))


def test_out_of_memory_is_not_taken_for_a_missing_kernel(monkeypatch):
    monkeypatch.setattr(TopkRouter, "_bf16x3_failed", False)
    router = TopkRouter(64, 24)

    def oom(x, split, mm=None):
        raise torch.cuda.OutOfMemoryError("out of memory")

    monkeypatch.setattr(router_mod, "linear_bf16x3", oom)
    monkeypatch.setattr(TopkRouter, "_use_bf16x3", lambda self, x: True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        router(torch.randn(8, 64).to(torch.bfloat16))
    assert TopkRouter._bf16x3_failed is False
