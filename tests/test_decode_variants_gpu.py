"""The expert decode GEMV variants (LONGCAT_FFN_DECODE_KERNEL=auto|v1|v2|v3) and both router kernels (block per
token up to 64 tokens, warp per token above) against reference.py and against v1, at the real LongCat-Flash shapes
(H=6144, I=2048 and the TP-8 shard I=256) and at odd sizes that hit every remainder / scalar-load branch. All
variants run in one process: the extension reads LONGCAT_FFN_DECODE_KERNEL at every call. v3 (tensor-core GEMV, expert_ffn_v3.cuh) takes bf16 / fp16 with H
and I multiples of 8; the fp32 and odd-size cases check its fallback to v1."""

from __future__ import annotations

import pytest
import torch

import longcat_service.ops as ops
from longcat_service.ops import reference as ref
from longcat_service.ops.testing import make_router_inputs

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if ops.ACTIVE_BACKEND != "extension cpu+cuda":
    pytest.skip(f"CUDA kernels not built (ops backend: {ops.ACTIVE_BACKEND})", allow_module_level=True)

L = torch.ops.longcat
DEV = "cuda"

# (T, E, k, H, I, dtype): real shapes (SwiGLU split-K over 8 warps; down with K=2048 and K=256); sizes just
# past one K step (remainder guards); sizes that are not 16-byte rows (scalar loads); many rows per expert.
FFN_CASES = [
    (1, 16, 12, 6144, 2048, torch.bfloat16),
    (3, 16, 12, 6144, 2048, torch.bfloat16),
    (40, 16, 12, 6144, 2048, torch.bfloat16),
    (1, 32, 12, 6144, 256, torch.bfloat16),
    (64, 32, 12, 6144, 256, torch.bfloat16),
    (5, 8, 4, 2056, 1032, torch.bfloat16),
    (5, 8, 4, 2050, 1030, torch.bfloat16),
    (9, 8, 4, 2048, 1024, torch.float32),
    (9, 8, 4, 200, 40, torch.float32),
    # v3 tiles: fp16; partial column tiles (I=96 / 40, H=200); K of 2 steps (8 K-split warps, 6 of them empty);
    # a batch of 256 (>8 rows per expert: several passes); empty batch.
    (7, 12, 6, 6144, 256, torch.float16),
    (9, 8, 4, 200, 96, torch.bfloat16),
    (3, 6, 4, 200, 40, torch.bfloat16),
    (1, 4, 2, 64, 32, torch.bfloat16),
    (256, 64, 12, 1024, 512, torch.bfloat16),
    (0, 8, 4, 256, 128, torch.bfloat16),
]


def _ffn_inputs(t, e, k, h, i, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(t, h, device=DEV, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, device=DEV, generator=g) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device=DEV, generator=g) / i**0.5).to(dtype)
    ids = torch.randint(0, e, (t, k), device=DEV, generator=g, dtype=torch.int32)
    return hidden, w13, w2, ids


