"""ops/reference.py contract details not covered by the op comparisons (tests/test_ops.py): the results and their
dtypes do not depend on torch's default dtype (a caller may build or run a bf16 model under a bf16 default, as
transformers does while it builds one), and dense_gemv returns the input's dtype."""

from __future__ import annotations

import pytest
import torch

from longcat_service.ops import reference as ref
from longcat_service.ops.testing import make_expert_weights, make_router_inputs

T, E, Z, K, H, INTER = 300, 10, 4, 6, 16, 8  # 1800 slots: counts and rows past what bf16 holds exactly (256)


def make_inputs():
    g = torch.Generator().manual_seed(0)
    logits, bias = make_router_inputs(T, E, Z, zero_share="mixed", ties=False, generator=g)
    hidden = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w13, w2 = make_expert_weights(E, H, INTER, torch.bfloat16, generator=g)
    return logits, bias, hidden, w13, w2


def run_all(logits, bias, hidden, w13, w2):
    ids, weights, zero_weight = ref.router_topk(logits, bias, K, 6.0, E)
    align = ref.moe_align(ids, E)
    expert_out = ref.expert_ffn(hidden, w13, w2, align[0], align[1], K)
    out = ref.combine(expert_out, align[2], weights, hidden, zero_weight, True)
    return (ids, weights, zero_weight, *align, expert_out, out)


def test_results_do_not_depend_on_the_default_dtype():
    inputs = make_inputs()
    want = run_all(*inputs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = run_all(*inputs)
    finally:
        torch.set_default_dtype(previous)
    assert int(want[3][-1]) > 256  # expert offsets past bf16's exact integers
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert want[0].dtype == torch.int32 and [t.dtype for t in want[3:8]] == [torch.int32] * 5
    assert want[-1].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dense_gemv_returns_the_input_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 64, generator=g).to(dtype), torch.randn(40, 64, generator=g).to(dtype)
    out = ref.dense_gemv(x, w)
    assert out.dtype == dtype and out.shape == (3, 40)
    exact = x.double() @ w.double().t()
    torch.testing.assert_close(out.double(), exact, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


def test_router_topk_of_no_tokens():
    logits, bias = torch.zeros(0, E + Z), torch.zeros(E + Z)
    ids, weights, zero_weight = ref.router_topk(logits, bias, K, 6.0, E)
    assert (ids.shape, ids.dtype, weights.shape, weights.dtype, zero_weight.shape) == (
        (0, K), torch.int32, (0, K), torch.float32, (0,))
