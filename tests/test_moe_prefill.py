"""The MoE prefill path: expert_ffn's unspecified rows never reach combine's output, the grouped-GEMM
expert FFN (torch and Triton variants; torch._grouped_mm runs on CPU too), the device-limited row gather,
and the router's bf16x3 GEMM (the fp32 router weight split into three bf16 parts).

Without a GPU the Triton kernels run in the interpreter and the bf16x3 GEMM is emulated (CPU torch has no
mm with out_dtype): bf16 products of bf16 values are exact in fp32, so an fp32 GEMM of the upcast parts
does the same math as the tensor cores. Tests marked gpu run the real thing.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import longcat_service.ops as ops  # noqa: E402
from longcat_service.layers import router as router_mod  # noqa: E402
from longcat_service.ops import extension  # noqa: E402
from longcat_service.ops import reference as ref  # noqa: E402
from longcat_service.ops.testing import make_expert_weights, make_router_inputs  # noqa: E402
from tests.extension_switch import skip_without_extension  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

HAVE_EXT = ops.ACTIVE_BACKEND.startswith("extension")
needs_ext = skip_without_extension(HAVE_EXT, f"ops backend is {ops.ACTIVE_BACKEND}")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="no CUDA device")
DEVICE = "cuda" if ON_GPU else "cpu"
SCALE = 6.0


def _routed(t, e, z, k, h, i, share="mixed", seed=0, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits, bias = make_router_inputs(t, e, z, zero_share=share, generator=g)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    w13, w2 = make_expert_weights(e, h, i, dtype, generator=g)
    ids, weights, zero_w = ref.router_topk(logits, bias, k, SCALE, e)
    offsets, sorted_slots, slot_rows, _, _ = ref.moe_align(ids, e)
    to = lambda *ts: [x.to(device) for x in ts]  # noqa: E731
    return to(hidden, w13, w2, offsets, sorted_slots, slot_rows, weights, zero_w)


# ---- expert_ffn's rows past expert_offsets[-1] are unspecified: combine must never read them ------------------


def _poisoned(y: torch.Tensor, num_rows: int) -> torch.Tensor:
    bad = y.clone()
    rest = bad[num_rows:]
    if rest.numel():
        rest.copy_(torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38])
                   .to(y.dtype).repeat(rest.numel() // 4 + 1)[: rest.numel()].view_as(rest))
    return bad


@pytest.mark.parametrize("share", ["mixed", "all"])
def test_combine_ignores_rows_past_the_last_real_row(share):
    hidden, w13, w2, offsets, sorted_slots, slot_rows, weights, zero_w = _routed(37, 10, 6, 4, 16, 8, share)
    n = int(offsets[-1])
    assert n < sorted_slots.numel()  # some slots go to zero experts, so there are rows to poison
    y = ref.expert_ffn(hidden, w13, w2, offsets, sorted_slots, 4)
    bad = _poisoned(y, n)
    combines = [ref.combine] + ([torch.ops.longcat.combine] if HAVE_EXT else [])
    for combine in combines:
        for add_identity in (True, False):
            want = combine(y, slot_rows, weights, hidden, zero_w, add_identity)
            got = combine(bad, slot_rows, weights, hidden, zero_w, add_identity)
            assert torch.isfinite(got).all()
            assert torch.equal(got, want), (combine, add_identity)


# ---- the grouped-GEMM expert FFN (what CUDA prefill runs), here on CPU ----------------------------------------


def _grouped(monkeypatch, triton_path: bool, *args):
    monkeypatch.setattr(extension, "fast_path_enabled", lambda t: triton_path)
    return extension._expert_ffn_grouped_mm(*args)


@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=needs_triton)])
@pytest.mark.parametrize("t,e,z,k,h,i,share", [(50, 12, 6, 4, 64, 32, "mixed"), (33, 8, 4, 3, 48, 24, "none"),
                                                (20, 8, 4, 3, 48, 24, "all"), (0, 8, 4, 3, 48, 24, "mixed")])
def test_grouped_expert_ffn_matches_reference_on_real_rows(monkeypatch, triton_path, t, e, z, k, h, i, share):
    if ON_GPU and t == 0:
        pytest.skip("the CUDA path never runs the grouped GEMM without tokens (_use_grouped_mm)")
    hidden, w13, w2, offsets, sorted_slots, slot_rows, weights, zero_w = _routed(t, e, z, k, h, i, share, seed=t,
                                                                                device=DEVICE)
    n = int(offsets[-1])
    y = _grouped(monkeypatch, triton_path, hidden, w13, w2, offsets, sorted_slots, k)
    assert y.shape == (t * k, h) and y.dtype == torch.bfloat16
    want = ref.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    torch.testing.assert_close(y[:n], want[:n], rtol=2e-2, atol=2e-2)
    if triton_path:  # same GEMMs, and a gather and activation bit-identical to index_select and silu * up
        torch_y = _grouped(monkeypatch, False, hidden, w13, w2, offsets, sorted_slots, k)
        assert torch.equal(y[:n], torch_y[:n])
    if HAVE_EXT and t:  # whatever the unspecified rows hold, the combined output is the reference's
        got = torch.ops.longcat.combine(y, slot_rows, weights, hidden, zero_w, True)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref.combine(want, slot_rows, weights, hidden, zero_w, True),
                                   rtol=2e-2, atol=2e-2 * SCALE)


@needs_triton
@pytest.mark.parametrize("t,k,h,share", [(40, 4, 64, "mixed"), (9, 3, 2048 + 24, "mixed"), (12, 2, 5000, "none"),
                                         (12, 2, 40, "all"), (0, 2, 40, "mixed")])
def test_gather_expert_rows(t, k, h, share):
    from longcat_service.kernels.moe_gather import gather_expert_rows, gather_expert_rows_reference

    hidden, _, _, offsets, sorted_slots, *_ = _routed(t, 8, 4, k, 8, 4, share, seed=h)
    hidden = torch.randn(t, h).to(torch.bfloat16).to(DEVICE)
    offsets, sorted_slots = offsets.to(DEVICE), sorted_slots.to(DEVICE)
    n = int(offsets[-1])
    got = gather_expert_rows(hidden, sorted_slots, k, offsets[-1:])
    want = gather_expert_rows_reference(hidden, sorted_slots, k)
    assert got.shape == want.shape == (t * k, h)
    assert torch.equal(got[:n], want[:n])
    for rows in (0, n // 2):  # a smaller count: only that many rows are written
        limited = gather_expert_rows(hidden, sorted_slots, k, torch.tensor([rows], dtype=torch.int32, device=DEVICE))
        assert torch.equal(limited[:rows], want[:rows])


# ---- router: bf16x3 GEMM ---------------------------------------------------------------------------------------


def _emulated_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.float() @ b.float()  # bf16 x bf16 products are exact in fp32; fp32 accumulation


def test_split_bf16x3_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 257, generator=g) * torch.exp(torch.empty(300, 257).uniform_(-30, 30, generator=g))
    w[0, :3] = torch.tensor([0.0, -0.0, 1.0])
    parts = router_mod.split_bf16x3(w)
    assert parts.shape == (900, 257) and parts.dtype == torch.bfloat16
    hi, mid, lo = parts.double().chunk(3)
    assert torch.equal(hi + mid + lo, w.double())


def _router_case(t, h=6144, e=768, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, h, generator=g) * 0.02
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    bias = torch.randn(e, generator=g) * 1e-3
    return x, w, bias


def _assert_same_routing(logits, want_logits, exact, bias, k, num_experts):
    """Same experts for every token, except where the exact (fp64) k-th and (k+1)-th scores are closer than
    the two logits' difference can move them (a softmax probability p moves by at most ~2 p max|dlogit|)."""
    # as sets: two near-equal scores inside the top k may swap places (the combine sums them either way)
    ids = ref.router_topk(logits, bias, k, SCALE, num_experts)[0].sort(-1).values
    want = ref.router_topk(want_logits, bias, k, SCALE, num_experts)[0].sort(-1).values
    differ = (ids != want).any(-1).nonzero().flatten().tolist()
    max_dlogit = float((logits.double() - want_logits.double()).abs().max())
    scores = torch.softmax(exact, -1) + bias.double()
    top = scores.topk(k + 1, dim=-1).values
    for tok in differ:
        gap = float(top[tok, k - 1] - top[tok, k])
        assert gap < 4 * float(top[tok, k - 1]) * max_dlogit + 1e-12, f"token {tok}: routing differs, gap {gap}"
    return len(differ)


