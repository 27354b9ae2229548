"""The compiled CPU ops (torch.ops.longcat.*) against reference.py, and reference.py against an
independent naive loop of HF semantics (longcat_service.ops.testing.naive_moe)."""

from __future__ import annotations

import pytest
import torch

import longcat_service.ops as ops
from longcat_service.ops import reference as ref
from longcat_service.ops.testing import make_expert_weights, make_router_inputs, naive_moe
from tests.extension_switch import skip_without_extension

try:
    from longcat_service import _C  # noqa: F401

    HAVE_EXT = ops.ACTIVE_BACKEND.startswith("extension")
    WHY_NOT = f"ops backend is {ops.ACTIVE_BACKEND}"
except ImportError as exc:
    HAVE_EXT, WHY_NOT = False, f"extension longcat_service._C not built ({exc}); run pip install --no-build-isolation -e ."

needs_ext = skip_without_extension(HAVE_EXT, WHY_NOT)
L = torch.ops.longcat
HIDDEN, INTER, SCALE = 48, 24, 6.0

# (T, E, Z, k, zero_share, ties, dtype): T in {0,1,7,129,1000}, E not powers of two, k in {1, 12}, Z = 0,
# all / no slots to zero experts, exact ties, bf16 and fp32.
CASES = [
    (0, 12, 6, 4, "mixed", False, torch.float32),
    (1, 12, 6, 12, "mixed", False, torch.bfloat16),
    (7, 13, 0, 1, "none", False, torch.float32),
    (7, 20, 12, 12, "all", False, torch.bfloat16),
    (7, 20, 12, 12, "none", False, torch.float32),
    (129, 12, 6, 12, "mixed", True, torch.float32),
    (129, 13, 0, 12, "none", True, torch.bfloat16),
    (129, 30, 10, 1, "mixed", False, torch.bfloat16),
    (1000, 20, 12, 12, "mixed", False, torch.bfloat16),
    (1000, 12, 6, 1, "all", False, torch.float32),
]


def _case_id(case):
    t, e, z, k, share, ties, dtype = case
    return f"T{t}-E{e}-Z{z}-k{k}-{share}{'-ties' if ties else ''}-{str(dtype).split('.')[-1]}"


def _inputs(case, seed):
    t, e, z, k, share, ties, dtype = case
    g = torch.Generator().manual_seed(seed)
    logits, bias = make_router_inputs(t, e, z, zero_share=share, ties=ties, generator=g)
    hidden = torch.randn(t, HIDDEN, generator=g).to(dtype)
    w13, w2 = make_expert_weights(e, HIDDEN, INTER, dtype, generator=g)
    return logits, bias, hidden, w13, w2


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_op_matches_reference(case):
    t, e, z, k, share, ties, dtype = case
    logits, bias, hidden, w13, w2 = _inputs(case, seed=hash(_case_id(case)) % 2**31)

    ids, weights, zero_w = L.router_topk(logits, bias, k, SCALE, e)
    r_ids, r_weights, r_zero_w = ref.router_topk(logits, bias, k, SCALE, e)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and zero_w.dtype == torch.float32
    assert torch.equal(ids, r_ids)
    torch.testing.assert_close(weights, r_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(zero_w, r_zero_w, rtol=1e-6, atol=1e-6)
    if share == "all" and t:
        assert bool((r_ids >= e).all())
    if share == "none" and t:
        assert bool((r_ids < e).all()) and not zero_w.any()

    align = L.moe_align(r_ids, e)
    r_align = ref.moe_align(r_ids, e)
    for name, got, want in zip(("offsets", "sorted_slots", "slot_rows", "active", "num_active"), align, r_align,
                               strict=True):
        assert got.dtype == torch.int32, name
        assert torch.equal(got, want), name

    offsets, sorted_slots, slot_rows, _, _ = r_align
    y = L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    r_y = ref.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    assert y.dtype == dtype and y.shape == r_y.shape
    n = int(offsets[-1])  # rows at or past it are unspecified (combine never reads them)
    torch.testing.assert_close(y[:n], r_y[:n])

    out = L.combine(r_y, slot_rows, r_weights, hidden, r_zero_w, True)
    assert torch.equal(out, ref.combine(r_y, slot_rows, r_weights, hidden, r_zero_w, True))
    no_identity = L.combine(r_y, slot_rows, r_weights, hidden, r_zero_w, False)
    assert torch.equal(no_identity, ref.combine(r_y, slot_rows, r_weights, hidden, r_zero_w, False))

    full = ops.moe_forward(hidden, logits, bias, w13, w2, k, SCALE)
    # fp32: the same math, at most another summation order; bf16: intermediates may round at other points
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(full, ref.moe_forward(hidden, logits, bias, w13, w2, k, SCALE), **tol)


@pytest.mark.parametrize(
    "case",
    [(7, 13, 0, 1, "none", False), (7, 12, 6, 4, "mixed", False), (5, 20, 12, 12, "all", False),
     (9, 12, 6, 12, "mixed", True)],
    ids=lambda c: f"T{c[0]}-E{c[1]}-Z{c[2]}-k{c[3]}-{c[4]}{'-ties' if c[5] else ''}",
)
def test_reference_matches_naive_hf_loop(case):
    t, e, z, k, share, ties = case
    logits, bias, hidden, w13, w2 = _inputs((t, e, z, k, share, ties, torch.float32), seed=7)
    want_ids, want = naive_moe(hidden, logits, bias, w13, w2, k, SCALE)
    ids, _, _ = ref.router_topk(logits, bias, k, SCALE, e)
    assert ids.tolist() == want_ids
    got = ref.moe_forward(hidden, logits, bias, w13, w2, k, SCALE)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if HAVE_EXT:
        torch.testing.assert_close(ops.moe_forward(hidden, logits, bias, w13, w2, k, SCALE).double(), want,
                                   rtol=1e-5, atol=1e-5)


def test_naive_loop_sees_ties_resolved_to_lower_index():
    # Two experts with equal top probability: the lower index must be chosen first.
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0]])
    ids, _ = naive_moe(torch.ones(1, 2), logits, torch.zeros(4), torch.zeros(4, 2, 2), torch.zeros(4, 2, 1), 2, 1.0)
    assert ids == [[1, 3]]
    assert ref.router_topk(logits, torch.zeros(4), 2, 1.0, 4)[0].tolist() == [[1, 3]]


