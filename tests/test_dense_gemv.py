"""dense_gemv (the decode-batch GEMV, csrc/*/dense_gemv.*) against reference.py, its F.linear fallbacks, and the
layers/linear.py helper that routes decode batches to it. The CUDA tests (marked gpu) skip without a GPU or
without the CUDA kernels built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longcat_service.ops as ops
from longcat_service.layers import linear as linear_mod
from longcat_service.ops import extension
from longcat_service.ops import reference as ref
from tests.extension_switch import skip_without_extension

HAVE_EXT = ops.ACTIVE_BACKEND.startswith("extension")
HAVE_CUDA_OPS = torch.cuda.is_available() and ops.ACTIVE_BACKEND == "extension cpu+cuda"
needs_ext = skip_without_extension(HAVE_EXT, f"ops backend is {ops.ACTIVE_BACKEND}")
needs_cuda_ops = pytest.mark.skipif(
    not HAVE_CUDA_OPS, reason=f"needs CUDA and the CUDA kernels (ops backend: {ops.ACTIVE_BACKEND})"
)
L = torch.ops.longcat

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(n, k) for n in (1, 7, 33, 2112) for k in (8, 64, 1536, 6144)]
# On the GPU also: N = 4227 takes 4 columns per warp on a 132-SM H200 (with a 3-column tail), K = 1544 leaves
# lanes with unequal step counts (a partial last pass).
GPU_SHAPES = SHAPES + [(4227, 1536), (33, 1544), (4227, 1544)]
# Rounding of the output (one ulp: the order of fp32 additions may move a value across a rounding boundary)
# plus fp32 accumulation-order error at K = 6144 with outputs of unit scale.
TOL = {torch.bfloat16: (2**-7, 1e-4), torch.float16: (2**-10, 1e-4), torch.float32: (1e-5, 1e-4)}


def _dtype_id(dtype):
    return str(dtype).split(".")[-1]


def _inputs(m, n, k, dtype, seed, device="cpu", x_pad=0):
    """x [m, k] (a column slice of [m, k + 2 * x_pad] when x_pad: row stride > k, still 16-byte aligned) and
    w [n, k] scaled so that outputs are of unit scale."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(m, k + 2 * x_pad, generator=g).to(device, dtype)
    x = wide[:, x_pad : x_pad + k]
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(device, dtype)
    return x, w


