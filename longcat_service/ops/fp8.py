"""Block-FP8 matmuls the layers call: one dispatch function per kind (dense linear, routed experts).

Weights: e4m3 [.., N, K] with an fp32 block scale [.., ceil(N/128), ceil(K/128)] (ops/fp8_reference.py).
`parts` (row counts) describes a weight stacked from several checkpoint tensors whose scales were kept per part
(gate + up when a part is not a whole number of 128-row blocks): that layout is not the kernels' block layout, so
it always takes the reference path. None: the standard block layout.

On CUDA, with the extension / Triton kernels present (h15k's wrappers, looked up once, guarded so either side
works alone): decode rows (<= DECODE_ROWS) stream the FP8 weight through `dense_gemv_fp8` (dequantized in
registers), more rows take a w8a8 block GEMM (dynamic per-token-group activation quantization): up to
LONGCAT_FP8_SPLITK_MAX_ROWS rows the Triton split-K GEMM (kernels/fp8_splitk.py) on the shapes where it measured
faster than cuBLAS (its SHAPE_CONFIGS), else torch's cuBLASLt blockwise scaled-mm on Hopper where it takes the
shape, else the Triton block GEMM (the same numerics up to fp32 summation order); the routed
experts take `extension.expert_ffn_fp8`, which picks its own decode / grouped-GEMM regime. Everywhere else
(CPU, unsupported shapes): the reference, i.e. dequantize to the activation dtype, then the bf16/fp32 op
(weight-only: equal to the unquantized model run on the dequantized weights). Choices use shapes, dtypes and the
build only, never device values, so they are CUDA-graph safe.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from longcat_service import envs, ops
from longcat_service.ops.fp8_reference import BLOCK, FP8_DTYPE, block_dequant, per_token_group_quant

# Rows up to which the dense linears stream the weight through dense_gemv_fp8 (which takes up to 8). Its tensor-core
# kernel (from 3 rows) costs the same at 8 rows as at 1: H200 2026-12-04 at 4 rows, us, GEMV / cuBLAS at 16 rows:
# q_a+kv_a 8.8 / 15.4, q_b 9.0 / 11.7, o_proj 18.1 / 24.4, gate_up 48.1 / 60.1, down 26.3 / 34.4. (With the FMA
# kernels alone, run 1, 8 rows lost to cuBLAS on all but q_a+kv_a.)
DECODE_ROWS = 8


def cdiv(a: int, b: int = BLOCK) -> int:
    return -(-a // b)


def standard_layout(parts: Sequence[int]) -> bool:
    """Stacking parts along N keeps the 128-row block layout iff every part but the last is whole blocks."""
    return all(rows % BLOCK == 0 for rows in parts[:-1])


def dequant(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, parts: Sequence[int] | None = None):
    """The weight in `dtype` (2-D or 3-D); `parts`: row counts of stacked parts whose scales are stacked per part."""
    if parts is None:
        return _dequant_stacked(w8, scale, dtype)
    w_parts = w8.split(list(parts), dim=-2)
    s_parts = scale.split([cdiv(rows) for rows in parts], dim=-2)
    return torch.cat([_dequant_stacked(w, s, dtype) for w, s in zip(w_parts, s_parts, strict=True)], dim=-2)


DEQUANT_CHUNK_ELEMENTS = 1 << 28  # block_dequant's fp32 temporaries: ~2 GiB at most per chunk of experts


def _dequant_stacked(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """block_dequant, a few experts at a time for 3-D weights, so that a whole layer's experts (the reference
    fallback on a GPU) never has fp32 temporaries of its full size."""
    per_item = w8.shape[-1] * w8.shape[-2]
    if w8.dim() == 2 or w8.numel() <= DEQUANT_CHUNK_ELEMENTS:
        return block_dequant(w8, scale, dtype=dtype)
    out = torch.empty(w8.shape, dtype=dtype, device=w8.device)
    step = max(1, DEQUANT_CHUNK_ELEMENTS // per_item)
    for i in range(0, w8.shape[0], step):
        out[i : i + step] = block_dequant(w8[i : i + step], scale[i : i + step], dtype=dtype)
    return out


@functools.cache
def _extension():
    """ops.extension when the build has h15k's FP8 ops and wrappers (CUDA build only), else None."""
    if ops.ACTIVE_BACKEND != "extension cpu+cuda" or not hasattr(torch.ops.longcat, "dense_gemv_fp8"):
        return None
    from longcat_service.ops import extension

    needed = ("dense_gemv_fp8", "dense_gemv_fp8_supported", "expert_ffn_fp8")
    return extension if all(hasattr(extension, name) for name in needed) else None


