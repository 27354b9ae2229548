"""The ops backed by the compiled extension (torch.ops.longcat.*), with reference.py's signatures.

The dispatcher picks the CPU or CUDA kernel from the tensors' device. On CUDA, expert_ffn has two
regimes: a weight-streaming kernel for few tokens per expert (decode) and a grouped GEMM for many (prefill: our
Triton kernel, or torch._grouped_mm without Triton); the choice uses only T, k and E, never device values, so it is CUDA-graph safe.
expert_ffn's rows at or past expert_offsets[-1] are unspecified (the grouped-GEMM path leaves them
uninitialised); combine reads only the rows of real-expert slots.
dense_gemv runs the compiled kernel only on the shapes and layouts it takes (dense_gemv_supported), else F.linear.
Block FP8 (spec: ops/fp8_reference.py): dense_gemv_fp8 and expert_ffn_fp8 run the compiled decode kernels where they
take the inputs (*_supported; decode experts: or the Triton w8a16 kernel where fp8_decode_expert_kernel picks it),
prefill experts go to the Triton grouped FP8 GEMM, anything else to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longcat_service import envs
from longcat_service.kernels import device_capability, fast_path_enabled
from longcat_service.ops import fp8_reference

_ops = torch.ops.longcat

# Expected rows per expert (T*k/E) at or above which a grouped GEMM beats streaming weights with
# CUDA-core FMAs (tensor cores win once each weight byte is reused by ~8+ rows).
GROUPED_MM_MIN_ROWS_PER_EXPERT = 8

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
    if device_capability(hidden.device) < (9, 0):
        return False
    if hidden.shape[-1] % 8 or w13.shape[1] % 16:  # 16-byte row alignment for the grouped GEMM
        return False
    return num_slots >= GROUPED_MM_MIN_ROWS_PER_EXPERT * w13.shape[0]


def _expert_ffn_grouped_mm(hidden, w13, w2, expert_offsets, sorted_slots, top_k):
    """Prefill path: gather rows into expert order, two grouped GEMMs (bf16, fp32 accumulate), SwiGLU.

    Rows at or past expert_offsets[-1] (as many as zero-expert slots) belong to no group: no GEMM writes them and
    no real row depends on them, so they are left as they are (the op's contract: unspecified; combine never reads
    them). With Triton, the row gather, our grouped GEMM (kernels/grouped_gemm.py) and the activation skip them
    (the count is read on the device, so there is no host sync): on the H200 the grouped GEMM streamed the expert
    weights at 88-92% of the copy rate against torch._grouped_mm's 75-79% (RESULTS.md session 4; a 4096-token
    prefill at 53.9% vs 49.2% of the matmul rate), with equal outputs. Without Triton: torch._grouped_mm.
    """
    if fast_path_enabled(hidden):
        from longcat_service.kernels.grouped_gemm import grouped_gemm
        from longcat_service.kernels.moe_gather import gather_expert_rows
        from longcat_service.kernels.silu_mul import silu_and_mul

        num_rows = expert_offsets[-1:]
        x = gather_expert_rows(hidden, sorted_slots, top_k, num_rows)
        # a token's top-k experts are distinct: no expert has more rows than tokens (a tile-size hint only)
        offsets, max_rows = expert_offsets.to(torch.int32), hidden.shape[0]
        act = silu_and_mul(grouped_gemm(x, w13, offsets, max_rows), num_rows)
        return grouped_gemm(act, w2, offsets, max_rows)
    ends = expert_offsets[1:]
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


# ---- block FP8 weights ------------------------------------------------------------------------------------------

FP8_DTYPE = torch.float8_e4m3fn


def _has_kernel(op: str, t: torch.Tensor) -> bool:
    """Does the built extension register longcat::op for t's device (a CPU-only build has no CUDA kernels)?"""
    key = "CUDA" if t.is_cuda else "CPU"
    return hasattr(_ops, op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"longcat::{op}", key)


