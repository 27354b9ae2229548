"""Block-FP8 kernels on the GPU against ops/fp8_reference.py: the CUDA decode kernels (dense_gemv_fp8,
expert_ffn_fp8), the Triton prefill kernels (per-token-group quant, w8a8 GEMM, grouped FP8 GEMM), torch's blockwise
scaled-mm where this torch has it, and the dispatch. Random inputs incl. partial 128-blocks, empty batches and the
LongCat-Flash shapes. Skipped without a CUDA device (CI); the CUDA-op tests also without the FP8 ops built.

Bounds. Weight-only kernels (decode): each output is an fp32 sum of exact products x * w8 scaled per 16-element
partial sum, so it is within one rounding to bf16 plus fp32 accumulation error of the fp64 product with the
dequantized weight. w8a8 kernels: against the fp64 product of the quantized operands, with the FP8 tensor cores'
reduced-precision accumulation inside each 128-wide K group (Hopper keeps ~14 bits there, DeepSeek-V3 report §3.3;
the kernels add each group's partial product into an fp32 accumulator) bounded by FP8_MMA_ACC of the products'
magnitude. That bound is measured, not derived: on the H200 (run 1, benchmarks/RESULTS.md) the Triton w8a8 GEMM
(one 128-deep tl.dot per scale group, i.e. four chained k=32 wgmma into a fresh fp32 accumulator, then scaled and
added in fp32: the DeepSeek-V3 promotion scheme, no kernel-side error) reached 1.79 x 2^-10 on 2078 of 25M outputs
of 4096x6144x1536; 2^-8 leaves 2.2x room and still catches a wrong or dropped scale group (>= 1/48 of magnitude).
"""

from __future__ import annotations

import pytest
import torch

import longcat_service.ops as ops
from longcat_service.ops import fp8 as fp8_ops  # the layers' FP8 dispatch
from longcat_service.ops import fp8_reference as fr
from longcat_service.ops import reference as ref
from longcat_service.ops.testing import make_router_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
HAVE_FP8_OPS = ops.ACTIVE_BACKEND == "extension cpu+cuda" and hasattr(torch.ops.longcat, "dense_gemv_fp8")
needs_ops = pytest.mark.skipif(not HAVE_FP8_OPS, reason=f"CUDA FP8 ops not built (backend {ops.ACTIVE_BACKEND})")
L = torch.ops.longcat
DEV = "cuda"
BF16_ULP = 2.0**-8


# opcheck without test_schema: its mutation check compares inputs with torch.allclose, which has no float8 kernel
# ("mul_cuda" not implemented for 'Float8_e4m3fn' on the H200); the ops' schemas mark no input as mutated.
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