@needs_ext
def test_router_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 2.0]])
    ids, weights, zero_w = L.router_topk(logits, torch.zeros(7), 5, 2.0, 5)
    assert ids.tolist() == [[1, 2, 4, 5, 6]]
    probs = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(weights[0], probs[[1, 2, 4, 5, 6]] * 2.0)
    torch.testing.assert_close(zero_w, (probs[5] + probs[6]).reshape(1) * 2.0)


@needs_ext
def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    ids, weights, _ = L.router_topk(logits, torch.tensor([0.0, 0.0, 1.0]), 1, 1.0, 3)
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(weights, torch.softmax(logits, -1)[:, 2:])


@needs_ext
def test_align_keeps_slot_order_within_expert():
    ids = torch.tensor([[3, 1], [1, 9], [3, 1]], dtype=torch.int32)  # E=5; 9 is a zero expert
    offsets, sorted_slots, slot_rows, active, num_active = L.moe_align(ids, 5)
    assert offsets.tolist() == [0, 0, 3, 3, 5, 5]
    assert sorted_slots.tolist() == [1, 2, 5, 0, 4, -1]
    assert slot_rows.tolist() == [3, 0, 1, -1, 4, 2]
    assert active.tolist() == [1, 3, -1, -1, -1] and num_active.tolist() == [2]


@needs_ext
def test_opcheck_every_op():
    g = torch.Generator().manual_seed(3)
    logits, bias = make_router_inputs(5, 7, 3, generator=g)
    hidden = torch.randn(5, 16, generator=g)
    w13, w2 = make_expert_weights(7, 16, 8, torch.float32, generator=g)
    ids, weights, zero_w = L.router_topk(logits, bias, 3, SCALE, 7)
    offsets, sorted_slots, slot_rows, active, num_active = L.moe_align(ids, 7)
    y = L.expert_ffn(hidden, w13, w2, offsets, sorted_slots, 3)
    torch.library.opcheck(L.router_topk.default, (logits, bias, 3, SCALE, 7))
    torch.library.opcheck(L.moe_align.default, (ids, 7))
    torch.library.opcheck(L.expert_ffn.default, (hidden, w13, w2, offsets, sorted_slots, 3))
    torch.library.opcheck(L.combine.default, (y, slot_rows, weights, hidden, zero_w, True))


@needs_ext
@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: L.router_topk(torch.zeros(2, 8), torch.zeros(7), 2, 1.0, 4), "correction_bias"),
        (lambda: L.router_topk(torch.zeros(2, 8), torch.zeros(8), 9, 1.0, 4), "top_k"),
        (lambda: L.router_topk(torch.zeros(8), torch.zeros(8), 2, 1.0, 4), "logits"),
        (lambda: L.moe_align(torch.zeros(2, 2), 4), "topk_ids"),
        (lambda: L.moe_align(torch.full((1, 2), -1, dtype=torch.int32), 4), "topk_ids"),
        (lambda: L.expert_ffn(torch.zeros(2, 8), torch.zeros(3, 6, 8), torch.zeros(3, 8, 4),
                              torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 2), "w13"),
        (lambda: L.expert_ffn(torch.zeros(2, 8), torch.zeros(3, 8, 8), torch.zeros(3, 8, 4),
                              torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 2),
         "expert_offsets"),
        (lambda: L.combine(torch.zeros(4, 8), torch.zeros(3, dtype=torch.int32), torch.zeros(2, 2),
                           torch.zeros(2, 8), torch.zeros(2), True), "slot_rows"),
    ],
)
def test_bad_input_names_the_field(call, field):
    with pytest.raises(RuntimeError, match=field):
        call()