def _fp8_scale_ok(w8: torch.Tensor, scale: torch.Tensor) -> bool:
    n, k = w8.shape[-2:]
    want = (*w8.shape[:-2], -(-n // 128), -(-k // 128))
    return (w8.dtype == FP8_DTYPE and scale.dtype == torch.float32 and tuple(scale.shape) == want
            and scale.device == w8.device)


def dense_gemv_fp8_supported(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> bool:
    """Inputs the compiled dense_gemv_fp8 takes: x [M <= 8, K] and w8 e4m3 [N, K] with its fp32 block scale on one
    device, unit last strides. On CUDA also: x bf16, K a multiple of 16 (whole 16-byte weight vectors; a
    partial last 128-block is fine), x and w8 rows starting 16-byte aligned. Host metadata only (graph-safe)."""
    if x.dim() != 2 or w8.dim() != 2 or x.device != w8.device or not _fp8_scale_ok(w8, scale):
        return False
    rows, k = x.shape
    if rows > DENSE_GEMV_MAX_ROWS or w8.shape[1] != k or x.dtype not in _GEMV_VECTOR_WIDTH:
        return False
    if (k > 1 and (x.stride(1) != 1 or w8.stride(1) != 1)) or not _has_kernel("dense_gemv_fp8", x):
        return False
    if not x.is_cuda:
        return True
    return x.dtype == torch.bfloat16 and k % 16 == 0 and _rows_16b_aligned(x) and _rows_16b_aligned(w8)


def dense_gemv_fp8(x, w8, scale):
    """x [M, K] @ dequant(w8, scale)^T -> [M, N] in x's dtype (weight-only FP8, fp32 accumulation)."""
    if dense_gemv_fp8_supported(x, w8, scale):
        return _ops.dense_gemv_fp8(x, w8, scale)
    return fp8_reference.fp8_linear_ref(x, w8, scale)


def expert_ffn_fp8_supported(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Shapes the compiled expert_ffn_fp8 takes (the scales are checked by the op): on CUDA bf16 hidden, H and
    I multiples of 16 and 16-byte aligned bases; on CPU any (the CPU op dequantizes)."""
    if not _has_kernel("expert_ffn_fp8", hidden) or w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        return False
    if not hidden.is_cuda:
        return True
    h, i = hidden.shape[-1], w2.shape[-1]
    aligned = all(t.data_ptr() % 16 == 0 for t in (hidden, w13, w2))
    return hidden.dtype == torch.bfloat16 and h % 16 == 0 and i % 16 == 0 and aligned


def _use_grouped_fp8(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, num_slots: int) -> bool:
    """Prefill experts through the Triton grouped FP8 GEMM: many rows per expert, FP8 tensor cores (sm_89+)."""
    if not hidden.is_cuda or hidden.dtype != torch.bfloat16 or not fast_path_enabled(hidden):
        return False
    if device_capability(hidden.device) < (8, 9):
        return False
    if hidden.shape[-1] % 16 or w2.shape[-1] % 16:  # 16-byte fp8 rows for TMA / vector loads
        return False
    return num_slots >= GROUPED_MM_MIN_ROWS_PER_EXPERT * w13.shape[0]


def _expert_ffn_grouped_fp8(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k):
    """Prefill path, w8a8: gather rows into expert order and quantize them per token-group (one fused pass),
    grouped FP8 GEMM (gate_up), SwiGLU and quantize (one fused pass), grouped FP8 GEMM (down); each GEMM with the
    config measured fastest at its shape. Rows at or past expert_offsets[-1] are unspecified (as expert_ffn)."""
    from longcat_service.kernels.fp8_gemm import grouped_gemm_fp8, prefill_expert_configs
    from longcat_service.kernels.moe_fp8_quant import gather_quant_fp8, silu_mul_quant_fp8

    num_rows = expert_offsets[-1:]
    offsets, max_rows = expert_offsets.to(torch.int32), hidden.shape[0]
    gate_up_config, down_config = prefill_expert_configs(hidden.shape[0])
    x8, x_scale = gather_quant_fp8(hidden, sorted_slots, top_k, num_rows)
    gate_up = grouped_gemm_fp8(x8, x_scale, w13, w13_scale, offsets, max_rows, out_dtype=hidden.dtype,
                               config=gate_up_config)
    act8, act_scale = silu_mul_quant_fp8(gate_up, num_rows)
    return grouped_gemm_fp8(act8, act_scale, w2, w2_scale, offsets, max_rows, out_dtype=hidden.dtype,
                            config=down_config)


# Decode batches (tokens a step) from which FP8 experts take the Triton w8a16 kernel (kernels/fp8_expert_decode.py:
# each active expert's weights read once for all of its rows) instead of the CUDA expert_ffn_fp8 (2-row FMA passes;
# the tensor-core expert_ffn_fp8_mma.cuh for narrow experts), up to the grouped-GEMM regime. H200, 2026-12-03,
# `python benchmarks/bench_fp8_kernels.py --sections experts --reps 20` (LongCat routing, E = 512, H = 6144): I = 2048
# B = 64: Triton 3216 us (0.90 of the byte floor) vs CUDA 4216 (0.69), B = 128 4988 vs 7621, B = 256 5814 vs 14011;
# below 16 tokens CUDA is as fast or faster (B = 8 668 vs 743). I = 256 (a TP8 shard): Triton from 8 tokens (115 vs
# 154 us; B = 2 62 vs 45).
TRITON_FP8_DECODE_MIN_TOKENS_WIDE = 16
TRITON_FP8_DECODE_MIN_TOKENS_NARROW = 8
TRITON_FP8_DECODE_WIDE_INTER = 1024


def fp8_decode_expert_kernel(tokens: int, inter: int) -> str:
    """'triton' or 'cuda': which decode kernel runs FP8 experts of width `inter` for `tokens` tokens (host values
    only: fixed per captured CUDA graph). LONGCAT_FP8_EXPERT_KERNEL=triton|cuda forces one (temporary)."""
    forced = envs.LONGCAT_FP8_EXPERT_KERNEL
    if forced != "auto":
        return forced
    wide = inter >= TRITON_FP8_DECODE_WIDE_INTER
    min_tokens = TRITON_FP8_DECODE_MIN_TOKENS_WIDE if wide else TRITON_FP8_DECODE_MIN_TOKENS_NARROW
    return "triton" if tokens >= min_tokens else "cuda"


def _use_triton_fp8_decode(hidden, w13, w13_scale, w2, w2_scale) -> bool:
    from longcat_service.kernels import fp8_expert_decode

    if not fast_path_enabled(hidden) or fp8_decode_expert_kernel(hidden.shape[0], w2.shape[-1]) != "triton":
        return False
    if device_capability(hidden.device) < (8, 9):  # e4m3 in Triton
        return False
    return fp8_expert_decode.supported(hidden, w13, w2, w13_scale, w2_scale)


def expert_ffn_fp8(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k, active_experts=None,
                   num_active=None):
    """expert_ffn with block-FP8 expert weights. Decode (few rows per expert): the compiled weight-only kernel, or
    the Triton w8a16 one where fp8_decode_expert_kernel picks it; prefill (many rows per expert, CUDA): w8a8
    through the Triton grouped FP8 GEMM; shapes none takes: the weights dequantized to hidden's dtype, then
    expert_ffn (tiny test models only: that copies every expert)."""
    if _use_grouped_fp8(hidden, w13, w2, sorted_slots.shape[0]):
        return _expert_ffn_grouped_fp8(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k)
    if _use_triton_fp8_decode(hidden, w13, w13_scale, w2, w2_scale):
        from longcat_service.kernels.fp8_expert_decode import expert_ffn_fp8_decode

        return expert_ffn_fp8_decode(hidden, w13, w13_scale, w2, w2_scale, expert_offsets.to(torch.int32),
                                     sorted_slots.to(torch.int32), top_k, active_experts, num_active)
    if expert_ffn_fp8_supported(hidden, w13, w2):
        return _ops.expert_ffn_fp8(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k,
                                   active_experts, num_active)
    w13_d = fp8_reference.block_dequant(w13, w13_scale, dtype=hidden.dtype)
    w2_d = fp8_reference.block_dequant(w2, w2_scale, dtype=hidden.dtype)
    return expert_ffn(hidden, w13_d, w2_d, expert_offsets, sorted_slots, top_k, active_experts, num_active)