@pytest.mark.parametrize("variant", ["v2", "v3"])
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-H{c[3]}-I{c[4]}-{c[5]}")
def test_expert_ffn_variant_matches_reference_and_v1(case, variant, monkeypatch):
    t, e, k, h, i, dtype = case
    hidden, w13, w2, ids = _ffn_inputs(*case, seed=t * 31 + h)
    offsets, sorted_slots, _, active, num_active = L.moe_align(ids, e)
    want = ref.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    monkeypatch.setenv("LONGCAT_FFN_DECODE_KERNEL", "v1")
    v1 = L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k, active, num_active)
    monkeypatch.setenv("LONGCAT_FFN_DECODE_KERNEL", variant)
    got = L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k, active, num_active)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got, v1, **tol)
    # Without the align outputs the kernel walks all experts: same result (v3 picks its K split from the bound on
    # active experts, so the fp32 summation order, hence the last bf16 bit, may differ).
    walk_all = L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    torch.testing.assert_close(walk_all, got, **({"rtol": 0, "atol": 0} if variant == "v2" else tol))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expert_ffn_v3_rows_and_zero_experts(dtype, monkeypatch):
    """v3 at batch 1 (one row per expert, the ~8-expert grid), with some and with all slots on zero experts
    (ids >= E: no rows, num_active 0), and rows past the last real row left zero."""
    monkeypatch.setenv("LONGCAT_FFN_DECODE_KERNEL", "v3")
    e, k, h, i = 24, 12, 6144, 2048
    hidden, w13, w2, ids = _ffn_inputs(3, e, k, h, i, dtype, seed=11)
    ids[0] = torch.arange(k, device=DEV, dtype=torch.int32)  # token 0: 12 experts, one row each
    ids[1, : k // 2] = e + torch.arange(k // 2, device=DEV, dtype=torch.int32)  # token 1: half to zero experts
    ids[2] = e + 1  # token 2: all to zero experts
    for lo, hi in ((0, 1), (0, 3), (2, 3)):
        x, rows = hidden[lo:hi].contiguous(), ids[lo:hi].contiguous()
        offsets, sorted_slots, _, active, num_active = L.moe_align(rows, e)
        want = ref.expert_ffn(x, w13, w2, offsets, sorted_slots, k)
        got = L.expert_ffn(x, w13, w2, offsets, sorted_slots, k, active, num_active)
        assert not got.isnan().any() and (got[int(offsets[-1]):] == 0).all()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        rel = ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()
        assert rel < 1e-2, rel


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_expert_ffn_variant_in_a_cuda_graph(variant, monkeypatch):
    monkeypatch.setenv("LONGCAT_FFN_DECODE_KERNEL", variant)
    hidden, w13, w2, ids = _ffn_inputs(4, 16, 12, 6144, 256, torch.bfloat16, seed=3)
    offsets, sorted_slots, _, active, num_active = L.moe_align(ids, 16)
    args = (hidden, w13, w2, offsets, sorted_slots, 12, active, num_active)
    eager = L.expert_ffn(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = L.expert_ffn(*args)
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


def test_bad_variant_names_are_refused(monkeypatch):
    hidden, w13, w2, ids = _ffn_inputs(1, 4, 2, 64, 32, torch.bfloat16, seed=0)
    offsets, sorted_slots, _, active, num_active = L.moe_align(ids, 4)
    monkeypatch.setenv("LONGCAT_FFN_DECODE_KERNEL", "v9")
    with pytest.raises(RuntimeError, match="LONGCAT_FFN_DECODE_KERNEL"):
        L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, 2, active, num_active)


# (T, E, Z, k, zero_share, ties): the 560B router width (768), widths for each per-thread register count
# (<= 1024, <= 2048, <= 6144), exact ties, the T=64 limit and T=65 (the warp kernel, also with one warp per block
# for widths over 1536).
ROUTER_CASES = [
    (1, 512, 256, 12, "mixed", False),
    (64, 512, 256, 12, "mixed", False),
    (3, 512, 256, 12, "mixed", True),
    (5, 1300, 700, 12, "all", False),
    (2, 4096, 2048, 12, "none", False),
    (7, 20, 12, 12, "mixed", False),
    (65, 512, 256, 12, "mixed", False),
    (65, 2048, 1024, 12, "none", False),
]


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-Z{c[2]}-k{c[3]}-{c[4]}-ties{c[5]}")
def test_router_matches_reference(case):
    t, e, z, k, share, ties = case
    g = torch.Generator().manual_seed(t + e)
    logits, bias = make_router_inputs(t, e, z, zero_share=share, ties=ties, generator=g, device=DEV)
    ids, weights, zero_w = L.router_topk(logits, bias, k, 6.0, e)
    r_ids, r_weights, r_zero_w = ref.router_topk(logits, bias, k, 6.0, e)
    assert torch.equal(ids, r_ids)
    torch.testing.assert_close(weights, r_weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(zero_w, r_zero_w, rtol=1e-5, atol=1e-6)