@functools.cache
def _w8a8_gemm():
    """kernels/fp8_gemm.w8a8_linear (torch's blockwise scaled-mm where it takes the shape, else the Triton w8a8
    GEMM), or None when the Triton module is absent."""
    try:
        from longcat_service.kernels.fp8_gemm import w8a8_linear
    except ImportError:
        return None
    return w8a8_linear


@functools.cache
def _splitk():
    """kernels/fp8_splitk (the split-K w8a8 GEMM for decode rows), or None when Triton is absent."""
    from longcat_service.kernels import triton_available

    if not triton_available():
        return None
    from longcat_service.kernels import fp8_splitk

    return fp8_splitk


def splitk_max_rows() -> int:
    """Rows up to which (above DECODE_ROWS) fp8_linear takes the split-K GEMM on CUDA: LONGCAT_FP8_SPLITK_MAX_ROWS,
    at most the kernel's row tile (fp8_splitk.MAX_ROWS); 0 = off."""
    return min(envs.LONGCAT_FP8_SPLITK_MAX_ROWS, 128)


def splitk_supported(x2: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> bool:
    """What the split-K GEMM takes (fp8_splitk.supported), Triton on. Host metadata only."""
    from longcat_service.kernels import fast_path_enabled

    module = _splitk()
    return module is not None and fast_path_enabled(x2) and module.supported(x2, w8, scale)


def splitk_wins(rows: int, w8: torch.Tensor) -> bool:
    """Whether this many rows of this weight shape take the split-K GEMM: up to splitk_max_rows() rows, and only
    where the H200 measured it faster than cuBLAS (a fp8_splitk.SHAPE_CONFIGS entry for the row tile and shape;
    its rule's default configs lost to cuBLAS on every LongCat shape)."""
    module = _splitk()
    return (DECODE_ROWS < rows <= splitk_max_rows() and module is not None
            and module.measured_config(rows, *w8.shape) is not None)


def w8a8_supported(x2: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> bool:
    """What the Triton w8a8 GEMM takes: CUDA with FP8 tensor cores (sm_89+), Triton on, x [M, K] bf16 / fp16 and
    w8 [N, K] e4m3 with unit last strides and its standard block scale. Host metadata only."""
    from longcat_service.kernels import device_capability, fast_path_enabled

    if _w8a8_gemm() is None or not fast_path_enabled(x2) or x2.dtype not in (torch.bfloat16, torch.float16):
        return False
    n, k = w8.shape
    if w8.device != x2.device or tuple(scale.shape) != (cdiv(n), cdiv(k)) or scale.dtype != torch.float32:
        return False
    if k > 1 and (x2.stride(1) != 1 or w8.stride(1) != 1):
        return False
    return device_capability(x2.device) >= (8, 9)


def quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded through the dynamic per-token-group e4m3 activation quantization, in fp32."""
    x8, x_scale = per_token_group_quant(x)
    return x8.float() * x_scale.repeat_interleave(BLOCK, dim=-1)[:, : x.shape[-1]]


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, parts: Sequence[int] | None = None,
               w8a8_reference: bool = False):
    """x [..., K] @ W^T -> [..., N] in x's dtype, W the block-FP8 weight (w8, scale).

    w8a8_reference: where the reference runs, round prefill rows (batches of more than DECODE_ROWS) through the
    activation quantization first, as the GPU prefill kernels do (w8a8_linear_ref: fp32 matmul), instead of the
    weight-only reference: a CPU model then follows the GPU's numerics (tests)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda and parts is None:
        ext = _extension()
        if x2.shape[0] <= DECODE_ROWS and ext is not None and ext.dense_gemv_fp8_supported(x2, w8, scale):
            return ext.dense_gemv_fp8(x2, w8, scale).view(*x.shape[:-1], w8.shape[0])
        if splitk_wins(x2.shape[0], w8) and splitk_supported(x2, w8, scale):
            return _splitk().w8a8_splitk_linear(x2, w8, scale).view(*x.shape[:-1], w8.shape[0])
        if w8a8_supported(x2, w8, scale):  # prefill rows, or decode rows the GEMV does not take
            return _w8a8_gemm()(x2, w8, scale).view(*x.shape[:-1], w8.shape[0])
    if w8a8_reference and x2.shape[0] > DECODE_ROWS:
        out = quant_dequant(x2) @ dequant(w8, scale, torch.float32, parts).t()
        return out.to(x.dtype).view(*x.shape[:-1], w8.shape[0])
    return F.linear(x, dequant(w8, scale, x.dtype, parts))


def fp8_expert_ffn(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k, active_experts,
                   num_active, w13_parts: Sequence[int] | None = None, w8a8_reference: bool = False):
    """ops.expert_ffn with block-FP8 expert weights (w13 [E, 2I, H], w2 [E, H, I] and their scales). On CUDA the
    extension's expert_ffn_fp8 picks decode kernel / grouped FP8 GEMM / its own fallback. w8a8_reference: as in
    fp8_linear, for batches the GPU runs through the grouped FP8 GEMM (at least 8 rows per expert on average)."""
    ext = _extension()
    if hidden.is_cuda and w13_parts is None and ext is not None:
        return ext.expert_ffn_fp8(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k,
                                  active_experts, num_active)
    if w8a8_reference and sorted_slots.shape[0] >= GROUPED_MIN_ROWS_PER_EXPERT * w13.shape[0]:
        return expert_ffn_w8a8_ref(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k,
                                   w13_parts)
    return ops.expert_ffn(hidden, dequant(w13, w13_scale, hidden.dtype, w13_parts),
                          dequant(w2, w2_scale, hidden.dtype), expert_offsets, sorted_slots, top_k)


GROUPED_MIN_ROWS_PER_EXPERT = 8  # ops/extension.py GROUPED_MM_MIN_ROWS_PER_EXPERT: the GPU's prefill regime


def expert_ffn_w8a8_ref(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k,
                        w13_parts: Sequence[int] | None = None) -> torch.Tensor:
    """The GPU prefill experts' numerics (gather, activation quantization, grouped FP8 GEMM out in hidden's dtype,
    SwiGLU in hidden's dtype, quantization, grouped FP8 GEMM), with fp32 matmuls. Unused rows are zeros."""
    out = torch.zeros(sorted_slots.numel(), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    offsets = expert_offsets.tolist()
    inter = w2.shape[-1]
    for e in range(w13.shape[0]):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        x = hidden[sorted_slots[start:end].long() // top_k]
        w13_e = dequant(w13[e], w13_scale[e], torch.float32, w13_parts)
        gate_up = (quant_dequant(x) @ w13_e.t()).to(hidden.dtype)
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out[start:end] = (quant_dequant(act) @ dequant(w2[e], w2_scale[e], torch.float32).t()).to(hidden.dtype)
    return out


def moe_forward_fp8(hidden, router_logits, correction_bias, experts, top_k, routed_scaling_factor,
                    add_identity=True):
    """ops.moe_forward with the FP8 expert weights of `experts` (layers/fp8_experts.Fp8FusedExperts)."""
    num_experts = experts.w13.shape[0]
    ids, weights, zero_weight = ops.router_topk(router_logits, correction_bias, top_k, routed_scaling_factor,
                                                num_experts)
    offsets, sorted_slots, slot_rows, active, num_active = ops.moe_align(ids, num_experts)
    expert_out = fp8_expert_ffn(hidden, experts.w13, experts.w13_scale, experts.w2, experts.w2_scale, offsets,
                                sorted_slots, top_k, active, num_active, experts.w13_parts,
                                experts.w8a8_reference)
    return ops.combine(expert_out, slot_rows, weights, hidden, zero_weight, add_identity)


__all__ = ["BLOCK", "DECODE_ROWS", "FP8_DTYPE", "cdiv", "dequant", "fp8_expert_ffn", "fp8_linear",
           "moe_forward_fp8", "quant_dequant", "splitk_max_rows", "splitk_supported", "splitk_wins", "standard_layout",
           "w8a8_supported"]
