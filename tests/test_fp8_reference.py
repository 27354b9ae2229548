"""The block-FP8 reference (ops/fp8_reference.py) against independent per-element/per-block loops and e4m3 bounds."""

from __future__ import annotations

import pytest
import torch

from longcat_service.ops import fp8_reference as fp8
from longcat_service.ops import reference as ref

E4M3_REL = 2.0**-4  # e4m3 has 3 mantissa bits: round-to-nearest error <= half an ulp = 2^-4 relative


def _scale_loop(w8, scale, block=128):
    """W[i, j] = w8[i, j] * scale[i // b, j // b], element by element (independent of the vectorized code)."""
    n, k = w8.shape
    out = torch.empty(n, k)
    for i in range(n):
        for j in range(k):
            out[i, j] = w8[i, j].float() * scale[i // block, j // block]
    return out


@pytest.mark.parametrize("n,k", [(128, 256), (130, 200), (5, 7), (257, 129)])
def test_dequant_is_a_per_block_multiplier(n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w8 = (torch.randn(n, k, generator=g) * 50).to(fp8.FP8_DTYPE)
    scale = torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.1
    got = fp8.block_dequant(w8, scale, dtype=torch.float32)
    assert got.shape == (n, k) and got.dtype == torch.float32
    assert torch.equal(got, _scale_loop(w8, scale))
    assert fp8.block_dequant(w8, scale).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 260, 131), (2, 128, 128), (1, 5)])
