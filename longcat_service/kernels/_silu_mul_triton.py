"""The Triton side of silu_mul.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode, next_pow2

try:  # CUDA's expf (libdevice __nv_expf), the exp torch's silu kernel calls; tl.exp is ex2.approx-based
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton layouts
    from triton.language.extra.cuda import libdevice

MAX_BLOCK = 2048


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even with integer ops (the CPU interpreter's cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)  # NaN stays NaN (torch's canonical quiet NaN)
    return rounded.to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_f32(x, MANUAL_BF16: tl.constexpr):
    if MANUAL_BF16 and x.dtype == tl.bfloat16:  # the interpreter's bf16 -> fp32 cast loses subnormals
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _round(x, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    if MANUAL_BF16 and dtype == tl.bfloat16:
        return _bf16_rne(x)
    else:
        return x.to(dtype)


@triton.jit
def _silu_mul(gate, up, dtype: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """silu(gate) * up rounded to dtype as eager torch does (gate, up: loaded tiles of the model dtype)."""
    gate = _to_f32(gate, MANUAL_BF16)
    up = _to_f32(up, MANUAL_BF16)
    if LIBDEVICE_EXP:
        e = libdevice.exp(-gate)
    else:  # the interpreter has no libdevice
        e = tl.exp(-gate)
    silu = tl.math.div_rn(gate, 1.0 + e)  # IEEE division, like torch (tl's `/` may lower to div.full)
    silu = _to_f32(_round(silu, dtype, MANUAL_BF16), MANUAL_BF16)  # F.silu's output dtype
    return _round(silu * up, dtype, MANUAL_BF16)  # one rounding, as torch's fp32-opmath mul


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, num_rows_ptr, inter, s_x, s_o,
    BLOCK: tl.constexpr, LIMIT_ROWS: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    if LIMIT_ROWS:  # rows at or past *num_rows_ptr (read on the device: no host sync) are left unwritten
        mask = mask & (row < tl.load(num_rows_ptr).to(tl.int64))
    gate_ptr = x_ptr + row * s_x + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0)
    up = tl.load(gate_ptr + inter, mask=mask, other=0.0)
    out = _silu_mul(gate, up, out_ptr.dtype.element_ty, LIBDEVICE_EXP, MANUAL_BF16)
    tl.store(out_ptr + row * s_o + cols, out, mask=mask)


def launch(gate_up: torch.Tensor, num_rows: torch.Tensor | None = None) -> torch.Tensor:
    rows, width = gate_up.shape
    inter = width // 2
    if gate_up.stride(-1) != 1:
        raise ValueError("silu_and_mul: the last dimension must be contiguous")
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or inter == 0:
        return out
    block = min(next_pow2(inter), MAX_BLOCK)
    interp = interpreter_mode()
    grid = (rows, triton.cdiv(inter, block))
    _silu_mul_kernel[grid](
        gate_up, out, num_rows if num_rows is not None else gate_up, inter, gate_up.stride(0), out.stride(0),
        BLOCK=block, LIMIT_ROWS=num_rows is not None, LIBDEVICE_EXP=not interp, MANUAL_BF16=interp,
        num_warps=8 if block >= 2048 else 4,
    )
    return out
