"""The split-K block-FP8 w8a8 GEMM (kernels/fp8_splitk.py) on the GPU: the LongCat-Flash-2L dense shapes at decode
row counts against the exact product of the quantized operands, every benchmark candidate config, the dispatch
switch (LONGCAT_FP8_SPLITK_MAX_ROWS) and a captured CUDA graph. Skipped without a CUDA device (CI); the CPU
interpreter runs tests/test_fp8_splitk.py.

Bound (as tests/test_fp8_gpu.py's w8a8 kernels): one bf16 rounding of the exact value plus FP8_MMA_ACC of the
products' magnitude for the FP8 tensor cores' reduced-precision accumulation inside each 128-wide group (measured
on the H200 for the same promotion scheme: 1.79 x 2^-10 worst; 2^-8 still catches a wrong or dropped group).
"""

from __future__ import annotations

import pytest
import torch

from longcat_service.kernels import fp8_splitk as fs
from longcat_service.kernels.fp8_gemm import w8a8_linear
from longcat_service.ops import fp8 as fp8_ops
from longcat_service.ops import fp8_reference as fr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"
BF16_ULP = 2.0**-8
FP8_MMA_ACC = 2.0**-8
SHAPES_2L = {"q_a_kv_a": (2176, 6144), "q_b": (12288, 1536), "o_proj": (6144, 8192), "gate_up": (24576, 6144),
             "down": (6144, 12288)}


def _case(m, n, k, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(m, k, device=DEV, generator=g) * 2).to(torch.bfloat16)
    w8, ws = fr.block_quant(torch.randn(n, k, device=DEV, generator=g) * 0.02)
    return x, w8, ws


def _assert_w8a8(out, x, w8, ws, what):
    k = x.shape[1]
    x8, xs = fr.per_token_group_quant(x)
    xq = x8.double() * xs.double().repeat_interleave(128, dim=1)[:, :k]
    wq = fr.block_dequant(w8, ws, dtype=torch.float64)
    exact, mag = xq @ wq.t(), xq.abs() @ wq.abs().t()
    bound = BF16_ULP * exact.abs() + FP8_MMA_ACC * mag * (1 + BF16_ULP) + 1e-30
    err = (out.double() - exact).abs()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all(), what
    bad = err > bound
    assert not bool(bad.any()), f"{what}: {int(bad.sum())}/{err.numel()} off, worst {float((err / bound).max()):.3g}x"


@pytest.mark.parametrize("m", [8, 16, 64, 128])
@pytest.mark.parametrize("shape", list(SHAPES_2L))
def test_splitk_at_the_2l_shapes(shape, m):
    n, k = SHAPES_2L[shape]
    x, w8, ws = _case(m, n, k, seed=m + n)
    out = fs.w8a8_splitk_linear(x, w8, ws)
    _assert_w8a8(out, x, w8, ws, f"{shape} M={m} {fs.config_for(m, n, k, fs.sm_count(x.device))}")
    assert torch.equal(out, fs.w8a8_splitk_linear(x, w8, ws))  # the split sum's fixed order: the same bits


@pytest.mark.parametrize("m", [16, 128])
@pytest.mark.parametrize("cfg", [str(c) for c in fs.SWEEP_CONFIGS] + ["64,1,4,4,swap", "128,11,3,4,swap"])
def test_every_candidate_config(cfg, m):
    """The benchmark's candidates (and an unsplit and an uneven split) at the o_proj shape, plus ragged N / K."""
    config = fs.parse_splitk_config(cfg)
    x, w8, ws = _case(m, 6144, 8192, seed=m)
    _assert_w8a8(fs.w8a8_splitk_linear(x, w8, ws, config), x, w8, ws, f"{cfg} M={m}")
    x, w8, ws = _case(m - 3, 2112, 1000, seed=m + 1)
    _assert_w8a8(fs.w8a8_splitk_linear(x, w8, ws, config), x, w8, ws, f"{cfg} M={m - 3} ragged")


@pytest.mark.parametrize("m", [8, 64, 128])
def test_fused_quantization_equals_the_unfused(m):
    """fuse quantizes x inside the GEMM bit for bit as per_token_group_quant_fp8: the same output bits."""
    x, w8, ws = _case(m, 2176, 6144, seed=m)
    for cfg in ("64,8,4,4,swap,tma", "128,4,4,4,swap"):
        fused = fs.w8a8_splitk_linear(x, w8, ws, fs.parse_splitk_config(cfg + ",fuse"))
        assert torch.equal(fused, fs.w8a8_splitk_linear(x, w8, ws, fs.parse_splitk_config(cfg))), cfg


def test_dispatch_switch(monkeypatch):
    x, w8, ws = _case(14, 6144, 8192, seed=5)  # o_proj: a SHAPE_CONFIGS entry at the 16-row tile
    monkeypatch.setenv("LONGCAT_FP8_SPLITK_MAX_ROWS", "0")
    assert torch.equal(fp8_ops.fp8_linear(x, w8, ws), w8a8_linear(x, w8, ws))
    monkeypatch.delenv("LONGCAT_FP8_SPLITK_MAX_ROWS")  # the default
    got = fp8_ops.fp8_linear(x.view(2, 7, -1), w8, ws)
    assert got.shape == (2, 7, 6144)
    assert torch.equal(got.view(14, -1), fs.w8a8_splitk_linear(x, w8, ws))
    monkeypatch.setenv("LONGCAT_FP8_SPLITK_MAX_ROWS", "12")  # 14 rows: above the bound, cuBLAS again
    assert torch.equal(fp8_ops.fp8_linear(x, w8, ws), w8a8_linear(x, w8, ws))
    monkeypatch.delenv("LONGCAT_FP8_SPLITK_MAX_ROWS")
    xb, w8b, wsb = _case(14, 12288, 1536, seed=6)  # q_b: no entry (cuBLAS measured faster), cuBLAS
    assert torch.equal(fp8_ops.fp8_linear(xb, w8b, wsb), w8a8_linear(xb, w8b, wsb))


@pytest.mark.parametrize("shape,rows", [("o_proj", 16), ("gate_up", 64)])
def test_splitk_inside_a_cuda_graph(shape, rows, monkeypatch):
    """fp8_linear (default switch, shapes with a SHAPE_CONFIGS entry) captured in a CUDA graph: replays with new
    inputs give the eager call's bits."""
    monkeypatch.delenv("LONGCAT_FP8_SPLITK_MAX_ROWS", raising=False)
    n, k = SHAPES_2L[shape]
    assert fs.measured_config(rows, n, k) is not None
    x, w8, ws = _case(rows, n, k, seed=9)
    static_x = x.clone()
    fp8_ops.fp8_linear(static_x, w8, ws)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fp8_ops.fp8_linear(static_x, w8, ws)
    for seed in (10, 11):
        fresh, _, _ = _case(rows, 1, k, seed=seed)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, fs.w8a8_splitk_linear(fresh, w8, ws))
        _assert_w8a8(static_out, fresh, w8, ws, f"{shape} graph replay")
