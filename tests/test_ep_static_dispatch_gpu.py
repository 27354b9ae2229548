"""The fixed-capacity expert-parallel exchange (EP decode steps in CUDA graphs) captured in a CUDA graph on one GPU
(world size 1: the all-to-alls are the identity, so this checks that everything around them is capture-safe, i.e.
free of host syncs and data-dependent shapes). A replay on new routing equals the eager call bit for bit and the
plain MoE within bf16 tolerance; a capacity the routing exceeds raises the overflow flag inside the graph.
NCCL cannot put two ranks on one GPU: the multi-rank capture runs in benchmarks/tp_session.sh (check_tiny_ep_graphs)."""

from __future__ import annotations

import pytest
import torch

import longcat_service.ops as ops
from longcat_service.distributed.ep_static_dispatch import FixedCapacityDispatcher, capacity_per_peer
from longcat_service.layers.moe_ep import exchange_static
from longcat_service.ops import reference as ref
from longcat_service.ops.testing import make_expert_weights, make_router_inputs

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if ops.ACTIVE_BACKEND != "extension cpu+cuda":
    pytest.skip(f"CUDA kernels not built (ops backend: {ops.ACTIVE_BACKEND})", allow_module_level=True)

DEV = "cuda"
SCALE = 6.0
E, Z, K, H, INTER = 40, 20, 12, 256, 128


def _setup(num_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits, bias = make_router_inputs(num_tokens, E, Z, generator=g, device=DEV)
    hidden = torch.randn(num_tokens, H, generator=g).to(DEV, torch.bfloat16)
    w13, w2 = make_expert_weights(E, H, INTER, torch.bfloat16, generator=g, device=DEV)
    return g, logits, bias, hidden, w13, w2


def _step(logits, bias, hidden, w13, w2, capacity):
    owner = torch.zeros(E, dtype=torch.int64, device=DEV)
    local_row = torch.arange(E, dtype=torch.int64, device=DEV)

    def local_experts(rows, local_expert):  # as layers/moe.LongcatMoE._local_experts
        offsets, sorted_slots, slot_rows, _, _ = ops.moe_align(local_expert.to(torch.int32).reshape(-1, 1), E)
        y = ops.expert_ffn(rows, w13, w2, offsets, sorted_slots, 1)
        return y.index_select(0, slot_rows.long().clamp(min=0))

    ids, weights, zero_weight = ops.router_topk(logits, bias, K, SCALE, E)
    out, slot_rows, overflow = exchange_static(hidden, ids, E, owner, local_row, K, E,
                                               FixedCapacityDispatcher(None, 1), local_experts, capacity)
    return ops.combine(out, slot_rows, weights, hidden, zero_weight, True), overflow


def _capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph, static


@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_graph_replay_of_fixed_capacity_exchange_equals_eager(num_tokens):
    g, logits, bias, hidden, w13, w2 = _setup(num_tokens, num_tokens)
    capacity = capacity_per_peer(num_tokens, 1, K)
    graph, (static_out, static_overflow) = _capture(lambda: _step(logits, bias, hidden, w13, w2, capacity))
    new_logits, _ = make_router_inputs(num_tokens, E, Z, generator=g, device=DEV)
    logits.copy_(new_logits)  # new routing and activations in the same buffers
    hidden.copy_(torch.randn(num_tokens, H, generator=g).to(DEV, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_overflow = _step(logits, bias, hidden, w13, w2, capacity)
    assert torch.equal(static_out, eager_out)
    assert not bool(static_overflow) and not bool(eager_overflow)
    torch.testing.assert_close(static_out, ref.moe_forward(hidden, logits, bias, w13, w2, K, SCALE).float(),
                               rtol=2e-2, atol=2e-2)


def test_overflow_flag_is_set_inside_the_graph():
    g, logits, bias, hidden, w13, w2 = _setup(16, 5)
    graph, (_, overflow) = _capture(lambda: _step(logits, bias, hidden, w13, w2, 2))  # 2 rows for 16 x 12 slots
    logits.copy_(make_router_inputs(16, E, Z, generator=g, device=DEV)[0])
    graph.replay()
    torch.cuda.synchronize()
    assert bool(overflow)
