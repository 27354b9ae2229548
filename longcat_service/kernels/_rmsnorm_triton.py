"""The Triton side of rmsnorm.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, eps, hidden,
    s_x, s_r, s_o, s_s,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * s_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like the eager bf16 add
        tl.store(sum_ptr + row * s_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    rows, hidden = x.shape
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm: the last dimension must be contiguous")
    out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else None
    if rows == 0:
        return out, total
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out, total if total is not None else out,
        float(eps), hidden,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        total.stride(0) if total is not None else 0,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=8 if block >= 4096 else 4,
    )
    return out, total