def test_bf16x3_router_logits_match_fp32_on_cpu():
    x, w, bias = _router_case(256)
    exact = x.double() @ w.double().t()
    fp32 = F.linear(x.float(), w)
    split = router_mod.linear_bf16x3(x, router_mod.split_bf16x3(w), mm=_emulated_mm)
    assert split.dtype == torch.float32 and split.shape == fp32.shape
    err_fp32 = (fp32.double() - exact).abs().max().item()
    err_split = (split.double() - exact).abs().max().item()
    magnitude = (x.double().abs() @ w.double().abs().t())
    assert ((split.double() - exact).abs() / magnitude).max().item() < 2e-7  # fp32 accuracy (~2^-24 * sqrt(H))
    assert err_split <= 2 * err_fp32 + 1e-7, (err_split, err_fp32)
    assert _assert_same_routing(split, fp32, exact, bias, 12, 512) == 0


def test_router_keeps_fp32_gemm_on_cpu_and_for_decode():
    router = router_mod.TopkRouter(64, 24)
    with torch.no_grad():
        router.classifier.weight.copy_(torch.randn(24, 64))
    x = torch.randn(1000, 64).to(torch.bfloat16)
    assert not router._use_bf16x3(x)
    assert torch.equal(router(x), F.linear(x.float(), router.classifier.weight))


