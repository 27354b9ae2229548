"""The Triton side of moe_fp8_quant.py.

Each program quantizes BLOCK_M rows x GROUPS scale groups, laid out as BLOCK_M * GROUPS segments of 128 columns
(one (row, group) pair per tile row, a row's groups adjacent: contiguous loads). The quantization is
_fp8_gemm_triton._quant_groups and the activation _silu_mul_triton._silu_mul, the code of the unfused kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode
from longcat_service.kernels._fp8_gemm_triton import GROUP, _aot, _quant_groups
from longcat_service.kernels._silu_mul_triton import _silu_mul, _to_f32

BLOCK_M, GROUPS, NUM_WARPS = 4, 8, 4  # 32 segments: 8 KB of bf16 read per program (silu: 16 KB)


@triton.jit
def _segments(limit, K, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """This program's segments: rows, groups, columns [S, GROUP_SIZE], and the masks of the columns and the scales
    (rows at or past limit are neither read nor written)."""
    seg = tl.arange(0, BLOCK_M * GROUPS)
    rows = tl.program_id(0) * BLOCK_M + seg // GROUPS
    g = tl.program_id(1) * GROUPS + seg % GROUPS
    cols = g[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]
    row_ok = rows < limit
    return rows, g, cols, row_ok[:, None] & (cols < K), row_ok & (g < tl.cdiv(K, GROUP_SIZE))


@triton.jit
def _gather_quant_kernel(
    h_ptr, slots_ptr, num_rows_ptr, q_ptr, s_ptr, M, K, top_k, s_h, s_qm, s_sm,
    BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, MANUAL_FP8: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
):
    limit = tl.minimum(tl.load(num_rows_ptr).to(tl.int32), M)  # read on the device: no host sync
    if tl.program_id(0) * BLOCK_M < limit:  # a block of zero-expert rows does nothing
        rows, g, cols, mask, s_mask = _segments(limit, K, BLOCK_M, GROUPS, GROUP_SIZE)
        token = (tl.load(slots_ptr + rows, mask=s_mask, other=0) // top_k).to(tl.int64)
        x = tl.load(h_ptr + token[:, None] * s_h + cols, mask=mask, other=0.0)
        q, s = _quant_groups(_to_f32(x, MANUAL_BF16), MANUAL_FP8)
        r64 = rows.to(tl.int64)
        tl.store(q_ptr + r64[:, None] * s_qm + cols, q, mask=mask)
        tl.store(s_ptr + r64 * s_sm + g, s, mask=s_mask)


@triton.jit
def _silu_mul_quant_kernel(
    x_ptr, num_rows_ptr, q_ptr, s_ptr, M, K, s_x, s_qm, s_sm,
    BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, LIMIT_ROWS: tl.constexpr,
    LIBDEVICE_EXP: tl.constexpr, MANUAL_FP8: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    """K = I: gate columns [0, I) of x, up columns [I, 2I); the activation is rounded to x's dtype, then quantized.
    Masked columns load as zeros and silu(0) * 0 = +0, so they do not change a group's max."""
    limit = M
    if LIMIT_ROWS:
        limit = tl.minimum(tl.load(num_rows_ptr).to(tl.int32), M)
    if tl.program_id(0) * BLOCK_M < limit:
        rows, g, cols, mask, s_mask = _segments(limit, K, BLOCK_M, GROUPS, GROUP_SIZE)
        r64 = rows.to(tl.int64)
        gate_ptrs = x_ptr + r64[:, None] * s_x + cols
        gate = tl.load(gate_ptrs, mask=mask, other=0.0)
        up = tl.load(gate_ptrs + K, mask=mask, other=0.0)
        act = _silu_mul(gate, up, x_ptr.dtype.element_ty, LIBDEVICE_EXP, MANUAL_BF16)
        q, s = _quant_groups(_to_f32(act, MANUAL_BF16), MANUAL_FP8)
        tl.store(q_ptr + r64[:, None] * s_qm + cols, q, mask=mask)
        tl.store(s_ptr + r64 * s_sm + g, s, mask=s_mask)


def _grid(rows: int, k: int, block_m: int, groups: int) -> tuple[int, int]:
    return triton.cdiv(rows, block_m), triton.cdiv(triton.cdiv(k, GROUP), groups)


def launch_gather_quant(hidden, sorted_slots, top_k, num_rows, q, s, block_m=BLOCK_M, groups=GROUPS,
                        num_warps=NUM_WARPS) -> None:
    rows, k = q.shape
    interp = interpreter_mode()
    _gather_quant_kernel[_grid(rows, k, block_m, groups)](
        hidden, sorted_slots, num_rows, q, s, rows, k, top_k, hidden.stride(0), q.stride(0), s.stride(0),
        BLOCK_M=block_m, GROUPS=groups, GROUP_SIZE=GROUP, MANUAL_FP8=interp, MANUAL_BF16=interp, num_warps=num_warps,
    )


def launch_silu_mul_quant(gate_up, num_rows, q, s, block_m=BLOCK_M, groups=GROUPS, num_warps=NUM_WARPS) -> None:
    rows, inter = q.shape
    interp = interpreter_mode()
    _silu_mul_quant_kernel[_grid(rows, inter, block_m, groups)](
        gate_up, num_rows if num_rows is not None else gate_up, q, s, rows, inter, gate_up.stride(0), q.stride(0),
        s.stride(0), BLOCK_M=block_m, GROUPS=groups, GROUP_SIZE=GROUP, LIMIT_ROWS=num_rows is not None,
        LIBDEVICE_EXP=not interp, MANUAL_FP8=interp, MANUAL_BF16=interp, num_warps=num_warps,
    )


def aot_compile_gather_quant(h: int = 6144, rows: int = 49152, capability: int = 90):
    """Compile _gather_quant_kernel as launch_gather_quant() would for bf16 hidden [4096, h] (offline check)."""
    hidden = torch.empty(4096, h, dtype=torch.bfloat16)
    i32 = torch.empty(rows, dtype=torch.int32)
    values = dict(h_ptr=hidden, slots_ptr=i32, num_rows_ptr=i32, q_ptr=torch.empty(1, dtype=torch.float8_e4m3fn),
                  s_ptr=torch.empty(1), M=rows, K=h, top_k=12, s_h=h, s_qm=h, s_sm=-(-h // GROUP))
    constexprs = dict(BLOCK_M=BLOCK_M, GROUPS=GROUPS, GROUP_SIZE=GROUP, MANUAL_FP8=False, MANUAL_BF16=False)
    return _aot(_gather_quant_kernel, values, constexprs, NUM_WARPS, 1, capability)


def aot_compile_silu_mul_quant(inter: int = 2048, rows: int = 49152, capability: int = 90):
    """Compile _silu_mul_quant_kernel as launch_silu_mul_quant() would for bf16 gate_up [rows, 2 * inter]."""
    x = torch.empty(rows, 2 * inter, dtype=torch.bfloat16)
    values = dict(x_ptr=x, num_rows_ptr=torch.empty(1, dtype=torch.int32),
                  q_ptr=torch.empty(1, dtype=torch.float8_e4m3fn), s_ptr=torch.empty(1), M=rows, K=inter,
                  s_x=2 * inter, s_qm=inter, s_sm=-(-inter // GROUP))
    constexprs = dict(BLOCK_M=BLOCK_M, GROUPS=GROUPS, GROUP_SIZE=GROUP, LIMIT_ROWS=True, LIBDEVICE_EXP=True,
                      MANUAL_FP8=False, MANUAL_BF16=False)
    return _aot(_silu_mul_quant_kernel, values, constexprs, NUM_WARPS, 1, capability)
