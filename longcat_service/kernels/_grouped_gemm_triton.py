"""The Triton side of grouped_gemm.py.

One program per (N tile, expert): grid (cdiv(N, BLOCK_N), E), axis 0 fastest, so the programs running at one
time share a few experts and each expert's x rows are read from HBM about once (later N tiles hit L2). A
program walks its expert's rows in BLOCK_M tiles; each tile runs the whole K loop over the program's weight
tile w[e, n0:n0+BLOCK_N, :] (software-pipelined, num_stages deep). With BLOCK_M >= the rows of most experts
the weights are streamed from HBM once. SPLIT_TAIL: the last tile of an expert runs BLOCK_M // 2 rows when
they suffice (half the tensor-core work for the ~half of experts at <= BLOCK_M // 2 rows).

Loads: plain masked pointer loads (any 16-byte-compatible layout), or TMA (TensorDescriptor; x as [R, K],
w as [E*N, K]) whose out-of-bounds reads return zeros. Rows of a TMA x tile past the expert's end belong to
the next expert (or are zero past R): they only feed accumulator rows that the masked store drops, as do
weight rows past N of a partial last N tile. The store is always a masked pointer store (rows past the
expert's end belong to another program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode
from longcat_service.kernels._silu_mul_triton import _round, _to_f32

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - triton < 3.4
    TensorDescriptor = None


@triton.jit
def _k_step(
    acc, x_ptrs, w_ptrs, x_desc, w_desc, row0, w_row0, k0, K, row_ok, col_ok, ks,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr, MANUAL_BF16: tl.constexpr, IEEE: tl.constexpr,
):
    """acc += x[rows, k0 : k0 + BLOCK_K] @ w[cols, k0 : k0 + BLOCK_K]^T."""
    if TMA:
        a = x_desc.load([row0, k0])
        b = w_desc.load([w_row0, k0])
    else:
        if EVEN_K:
            a = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
            if EVEN_N:
                b = tl.load(w_ptrs + k0)
            else:
                b = tl.load(w_ptrs + k0, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + ks) < K
            a = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    if MANUAL_BF16:  # the interpreter's dot multiplies bf16 as raw uint16 bits: upcast exactly first
        acc = tl.dot(_to_f32(a, MANUAL_BF16), tl.trans(_to_f32(b, MANUAL_BF16)), acc, input_precision="ieee")
    elif IEEE:  # fp32 inputs: true fp32 products (tl.dot's default for fp32 is tf32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _tile(
    x_ptr, w_ptr, y_ptr, x_desc, w_desc, row0, row_end, expert, n0, N, K, s_xm, s_we, s_wn, s_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr, MANUAL_BF16: tl.constexpr,
    IEEE: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """y[row0 : min(row0 + BLOCK_M, row_end), n0 : n0 + BLOCK_N] = x[rows] @ w[expert, cols]^T (fp32 accumulate)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * s_xm + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * s_we + cols.to(tl.int64)[:, None] * s_wn + ks[None, :]
    w_row0 = expert * N + n0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_WHILE:  # Triton's CPU interpreter cannot take runtime values as range() bounds
        k0 = 0
        while k0 < K:
            acc = _k_step(acc, x_ptrs, w_ptrs, x_desc, w_desc, row0, w_row0, k0, K, row_ok, col_ok, ks,
                          EVEN_K, EVEN_N, TMA, MANUAL_BF16, IEEE)
            k0 += BLOCK_K
    else:  # a for loop, so that the compiler software-pipelines the loads (num_stages)
        for k0 in range(0, K, BLOCK_K):
            acc = _k_step(acc, x_ptrs, w_ptrs, x_desc, w_desc, row0, w_row0, k0, K, row_ok, col_ok, ks,
                          EVEN_K, EVEN_N, TMA, MANUAL_BF16, IEEE)
    out = _round(acc, y_ptr.dtype.element_ty, MANUAL_BF16)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * s_ym + cols[None, :]
    tl.store(y_ptrs, out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr, offs_ptr, x_desc, x_half_desc, w_desc, N, K, s_xm, s_we, s_wn, s_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_TAIL: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr, MANUAL_BF16: tl.constexpr,
    IEEE: tl.constexpr, USE_WHILE: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    expert = tl.program_id(1)
    start = tl.load(offs_ptr + expert)
    end = tl.load(offs_ptr + expert + 1)
    if end <= start:  # an expert without rows: nothing to read or write
        return
    full_end = end
    if SPLIT_TAIL:
        full_end = start + ((end - start) // BLOCK_M) * BLOCK_M
    if USE_WHILE:  # Triton's CPU interpreter cannot take device values as range() bounds
        row0 = start
        while row0 < full_end:
            _tile(x_ptr, w_ptr, y_ptr, x_desc, w_desc, row0, end, expert, n0, N, K, s_xm, s_we, s_wn, s_ym,
                  BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, TMA, MANUAL_BF16, IEEE, USE_WHILE)
            row0 += BLOCK_M
    else:
        for row0 in range(start, full_end, BLOCK_M):
            _tile(x_ptr, w_ptr, y_ptr, x_desc, w_desc, row0, end, expert, n0, N, K, s_xm, s_we, s_wn, s_ym,
                  BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, TMA, MANUAL_BF16, IEEE, USE_WHILE)
    if SPLIT_TAIL:
        if full_end < end:
            if end - full_end <= BLOCK_M // 2:
                _tile(x_ptr, w_ptr, y_ptr, x_half_desc, w_desc, full_end, end, expert, n0, N, K, s_xm, s_we, s_wn,
                      s_ym, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, TMA, MANUAL_BF16, IEEE, USE_WHILE)
            else:
                _tile(x_ptr, w_ptr, y_ptr, x_desc, w_desc, full_end, end, expert, n0, N, K, s_xm, s_we, s_wn,
                      s_ym, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, TMA, MANUAL_BF16, IEEE, USE_WHILE)


def _w_row_stride(w: torch.Tensor) -> int | None:
    """Row stride of w [E, N, K] viewed as [E*N, K], or None if the expert and row dimensions do not merge."""
    num_experts, n, _ = w.shape
    if n == 1:
        return w.stride(0)
    if num_experts > 1 and w.stride(0) != n * w.stride(1):
        return None
    return w.stride(1)


def tma_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA descriptors for x [R, K] and w viewed as [E*N, K]: 16-bit dtype, unit last stride, 16-byte aligned
    bases and row strides, and w's expert and row dimensions mergeable."""
    if TensorDescriptor is None or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    num_experts, n, k = w.shape
    if k == 0 or x.shape[0] == 0 or num_experts * n == 0:
        return False
    w_row = _w_row_stride(w)
    if x.stride(1) != 1 or w.stride(2) != 1 or w_row is None:
        return False
    elem = x.element_size()
    return (x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and (x.stride(0) * elem) % 16 == 0
            and (w_row * elem) % 16 == 0)


def launch(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, y: torch.Tensor,
           block_m: int, block_n: int, block_k: int, num_stages: int, num_warps: int,
           tma: bool, split_tail: bool) -> None:
    rows, k = x.shape
    num_experts, n, _ = w.shape
    interp = interpreter_mode()
    use_tma = tma and tma_supported(x, w)
    if use_tma:
        x_desc = TensorDescriptor(x, [rows, k], [x.stride(0), 1], [block_m, block_k])
        # the half tile of split_tail loads [block_m // 2, block_k] boxes: a descriptor of its own
        x_half_desc = TensorDescriptor(x, [rows, k], [x.stride(0), 1], [block_m // 2, block_k]) if split_tail else None
        w_desc = TensorDescriptor(w, [num_experts * n, k], [_w_row_stride(w), 1], [block_n, block_k])
    else:
        x_desc = x_half_desc = w_desc = None
    grid = (triton.cdiv(n, block_n), num_experts)
    _grouped_gemm_kernel[grid](
        x, w, y, expert_offsets, x_desc, x_half_desc, w_desc, n, k, x.stride(0), w.stride(0), w.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_TAIL=split_tail,
        EVEN_K=k % block_k == 0, EVEN_N=n % block_n == 0, TMA=use_tma,
        MANUAL_BF16=interp, IEEE=x.dtype == torch.float32, USE_WHILE=interp,
        num_stages=num_stages, num_warps=num_warps,
    )


def aot_compile(config, n: int, k: int, dtype: torch.dtype = torch.bfloat16, rows: int = 32768,
                num_experts: int = 512, capability: int = 90):
    """Compile the kernel as launch() would specialise it for x [rows, k] and w [num_experts, n, k], for a CUDA
    GPU of this compute capability, without a GPU (triton.compile; ptxas ships with triton). An offline check
    of the GPU path, which the CPU interpreter does not compile. Needs TRITON_INTERPRET unset at import (else
    the kernel is an interpreter function). Returns triton's CompiledKernel (metadata.shared, asm["ttgir"])."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    x = torch.empty(rows, k, dtype=dtype)  # CPU stand-ins: specialisation reads dtype, alignment and strides
    w_rows = torch.empty(64, k, dtype=dtype)
    use_tma = config.tma and tma_supported(x, w_rows.view(1, 64, k))  # launch()'s test (contiguous tensors)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    values = dict(x_ptr=x, w_ptr=x, y_ptr=x, offs_ptr=torch.empty(num_experts + 1, dtype=torch.int32),
                  x_desc=None, x_half_desc=None, w_desc=None, N=n, K=k, s_xm=k, s_we=n * k, s_wn=k, s_ym=n)
    if use_tma:
        values["x_desc"] = TensorDescriptor(x, [rows, k], [k, 1], [bm, bk])
        if config.split_tail:
            values["x_half_desc"] = TensorDescriptor(x, [rows, k], [k, 1], [bm // 2, bk])
        values["w_desc"] = TensorDescriptor(w_rows, [num_experts * n, k], [k, 1], [bn, bk])
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_TAIL=config.split_tail, EVEN_K=k % bk == 0,
                      EVEN_N=n % bn == 0, TMA=use_tma, MANUAL_BF16=False, IEEE=dtype == torch.float32,
                      USE_WHILE=False)
    fn = _grouped_gemm_kernel
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or values[name] is None:
            constexprs.setdefault(name, None)
            signature[name] = "constexpr"
            continue
        ty, key = native_specialize_impl(BaseBackend, values[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # an int equal to 1 is specialised to a constant
            constexprs[name] = values[name]
        if key == "D":  # divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