def _assert_matches_fp32(out, x, w):
    """out (in x's dtype) against the fp32-accumulated product, computed on the CPU."""
    assert out.dtype == x.dtype and out.shape == (x.shape[0], w.shape[0]) and out.is_contiguous()
    expected = x.cpu().float() @ w.cpu().float().t()
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(out.cpu().float(), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------- CPU


def test_reference_is_fp32_product_in_input_dtype():
    x, w = _inputs(3, 5, 16, torch.bfloat16, seed=1)
    out = ref.dense_gemv(x, w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (x.float() @ w.float().t()).to(torch.bfloat16))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_cpu_op_matches_reference(shape, dtype):
    n, k = shape
    rows, w = _inputs(8, n, k, dtype, seed=1000 * n + k)
    for m in range(9):
        x = rows[:m]
        expected = ref.dense_gemv(x, w)
        rtol, atol = TOL[dtype]
        for out in (L.dense_gemv(x, w), extension.dense_gemv(x, w)):
            assert out.dtype == dtype and out.shape == (m, n)
            torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_cpu_strided_inputs(dtype):
    n, k = 33, 1536
    for m in (1, 3, 8):
        x, _ = _inputs(m, n, k, dtype, seed=m, x_pad=8)
        assert x.stride() == (k + 16, 1)
        g = torch.Generator().manual_seed(100 + m)
        fused = torch.randn(2 * n, k + 16, generator=g).to(dtype)
        for w in (fused[n:, :k], fused[:n, 8 : 8 + k]):  # a row block (like q_a_proj's view), a column slice
            assert extension.dense_gemv_supported(x, w)
            rtol, atol = TOL[dtype]
            torch.testing.assert_close(extension.dense_gemv(x, w), ref.dense_gemv(x, w), rtol=rtol, atol=atol)
            torch.testing.assert_close(L.dense_gemv(x, w), ref.dense_gemv(x, w), rtol=rtol, atol=atol)


@needs_ext
def test_cpu_op_returns_empty_for_no_rows():
    x, w = _inputs(0, 7, 64, torch.bfloat16, seed=3)
    out = L.dense_gemv(x, w)
    assert out.shape == (0, 7) and out.dtype == torch.bfloat16


def test_unsupported_inputs_fall_back_to_f_linear():
    g = torch.Generator().manual_seed(4)
    cases = [
        (torch.randn(2, 12, generator=g).bfloat16(), torch.randn(5, 12, generator=g).bfloat16()),  # K % 8
        (torch.randn(2, 6, generator=g), torch.randn(5, 6, generator=g)),  # fp32, K % 4
        (torch.randn(9, 64, generator=g).bfloat16(), torch.randn(5, 64, generator=g).bfloat16()),  # 9 rows
        (torch.randn(2, 64, generator=g).bfloat16(), torch.randn(5, 64, generator=g).half()),  # dtypes differ
        (torch.randn(2, 64, generator=g).double(), torch.randn(5, 64, generator=g).double()),  # float64
        (torch.randn(2, 72, generator=g).bfloat16()[:, 1:65], torch.randn(5, 64, generator=g).bfloat16()),  # 2 B off
        (torch.randn(2, 64, 2, generator=g).bfloat16()[..., 0], torch.randn(5, 64, generator=g).bfloat16()),  # stride 2
    ]
    for x, w in cases:
        assert not extension.dense_gemv_supported(x, w)
        if x.dtype == w.dtype:
            assert torch.equal(extension.dense_gemv(x, w), F.linear(x, w))
        else:
            with pytest.raises(RuntimeError):
                extension.dense_gemv(x, w)  # F.linear's own error


@needs_ext
def test_cpu_op_rejects_bad_arguments():
    x, w = _inputs(2, 5, 64, torch.float32, seed=5)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        L.dense_gemv(torch.randn(9, 64), w)
    with pytest.raises(RuntimeError, match="w must be"):
        L.dense_gemv(x, torch.randn(5, 32))
    with pytest.raises(RuntimeError, match="share one dtype"):
        L.dense_gemv(x, w.bfloat16())
    with pytest.raises(RuntimeError, match="2-D"):
        L.dense_gemv(x[0], w)


@needs_ext
def test_fake_kernel_gives_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = L.dense_gemv(torch.empty(3, 64, dtype=torch.bfloat16), torch.empty(2112, 64, dtype=torch.bfloat16))
    assert out.shape == (3, 2112) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("rows", ["0", "8"])
def test_linear_helper_is_f_linear_on_cpu(monkeypatch, rows):
    monkeypatch.setenv("LONGCAT_DENSE_GEMV_ROWS", rows)
    x, w = _inputs(4, 33, 64, torch.bfloat16, seed=6)
    bias = torch.randn(33).bfloat16()
    assert torch.equal(linear_mod.linear(x, w), F.linear(x, w))
    assert torch.equal(linear_mod.linear(x, w, bias), F.linear(x, w, bias))
    layer = linear_mod.ReplicatedLinear(64, 33, torch.bfloat16)
    layer.weight.data.copy_(w)
    assert torch.equal(layer(x), F.linear(x, w))


# ----------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_cuda_op_matches_fp32_reference(shape, dtype):
    n, k = shape
    for x_pad in (0, 8):  # contiguous x, and a column slice of a wider tensor (row stride > K)
        rows, w = _inputs(8, n, k, dtype, seed=1000 * n + k + x_pad, device="cuda", x_pad=x_pad)
        for m in range(9):
            x = rows[:m]
            out = L.dense_gemv(x, w)
            _assert_matches_fp32(out, x, w)
            assert torch.equal(extension.dense_gemv(x, w), out)


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_cuda_strided_weight(dtype):
    n, k = 2112, 1536
    g = torch.Generator().manual_seed(7)
    fused = (torch.randn(2 * n, k + 16, generator=g) / k**0.5).to("cuda", dtype)
    for m in (1, 5):
        x, _ = _inputs(m, 1, k, dtype, seed=8 + m, device="cuda", x_pad=8)
        for w in (fused[n:, :k], fused[:n, 8 : 8 + k]):  # a row block (like q_a_proj's view), a column slice
            _assert_matches_fp32(L.dense_gemv(x, w), x, w)


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(2112, 6144), (4227, 1544), (33, 64)], ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_cuda_rows_are_batch_invariant(shape, dtype):
    """Row i of an M-row call equals the 1-row call on row i, bit for bit (its sums never depend on M)."""
    n, k = shape
    x, w = _inputs(8, n, k, dtype, seed=n + k, device="cuda")
    singles = [L.dense_gemv(x[i : i + 1], w) for i in range(8)]
    for m in range(1, 9):
        out = L.dense_gemv(x[:m], w)
        for i in range(m):
            assert torch.equal(out[i : i + 1], singles[i]), (m, i)


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("m", [1, 3, 8])
def test_cuda_graph_replay_matches_eager(m):
    x, w = _inputs(m, 2112, 6144, torch.bfloat16, seed=m, device="cuda")
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        L.dense_gemv(static_x, w)  # warm-up off the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = L.dense_gemv(static_x, w)
    graph.replay()
    assert torch.equal(static_out, L.dense_gemv(static_x, w))
    fresh, _ = _inputs(m, 1, 6144, torch.bfloat16, seed=100 + m, device="cuda")
    static_x.copy_(fresh)
    graph.replay()
    assert torch.equal(static_out, L.dense_gemv(fresh, w))


