"""The fused residual-add + RMSNorm (kernels/rmsnorm.fused_add_rms_norm) against its pure-PyTorch spec, and the
decoder wiring that uses it (layers/layernorm.RMSNorm.add_norm).

Without a GPU the kernel runs in Triton's CPU interpreter, with exact bf16 rounding (silu_mul's helpers). What must
hold bit for bit, on either device:
- the updated residual: each add is one IEEE fp32 add rounded once to the model dtype, as eager torch adds;
- the fused output vs the plain Triton rms_norm of that residual (the unfused sequence on CUDA): one row routine,
  one tile, so one reduction order;
- the fp32 copy vs out.float().
Against the pure-PyTorch norm the output differs by the fp32 reduction order and rsqrt (~1 fp32 ulp of the
normalizer), which can move a bf16 rounding by one ulp (2^-8 relative) and, after the weight product, by at most
2^-7 relative; fp32 outputs by a few fp32 ulps (1e-6 relative). Most bf16 elements must match exactly (a rounding
point missed or added would make about half of them differ).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.kernels.rmsnorm import (  # noqa: E402
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
)
from longcat_service.layers import layernorm as layernorm_mod  # noqa: E402
from longcat_service.layers.layernorm import RMSNorm  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
EPS = 1e-5


def _case(rows, hidden, dtype, addend_dtypes, seed, row_stride=None):
    """residual (a row-strided view when row_stride), addends, weight, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    width = row_stride or hidden
    base = (3 * torch.randn(rows, width, generator=g)).to(dtype).to(DEVICE)
    residual = base[:, :hidden]
    addends = tuple((2 * torch.randn(rows, hidden, generator=g)).to(d).to(DEVICE) for d in addend_dtypes)
    weight = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE)
    return residual, addends, weight


def _assert_close_to_reference(out, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        return
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-5)
    exact = (out == ref).float().mean().item()
    assert exact > 0.97, f"only {exact:.3f} of the elements equal the reference"


