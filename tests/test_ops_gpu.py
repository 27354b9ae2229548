"""CUDA kernels of the longcat ops against reference.py (run on the GPU too), CUDA-graph capture and
replay of moe_forward, and the grouped-GEMM prefill path. Skipped without a GPU or a CUDA build."""

from __future__ import annotations

import pytest
import torch

import longcat_service.ops as ops
from longcat_service.ops import extension
from longcat_service.ops import reference as ref
from longcat_service.ops.testing import make_expert_weights, make_router_inputs

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if ops.ACTIVE_BACKEND != "extension cpu+cuda":
    pytest.skip(f"CUDA kernels not built (ops backend: {ops.ACTIVE_BACKEND})", allow_module_level=True)

L = torch.ops.longcat
DEV = "cuda"
SCALE = 6.0

# (T, E, Z, k, zero_share, ties, dtype, H, I): T in {0,1,2,3,4,7,129,1000} (T * k <= 256: moe_align's one-block path); E not powers of two; k in {1, 12};
# Z = 0; all / no slots to zero experts; exact ties; bf16 and fp32; H, I multiples of 8 (vector loads)
# and odd ones (scalar fallback).
CASES = [
    (0, 12, 6, 4, "mixed", False, torch.bfloat16, 256, 128),
    (1, 12, 6, 12, "mixed", False, torch.bfloat16, 256, 128),
    (1, 512, 256, 12, "mixed", False, torch.bfloat16, 512, 64),
    # 2 and 3-4 tokens: the expert GEMV's 2- and 4-row variants (1 token: 1 row, 5+ tokens: 8 rows)
    (2, 20, 12, 12, "mixed", False, torch.bfloat16, 256, 128),
    (3, 13, 0, 4, "none", True, torch.float32, 101, 37),
    (4, 24, 8, 12, "mixed", False, torch.bfloat16, 136, 72),
    (7, 13, 0, 1, "none", False, torch.float32, 256, 96),
    (7, 20, 12, 12, "all", False, torch.bfloat16, 256, 128),
    (7, 20, 12, 12, "none", False, torch.float32, 200, 40),
    (129, 12, 6, 12, "mixed", True, torch.float32, 136, 72),
    (129, 13, 0, 12, "none", True, torch.bfloat16, 256, 128),
    (129, 30, 10, 1, "mixed", False, torch.bfloat16, 101, 37),
    (1000, 20, 12, 12, "mixed", False, torch.bfloat16, 256, 128),
    (1000, 300, 150, 12, "mixed", False, torch.float32, 128, 64),
    (1000, 12, 6, 1, "all", False, torch.float32, 128, 64),
]


def _case_id(c):
    return f"T{c[0]}-E{c[1]}-Z{c[2]}-k{c[3]}-{c[4]}{'-ties' if c[5] else ''}-{str(c[6]).split('.')[-1]}-H{c[7]}-I{c[8]}"


def _inputs(case, seed):
    t, e, z, k, share, ties, dtype, h, i = case
    g = torch.Generator().manual_seed(seed)
    logits, bias = make_router_inputs(t, e, z, zero_share=share, ties=ties, generator=g, device=DEV)
    hidden = torch.randn(t, h, generator=g).to(DEV, dtype)
    w13, w2 = make_expert_weights(e, h, i, dtype, generator=g, device=DEV)
    return logits, bias, hidden, w13, w2


def _tol(dtype):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("ffn_kernel", ["auto", "v3"])  # v3: LONGCAT_FFN_DECODE_KERNEL=v3 (v1 for fp32 / odd sizes)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_cuda_op_matches_reference(case, ffn_kernel, monkeypatch):
    monkeypatch.setenv("LONGCAT_FFN_DECODE_KERNEL", ffn_kernel)
    t, e, z, k, share, ties, dtype, _, _ = case
    logits, bias, hidden, w13, w2 = _inputs(case, seed=len(_case_id(case)) * 7919 + t)

    ids, weights, zero_w = L.router_topk(logits, bias, k, SCALE, e)
    r_ids, r_weights, r_zero_w = ref.router_topk(logits, bias, k, SCALE, e)
    assert torch.equal(ids, r_ids)
    torch.testing.assert_close(weights, r_weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(zero_w, r_zero_w, rtol=1e-5, atol=1e-6)

    align = L.moe_align(r_ids, e)
    for name, got, want in zip(("offsets", "sorted_slots", "slot_rows", "active", "num_active"), align,
                               ref.moe_align(r_ids, e), strict=True):
        assert torch.equal(got, want), name
    offsets, sorted_slots, slot_rows, active, num_active = align

    r_y = ref.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    y = L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k, active, num_active)
    n = int(offsets[-1])  # rows at or past it are unspecified (combine never reads them)
    assert not y[:n].isnan().any()
    torch.testing.assert_close(y[:n], r_y[:n], **_tol(dtype))
    torch.testing.assert_close(L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)[:n], y[:n], rtol=0, atol=0)

    for add_identity in (True, False):
        got = L.combine(r_y, slot_rows, r_weights, hidden, r_zero_w, add_identity)
        assert torch.equal(got, ref.combine(r_y, slot_rows, r_weights, hidden, r_zero_w, add_identity))

    # y's bf16 rounding differences reach the output multiplied by a routing weight (up to SCALE).
    full = ops.moe_forward(hidden, logits, bias, w13, w2, k, SCALE)
    tol = _tol(dtype) if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2 * SCALE}
    torch.testing.assert_close(full, ref.moe_forward(hidden, logits, bias, w13, w2, k, SCALE), **tol)