class _FakeCudaInput:
    """Enough of a CUDA bf16 activation for TopkRouter._use_bf16x3 (which reads only metadata)."""

    is_cuda = True
    dtype = torch.bfloat16

    def __init__(self, tokens):
        self.shape = (tokens, 64)

    def dim(self):
        return 2


def test_router_bf16x3_threshold(monkeypatch):
    if not router_mod._HAS_MM_OUT_DTYPE:
        pytest.skip("this torch has no mm with out_dtype: the router always uses the fp32 GEMM")
    router = router_mod.TopkRouter(64, 24)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("LONGCAT_ROUTER_BF16X3_MIN_TOKENS", raising=False)
    default = router_mod.router_bf16x3_min_tokens()
    assert default > 256  # decode batches (CUDA graphs up to 256 tokens) keep the fp32 GEMV
    assert router._use_bf16x3(_FakeCudaInput(default)) and not router._use_bf16x3(_FakeCudaInput(default - 1))
    monkeypatch.setenv("LONGCAT_ROUTER_BF16X3_MIN_TOKENS", "0")
    assert not router._use_bf16x3(_FakeCudaInput(100000))
    monkeypatch.setenv("LONGCAT_ROUTER_BF16X3_MIN_TOKENS", "16")
    assert router._use_bf16x3(_FakeCudaInput(16))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not router._use_bf16x3(_FakeCudaInput(4096))


def test_router_split_weight_follows_the_parameter():
    router = router_mod.TopkRouter(32, 12)
    with torch.no_grad():
        router.classifier.weight.copy_(torch.randn(12, 32))
    first = router.split_weight()
    assert router.split_weight() is first  # cached
    hi, mid, lo = first.double().chunk(3)
    assert torch.equal(hi + mid + lo, router.classifier.weight.double())
    with torch.no_grad():  # an in-place write (weight loading) bumps the version counter
        router.classifier.weight.copy_(torch.randn(12, 32))
    second = router.split_weight()
    assert second is not first
    assert torch.equal(sum(second.double().chunk(3)), router.classifier.weight.double())
    with torch.inference_mode():  # in-place writes under inference mode count too
        router.classifier.weight.mul_(2)
    third = router.split_weight()
    assert torch.equal(sum(third.double().chunk(3)), router.classifier.weight.double())
    router.classifier.weight.data = torch.randn(12, 32)  # new storage
    assert torch.equal(sum(router.split_weight().double().chunk(3)), router.classifier.weight.double())
    assert "_split_cache" not in dict(router.state_dict())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [512, 4096])
def test_bf16x3_router_on_gpu(tokens):
    if not router_mod._HAS_MM_OUT_DTYPE:
        pytest.skip("this torch has no mm with out_dtype")
    x, w, bias = _router_case(tokens, seed=tokens)
    router = router_mod.TopkRouter(w.shape[1], w.shape[0]).cuda()
    with torch.no_grad():
        router.classifier.weight.copy_(w)
    xc = x.cuda()
    assert router._use_bf16x3(xc)
    got = router(xc)
    assert not router_mod.TopkRouter._bf16x3_failed, "torch.mm(out_dtype=float32) failed on this GPU"
    assert router._split_cache is not None
    fp32 = F.linear(xc.float(), router.classifier.weight)
    exact = x.double() @ w.double().t()
    magnitude = x.double().abs() @ w.double().abs().t()
    err = ((got.cpu().double() - exact).abs() / magnitude).max().item()
    err_fp32 = ((fp32.cpu().double() - exact).abs() / magnitude).max().item()
    # fp32-class accuracy (a bf16 GEMM would be ~4e-3); tensor-core fp32 accumulation may round a little
    # worse than cuBLAS's fp32 SIMT GEMM, hence the margin over err_fp32.
    assert err < 1e-6 and err <= 16 * err_fp32 + 1e-8, f"bf16x3 {err:.3g} vs fp32 GEMM {err_fp32:.3g} (of sum |x w|)"
    _assert_same_routing(got.cpu(), fp32.cpu(), exact, bias, 12, 512)
    small = xc[:8]  # decode-sized: the fp32 GEMV, unchanged
    assert torch.equal(router(small), F.linear(small.float(), router.classifier.weight))