@pytest.mark.gpu
@needs_cuda_ops
def test_cuda_op_rejects_layouts_it_cannot_vectorise():
    x, w = _inputs(2, 33, 64, torch.bfloat16, seed=9, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        L.dense_gemv(x[:, :60], w[:, :60])
    misaligned = torch.randn(2, 72, device="cuda").bfloat16()[:, 1:65]  # rows start 2 bytes past 16-byte alignment
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        L.dense_gemv(misaligned, w)
    assert torch.equal(extension.dense_gemv(misaligned, w), F.linear(misaligned, w))
    assert torch.equal(extension.dense_gemv(x[:, :60], w[:, :60]), F.linear(x[:, :60], w[:, :60]))


@pytest.mark.gpu
@needs_cuda_ops
def test_replicated_linear_takes_gemv_when_enabled(monkeypatch):
    calls = []
    gemv = extension.dense_gemv
    monkeypatch.setattr(extension, "dense_gemv", lambda x, w: calls.append(x.shape) or gemv(x, w))
    monkeypatch.setenv("LONGCAT_DENSE_GEMV_ROWS", "8")
    with torch.device("cuda"):
        layer = linear_mod.ReplicatedLinear(6144, 2112, torch.bfloat16)
        biased = linear_mod.ReplicatedLinear(6144, 2112, torch.bfloat16, bias=True)
    g = torch.Generator(device="cuda").manual_seed(10)
    for p in (layer.weight, biased.weight, biased.bias):
        p.data.copy_(torch.randn(p.shape, device="cuda", generator=g) / 6144**0.5)
    for m in (1, 4, 8):
        x = torch.randn(m, 6144, device="cuda", generator=g).bfloat16()
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=2**-7, atol=1e-3)
        assert torch.equal(biased(x), F.linear(x, biased.weight, biased.bias))  # bias: cuBLAS
    assert calls == [(1, 6144), (4, 6144), (8, 6144)]
    x = torch.randn(9, 6144, device="cuda", generator=g).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight))  # 9 rows: cuBLAS
    assert len(calls) == 3
    monkeypatch.delenv("LONGCAT_DENSE_GEMV_ROWS")  # the default, 2: cuBLAS was faster from 4 rows
    x = torch.randn(3, 6144, device="cuda", generator=g).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    assert len(calls) == 3


def test_dense_gemv_defaults_on_for_one_and_two_rows(monkeypatch):
    """The shipped default (the H200 timings in benchmarks/RESULTS.md): 1..2 rows."""
    from longcat_service import envs

    monkeypatch.delenv("LONGCAT_DENSE_GEMV_ROWS", raising=False)
    assert envs.LONGCAT_DENSE_GEMV_ROWS == 2