def test_quant_round_trip_within_e4m3_rounding_block_by_block(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # blocks of very different magnitude
    w8, scale = fp8.block_quant(w)
    n, k = shape[-2:]
    assert w8.dtype == fp8.FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == (*shape[:-2], -(-n // 128), -(-k // 128))
    back = fp8.block_dequant(w8, scale, dtype=torch.float32)
    # Per block: the scale maps the block's amax exactly onto 448, and every element is within e4m3 rounding
    # (relative 2^-4, plus the subnormal step 2^-9 * scale for tiny elements).
    w3, back3, s3 = w.reshape(-1, n, k), back.reshape(-1, n, k), scale.reshape(-1, *scale.shape[-2:])
    for e in range(w3.shape[0]):
        for bi in range(s3.shape[1]):
            for bj in range(s3.shape[2]):
                blk = w3[e, bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
                s = float(s3[e, bi, bj])
                assert s == pytest.approx(float(blk.abs().max()) / 448, rel=1e-6)
                got = back3[e, bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
                bound = E4M3_REL * blk.abs() + 2.0**-9 * s + 1e-30
                assert bool(((got - blk).abs() <= bound).all()), (e, bi, bj)


def test_quant_of_zero_block_is_finite_and_zero():
    w = torch.zeros(130, 140)
    w[129, 139] = 3.0  # only the last (partial) block is non-zero
    w8, scale = fp8.block_quant(w)
    assert scale[0, 0] == pytest.approx(1e-12 / 448)
    assert torch.equal(fp8.block_dequant(w8, scale, dtype=torch.float32), w)


def test_quant_saturates_nothing_and_hits_448_at_amax():
    w = torch.randn(128, 128) * 1e4
    w8, _ = fp8.block_quant(w)
    assert float(w8.float().abs().max()) == 448.0
    assert torch.isfinite(w8.float()).all()


@pytest.mark.parametrize("m,k", [(1, 128), (3, 300), (17, 6144), (0, 256)])
def test_per_token_group_quant_formula(m, k):
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    if m:
        x[0, :128] = 0  # an all-zero group uses the 1e-10 floor
    x8, xs = fp8.per_token_group_quant(x)
    groups = -(-k // 128)
    assert x8.shape == (m, k) and x8.dtype == fp8.FP8_DTYPE
    assert xs.shape == (m, groups) and xs.dtype == torch.float32
    for t in range(m):
        for gi in range(groups):
            cols = slice(gi * 128, min(k, (gi + 1) * 128))
            xg = x[t, cols].float()
            s = max(float(xg.abs().max()), 1e-10) / 448
            assert float(xs[t, gi]) == pytest.approx(s, rel=1e-6)
            want = (xg / s).clamp(-448, 448).to(fp8.FP8_DTYPE).float()
            assert torch.equal(x8[t, cols].float(), want)
            assert bool(((x8[t, cols].float() * s - xg).abs() <= E4M3_REL * xg.abs() + 2.0**-9 * s).all())


def test_quant_rejects_bad_ranks_and_dequant_rejects_wrong_scale_shape():
    with pytest.raises(ValueError, match="2-D"):
        fp8.per_token_group_quant(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="2-D"):
        fp8.block_quant(torch.zeros(4))
    w8 = torch.zeros(130, 256, dtype=fp8.FP8_DTYPE)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        fp8.block_dequant(w8, torch.ones(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_ref_is_linear_on_dequantized_weight(dtype):
    g = torch.Generator().manual_seed(7)
    w8, scale = fp8.block_quant(torch.randn(200, 260, generator=g))
    x = torch.randn(2, 3, 260, generator=g).to(dtype)
    got = fp8.fp8_linear_ref(x, w8, scale)
    w = _scale_loop(w8, scale)
    want = (x.float() @ w.t()).to(dtype)
    assert got.shape == (2, 3, 200) and got.dtype == dtype
    # bf16: the weight is rounded to bf16 and the output too, so allow a few bf16 ulps of the output's magnitude
    atol = 2.0**-6 * float(want.float().abs().max()) if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


def test_w8a8_linear_ref_is_exact_fp32_product_of_quantized_operands():
    g = torch.Generator().manual_seed(8)
    w8, scale = fp8.block_quant(torch.randn(131, 300, generator=g))
    x = torch.randn(5, 300, generator=g).to(torch.bfloat16)
    got = fp8.w8a8_linear_ref(x, w8, scale)
    # Independent: sum over K-groups of (x8 . w8) * x_scale[m, g] * w_scale[n // 128, g] (the kernels' form).
    x8, xs = fp8.per_token_group_quant(x)
    want = torch.zeros(5, 131, dtype=torch.float64)
    for gi in range(3):
        cols = slice(gi * 128, min(300, (gi + 1) * 128))
        part = x8[:, cols].double() @ w8[:, cols].double().t()
        ws = scale[:, gi].double().repeat_interleave(128)[:131]
        want += part * xs[:, gi : gi + 1].double() * ws[None, :]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float().to(torch.bfloat16).float(), rtol=1e-2, atol=1e-3)
    # and it stays close to the unquantized product (activation quantization error only)
    exact = x.float() @ fp8.block_dequant(w8, scale, dtype=torch.float32).t()
    assert float((got.float() - exact).abs().max()) <= 0.1 * float(exact.abs().max())


def test_expert_ffn_fp8_ref_equals_bf16_reference_on_dequantized_weights():
    g = torch.Generator().manual_seed(9)
    e, h, inter, k, t = 3, 136, 72, 2, 5
    w13_8, w13_s = fp8.block_quant(torch.randn(e, 2 * inter, h, generator=g) * 0.1)
    w2_8, w2_s = fp8.block_quant(torch.randn(e, h, inter, generator=g) * 0.1)
    hidden = torch.randn(t, h, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
    offsets, sorted_slots, _, _, _ = ref.moe_align(ids, e)
    got = fp8.expert_ffn_fp8_ref(hidden, w13_8, w13_s, w2_8, w2_s, offsets, sorted_slots, k)
    w13 = torch.stack([_scale_loop(w13_8[i], w13_s[i]) for i in range(e)]).to(torch.bfloat16)
    w2 = torch.stack([_scale_loop(w2_8[i], w2_s[i]) for i in range(e)]).to(torch.bfloat16)
    want = ref.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    assert torch.equal(got, want)