CASES = [  # (rows, hidden, addend dtypes): one row, odd sizes, two addends (the MoE's fp32 sum second)
    (1, 64, ("model",)),
    (1, 6144, ("model", torch.float32)),
    (3, 100, ("model",)),
    (5, 7, ("model", "model")),
    (2, 1, ("model",)),
    (7, 257, ("model", torch.float32)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,hidden,kinds", CASES)
def test_fused_add_rms_norm_matches_reference(dtype, rows, hidden, kinds):
    addend_dtypes = [dtype if k == "model" else k for k in kinds]
    residual, addends, w = _case(rows, hidden, dtype, addend_dtypes, seed=rows * 1000 + hidden)
    want_res = residual.clone()
    want = fused_add_rms_norm_reference(want_res, addends, w, EPS)
    out, out32 = fused_add_rms_norm(residual, addends, w, EPS, fp32_copy=True)
    assert out.dtype == dtype and out.shape == (rows, hidden)
    assert torch.equal(residual, want_res)  # the in-place adds, bit for bit
    assert torch.equal(out, rms_norm(want_res, w, EPS))  # the unfused Triton sequence, bit for bit
    assert torch.equal(out32, out.float())
    _assert_close_to_reference(out, want, dtype)


def test_fused_add_rms_norm_strided_rows_and_rounding_per_add():
    """Row-strided residual and addend views; each sum is rounded (h + a + b, not h + (a + b)): values chosen so
    the two orders differ in bf16."""
    residual, (a,), w = _case(4, 96, torch.bfloat16, [torch.bfloat16], seed=5, row_stride=160)
    wide = torch.zeros(4, 200, dtype=torch.bfloat16, device=DEVICE)
    b = wide[:, 10:106]
    b.copy_(-a)
    residual[:, 0] = 1.0
    a[:, 0] = 2**-8  # 1 + 2^-8 rounds to 1 (ties to even); then 1 - 2^-8 is exact: 0.99609375
    b[:, 0] = -(2**-8)
    before = residual.clone()
    want_res = residual.clone()
    want = fused_add_rms_norm_reference(want_res, (a, b), w, EPS)
    out, out32 = fused_add_rms_norm(residual, (a, b), w, EPS)
    assert out32 is None
    assert torch.equal(residual, want_res)
    assert (residual[:, 0] == 1 - 2**-8).all()  # the rounded order, not 1 + (a + b) = 1
    assert not torch.equal(residual, before)
    _assert_close_to_reference(out, want, torch.bfloat16)


def test_fused_add_rms_norm_empty_and_bad_input():
    residual, (a,), w = _case(0, 32, torch.float32, [torch.float32], seed=1)
    out, _ = fused_add_rms_norm(residual, (a,), w, EPS)
    assert out.shape == (0, 32)
    residual, (a,), w = _case(2, 32, torch.float32, [torch.float32], seed=1)
    with pytest.raises(ValueError, match="one or two addends"):
        fused_add_rms_norm(residual, (), w, EPS)
    with pytest.raises(ValueError, match="one or two addends"):
        fused_add_rms_norm(residual, (a, a, a), w, EPS)
    with pytest.raises(ValueError, match="does not match"):
        fused_add_rms_norm(residual, (a[:1],), w, EPS)
    with pytest.raises(ValueError, match="weight"):
        fused_add_rms_norm(residual, (a,), w[:-1], EPS)
    with pytest.raises(ValueError, match="dtype"):
        fused_add_rms_norm(residual, (a,), w.double(), EPS)
    with pytest.raises(ValueError, match="contiguous"):
        fused_add_rms_norm(residual, (torch.zeros(32, 2, device=DEVICE).t(),), w, EPS)


def _norm(hidden, dtype, seed):
    norm = RMSNorm(hidden, EPS, dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(hidden, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("num_addends", [0, 1, 2])
def test_add_norm_reference_path_is_the_eager_sequence(monkeypatch, num_addends):
    """RMSNorm.add_norm without the kernel (CPU; LONGCAT_DISABLE_TRITON) is exactly `h + a + b`, then the norm."""
    monkeypatch.setattr(layernorm_mod, "fast_path_enabled", lambda t: False)
    residual, addends, _ = _case(3, 48, torch.bfloat16, [torch.bfloat16, torch.float32][:num_addends], seed=9)
    norm = _norm(48, torch.bfloat16, 2)
    want_res = residual
    for a in addends:
        want_res = want_res + a.to(torch.bfloat16)
    with torch.no_grad():
        want = norm(want_res)
        got = norm.add_norm(residual, *addends)
        assert torch.equal(residual, want_res) and torch.equal(got, want)
        got2, got32 = norm.add_norm_fp32(residual.clone(), *addends)
    assert torch.equal(got32, got2.float())


def test_add_norm_fast_path_uses_the_kernel(monkeypatch):
    """With the fast path on (CPU: interpreted) add_norm runs fused_add_rms_norm; zero addends: the plain norm."""
    monkeypatch.setattr(layernorm_mod, "fast_path_enabled", lambda t: True)
    residual, addends, _ = _case(2, 40, torch.bfloat16, [torch.bfloat16, torch.float32], seed=4)
    norm = _norm(40, torch.bfloat16, 3)
    want_res = residual.clone()
    with torch.no_grad():
        want = fused_add_rms_norm_reference(want_res, addends, norm.weight, EPS)
        got, got32 = norm.add_norm_fp32(residual, *addends)
        assert torch.equal(residual, want_res) and torch.equal(got32, got.float())
        _assert_close_to_reference(got, want, torch.bfloat16)
        assert torch.equal(norm.add_norm(residual), rms_norm(residual, norm.weight, EPS))


def test_moe_fp32_out_and_router_input_are_the_unfused_values():
    """The decoder passes the MoE the norm's fp32 copy and takes its fp32 sum for the fused add: the same logits
    and, cast, the same output as the plain call."""
    from longcat_service.config import ModelConfig
    from longcat_service.model.loader import load_model
    from tests.tiny_config import TINY_CONFIG

    model = load_model(ModelConfig.from_dict(TINY_CONFIG), dtype=torch.bfloat16, device="cpu", load_format="dummy",
                       seed=3)
    moe = model.model.layers[0].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.inference_mode():
        plain = moe(x)
        fp32 = moe(x, x.float(), fp32_out=True)
        assert torch.equal(moe.router(x, x.float()), moe.router(x))
    assert fp32.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert torch.equal(fp32.to(torch.bfloat16), plain)
    assert moe.router.reads_fp32(x)  # CPU: the fp32 GEMM, never the bf16x3 split


# ---- GPU: the decode shapes ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 3, 64, 257])
def test_fused_add_rms_norm_equals_unfused_cuda_sequence(rows):
    """At LongCat-Flash's hidden size on the GPU: the fused kernel equals torch's bf16 adds + the Triton rms_norm
    bit for bit (residual and output), with the MoE's fp32 sum as second addend."""
    residual, (a, moe), w = _case(rows, 6144, torch.bfloat16, [torch.bfloat16, torch.float32], seed=rows)
    want_res = residual + a
    want_res = want_res + moe.to(torch.bfloat16)
    want = rms_norm(want_res, w, EPS)
    out, out32 = fused_add_rms_norm(residual, (a, moe), w, EPS, fp32_copy=True)
    assert torch.equal(residual, want_res)
    assert torch.equal(out, want)
    assert torch.equal(out32, want.float())


def _unfused_forward(model, ids, positions, meta, caches):
    """The decoder as spec §2 writes it (and as longcat_flash.py did before the fused adds): eager adds, then norms."""
    from longcat_service.layers.paged_attention import build_attention_plan

    plan = build_attention_plan(meta)
    h = model.model.embed_tokens(ids)
    cos, sin = model.rotary.cos_sin(positions, model.dtype)
    for i, layer in enumerate(model.model.layers):
        kv = (caches[2 * i], caches[2 * i + 1])
        h = h + layer.self_attn[0](layer.input_layernorm[0](h), cos, sin, plan, kv[0])
        n0 = layer.post_attention_layernorm[0](h)
        moe_out = layer.mlp(n0)
        h = h + layer.mlps[0](n0)
        h = h + layer.self_attn[1](layer.input_layernorm[1](h), cos, sin, plan, kv[1])
        h = h + layer.mlps[1](layer.post_attention_layernorm[1](h)) + moe_out
    return model.model.norm(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_wiring_is_bit_identical_to_the_unfused_layer(monkeypatch, dtype):
    """The model's forward with every residual add moved into RMSNorm.add_norm (reference path: no Triton) gives
    exactly the hidden states and cache entries of the unfused layer code: the rewiring changes no rounding."""
    from longcat_service.config import ModelConfig
    from longcat_service.layers.attention_metadata import AttentionMetadata
    from longcat_service.model.kv_cache import allocate_kv_caches
    from longcat_service.model.loader import load_model
    from tests.tiny_config import TINY_CONFIG

    monkeypatch.setenv("LONGCAT_DISABLE_TRITON", "1")
    config = ModelConfig.from_dict(TINY_CONFIG)
    model = load_model(config, dtype=dtype, device="cpu", load_format="dummy", seed=2)
    ids = torch.tensor([5, 9, 11, 3, 8, 1, 4, 60, 7])
    meta = AttentionMetadata.build([6, 3], [6, 3], [[0, 1], [3]], 4, "cpu")
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    with torch.inference_mode():
        got_caches = allocate_kv_caches(config, 6, 4, dtype, "cpu")
        want_caches = allocate_kv_caches(config, 6, 4, dtype, "cpu")
        got = model(ids, positions, meta, got_caches)
        want = _unfused_forward(model, ids, positions, meta, want_caches)
    assert torch.equal(got, want)
    for a, b in zip(got_caches, want_caches, strict=True):
        assert torch.equal(a, b)
