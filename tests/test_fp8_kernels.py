"""Block-FP8 kernels on the CPU: the Triton prefill kernels (kernels/fp8_gemm.py) in Triton's interpreter against
ops/fp8_reference.py and exact fp64 sums, the compiled CPU ops (dense_gemv_fp8, expert_ffn_fp8) and the Python
wrappers' dispatch. GPU runs of the same kernels: tests/test_fp8_gpu.py.

Bounds: the GEMMs multiply e4m3 values exactly (fp32 products of 4-bit significands) and scale each 128-group's
partial sum in fp32, so outputs are within one rounding to the output dtype plus the fp32 accumulation error of the
exact fp64 sum of the same quantized products.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.sm90_aot import assert_fits_shared_memory, compile_for_sm90

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import longcat_service.ops as ops  # noqa: E402
from longcat_service.kernels import fp8_gemm as fg  # noqa: E402
from longcat_service.ops import fp8 as fp8_ops  # noqa: E402  (the layers' FP8 dispatch)
from longcat_service.ops import fp8_reference as fr  # noqa: E402
from longcat_service.ops import reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(ON_GPU, reason="interpreter tests (CPU); the GPU runs tests/test_fp8_gpu.py")
HAVE_EXT = ops.ACTIVE_BACKEND.startswith("extension") and hasattr(torch.ops.longcat, "dense_gemv_fp8")
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason=f"FP8 ops not in the extension (backend {ops.ACTIVE_BACKEND})")
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


def _exact_grouped(x8, xs, w8, ws):
    """fp64 sum over K of the dequantized products, and the sum of their magnitudes (for the fp32 error bound)."""
    k = x8.shape[1]
    xq = x8.double() * xs.double().repeat_interleave(128, dim=1)[:, :k]
    wq = fr.block_dequant(w8, ws, dtype=torch.float64)
    return xq @ wq.t(), xq.abs() @ wq.abs().t()


def _assert_within(got, exact, magnitude, k, what=""):
    ulp = ULP[got.dtype]
    bound = ulp * exact.abs() + (k + 2) * 2.0**-24 * magnitude * (1 + ulp) + 1e-30
    err = (got.double() - exact).abs()
    assert torch.isfinite(got.float()).all(), what
    bad = err > bound
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {err.numel()} off, worst {float((err / bound).max()):.3g}x"


# ---- per-token-group quantization ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 128), (37, 300), (5, 16), (0, 256), (3, 6144)])
def test_quant_equals_reference_bit_for_bit(m, k, dtype):
    g = torch.Generator().manual_seed(m * 7 + k)
    x = (torch.randn(m, k, generator=g) * 20).to(dtype)
    if m:
        x[0, : min(k, 128)] = 0  # an all-zero group: the 1e-10 floor
        x[-1, :5] = torch.tensor([31.9, -126.3, 447.9, 1e-6, -1e-6])[: min(k, 5)].to(dtype)  # carries, +-0
    q, s = fg.per_token_group_quant_fp8(x)
    rq, rs = fr.per_token_group_quant(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == rs.shape
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_quant_of_strided_rows_and_bad_inputs():
    wide = torch.randn(6, 400).to(torch.bfloat16)
    x = wide[:, 8:264]
    q, s = fg.per_token_group_quant_fp8(x)
    rq, rs = fr.per_token_group_quant(x.contiguous())
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    with pytest.raises(ValueError, match="group=128"):
        fg.per_token_group_quant_fp8(x, group=64)
    with pytest.raises(ValueError, match="2-D"):
        fg.per_token_group_quant_fp8(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="unit last stride"):
        fg.per_token_group_quant_fp8(torch.zeros(4, 8).t())


@pytest.mark.parametrize("m", [1, 4, 5, 37])
def test_quant_writes_scaled_mm_layout(m):
    """pad_rows_to=4, scale_column_major: the same values on the real rows; padding rows x8 = +0 bytes and scale 1
    (what scaled_mm_blockwise used to build with F.pad, torch.ones and a strided copy); the scale is the transposed
    view of a contiguous [K/128, M_pad] tensor, i.e. scaled-mm's operand as is."""
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 520, generator=g) * 7).to(torch.bfloat16)
    q, s = fg.per_token_group_quant_fp8(x)
    qp, sp = fg.per_token_group_quant_fp8(x, pad_rows_to=4, scale_column_major=True)
    m_pad = -(-m // 4) * 4
    assert qp.shape == (m_pad, 520) and sp.shape == (m_pad, 5) and sp.stride() == (1, m_pad)
    assert torch.equal(qp[:m].view(torch.uint8), q.view(torch.uint8)) and torch.equal(sp[:m], s)
    assert (qp[m:].view(torch.uint8) == 0).all() and (sp[m:] == 1).all()
    assert fg.scaled_mm_ready(qp, sp) and not fg.scaled_mm_ready(q, s)
    q8, s8 = fg.per_token_group_quant_fp8(x, pad_rows_to=8)  # row-major, padded
    assert q8.shape[0] == s8.shape[0] == -(-m // 8) * 8 and s8.is_contiguous() and torch.equal(s8[:m], s)
    with pytest.raises(ValueError, match="pad_rows_to"):
        fg.per_token_group_quant_fp8(x, pad_rows_to=0)


# ---- fused MoE quantization (kernels/moe_fp8_quant.py) ---------------------------------------------------------
# Spec: the unfused pairs, bit for bit on the rows below num_rows (later rows are unspecified in both).


def _assert_same_quant(got, want, n, what):
    (q, s), (rq, rs) = got, want
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, what
    assert q.shape == rq.shape and s.shape == rs.shape, (what, q.shape, rq.shape, s.shape, rs.shape)
    assert torch.equal(s[:n], rs[:n]), f"{what}: scales differ"
    assert torch.equal(q[:n].view(torch.uint8), rq[:n].view(torch.uint8)), f"{what}: e4m3 bytes differ"


def _with_edge_values(x, g):
    """Groups that hit the clamp and the 1e-10 floor: huge values, an all-zero group, tiny values, rounding carries."""
    if x.shape[0] == 0:
        return x
    big = {torch.bfloat16: 3e38, torch.float16: 65504.0, torch.float32: 3e38}[x.dtype]
    x[0, : min(x.shape[1], 128)] = 0
    x[-1, :3] = torch.tensor([big, -big / 3, 1.0])[: min(3, x.shape[1])].to(x.dtype)
    if x.shape[1] > 128:
        x[-1, 128:] = (torch.randn(x.shape[1] - 128, generator=g) * 1e-12).to(x.dtype)  # below the floor
    x[x.shape[0] // 2, :4] = torch.tensor([31.9, -126.3, 447.9, 1e-6])[: min(4, x.shape[1])].to(x.dtype)
    return x


GATHER_CASES = [(1, 1, 1, 1), (7, 3, 300, 17), (5, 2, 128, 10), (9, 1, 130, 9), (6, 4, 256, 0), (0, 4, 256, 0),
                (4, 3, 64, 40)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t,k,h,n", GATHER_CASES)  # n > t * k: every row (num_rows is clipped to the rows)
def test_gather_quant_is_the_unfused_pair(t, k, h, n, dtype):
    from longcat_service.kernels.moe_fp8_quant import gather_quant_fp8
    from longcat_service.kernels.moe_gather import gather_expert_rows, gather_expert_rows_reference

    g = torch.Generator().manual_seed(t * 31 + h + n)
    hidden = _with_edge_values((torch.randn(t, h, generator=g) * 20).to(dtype), g)
    sorted_slots = torch.randperm(t * k, generator=g).to(torch.int32)
    num_rows = torch.tensor([n], dtype=torch.int32 if n % 2 else torch.int64)
    got = gather_quant_fp8(hidden, sorted_slots, k, num_rows)
    real = min(n, t * k)
    _assert_same_quant(got, fg.per_token_group_quant_fp8(gather_expert_rows(hidden, sorted_slots, k, num_rows)),
                       real, "unfused kernels")
    _assert_same_quant(got, fr.per_token_group_quant(gather_expert_rows_reference(hidden, sorted_slots, k)), real,
                       "references")


SILU_CASES = [(1, 1, None), (13, 200, 11), (8, 128, None), (5, 64, 0), (0, 256, None), (3, 300, 7)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,inter,n", SILU_CASES)
def test_silu_mul_quant_is_the_unfused_pair(rows, inter, n, dtype):
    from longcat_service.kernels.moe_fp8_quant import silu_mul_quant_fp8
    from longcat_service.kernels.silu_mul import silu_and_mul, silu_and_mul_reference

    g = torch.Generator().manual_seed(rows * 17 + inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    if rows and inter >= 2:
        gate_up[0, : min(inter, 128)] = 0  # gate 0: an all-zero group
        gate_up[-1, :2] = torch.tensor([200.0, -200.0]).to(dtype)  # silu(x) = x and -0
        big = 1e36 if dtype != torch.float16 else 300.0  # 200 * big: finite (inf is outside the quantizer's domain)
        gate_up[-1, inter: inter + 2] = torch.tensor([big, 5.0]).to(dtype)  # the group's amax, near the clamp
    num_rows = None if n is None else torch.tensor([n])
    got = silu_mul_quant_fp8(gate_up, num_rows)
    real = rows if n is None else min(n, rows)
    _assert_same_quant(got, fg.per_token_group_quant_fp8(silu_and_mul(gate_up, num_rows)), real, "unfused kernels")
    if dtype == torch.bfloat16:  # the interpreter's exp is numpy's: bit-identical to torch in bf16 (test_silu_mul)
        _assert_same_quant(got, fr.per_token_group_quant(silu_and_mul_reference(gate_up)), real, "references")


@pytest.mark.parametrize("block_m,groups", [(1, 1), (2, 4), (16, 2)])
def test_fused_quant_tiles(block_m, groups):
    """Any tile of rows x scale groups gives the same bytes (the max over a group is exact)."""
    from longcat_service.kernels import _moe_fp8_quant_triton as mq
    from longcat_service.kernels.moe_gather import gather_expert_rows
    from longcat_service.kernels.silu_mul import silu_and_mul

    g = torch.Generator().manual_seed(block_m + groups)
    hidden = (torch.randn(6, 400, generator=g) * 3).to(torch.bfloat16)
    slots = torch.randperm(18, generator=g).to(torch.int32)
    n = torch.tensor([13])
    q, s = torch.empty(18, 400, dtype=torch.float8_e4m3fn), torch.empty(18, 4)
    mq.launch_gather_quant(hidden, slots, 3, n, q, s, block_m=block_m, groups=groups, num_warps=4)
    _assert_same_quant((q, s), fg.per_token_group_quant_fp8(gather_expert_rows(hidden, slots, 3, n)), 13, "gather")
    gate_up = (torch.randn(18, 800, generator=g) * 3).to(torch.bfloat16)
    mq.launch_silu_mul_quant(gate_up, n, q, s, block_m=block_m, groups=groups, num_warps=4)
    _assert_same_quant((q, s), fg.per_token_group_quant_fp8(silu_and_mul(gate_up, n)), 13, "silu")


def test_fused_quant_bad_inputs():
    from longcat_service.kernels.moe_fp8_quant import gather_quant_fp8, silu_mul_quant_fp8

    hidden, slots, n = torch.zeros(4, 128, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.int32), torch.tensor([3])
    with pytest.raises(ValueError, match="must be \\[T, H\\]"):
        gather_quant_fp8(hidden[None], slots, 2, n)
    with pytest.raises(ValueError, match="dtype"):
        gather_quant_fp8(hidden.double(), slots, 2, n)
    with pytest.raises(ValueError, match="contiguous"):
        gather_quant_fp8(torch.zeros(128, 4, dtype=torch.bfloat16).t(), slots, 2, n)
    with pytest.raises(ValueError, match="num_rows"):
        gather_quant_fp8(hidden, slots, 2, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_rows"):
        gather_quant_fp8(hidden, slots, 2, None)
    with pytest.raises(ValueError, match="sorted_slots"):
        gather_quant_fp8(hidden, slots.float(), 2, n)
    with pytest.raises(ValueError, match="\\[N, 2I\\]"):
        silu_mul_quant_fp8(torch.zeros(3, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        silu_mul_quant_fp8(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul_quant_fp8(torch.zeros(4, 6, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="num_rows"):
        silu_mul_quant_fp8(torch.zeros(3, 4, dtype=torch.bfloat16), torch.tensor([1.0]))
    q, s = silu_mul_quant_fp8(torch.zeros(3, 0, dtype=torch.bfloat16))  # I = 0, like the quantizer's K = 0
    assert q.shape == (3, 0) and s.shape == (3, 0)


# ---- dense w8a8 ------------------------------------------------------------------------------------------------

SMALL_DENSE = fg.DenseFp8Config(block_m=32, block_n=32, block_k=64, group_m=2, num_stages=2, num_warps=4)


@pytest.mark.parametrize("m,n,k", [(37, 131, 300), (16, 128, 256), (1, 5, 7), (70, 40, 128)])
@pytest.mark.parametrize("cfg", ["small", "k128"])
def test_w8a8_gemm_matches_exact_and_reference(m, n, k, cfg):
    config = SMALL_DENSE if cfg == "small" else fg.DenseFp8Config(32, 64, 128, 4, 2, 4)
    g = torch.Generator().manual_seed(m + n + k)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    w8, ws = fr.block_quant(torch.randn(n, k, generator=g) * 0.05)
    out = fg.w8a8_block_gemm(x, w8, ws, config=config)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    x8, xs = fr.per_token_group_quant(x)
    exact, mag = _exact_grouped(x8, xs, w8, ws)
    _assert_within(out, exact, mag, k, f"w8a8 {m}x{n}x{k}")
    want = fr.w8a8_linear_ref(x, w8, ws)
    assert float((out.float() - want.float()).abs().max()) <= 2 * 2.0**-8 * float(want.float().abs().max())


def test_w8a8_gemm_empty_and_fp32_output():
    w8, ws = fr.block_quant(torch.randn(24, 40))
    assert fg.w8a8_block_gemm(torch.zeros(0, 40), w8, ws).shape == (0, 24)
    x = torch.randn(3, 40)
    out = fg.w8a8_block_gemm(x, w8, ws, config=SMALL_DENSE)
    assert out.dtype == torch.float32
    x8, xs = fr.per_token_group_quant(x)
    exact, mag = _exact_grouped(x8, xs, w8, ws)
    _assert_within(out, exact, mag, 40, "fp32 out")
    with pytest.raises(ValueError, match="scale"):
        fg.w8a8_block_gemm(x, w8, ws[:, :0])
    with pytest.raises(ValueError, match="float8"):
        fg.w8a8_block_gemm(x, w8.float(), ws)


# ---- grouped (prefill experts) ---------------------------------------------------------------------------------

SMALL_GROUPED = {
    "ptr": fg.parse_config("32,64,32,2,4"),
    "tma": fg.parse_config("16,32,32,2,4,tma"),
    "split": fg.parse_config("32,128,32,2,4,split"),
    "tma_split": fg.parse_config("16,64,32,2,4,tma,split"),
    # the persistent kernel (fp8_gemm.GroupedFp8Config); flat is the compiled path's (here the plain loops run)
    "persist": fg.parse_fp8_config("32,64,16,2,4,persist"),
    "persist_tma": fg.parse_fp8_config("16,32,32,2,4,tma,persist2"),
    "persist_tma_flat": fg.parse_fp8_config("16,32,16,2,4,tma,persist1,flat"),
    "persist_wide": fg.parse_fp8_config("256,32,16,2,4,tma,persist2,flat"),  # block_n > 128: per-column scales
}
COUNTS = {"mixed": [5, 0, 33, 1, 0, 16, 17, 40], "one_expert": [0, 0, 77, 0], "all_empty": [0, 0, 0]}


def _grouped_case(counts, n, k, seed, extra_rows=3):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    x = (torch.randn(sum(counts) + extra_rows, k, generator=g) * 2).to(torch.bfloat16)
    x8, xs = fr.per_token_group_quant(x)
    w8, ws = fr.block_quant(torch.randn(len(counts), n, k, generator=g) * 0.05)
    return x8, xs, w8, ws, offsets


def _check_grouped(y, x8, xs, w8, ws, offsets, what):
    n_real = int(offsets[-1])
    offs = offsets.tolist()
    for e in range(w8.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            exact, mag = _exact_grouped(x8[a:b], xs[a:b], w8[e], ws[e])
            _assert_within(y[a:b], exact, mag, x8.shape[1], f"{what} expert {e}")
    assert y.shape == (x8.shape[0], w8.shape[1]) and n_real <= y.shape[0]


@pytest.mark.parametrize("variant", list(SMALL_GROUPED))
@pytest.mark.parametrize("counts", list(COUNTS))
@pytest.mark.parametrize("n,k", [(72, 256), (40, 200)])  # K = 200: partial scale group, no TMA (not 16-byte rows)
def test_grouped_matches_exact(counts, variant, n, k):
    x8, xs, w8, ws, offsets = _grouped_case(COUNTS[counts], n, k, seed=n + k)
    y = fg.grouped_gemm_fp8(x8, xs, w8, ws, offsets, config=SMALL_GROUPED[variant])
    assert y.dtype == torch.bfloat16
    _check_grouped(y, x8, xs, w8, ws, offsets, f"{counts} {variant}")
    n_real = int(offsets[-1])
    want = fg.grouped_gemm_fp8_reference(x8, xs, w8, ws, offsets)
    torch.testing.assert_close(y[:n_real].float(), want[:n_real].float(), rtol=2**-7, atol=1e-3)


def test_grouped_tma_choice_and_row_hint():
    from longcat_service.kernels._fp8_gemm_triton import tma_supported

    x8, xs, w8, ws, offsets = _grouped_case([0, 50, 3], 32, 256, seed=3)
    assert tma_supported(x8, w8)
    assert not tma_supported(x8[:, :200], w8[..., :200])
    for bound in (1, 3, 50, 10**6):
        y = fg.grouped_gemm_fp8(x8, xs, w8, ws, offsets, max_rows_per_expert=bound, config=SMALL_GROUPED["tma_split"])
        _check_grouped(y, x8, xs, w8, ws, offsets, f"bound {bound}")


def test_grouped_no_rows_no_k_and_bad_inputs():
    x8, xs, w8, ws, offsets = _grouped_case([0, 0], 24, 128, seed=4, extra_rows=0)
    assert fg.grouped_gemm_fp8(x8, xs, w8, ws, offsets).shape == (0, 24)
    x8, xs, w8, ws, offsets = _grouped_case([2, 3], 24, 128, seed=5)
    with pytest.raises(ValueError, match="int32"):
        fg.grouped_gemm_fp8(x8, xs, w8, ws, offsets.long())
    with pytest.raises(ValueError, match="x_scale"):
        fg.grouped_gemm_fp8(x8, xs[:, :0], w8, ws, offsets)
    with pytest.raises(ValueError, match="float8"):
        fg.grouped_gemm_fp8(x8.float(), xs, w8, ws, offsets)
    with pytest.raises(ValueError, match="divide"):
        fg.grouped_gemm_fp8(x8, xs, w8, ws, offsets, config=fg.parse_config("32,256,32,2,4"))


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("counts", [[0, 3, 0, 16, 17, 0], [1100], [0, 0, 0], [5] * 37])
def test_row_tile_list(counts, block_m):
    """_row_tiles_kernel: every expert's row tiles (expert, first row) in expert order, and their number (1100 rows
    of 16: 69 tiles, more than one BLOCK_T step; 37 experts: not a power of two)."""
    from longcat_service.kernels import _fp8_gemm_triton as ft

    offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    want = [(e, int(offsets[e]) + j) for e, c in enumerate(counts) for j in range(0, c, block_m)]
    size = len(want) + 5
    tile_expert = torch.full((size,), -7, dtype=torch.int32)
    tile_row, count = tile_expert.clone(), torch.full((1,), -7, dtype=torch.int32)
    ft._row_tiles_kernel[(len(counts),)](offsets, len(counts), tile_expert, tile_row, count, BLOCK_M=block_m,
                                         BLOCK_E=fg.next_pow2(len(counts)), BLOCK_T=64, USE_WHILE=True)
    assert int(count) == len(want)
    assert list(zip(tile_expert[: len(want)].tolist(), tile_row[: len(want)].tolist(), strict=True)) == want
    assert tile_expert[len(want):].eq(-7).all() and tile_row[len(want):].eq(-7).all()


@pytest.mark.parametrize("cfg", ["16,32,16,2,4,tma,persist1", "32,64,32,2,4,persist3", "16,32,32,2,4,tma,split",
                                 "16,32,32,2,4,tma,persist2,flat"])
def test_grouped_variants_write_only_their_rows(cfg):
    """Row tiles that cross into the next expert's rows (or past the last real row) store only their own expert's
    rows: rows past expert_offsets[-1] keep what they held; different grid sizes (persist 1..3 x 3 programs under
    the interpreter) change which of two overlapping tiles runs last."""
    from longcat_service.kernels._fp8_gemm_triton import launch_grouped

    config = fg.parse_fp8_config(cfg)
    counts = [7, 0, 21, 40, 1, 0, 33, 2]
    x8, xs, w8, ws, offsets = _grouped_case(counts, 72, 256, seed=17, extra_rows=29)
    y = torch.full((x8.shape[0], 72), float("nan"), dtype=torch.bfloat16)
    launch_grouped(x8, xs, w8, ws, offsets, y, config.block_m, config.block_n, config.block_k, config.num_stages,
                   config.num_warps, config.tma, config.split_tail, persistent=config.persistent,
                   flatten=config.flatten)
    n_real = int(offsets[-1])
    assert y[n_real:].isnan().all()
    _check_grouped(y, x8, xs, w8, ws, offsets, cfg)


def test_fp8_config_grammar():
    for text in ["128,128,64,4,4,tma", "64,128,128,4,4,tma,split", "16,32,32,2,4,split", "32,64,16,2,4,persist3",
                 "32,64,16,2,4,persist3,flat", "256,128,64,5,8,tma,persist1,flat"]:
        cfg = fg.parse_fp8_config(text)
        assert fg.parse_fp8_config(str(cfg)) == cfg
    cfg = fg.parse_fp8_config(" 128, 128, 64, 4, 4, PERSIST, flat, tma ")
    assert (cfg.block_n, cfg.block_k, cfg.block_m, cfg.num_stages, cfg.num_warps) == (128, 128, 64, 4, 4)
    assert cfg.tma and cfg.persistent == 1 and cfg.flatten and not cfg.split_tail
    assert str(cfg) == "128,128,64,4,4,tma,persist1,flat"
    deleted = [(f"128,128,64,4,4,tma,persist1,{flag}", "expected") for flag in ("swap", "ws", "k2")]
    for bad, match in deleted + [
            ("128,128,64,4,4,persistx", "persist"), ("128,128,64,4,4,persist,persist2", "persist"),
            ("128,128,64,4,4,split,persist2", "do not combine"), ("128,128,64,4,4,persist9", "0..8"),
            ("128,128,64,4,4,tma,flat", "flat needs"), ("128,256,64,4,4", "divide"),
            ("128,128,64,4,4,swapp", "expected"), ("128,128,48,4,4", "power")]:
        with pytest.raises(ValueError, match=match):
            fg.parse_fp8_config(bad)


def test_config_tables():
    assert set(fg.ALL_GROUPED_CONFIGS) == set(fg.GROUPED_CONFIGS) | set(fg.VARIANT_CONFIGS)
    assert len(set(fg.ALL_GROUPED_CONFIGS)) == len(fg.ALL_GROUPED_CONFIGS)
    for cfg in fg.ALL_GROUPED_CONFIGS:
        assert 128 % cfg.block_k == 0
        stage = (cfg.block_m + cfg.block_n) * cfg.block_k  # fp8: 1 byte
        assert cfg.num_stages * stage <= 200 * 1024, cfg
    assert fg.DEFAULT_GROUPED_CONFIG in fg.GROUPED_CONFIGS and fg.DEFAULT_DENSE_CONFIG in fg.DENSE_CONFIGS
    # in VARIANT_CONFIGS: tests/test_fp8_grouped_variants_gpu.py runs them on the GPU
    assert fg.DEFAULT_GATE_UP_CONFIG in fg.VARIANT_CONFIGS and fg.DEFAULT_DOWN_CONFIG in fg.VARIANT_CONFIGS
    for cfg in fg.DENSE_CONFIGS:
        assert 128 % cfg.block_k == 0
        assert cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k <= 200 * 1024, cfg


# ---- the prefill expert FFN (w8a8) -----------------------------------------------------------------------------


def _routed_fp8(t, e, k, h, inter, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(torch.bfloat16)
    ids = torch.zeros(t, k, dtype=torch.int32)
    for i in range(t):
        ids[i] = torch.randperm(e + 4, generator=g)[:k]  # distinct ids per token; ids >= e: zero experts
    offsets, sorted_slots, slot_rows, _, _ = ref.moe_align(ids, e)
    w13, w13_s = fr.block_quant(torch.randn(e, 2 * inter, h, generator=g) * h**-0.5)
    w2, w2_s = fr.block_quant(torch.randn(e, h, inter, generator=g) * inter**-0.5)
    return hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots


def _w8a8_expert_ffn_ref(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k):
    """Per expert: w8a8 gate_up (rounded to bf16), SiLU * up (bf16), w8a8 down: the prefill path's spec."""
    out = torch.zeros(sorted_slots.numel(), hidden.shape[1], dtype=hidden.dtype)
    offs = offsets.tolist()
    inter = w2.shape[-1]
    for e in range(w13.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            x = hidden[sorted_slots[a:b].long() // k]
            gu = fr.w8a8_linear_ref(x, w13[e], w13_s[e]).float()
            act = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(hidden.dtype)
            out[a:b] = fr.w8a8_linear_ref(act, w2[e], w2_s[e])
    return out


def _unfused_expert_ffn(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k):
    """The prefill path before the fused quantization kernels, with its GEMM configs (the fused kernels are bit for
    bit the unfused pairs, so the results must be equal)."""
    from longcat_service.kernels.moe_gather import gather_expert_rows
    from longcat_service.kernels.silu_mul import silu_and_mul

    num_rows, offs = offsets[-1:], offsets.to(torch.int32)
    x8, xs = fg.per_token_group_quant_fp8(gather_expert_rows(hidden, sorted_slots, k, num_rows))
    gate_up = fg.grouped_gemm_fp8(x8, xs, w13, w13_s, offs, hidden.shape[0], config=fg.DEFAULT_GATE_UP_CONFIG)
    a8, a_s = fg.per_token_group_quant_fp8(silu_and_mul(gate_up, num_rows))
    return fg.grouped_gemm_fp8(a8, a_s, w2, w2_s, offs, hidden.shape[0], config=fg.DEFAULT_DOWN_CONFIG)


@pytest.mark.parametrize("t,e,k,h,inter", [(40, 6, 3, 128, 64), (25, 5, 2, 160, 48), (0, 4, 2, 128, 64)])
def test_prefill_expert_ffn_is_w8a8(t, e, k, h, inter):
    from longcat_service.ops import extension

    hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots = _routed_fp8(t, e, k, h, inter, seed=t + e)
    y = extension._expert_ffn_grouped_fp8(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)
    n = int(offsets[-1])
    assert y.shape == (t * k, h) and y.dtype == torch.bfloat16
    assert torch.equal(y[:n], _unfused_expert_ffn(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)[:n])
    want = _w8a8_expert_ffn_ref(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)
    if n:
        # the same quantized operands, except that act (SiLU * up, bf16) may differ by one bf16 ulp (exp), and when
        # that element is its group's amax the whole group re-rounds: up to one e4m3 step (2^-4) in a few outputs
        scale = float(want[:n].float().abs().max())
        assert float((y[:n].float() - want[:n].float()).abs().max()) <= 0.1 * scale
        assert float((y[:n].float() - want[:n].float()).abs().mean()) <= 2e-3 * scale
        weight_only = fr.expert_ffn_fp8_ref(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)
        # and within activation-quantization error (e4m3: 2^-4 relative per element) of the weight-only result
        assert float((y[:n].float() - weight_only[:n].float()).abs().mean()) <= 0.08 * float(
            weight_only[:n].float().abs().mean())


# ---- compiled CPU ops and the wrappers -------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("m,n,k", [(1, 131, 300), (8, 64, 256), (0, 5, 7), (3, 200, 128)])
def test_cpu_dense_gemv_fp8_op_is_the_reference(m, n, k):
    from longcat_service.ops import extension

    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w8, ws = fr.block_quant(torch.randn(n, k, generator=g))
    got = torch.ops.longcat.dense_gemv_fp8(x, w8, ws)
    w = fr.block_dequant(w8, ws, dtype=torch.bfloat16)
    assert torch.equal(got, (x.float() @ w.float().t()).to(torch.bfloat16))
    assert extension.dense_gemv_fp8_supported(x, w8, ws)
    assert torch.equal(extension.dense_gemv_fp8(x, w8, ws), got)


@needs_ext
def test_cpu_fp8_ops_reject_bad_arguments():
    L = torch.ops.longcat
    x = torch.randn(2, 256).to(torch.bfloat16)
    w8, ws = fr.block_quant(torch.randn(130, 256))
    with pytest.raises(RuntimeError, match=r"scale must be float32 \[2, 2\]"):
        L.dense_gemv_fp8(x, w8, ws[:1])
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        L.dense_gemv_fp8(x, w8.to(torch.bfloat16), ws)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        L.dense_gemv_fp8(torch.randn(9, 256).to(torch.bfloat16), w8, ws)
    hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots = _routed_fp8(3, 4, 2, 128, 64, seed=1)
    with pytest.raises(RuntimeError, match="w2's scale"):
        L.expert_ffn_fp8(hidden, w13, w13_s, w2, torch.ones(4, 2, 1), offsets, sorted_slots, 2)
    with pytest.raises(RuntimeError, match="w13 must be float8_e4m3fn"):
        L.expert_ffn_fp8(hidden, w13.to(torch.bfloat16), w13_s, w2, w2_s, offsets, sorted_slots, 2)


@needs_ext
@pytest.mark.parametrize("t", [0, 1, 7])
def test_cpu_expert_ffn_fp8_op_is_the_reference(t):
    from longcat_service.ops import extension

    hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots = _routed_fp8(t, 5, 3, 136, 72, seed=t)
    want = fr.expert_ffn_fp8_ref(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, 3)
    got = torch.ops.longcat.expert_ffn_fp8(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, 3)
    n = int(offsets[-1])
    torch.testing.assert_close(got[:n], want[:n], rtol=0, atol=0)
    wrapped = extension.expert_ffn_fp8(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, 3)
    assert torch.equal(wrapped[:n], got[:n])


@needs_ext
def test_fake_kernels_give_output_shapes():
    x = torch.empty(3, 256, dtype=torch.bfloat16, device="meta")
    w8 = torch.empty(130, 256, dtype=torch.float8_e4m3fn, device="meta")
    out = torch.ops.longcat.dense_gemv_fp8(x, w8, torch.empty(2, 2, device="meta"))
    assert out.shape == (3, 130) and out.dtype == torch.bfloat16
    hidden = torch.empty(4, 128, dtype=torch.bfloat16, device="meta")
    y = torch.ops.longcat.expert_ffn_fp8(hidden, torch.empty(2, 64, 128, dtype=torch.float8_e4m3fn, device="meta"),
                                         torch.empty(2, 1, 1, device="meta"),
                                         torch.empty(2, 128, 32, dtype=torch.float8_e4m3fn, device="meta"),
                                         torch.empty(2, 1, 1, device="meta"),
                                         torch.empty(3, dtype=torch.int32, device="meta"),
                                         torch.empty(8, dtype=torch.int32, device="meta"), 2)
    assert y.shape == (8, 128)


def test_fp8_linear_on_cpu_is_the_weight_only_reference():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 260, generator=g).to(torch.bfloat16)
    w8, ws = fr.block_quant(torch.randn(140, 260, generator=g))
    got = fp8_ops.fp8_linear(x, w8, ws)
    assert got.shape == (2, 5, 140)
    assert torch.equal(got, fr.fp8_linear_ref(x, w8, ws))
    assert not fp8_ops.w8a8_supported(x[0], w8, ws)  # CPU tensors: the reference


# ---- the GPU build of the Triton kernels, compiled offline ----------------------------------------------------

_AOT = """
from longcat_service.kernels._fp8_gemm_triton import aot_compile_dense, aot_compile_grouped, aot_compile_quant
from longcat_service.kernels.fp8_gemm import DENSE_CONFIGS, GROUPED_CONFIGS
from longcat_service.kernels._moe_fp8_quant_triton import aot_compile_gather_quant, aot_compile_silu_mul_quant
for name, compile_quant in [("quant", aot_compile_quant), ("gather_quant", aot_compile_gather_quant),
                            ("silu_mul_quant", aot_compile_silu_mul_quant)]:
    ptx = compile_quant().asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx, (name, "RNE cast, IEEE division")
    print(name, flush=True)
for cfg in DENSE_CONFIGS[:2]:
    ck = aot_compile_dense(cfg, 4096, 6144, 6144)
    assert "e4m3.e4m3" in ck.asm["ptx"] and "wgmma" in ck.asm["ptx"], (cfg, "no fp8 wgmma")
    print("dense", cfg, ck.metadata.shared, flush=True)
for n, k, cfg in [(4096, 6144, GROUPED_CONFIGS[0]), (6144, 2048, GROUPED_CONFIGS[3]), (72, 200, GROUPED_CONFIGS[0])]:
    ck = aot_compile_grouped(cfg, n, k)
    ttgir = ck.asm["ttgir"]
    assert "e4m3.e4m3" in ck.asm["ptx"] and "warp_group_dot" in ttgir, (cfg, "no fp8 wgmma")
    assert ("async_tma_copy_global_to_local" in ttgir) == (cfg.tma and k % 16 == 0), (cfg, "tma")
    print("grouped", n, k, cfg, ck.metadata.shared, flush=True)
"""


def test_sm90_build_uses_fp8_tensor_cores():
    """The Triton kernels compile for sm_90 to FP8 wgmma (and TMA where asked); the quantizer rounds like torch."""
    lines = compile_for_sm90(_AOT)
    assert len(lines) == 8, lines
    assert_fits_shared_memory(lines[3:])


_AOT_VARIANTS = """
import os, re, subprocess, tempfile
import triton
from longcat_service.kernels._fp8_gemm_triton import aot_compile_grouped
from longcat_service.kernels.fp8_gemm import VARIANT_CONFIGS
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for cfg in VARIANT_CONFIGS:
    ck = aot_compile_grouped(cfg, 6144, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.cubin"), "wb") as f:
            f.write(ck.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    assert re.search(r"STACK:0 ", usage), (str(cfg), "spills registers", usage)
    ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
    assert re.search(r"wgmma[.]mma_async[.]sync[.]aligned[.]m64n\\d+k32[.]f32[.]e4m3[.]e4m3", ptx), (str(cfg), "wgmma")
    assert "async_tma_copy_global_to_local" in ttgir, (str(cfg), "tma")
    print(cfg, ck.metadata.shared, ck.metadata.num_warps, flush=True)
"""


def test_sm90_build_of_the_grouped_variants():
    """Every VARIANT_CONFIGS kernel compiles for sm_90 at the LongCat down shape (6144 x 2048): FP8 wgmma, TMA, no
    register spills, shared memory that fits an H200 SM (228 KB, 1 KB reserved per block) for each of a persistent
    config's programs per SM."""
    lines = compile_for_sm90(_AOT_VARIANTS)
    assert len(lines) == len(fg.VARIANT_CONFIGS), lines
    for cfg, line in zip(fg.VARIANT_CONFIGS, lines, strict=True):
        shared = int(line.split()[-2])
        assert shared <= 227 * 1024, line
        assert max(cfg.persistent, 1) * (shared + 1024) <= 228 * 1024, f"{line}: the persistent programs do not fit"


def test_bench_grouped_config_selection_and_table(capsys):
    """benchmarks/bench_fp8_kernels.py: --configs / --config-list pick the sweep; the table prints each config's
    fraction of the copy floor (failed configs with their error) and the fastest per GEMM and token count."""
    from benchmarks.bench_fp8_kernels import grouped_configs, print_tables

    assert grouped_configs(None, None) == list(fg.ALL_GROUPED_CONFIGS)
    assert grouped_configs("all", None) == list(fg.ALL_GROUPED_CONFIGS)
    assert grouped_configs("variants", None) == list(fg.VARIANT_CONFIGS)
    assert grouped_configs("base", None) == list(fg.GROUPED_CONFIGS)
    assert grouped_configs("3", None) == list(fg.ALL_GROUPED_CONFIGS[:3])
    listed = grouped_configs("2", " 128,128,64,4,4,tma ; 128,128,64,4,4,tma,persist2,flat;")
    assert [str(c) for c in listed] == ["128,128,64,4,4,tma", "128,128,64,4,4,tma,persist2,flat"]
    with pytest.raises(ValueError):
        grouped_configs(None, "128,128,64,4,4,tma,swap")
    base = {"N": 4096, "K": 6144, "rows": 32768, "quant_us": 50.0, "bf16_grouped_us": 6500.0, "byte_floor_us": 3000.0,
            "flop_floor_us": 1000.0}
    rows = [dict(base, gemm="gate_up", tokens=4096, config="a", ours_us=4000.0, error=None, copy_frac=0.75),
            dict(base, gemm="gate_up", tokens=4096, config="b", ours_us=3750.0, error=None, copy_frac=0.8),
            dict(base, gemm="gate_up", tokens=4096, config="c", ours_us=None, error="CompilationError: x",
                 copy_frac=None),
            dict(base, gemm="down", tokens=1024, config="a", ours_us=2000.0, error=None, copy_frac=0.5)]
    print_tables({"grouped": rows})
    out = capsys.readouterr().out
    assert "0.800" in out and "CompilationError: x" in out
    assert 'fastest gate_up at 4096 tokens: "b" 3750.0 us, 0.800 of the copy floor' in out
    assert 'fastest down at 1024 tokens: "a" 2000.0 us, 0.500 of the copy floor' in out


def test_prefill_expert_configs_by_prompt_length():
    small, large = fg.SMALL_PREFILL_CONFIG, fg.LARGE_PREFILL_CONFIG
    mid = (fg.DEFAULT_GATE_UP_CONFIG, fg.DEFAULT_DOWN_CONFIG)
    assert fg.prefill_expert_configs(1) == (small, small)
    assert fg.prefill_expert_configs(fg.SMALL_PREFILL_MAX_TOKENS - 1) == (small, small)
    assert fg.prefill_expert_configs(fg.SMALL_PREFILL_MAX_TOKENS) == mid
    assert fg.prefill_expert_configs(4096) == mid
    assert fg.prefill_expert_configs(fg.LARGE_PREFILL_MIN_TOKENS - 1) == mid
    assert fg.prefill_expert_configs(fg.LARGE_PREFILL_MIN_TOKENS) == (large, large)
    assert small != large and small not in mid
    for cfg in (small, large, *mid):  # every one is among the configs the GPU tests run
        assert cfg in fg.ALL_GROUPED_CONFIGS
