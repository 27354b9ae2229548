"""The ops backed by the compiled extension (torch.ops.longcat.*), with reference.py's signatures.

The dispatcher picks the CPU or CUDA kernel from the tensors' device. On CUDA, expert_ffn has two
regimes: a weight-streaming kernel for few tokens per expert (decode) and torch._grouped_mm for many
(prefill); the choice uses only T, k and E, never device values, so it is CUDA-graph safe.
expert_ffn's rows at or past expert_offsets[-1] are unspecified (the grouped-GEMM path leaves them
uninitialised); combine reads only the rows of real-expert slots.
dense_gemv runs the compiled kernel only on the shapes and layouts it takes (dense_gemv_supported), else F.linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from longcat_service.kernels import fast_path_enabled

_ops = torch.ops.longcat

# Expected rows per expert (T*k/E) at or above which a grouped GEMM beats streaming weights with
# CUDA-core FMAs (tensor cores win once each weight byte is reused by ~8+ rows).
GROUPED_MM_MIN_ROWS_PER_EXPERT = 8

# Prefill experts through the Triton grouped GEMM (kernels/grouped_gemm.py) instead of torch._grouped_mm when
# the Triton fast path is on: on the H200 it streamed the expert weights at 88-92% of the copy rate against
# torch._grouped_mm's 75-79% (benchmarks/bench_grouped_gemm.py, RESULTS.md session 4), with equal outputs.
# LONGCAT_TRITON_GROUPED_GEMM=0 (read once at import) goes back to torch._grouped_mm.
TRITON_GROUPED_GEMM = os.environ.get("LONGCAT_TRITON_GROUPED_GEMM", "1") == "1"

# dense_gemv: most rows per call (csrc/ops.h kDenseGemvMaxRows) and elements per 16-byte vector of each dtype.
DENSE_GEMV_MAX_ROWS = 8
_GEMV_VECTOR_WIDTH = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 4}


def router_topk(logits, correction_bias, top_k, routed_scaling_factor, num_experts):
    return _ops.router_topk(logits, correction_bias, top_k, float(routed_scaling_factor), num_experts)


def moe_align(topk_ids, num_experts):
    return _ops.moe_align(topk_ids, num_experts)


def _use_grouped_mm(hidden: torch.Tensor, w13: torch.Tensor, num_slots: int) -> bool:
    if not hidden.is_cuda or hidden.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    if torch.cuda.get_device_capability(hidden.device) < (9, 0):
        return False
    if hidden.shape[-1] % 8 or w13.shape[1] % 16:  # 16-byte row alignment for the grouped GEMM
        return False
    return num_slots >= GROUPED_MM_MIN_ROWS_PER_EXPERT * w13.shape[0]


def _expert_ffn_grouped_mm(hidden, w13, w2, expert_offsets, sorted_slots, top_k):
    """Prefill path: gather rows into expert order, two grouped GEMMs (bf16, fp32 accumulate), SwiGLU.

    Rows at or past expert_offsets[-1] (as many as zero-expert slots) belong to no group: _grouped_mm does
    not write them and no real row depends on them, so they are left as they are (the op's contract:
    unspecified; combine never reads them). With Triton, the gather and the activation skip them too (the
    count is read on the device, so there is no host sync), and with TRITON_GROUPED_GEMM so do the two GEMMs.
    """
    ends = expert_offsets[1:]
    if fast_path_enabled(hidden):
        from longcat_service.kernels.moe_gather import gather_expert_rows
        from longcat_service.kernels.silu_mul import silu_and_mul

        num_rows = expert_offsets[-1:]
        x = gather_expert_rows(hidden, sorted_slots, top_k, num_rows)
        if TRITON_GROUPED_GEMM:
            from longcat_service.kernels.grouped_gemm import grouped_gemm

            # a token's top-k experts are distinct: no expert has more rows than tokens (a tile-size hint only)
            offsets, max_rows = expert_offsets.to(torch.int32), hidden.shape[0]
            act = silu_and_mul(grouped_gemm(x, w13, offsets, max_rows), num_rows)
            return grouped_gemm(act, w2, offsets, max_rows)
        gate_up = torch._grouped_mm(x, w13.transpose(1, 2), offs=ends)
        act = silu_and_mul(gate_up, num_rows)
    else:
        inter = w2.shape[-1]
        tokens = torch.div(sorted_slots.clamp(min=0), top_k, rounding_mode="floor")
        x = hidden.index_select(0, tokens)
        gate_up = torch._grouped_mm(x, w13.transpose(1, 2), offs=ends)
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    return torch._grouped_mm(act, w2.transpose(1, 2), offs=ends)


def expert_ffn(hidden, w13, w2, expert_offsets, sorted_slots, top_k, active_experts=None, num_active=None):
    if _use_grouped_mm(hidden, w13, sorted_slots.shape[0]):
        return _expert_ffn_grouped_mm(hidden, w13, w2, expert_offsets, sorted_slots, top_k)
    return _ops.expert_ffn(hidden, w13, w2, expert_offsets, sorted_slots, top_k, active_experts, num_active)


def combine(expert_out, slot_rows, topk_weights, hidden, zero_weight, add_identity):
    return _ops.combine(expert_out, slot_rows, topk_weights, hidden, zero_weight, bool(add_identity))


def moe_forward(
    hidden,
    router_logits,
    correction_bias,
    w13,
    w2,
    top_k,
    routed_scaling_factor,
    add_identity=True,
):
    num_experts = w13.shape[0]
    ids, weights, zero_weight = router_topk(router_logits, correction_bias, top_k, routed_scaling_factor, num_experts)
    offsets, sorted_slots, slot_rows, active, num_active = moe_align(ids, num_experts)
    expert_out = expert_ffn(hidden, w13, w2, offsets, sorted_slots, top_k, active, num_active)
    return combine(expert_out, slot_rows, weights, hidden, zero_weight, add_identity)


def dense_gemv_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Inputs the compiled dense_gemv takes: x [M <= 8, K] and w [N, K] of one dtype (bf16, fp16, fp32) on one
    device, unit last strides, K a whole number of 16-byte vectors, rows starting 16-byte aligned. Reads only
    host metadata (data_ptr is an address), so a captured CUDA graph keeps the choice it was captured with."""
    vec = _GEMV_VECTOR_WIDTH.get(x.dtype)
    if vec is None or w.dtype != x.dtype or x.dim() != 2 or w.dim() != 2 or x.device != w.device:
        return False
    rows, k = x.shape
    if rows > DENSE_GEMV_MAX_ROWS or w.shape[1] != k or k % vec:
        return False
    return _rows_16b_aligned(x) and _rows_16b_aligned(w)


def _rows_16b_aligned(t: torch.Tensor) -> bool:
    unit_last = t.stride(1) == 1 or t.shape[1] <= 1
    row_stride_ok = t.shape[0] <= 1 or (t.stride(0) * t.element_size()) % 16 == 0
    return unit_last and row_stride_ok and t.data_ptr() % 16 == 0


def dense_gemv(x, w):
    if dense_gemv_supported(x, w):
        return _ops.dense_gemv(x, w)
    return F.linear(x, w)