def _poison_cached_blocks(nbytes: int) -> None:
    """Leave NaN-filled blocks in the caching allocator, so that the next torch.empty likely gets NaN garbage."""
    blocks = [torch.full((nbytes // 2,), float("nan"), dtype=torch.bfloat16, device=DEV) for _ in range(6)]
    del blocks


@pytest.mark.parametrize("triton_kernels", [True, False])  # gather + fused SwiGLU, or index_select + silu * up
@pytest.mark.parametrize("num_tokens", [64, 1000])
def test_grouped_mm_prefill_path_matches_reference(num_tokens, triton_kernels, monkeypatch):
    if not triton_kernels:
        monkeypatch.setenv("LONGCAT_DISABLE_TRITON", "1")
    e, z, k, h, i = 24, 12, 12, 256, 128
    g = torch.Generator().manual_seed(num_tokens)
    logits, bias = make_router_inputs(num_tokens, e, z, generator=g, device=DEV)
    hidden = torch.randn(num_tokens, h, generator=g).to(DEV, torch.bfloat16)
    w13, w2 = make_expert_weights(e, h, i, torch.bfloat16, generator=g, device=DEV)
    ids, weights, zero_w = ref.router_topk(logits, bias, k, SCALE, e)
    offsets, sorted_slots, slot_rows, _, _ = ref.moe_align(ids, e)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert extension._use_grouped_mm(hidden, w13, sorted_slots.numel())
    n = int(offsets[-1])
    assert n < sorted_slots.numel()  # zero-expert slots leave rows past the last real one
    _poison_cached_blocks(sorted_slots.numel() * 2 * max(h, 2 * i))
    got = ops.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    want = ref.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    torch.testing.assert_close(got[:n], want[:n], rtol=2e-2, atol=2e-2)  # rows from n on are unspecified
    # Whatever those rows hold (NaN from the poisoned cache, likely), nothing of them reaches the output.
    out = ops.combine(got, slot_rows, weights, hidden, zero_w, True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.combine(want, slot_rows, weights, hidden, zero_w, True),
                               rtol=2e-2, atol=2e-2 * SCALE)
    _poison_cached_blocks(sorted_slots.numel() * 2 * max(h, 2 * i))
    full = ops.moe_forward(hidden, logits, bias, w13, w2, k, SCALE)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full, ref.moe_forward(hidden, logits, bias, w13, w2, k, SCALE),
                               rtol=2e-2, atol=2e-2 * SCALE)


def test_opcheck_every_cuda_op():
    g = torch.Generator().manual_seed(5)
    logits, bias = make_router_inputs(9, 10, 6, generator=g, device=DEV)
    hidden = torch.randn(9, 64, generator=g).to(DEV, torch.bfloat16)
    w13, w2 = make_expert_weights(10, 64, 32, torch.bfloat16, generator=g, device=DEV)
    ids, weights, zero_w = L.router_topk(logits, bias, 4, SCALE, 10)
    offsets, sorted_slots, slot_rows, active, num_active = L.moe_align(ids, 10)
    y = L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, 4, active, num_active)
    torch.library.opcheck(L.router_topk.default, (logits, bias, 4, SCALE, 10))
    torch.library.opcheck(L.moe_align.default, (ids, 10))
    torch.library.opcheck(L.expert_ffn.default, (hidden, w13, w2, offsets, sorted_slots, 4, active, num_active))
    torch.library.opcheck(L.combine.default, (y, slot_rows, weights, hidden, zero_w, True))


@pytest.mark.parametrize("num_tokens", [1, 8, 300])
def test_cuda_graph_replay_of_moe_forward_equals_eager(num_tokens):
    e, z, k, h, i = 40, 20, 12, 256, 128
    g = torch.Generator().manual_seed(num_tokens)
    logits, bias = make_router_inputs(num_tokens, e, z, generator=g, device=DEV)
    hidden = torch.randn(num_tokens, h, generator=g).to(DEV, torch.bfloat16)
    w13, w2 = make_expert_weights(e, h, i, torch.bfloat16, generator=g, device=DEV)

    def step():
        return ops.moe_forward(hidden, logits, bias, w13, w2, k, SCALE)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    # New routing and activations in the same buffers: the replay must follow them (no baked-in counts).
    new_logits, _ = make_router_inputs(num_tokens, e, z, generator=g, device=DEV)
    logits.copy_(new_logits)
    hidden.copy_(torch.randn(num_tokens, h, generator=g).to(DEV, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, step())
    torch.testing.assert_close(static_out, ref.moe_forward(hidden, logits, bias, w13, w2, k, SCALE),
                               rtol=2e-2, atol=2e-2)


def test_torch_compile_traces_moe_forward():
    e, z, k, h, i = 12, 6, 4, 128, 64
    g = torch.Generator().manual_seed(11)
    logits, bias = make_router_inputs(5, e, z, generator=g, device=DEV)
    hidden = torch.randn(5, h, generator=g).to(DEV, torch.bfloat16)
    w13, w2 = make_expert_weights(e, h, i, torch.bfloat16, generator=g, device=DEV)
    compiled = torch.compile(ops.moe_forward, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, logits, bias, w13, w2, k, SCALE),
                               ops.moe_forward(hidden, logits, bias, w13, w2, k, SCALE))
