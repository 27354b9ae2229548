"""The Triton side of rmsnorm.py: the plain norm and the fused residual-add + norm share one row routine, so on a
GPU the fused kernel's output equals the plain kernel's on the same residual bit for bit.

In the CPU interpreter (tests) the bf16 casts go through silu_mul's exact helpers (its own casts truncate)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode
from longcat_service.kernels._silu_mul_triton import _round, _to_f32


@triton.jit
def _norm_row(xf, w_ptr, offs, mask, hidden, eps, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """xf: one row in fp32 (zeros where masked) -> weight * rmsnorm(xf) in dtype, rounded where transformers
    rounds: the normed row to dtype first, then the dtype product with the weight."""
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = _to_f32(_round(xf * rstd, dtype, MANUAL_BF16), MANUAL_BF16)
    w = _to_f32(tl.load(w_ptr + offs, mask=mask, other=0.0), MANUAL_BF16)
    return _round(normed * w, dtype, MANUAL_BF16)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, eps, hidden, s_x, s_o, BLOCK: tl.constexpr, MANUAL_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    xf = _to_f32(tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0), MANUAL_BF16)
    out = _norm_row(xf, w_ptr, offs, mask, hidden, eps, out_ptr.dtype.element_ty, MANUAL_BF16)
    tl.store(out_ptr + row * s_o + offs, out, mask=mask)


@triton.jit
def _add_rounded(acc, a_ptr, offs, mask, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """round(acc + round(a)) in dtype, back in fp32: torch's `r + a.to(dtype)` (fp32 opmath, one rounding)."""
    a = _to_f32(_round(_to_f32(tl.load(a_ptr + offs, mask=mask, other=0.0), MANUAL_BF16), dtype, MANUAL_BF16),
                MANUAL_BF16)
    return _to_f32(_round(acc + a, dtype, MANUAL_BF16), MANUAL_BF16)


@triton.jit
def _fused_add_rms_norm_kernel(
    res_ptr, a_ptr, b_ptr, w_ptr, out_ptr, out32_ptr, eps, hidden, s_r, s_a, s_b, s_o, s_o32,
    BLOCK: tl.constexpr, HAS_B: tl.constexpr, WRITE_F32: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    """residual = (residual + a) [+ b], each sum rounded to the residual's dtype, stored in place; out = norm of
    it (and its exact fp32 copy when WRITE_F32)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    dtype: tl.constexpr = res_ptr.dtype.element_ty
    acc = _to_f32(tl.load(res_ptr + row * s_r + offs, mask=mask, other=0.0), MANUAL_BF16)
    acc = _add_rounded(acc, a_ptr + row * s_a, offs, mask, dtype, MANUAL_BF16)
    if HAS_B:
        acc = _add_rounded(acc, b_ptr + row * s_b, offs, mask, dtype, MANUAL_BF16)
    tl.store(res_ptr + row * s_r + offs, _round(acc, dtype, MANUAL_BF16), mask=mask)
    out = _norm_row(acc, w_ptr, offs, mask, hidden, eps, dtype, MANUAL_BF16)
    tl.store(out_ptr + row * s_o + offs, out, mask=mask)
    if WRITE_F32:
        tl.store(out32_ptr + row * s_o32 + offs, _to_f32(out, MANUAL_BF16), mask=mask)


def _block_and_warps(hidden: int) -> tuple[int, int]:
    block = triton.next_power_of_2(hidden)
    return block, 8 if block >= 4096 else 4  # the fused kernel must use the plain one's tile (same reduction)


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows, hidden = x.shape
    if x.stride(-1) != 1:
        raise ValueError("rms_norm: the last dimension must be contiguous")
    out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block, warps = _block_and_warps(hidden)
    _rms_norm_kernel[(rows,)](x, weight, out, float(eps), hidden, x.stride(0), out.stride(0), BLOCK=block,
                              MANUAL_BF16=interpreter_mode(), num_warps=warps)
    return out


def launch_fused_add(residual: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor,
                     eps: float, fp32_copy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, hidden = residual.shape
    out = torch.empty(rows, hidden, dtype=residual.dtype, device=residual.device)
    out32 = torch.empty(rows, hidden, dtype=torch.float32, device=residual.device) if fp32_copy else None
    if rows == 0:
        return out, out32
    block, warps = _block_and_warps(hidden)
    b_arg = a if b is None else b
    o32_arg = out if out32 is None else out32
    _fused_add_rms_norm_kernel[(rows,)](
        residual, a, b_arg, weight, out, o32_arg, float(eps), hidden, residual.stride(0), a.stride(0),
        b_arg.stride(0), out.stride(0), o32_arg.stride(0), BLOCK=block, HAS_B=b is not None, WRITE_F32=fp32_copy,
        MANUAL_BF16=interpreter_mode(), num_warps=warps)
    return out, out32