def _quantized(shape, seed, std=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(*shape, device=DEV, generator=g) * std
    return fr.block_quant(w)


FP8_MMA_ACC = 2.0**-8  # relative to the products' magnitude: the tensor cores' FP8 accumulation within a group


def _assert_bf16_within(got, exact, magnitude, k, what="", mma=False):
    """got (bf16) within one bf16 rounding + fp32 accumulation error (any order) of the fp64 exact value (+ the FP8
    tensor cores' accumulation error when mma)."""
    acc = FP8_MMA_ACC if mma else (k + 2) * 2.0**-24
    bound = BF16_ULP * exact.abs() + acc * magnitude * (1 + BF16_ULP) + 1e-30
    err = (got.double() - exact).abs()
    assert got.dtype == torch.bfloat16 and torch.isfinite(got.float()).all(), what
    bad = err > bound
    assert not bool(bad.any()), f"{what}: {int(bad.sum())}/{err.numel()} off, worst {float((err / bound).max()):.3g}x"


def _weight_only_exact(x, w8, scale):
    w = fr.block_dequant(w8, scale, dtype=torch.float64)
    return x.double() @ w.t(), x.double().abs() @ w.abs().t()


# ---- dense_gemv_fp8 (CUDA) -------------------------------------------------------------------------------------

# (N, K): tiny, partial row/column blocks, K not a multiple of 128 (1552), LongCat's projections.
GEMV_SHAPES = [(1, 16), (7, 64), (33, 1536), (130, 272), (4227, 1552), (2112, 6144), (12288, 1536), (6144, 8192),
               (24576, 6144), (6144, 12288)]


# The GEMV variants as (LONGCAT_FP8_GEMV_SPLITK, LONGCAT_FP8_GEMV_MMA): the default rule, the plain FMA kernel, its
# split-K rule, forced split-K (S = 2, 3, 8 here; 4 and 6 in test_dense_gemv_fp8_splitk_variants_agree) and the
# tensor-core kernel.
GEMV_SPLITS = (("1", "auto"), ("0", "0"), ("1", "0"), ("2", "0"), ("3", "0"), ("8", "0"), ("0", "1"))


def _gemv_variant(monkeypatch, variant):
    monkeypatch.setenv("LONGCAT_FP8_GEMV_SPLITK", variant[0])
    monkeypatch.setenv("LONGCAT_FP8_GEMV_MMA", variant[1])


def _gemv_kernel_of(variant, m, k):
    """The forced variant the default rule ("auto") runs at m rows and this K (csrc/cuda/dense_gemv_fp8.cu use_mma:
    tensor cores from 3 rows and for K <= 2048, else the FMA kernels with their split rule)."""
    if variant[1] != "auto":
        return variant
    return ("0", "1") if m >= 3 or k <= 2048 else ("1", "0")


@needs_ops
@pytest.mark.parametrize("split", GEMV_SPLITS, ids="-".join)
@pytest.mark.parametrize("n,k", GEMV_SHAPES, ids=lambda v: str(v))
def test_dense_gemv_fp8_matches_exact(n, k, split, monkeypatch):
    from longcat_service.ops import extension

    _gemv_variant(monkeypatch, split)
    w8, scale = _quantized((n, k), seed=n + k, std=k**-0.5)
    g = torch.Generator(device=DEV).manual_seed(k)
    rows = torch.randn(8, k, device=DEV, generator=g).to(torch.bfloat16)
    for m in (0, 1, 2, 3, 5, 8):
        x = rows[:m]
        assert extension.dense_gemv_fp8_supported(x, w8, scale)
        out = L.dense_gemv_fp8(x, w8, scale)
        assert out.shape == (m, n)
        if m:
            exact, mag = _weight_only_exact(x, w8, scale)
            _assert_bf16_within(out, exact, mag, k, f"N{n} K{k} M{m}")
            # row 0 never depends on the batch size within a kernel (auto: the kernel it picks at m rows)
            kernel = _gemv_kernel_of(split, m, k)
            _gemv_variant(monkeypatch, kernel)
            assert torch.equal(out, L.dense_gemv_fp8(x, w8, scale)), f"auto at M{m} is not {kernel}"
            assert torch.equal(out[:1], L.dense_gemv_fp8(x[:1], w8, scale)), "row 0 depends on the batch size"
            _gemv_variant(monkeypatch, split)
    # and against the weight-only reference (weights rounded to bf16 there): a bf16-level difference
    want = fr.fp8_linear_ref(rows, w8, scale).float()
    got = L.dense_gemv_fp8(rows, w8, scale).float()
    assert float((got - want).abs().max()) <= 2**-6 * float(want.abs().max()) + 1e-3


def _every_e4m3_code(rows: int) -> torch.Tensor:
    """[rows, 256] float8_e4m3fn: row i is the 256 byte codes rolled by i (NaN codes 0x7f / 0xff -> 0): every sign,
    exponent (subnormals included) and mantissa in every lane position of a 16-byte vector."""
    codes = torch.arange(256, dtype=torch.int64)
    codes = torch.where((codes & 0x7F) == 0x7F, 0, codes)
    table = torch.stack([codes.roll(i) for i in range(rows)]).to(torch.uint8)
    return table.view(torch.float8_e4m3fn).to(DEV)


@needs_ops
@pytest.mark.parametrize("split", GEMV_SPLITS, ids="-".join)
def test_dense_gemv_fp8_dequantizes_every_code_exactly(split, monkeypatch):
    """One-hot activations pick single weights: the output is exactly the dequantized weight (e4m3 values times a
    power-of-two scale are bf16 numbers), for all 256 codes (subnormals included) in every position of a 16-byte
    vector, so a wrong bit or order in the in-register conversion fails."""
    _gemv_variant(monkeypatch, split)
    w8 = _every_e4m3_code(136)  # 2 row blocks, the second partial
    scale = torch.tensor([[2.0**-7, 2.0**-7], [2.0**3, 2.0**3]], device=DEV)  # [2, 2]: a power of two per block
    eye = torch.eye(256, device=DEV, dtype=torch.bfloat16)
    want = fr.block_dequant(w8, scale, dtype=torch.float32).t()  # [256 (k), 136 (n)]
    for m in (1, 2, 4):  # the GEMV's row variants
        got = torch.cat([L.dense_gemv_fp8(eye[i:i + m], w8, scale) for i in range(0, 256, m)]).float()
        assert torch.equal(got, want), f"M={m}: {int((got != want).sum())} weights off"


@needs_ops
@pytest.mark.parametrize("split", GEMV_SPLITS, ids="-".join)
def test_dense_gemv_fp8_strided_x_graph_and_rejects(split, monkeypatch):
    _gemv_variant(monkeypatch, split)
    w8, scale = _quantized((300, 512), seed=1, std=512**-0.5)
    wide = torch.randn(4, 512 + 32, device=DEV).to(torch.bfloat16)
    x = wide[:, 16:528]  # row stride 544 elements: 16-byte aligned rows
    out = L.dense_gemv_fp8(x, w8, scale)
    assert torch.equal(out, L.dense_gemv_fp8(x.contiguous(), w8, scale))
    graph = torch.cuda.CUDAGraph()
    static_out = L.dense_gemv_fp8(x, w8, scale)
    with torch.cuda.graph(graph):
        static_out = L.dense_gemv_fp8(x, w8, scale)
    wide.normal_()
    graph.replay()
    assert torch.equal(static_out, L.dense_gemv_fp8(x.contiguous(), w8, scale))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        L.dense_gemv_fp8(torch.randn(1, 24, device=DEV).to(torch.bfloat16), *_quantized((8, 24), seed=2))
    with pytest.raises(RuntimeError, match="bfloat16"):
        L.dense_gemv_fp8(torch.randn(1, 512, device=DEV).half(), w8, scale)


@needs_ops
@pytest.mark.parametrize("n,k", [(2176, 6144), (131, 4112), (24576, 6144), (12288, 1536)], ids=lambda v: str(v))
def test_dense_gemv_fp8_splitk_variants_agree(n, k, monkeypatch):
    """Every split (K = 4112: 9 steps, so S = 4, 6, 8 leave short and empty last slices) and the tensor-core kernel
    within the bound of the exact value, row 0 the 1-row call bit for bit within each; the split-K rule picks one of
    them and keeps the plain kernel where N alone fills the GPU (24576 and 12288 columns: >= 8 warps per SM)."""
    w8, scale = _quantized((n, k), seed=n * 7 + k, std=k**-0.5)
    x = torch.randn(4, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(n)).to(torch.bfloat16)
    exact, mag = _weight_only_exact(x, w8, scale)
    outs = {}
    monkeypatch.setenv("LONGCAT_FP8_GEMV_MMA", "0")
    for split in ("0", "2", "3", "4", "6", "8"):
        monkeypatch.setenv("LONGCAT_FP8_GEMV_SPLITK", split)
        outs[split] = L.dense_gemv_fp8(x, w8, scale)
        _assert_bf16_within(outs[split], exact, mag, k, f"N{n} K{k} S{split}")
        assert torch.equal(outs[split][:1], L.dense_gemv_fp8(x[:1], w8, scale)), f"S{split}: row 0 depends on M"
    monkeypatch.setenv("LONGCAT_FP8_GEMV_MMA", "1")
    mma = L.dense_gemv_fp8(x, w8, scale)
    _assert_bf16_within(mma, exact, mag, k, f"N{n} K{k} mma")
    assert torch.equal(mma[:1], L.dense_gemv_fp8(x[:1], w8, scale)), "mma: row 0 depends on M"
    monkeypatch.setenv("LONGCAT_FP8_GEMV_MMA", "0")
    monkeypatch.setenv("LONGCAT_FP8_GEMV_SPLITK", "1")
    auto = L.dense_gemv_fp8(x, w8, scale)
    assert any(torch.equal(auto, o) for o in outs.values())
    if n >= 12288:
        assert torch.equal(auto, outs["0"])
    monkeypatch.setenv("LONGCAT_FP8_GEMV_SPLITK", "5")
    with pytest.raises(RuntimeError, match="LONGCAT_FP8_GEMV_SPLITK"):
        L.dense_gemv_fp8(x, w8, scale)
    monkeypatch.setenv("LONGCAT_FP8_GEMV_SPLITK", "0")
    monkeypatch.setenv("LONGCAT_FP8_GEMV_MMA", "yes")
    with pytest.raises(RuntimeError, match="LONGCAT_FP8_GEMV_MMA"):
        L.dense_gemv_fp8(x, w8, scale)


# ---- expert_ffn_fp8 (CUDA decode) ------------------------------------------------------------------------------

# (T, E, Z, k, share, H, I): T = 0, 1 (one-row kernel), 2-7 (2-row passes; experts with more rows take several), 16
# and 129 at I <= 512 (the tensor-core kernel, expert_ffn_fp8_mma.cuh), 40 / 64 at I = 640 / 2048 (2-row passes); I = 64 / 256 (narrow: split-K SwiGLU), 2048 (wide); H, I with
# partial 128-blocks and an odd number of 64-wide chunks (H = 272, I = 48 / 144 / 640); all / no slots to zero experts.
FFN_CASES = [
    (0, 12, 6, 4, "mixed", 256, 128),
    (1, 12, 6, 12, "mixed", 256, 128),
    (1, 64, 32, 12, "mixed", 6144, 256),
    (2, 20, 12, 12, "mixed", 272, 48),
    (4, 24, 8, 12, "mixed", 256, 144),
    (7, 20, 12, 12, "all", 256, 128),
    (7, 20, 12, 12, "none", 512, 640),
    (16, 20, 12, 12, "mixed", 272, 144),
    (40, 64, 32, 12, "mixed", 512, 640),
    (64, 40, 20, 12, "mixed", 256, 2048),
    (129, 13, 0, 12, "none", 256, 64),
]


def _routed(case, seed):
    t, e, z, k, share, h, inter = case
    g = torch.Generator().manual_seed(seed)
    logits, bias = make_router_inputs(t, e, z, zero_share=share, generator=g, device=DEV)
    hidden = torch.randn(t, h, generator=g).to(DEV, torch.bfloat16)
    w13, w13_s = _quantized((e, 2 * inter, h), seed=seed, std=h**-0.5)
    w2, w2_s = _quantized((e, h, inter), seed=seed + 1, std=inter**-0.5)
    ids, _, _ = ref.router_topk(logits, bias, k, 6.0, e)
    offsets, sorted_slots, slot_rows, active, num_active = ref.moe_align(ids, e)
    return hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, active, num_active, k


def _ffn_exact(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k):
    """fp64 SwiGLU on the dequantized weights, h rounded to bf16 as the kernel stores it."""
    w13d = fr.block_dequant(w13, w13_s, dtype=torch.float64)
    w2d = fr.block_dequant(w2, w2_s, dtype=torch.float64)
    inter = w2.shape[-1]
    out = torch.zeros(sorted_slots.numel(), hidden.shape[1], dtype=torch.float64, device=DEV)
    offs = offsets.tolist()
    for e in range(w13.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            x = hidden[sorted_slots[a:b].long() // k].double()
            gu = x @ w13d[e].t()
            act = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(torch.bfloat16).double()
            out[a:b] = act @ w2d[e].t()
    return out


@needs_ops
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_expert_ffn_fp8_matches_reference(case, compact):
    hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, active, num_active, k = _routed(case, seed=case[0] + case[6])
    extra = (active, num_active) if compact else (None, None)
    y = L.expert_ffn_fp8(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k, *extra)
    n = int(offsets[-1])
    assert y.shape == (sorted_slots.numel(), hidden.shape[1]) and y.dtype == torch.bfloat16
    if n == 0:
        return
    want = fr.expert_ffn_fp8_ref(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)
    torch.testing.assert_close(y[:n], want[:n], rtol=2e-2, atol=2e-2)
    exact = _ffn_exact(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)[:n]
    err = (y[:n].double() - exact).abs()
    # h may differ from the fp64 chain's h by one bf16 rounding: a few bf16 ulps of the output's scale
    assert float(err.max()) <= 2**-5 * float(exact.abs().max()) + 1e-3
    assert float(err.mean()) <= 2**-8 * float(exact.abs().mean()) + 1e-4


@needs_ops
@pytest.mark.parametrize("tokens,inter", [(1, 2048), (16, 2048), (64, 2048), (1, 256), (16, 256), (64, 256)])
def test_expert_ffn_fp8_longcat_shapes(tokens, inter):
    case = (tokens, 32, 16, 12, "mixed", 6144, inter)  # 32 of the 512 experts: the same per-expert shapes
    hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, active, num_active, k = _routed(case, seed=tokens + inter)
    y = L.expert_ffn_fp8(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k, active, num_active)
    n = int(offsets[-1])
    exact = _ffn_exact(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)[:n]
    err = (y[:n].double() - exact).abs()
    assert float(err.max()) <= 2**-5 * float(exact.abs().max()) + 1e-3
    assert float(err.mean()) <= 2**-8 * float(exact.abs().mean()) + 1e-4


@needs_ops
@pytest.mark.parametrize("tokens", [8, 24])  # the FMA kernel, the tensor-core kernel
def test_expert_ffn_fp8_graph_replay_and_opcheck(tokens):
    case = (tokens, 40, 20, 12, "mixed", 256, 128)
    hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, active, num_active, k = _routed(case, seed=3)
    args = (hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k, active, num_active)
    eager = L.expert_ffn_fp8(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = L.expert_ffn_fp8(*args)
    graph.replay()
    n = int(offsets[-1])
    assert torch.equal(static[:n], eager[:n])
    torch.library.opcheck(L.expert_ffn_fp8.default, args, test_utils=OPCHECK_UTILS)
    x = torch.randn(3, 256, device=DEV).to(torch.bfloat16)
    torch.library.opcheck(L.dense_gemv_fp8.default, (x, *_quantized((130, 256), seed=4)), test_utils=OPCHECK_UTILS)


# ---- Triton prefill kernels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k", [(1, 128), (37, 300), (4096, 6144), (0, 256)])
def test_quant_is_bitwise_the_reference(m, k):
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8

    x = (torch.randn(m, k, device=DEV) * 30).to(torch.bfloat16)
    q, s = per_token_group_quant_fp8(x)
    rq, rs = fr.per_token_group_quant(x)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


# Fused MoE quantization (kernels/moe_fp8_quant.py): bit for bit the unfused pairs on the rows below num_rows.


def _assert_same_quant(got, want, n, what):
    (q, s), (rq, rs) = got, want
    assert q.shape == rq.shape and s.shape == rs.shape and q.dtype == rq.dtype and s.dtype == torch.float32, what
    assert torch.equal(s[:n], rs[:n]), f"{what}: scales differ"
    bad = q[:n].view(torch.uint8) != rq[:n].view(torch.uint8)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} e4m3 bytes differ, first at {bad.nonzero()[:3].tolist()}"


@pytest.mark.parametrize("t,k,h,share", [(4096, 12, 6144, 0.67), (37, 3, 300, 0.5), (5, 12, 6144, 1.0),
                                         (0, 12, 6144, 1.0)])
def test_gather_quant_fp8_is_the_unfused_pair(t, k, h, share):
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8
    from longcat_service.kernels.moe_fp8_quant import gather_quant_fp8
    from longcat_service.kernels.moe_gather import gather_expert_rows, gather_expert_rows_reference

    g = torch.Generator(device=DEV).manual_seed(t + h)
    hidden = (torch.randn(t, h, device=DEV, generator=g) * 30).to(torch.bfloat16)
    if t:
        hidden[0, :128] = 0  # the 1e-10 floor
        hidden[-1, :6] = torch.tensor([3e38, -1e38, 31.9, 1e-6, -1e-6, 447.9])  # near the clamp, +-0, carries
        hidden[-1, 128:256] = torch.randn(128, device=DEV, generator=g) * 1e-12  # a group below the floor
    sorted_slots = torch.randperm(t * k, device=DEV, generator=g).to(torch.int32)
    n = int(share * t * k)
    num_rows = torch.tensor([n], device=DEV)
    got = gather_quant_fp8(hidden, sorted_slots, k, num_rows)
    _assert_same_quant(got, per_token_group_quant_fp8(gather_expert_rows(hidden, sorted_slots, k, num_rows)), n,
                       "unfused kernels")
    _assert_same_quant(got, fr.per_token_group_quant(gather_expert_rows_reference(hidden, sorted_slots, k)), n,
                       "references")


@pytest.mark.parametrize("rows,inter,share", [(49152, 2048, 0.67), (37, 200, 1.0), (300, 256, None), (0, 2048, None)])
def test_silu_mul_quant_fp8_is_the_unfused_pair(rows, inter, share):
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8
    from longcat_service.kernels.moe_fp8_quant import silu_mul_quant_fp8
    from longcat_service.kernels.silu_mul import silu_and_mul, silu_and_mul_reference

    g = torch.Generator(device=DEV).manual_seed(rows + inter)
    gate_up = (torch.randn(rows, 2 * inter, device=DEV, generator=g) * 4).to(torch.bfloat16)
    if rows:
        gate_up[0, :128] = 0  # an all-zero activation group
        gate_up[-1, :2] = torch.tensor([200.0, -200.0])  # silu = x and -0
        gate_up[-1, inter:inter + 2] = torch.tensor([1e36, 5.0])  # the group's amax
    num_rows = None if share is None else torch.tensor([int(share * rows)], device=DEV, dtype=torch.int32)
    n = rows if share is None else int(share * rows)
    got = silu_mul_quant_fp8(gate_up, num_rows)
    _assert_same_quant(got, per_token_group_quant_fp8(silu_and_mul(gate_up, num_rows)), n, "unfused kernels")
    _assert_same_quant(got, fr.per_token_group_quant(silu_and_mul_reference(gate_up)), n, "references")


def _w8a8_exact(x, w8, scale):
    x8, xs = fr.per_token_group_quant(x)
    k = x.shape[1]
    xq = x8.double() * xs.double().repeat_interleave(128, dim=1)[:, :k]
    w = fr.block_dequant(w8, scale, dtype=torch.float64)
    return xq @ w.t(), xq.abs() @ w.abs().t()


@pytest.mark.parametrize("m,n,k", [(1, 7, 16), (37, 131, 300), (300, 2112, 6144), (4096, 6144, 1536),
                                   (64, 24576, 6144)])
def test_w8a8_gemm_matches_exact(m, n, k):
    from longcat_service.kernels.fp8_gemm import DENSE_CONFIGS, w8a8_block_gemm

    w8, scale = _quantized((n, k), seed=m + n, std=k**-0.5)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    exact, mag = _w8a8_exact(x, w8, scale)
    for cfg in DENSE_CONFIGS if (m, n) == (300, 2112) else DENSE_CONFIGS[:1]:  # every config once (compile time)
        _assert_bf16_within(w8a8_block_gemm(x, w8, scale, config=cfg), exact, mag, k, f"{m}x{n}x{k} {cfg}", mma=True)
    assert w8a8_block_gemm(x[:0], w8, scale).shape == (0, n)


def test_scaled_mm_blockwise_when_torch_has_it():
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8, scaled_mm_blockwise

    if not hasattr(torch.nn.functional, "scaled_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.scaled_mm")
    m, n, k = 256, 1536, 6144
    w8, scale = _quantized((n, k), seed=5, std=k**-0.5)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    x8, xs = per_token_group_quant_fp8(x)
    exact, mag = _w8a8_exact(x, w8, scale)
    _assert_bf16_within(scaled_mm_blockwise(x8, xs, w8, scale), exact, mag, k, "scaled_mm blockwise", mma=True)


@pytest.mark.parametrize("m", [4, 5, 64, 333])
def test_scaled_mm_blockwise_quantizer_layout_equals_built_layout(m):
    """w8a8_linear's quantizer writes scaled-mm's padded column-major operands itself (no ones / copy / pad kernels):
    cuBLASLt gets the same bytes as when scaled_mm_blockwise builds them from the plain layout, so the same output."""
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8, scaled_mm_blockwise, scaled_mm_ready

    if not hasattr(torch.nn.functional, "scaled_mm") or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs torch.nn.functional.scaled_mm on a Hopper GPU")
    w8, scale = _quantized((2176, 6144), seed=m, std=6144**-0.5)
    x = torch.randn(m, 6144, device=DEV).to(torch.bfloat16)
    x8, xs = per_token_group_quant_fp8(x)
    x8p, xsp = per_token_group_quant_fp8(x, pad_rows_to=4, scale_column_major=True)
    assert scaled_mm_ready(x8p, xsp) and not scaled_mm_ready(x8, xs)
    built = scaled_mm_blockwise(x8, xs, w8, scale)
    direct = scaled_mm_blockwise(x8p, xsp, w8, scale)[:m]
    assert torch.equal(direct, built)


@pytest.mark.parametrize("m,n,k", [(4, 2176, 6144), (5, 12288, 1536), (37, 6144, 8192), (4096, 6144, 1536),
                                   (333, 24576, 6144)])
def test_w8a8_linear_scaled_mm_path(m, n, k):
    """kernels/fp8_gemm.w8a8_linear, the dense prefill dispatch: on an H200 with F.scaled_mm every LongCat shape
    (incl. the fused q_a+kv_a padded to 2176 rows) takes torch's blockwise scaled-mm, rows padded to 4; results
    within the tensor-core bound of the exact w8a8 product; the Triton GEMM where scaled-mm does not take the
    shape (N = 2112, bf16 only, too few rows)."""
    from longcat_service.kernels import fp8_gemm

    w8, scale = _quantized((n, k), seed=m + 7, std=k**-0.5)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    hopper = torch.cuda.get_device_capability() == (9, 0) and hasattr(torch.nn.functional, "scaled_mm")
    assert fp8_gemm.scaled_mm_supported(x, w8, scale) == hopper
    assert not fp8_gemm.scaled_mm_supported(x, w8[:2112] if n == 2176 else w8[: n - 64], scale)
    assert not fp8_gemm.scaled_mm_supported(x.half(), w8, scale)
    assert not fp8_gemm.scaled_mm_supported(x[:3], w8, scale)
    exact, mag = _w8a8_exact(x, w8, scale)
    out = fp8_gemm.w8a8_linear(x, w8, scale)
    assert out.shape == (m, n) and out.is_contiguous()
    _assert_bf16_within(out, exact, mag, k, f"w8a8_linear {m}x{n}x{k}", mma=True)


def _offsets(counts):
    offs = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offs[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return offs.to(DEV)


@pytest.mark.parametrize("n,k", [(4096, 6144), (6144, 2048), (72, 200)])
def test_grouped_gemm_fp8_every_config(n, k):
    from longcat_service.kernels.fp8_gemm import GROUPED_CONFIGS, grouped_gemm_fp8, per_token_group_quant_fp8

    counts = [0, 1, 17, 64, 65, 130, 0, 40] if n > 100 else [5, 0, 33, 1]
    offsets = _offsets(counts)
    rows = sum(counts) + 20  # rows of zero-expert slots after the real ones
    x8, xs = per_token_group_quant_fp8(torch.randn(rows, k, device=DEV).to(torch.bfloat16))
    w8, ws = _quantized((len(counts), n, k), seed=n, std=k**-0.5)
    # every config at one shape; the others (4096 x 6144 shares (6144, 2048)'s compiled kernels) the first and the
    # pointer-load one: each config is a Triton compile of seconds
    configs = GROUPED_CONFIGS if n == 6144 else (GROUPED_CONFIGS[0], GROUPED_CONFIGS[3])
    for cfg in configs:
        y = grouped_gemm_fp8(x8, xs, w8, ws, offsets, config=cfg)
        offs = offsets.tolist()
        for e in range(len(counts)):
            a, b = offs[e], offs[e + 1]
            if b > a:
                xq = x8[a:b].double() * xs[a:b].double().repeat_interleave(128, dim=1)[:, :k]
                w = fr.block_dequant(w8[e], ws[e], dtype=torch.float64)
                _assert_bf16_within(y[a:b], xq @ w.t(), xq.abs() @ w.abs().t(), k, f"{cfg} expert {e}", mma=True)


def _unfused_expert_ffn(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k):
    """The prefill path before the fused quantization kernels, with the same GEMM configs."""
    from longcat_service.kernels import fp8_gemm as fg
    from longcat_service.kernels.moe_gather import gather_expert_rows
    from longcat_service.kernels.silu_mul import silu_and_mul

    num_rows, offs = offsets[-1:], offsets.to(torch.int32)
    x8, xs = fg.per_token_group_quant_fp8(gather_expert_rows(hidden, sorted_slots, k, num_rows))
    gate_up = fg.grouped_gemm_fp8(x8, xs, w13, w13_s, offs, hidden.shape[0], config=fg.DEFAULT_GATE_UP_CONFIG)
    a8, a_s = fg.per_token_group_quant_fp8(silu_and_mul(gate_up, num_rows))
    return fg.grouped_gemm_fp8(a8, a_s, w2, w2_s, offs, hidden.shape[0], config=fg.DEFAULT_DOWN_CONFIG)


def test_prefill_fused_quant_equals_unfused_at_longcat_shapes():
    """4096 tokens, k = 12, H = 6144, I = 2048 (32 of the 512 experts: the per-expert shapes, ~1000 rows each):
    the fused path equals the unfused one bit for bit on the real rows (the grouped GEMMs are deterministic)."""
    from longcat_service.ops import extension

    case = (4096, 32, 16, 12, "mixed", 6144, 2048)
    hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, _, _, k = _routed(case, seed=4096)
    y = extension._expert_ffn_grouped_fp8(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)
    n = int(offsets[-1])
    assert 0 < n < sorted_slots.numel()
    want = _unfused_expert_ffn(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)
    assert torch.equal(y[:n], want[:n])


def test_prefill_expert_ffn_fp8_path():
    from longcat_service.ops import extension

    case = (1000, 20, 10, 12, "mixed", 512, 256)
    hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, active, num_active, k = _routed(case, seed=9)
    assert extension._use_grouped_fp8(hidden, w13, w2, sorted_slots.numel())
    y = extension.expert_ffn_fp8(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k, active, num_active)
    n = int(offsets[-1])
    assert torch.equal(y[:n], _unfused_expert_ffn(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)[:n])
    weight_only = fr.expert_ffn_fp8_ref(hidden, w13, w13_s, w2, w2_s, offsets, sorted_slots, k)[:n].float()
    err = (y[:n].float() - weight_only).abs()
    # activation quantization (e4m3: <= 2^-4 relative per element, ~2.5% rms) twice
    assert float(err.mean()) <= 0.08 * float(weight_only.abs().mean())
    assert float(err.max()) <= 0.25 * float(weight_only.abs().max())


def test_fp8_linear_dispatch(monkeypatch):
    """ops/fp8.fp8_linear (the layers' dispatch): up to DECODE_ROWS (8) rows the CUDA GEMV, more rows the w8a8
    GEMM (kernels/fp8_gemm.w8a8_linear: scaled-mm or Triton; this shape has no split-K SHAPE_CONFIGS entry)."""
    w8, scale = _quantized((2112, 6144), seed=6, std=6144**-0.5)
    calls = []
    if HAVE_FP8_OPS:
        from longcat_service.ops import extension

        real = extension.dense_gemv_fp8
        monkeypatch.setattr(extension, "dense_gemv_fp8", lambda *a: calls.append("gemv") or real(*a))
    real_w8a8 = fp8_ops._w8a8_gemm()
    assert real_w8a8 is not None
    monkeypatch.setattr(fp8_ops, "_w8a8_gemm", lambda: lambda *a, **kw: calls.append("w8a8") or real_w8a8(*a, **kw))
    assert fp8_ops.DECODE_ROWS == 8
    for m in (1, 8, 9, 512):
        x = torch.randn(m, 6144, device=DEV).to(torch.bfloat16)
        out = fp8_ops.fp8_linear(x, w8, scale)
        want = fr.fp8_linear_ref(x, w8, scale).float()
        # weight-only vs w8a8: within activation quantization error (e4m3: ~2.5% rms relative per element)
        assert float((out.float() - want).abs().mean()) <= 0.06 * float(want.abs().mean())
    expected = (["gemv", "gemv"] if HAVE_FP8_OPS else ["w8a8", "w8a8"]) + ["w8a8", "w8a8"]
    assert calls == expected
