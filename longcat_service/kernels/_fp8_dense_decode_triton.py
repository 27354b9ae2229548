"""The Triton side of fp8_dense_decode.py: the w8a16 dense linear of decode batches, y = x @ dequant(w8)^T.

A dense linear is the decode experts' down GEMM (_fp8_expert_decode_triton.py) with one expert holding all rows:
the same K steps (_fp8_w8a16_triton._product: swap-AB, e4m3 tiles dequantized in registers, TMA weight loads).

Grid (cdiv(N, BLOCK_N), SPLIT_K), axis 0 fastest. A program owns one N tile and one K chunk (split-K: the small-N
shapes would otherwise leave most SMs idle) and walks all M rows in BLOCK_M tiles, K inner: with one row tile (M <=
BLOCK_M, the decode case) its weight chunk is read from HBM exactly once; each further row tile re-reads the chunk
(split-K chunks of a few hundred KB stay in L2 between row tiles; unsplit ones of the wide shapes may not).

SPLIT_K == 1: the program rounds its fp32 tile to y's dtype and stores it. SPLIT_K > 1: each program stores its fp32
partial tiles into part [SPLIT_K, M, N], then counts itself in on its N tile's counter (an acq_rel atomic after a
CTA barrier: its stores are visible before the count); the last of the tile's programs to arrive sums the partials
in split order (deterministic: the same sums whichever arrives last), rounds, stores y and resets the counter to 0
for the next launch (counters start zeroed and are left zeroed: CUDA-graph replayable without a memset). The fixup's
reads (SPLIT_K * M * BLOCK_N * 4 bytes) fall on one SM per N tile at the end; the alternative, two_pass, leaves the
sums to a second launch (_sum_splits_kernel: every SM, the same sums in the same order, so the same bits) at the
cost of a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode
from longcat_service.kernels._fp8_w8a16_triton import (
    TensorDescriptor,
    _out_ptrs,
    _product,
    aot_compile_kernel,
    weight_desc,
)
from longcat_service.kernels._silu_mul_triton import _round


@triton.jit
def _row_tile(
    x_ptr, y_ptr, part_ptr, w_ptrs, s_ptrs, w_desc, n0, row0, M, K, k_lo, k_hi, cols, col_ok, ks, s_xm, s_ym,
    part_offset, s_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, TMA: tl.constexpr,
    EVEN_K: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """Rows [row0, row0 + BLOCK_M) of the program's N tile over its K chunk: y (unsplit) or its partial."""
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * s_xm + ks[None, :]
    acc = _product(x_ptrs, w_ptrs, s_ptrs, w_desc, n0, k_lo, k_hi, K, row_ok, col_ok, ks, BLOCK_M, BLOCK_N,
                   BLOCK_K, TMA, EVEN_K, MANUAL_BF16, USE_WHILE)
    if SPLIT_K == 1:
        y_ptrs, mask = _out_ptrs(y_ptr, rows, cols, s_ym, row_ok, col_ok)
        tl.store(y_ptrs, _round(acc, y_ptr.dtype.element_ty, MANUAL_BF16), mask=mask)
    else:
        p_ptrs, mask = _out_ptrs(part_ptr + part_offset, rows, cols, s_pm, row_ok, col_ok)
        tl.store(p_ptrs, acc, mask=mask)


@triton.jit
def _reduce_tile(y_ptr, part_ptr, row0, M, cols, col_ok, s_ym, s_pm, s_ps,
                 RED_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """y rows [row0, row0 + RED_M) of the N tile: the SPLIT_K partials summed in split order, rounded. RED_M rows
    a step (a few registers per thread a partial), so that all SPLIT_K loads are in flight at once unspilled."""
    rows = row0 + tl.arange(0, RED_M)
    row_ok = rows < M
    p_ptrs, mask = _out_ptrs(part_ptr, rows, cols, s_pm, row_ok, col_ok)
    acc = tl.zeros((BLOCK_N, RED_M), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # .cg: from L2, where the other programs' stores are
        acc += tl.load(p_ptrs + s * s_ps, mask=mask, other=0.0, cache_modifier=".cg")
    y_ptrs, mask = _out_ptrs(y_ptr, rows, cols, s_ym, row_ok, col_ok)
    tl.store(y_ptrs, _round(acc, y_ptr.dtype.element_ty, MANUAL_BF16), mask=mask)


# M (and M * N) not specialised: one binary per config and shape serves every row count of a config's rows (CUDA-graph
# buckets and eager prefills alike; compile_watch.py), and the row masks gain nothing from divisibility.
@triton.jit(do_not_specialize=["M", "s_ps"])
def _dense_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, w_desc,
    M, N, K, k_chunk, s_xm, s_wn, s_sn, s_ym, s_pm, s_ps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, RED_M: tl.constexpr,
    FIXUP: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """y[m, n] = x_m . W[n] for the program's N tile (module docstring); SPLIT_K > 1 without FIXUP: partials only."""
    pid_n = tl.program_id(0)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * s_wn + ks[None, :]
    s_ptrs = s_ptr + (cols // 128) * s_sn
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
        part_offset = 0
    else:
        split = tl.program_id(1)
        k_lo = split * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, K)
        part_offset = split.to(tl.int64) * s_ps
    if USE_WHILE:
        row0 = 0
        while row0 < M:
            _row_tile(x_ptr, y_ptr, part_ptr, w_ptrs, s_ptrs, w_desc, n0, row0, M, K, k_lo, k_hi, cols, col_ok, ks,
                      s_xm, s_ym, part_offset, s_pm, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, TMA, EVEN_K, MANUAL_BF16,
                      USE_WHILE)
            row0 += BLOCK_M
    else:  # one pass per BLOCK_M rows (decode: one)
        for row0 in range(0, M, BLOCK_M):
            _row_tile(x_ptr, y_ptr, part_ptr, w_ptrs, s_ptrs, w_desc, n0, row0, M, K, k_lo, k_hi, cols, col_ok, ks,
                      s_xm, s_ym, part_offset, s_pm, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, TMA, EVEN_K, MANUAL_BF16,
                      USE_WHILE)
    if SPLIT_K > 1 and FIXUP:
        tl.debug_barrier()  # every thread's partial stores issued before the count (CUTLASS's semaphore pattern)
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last of the tile's programs: every partial is stored
            if USE_WHILE:
                row0 = 0
                while row0 < M:
                    _reduce_tile(y_ptr, part_ptr, row0, M, cols, col_ok, s_ym, s_pm, s_ps, RED_M, BLOCK_N,
                                 SPLIT_K, MANUAL_BF16)
                    row0 += RED_M
            else:
                for row0 in range(0, M, RED_M):
                    _reduce_tile(y_ptr, part_ptr, row0, M, cols, col_ok, s_ym, s_pm, s_ps, RED_M, BLOCK_N,
                                 SPLIT_K, MANUAL_BF16)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=["total", "s_ps"])
def _sum_splits_kernel(part_ptr, y_ptr, total, s_ps, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                       MANUAL_BF16: tl.constexpr):
    """y (contiguous [M, N], total = M * N values) = the sum of the SPLIT_K partials in split order, rounded."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * s_ps + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, _round(acc, y_ptr.dtype.element_ty, MANUAL_BF16), mask=ok)


SUM_BLOCK = 1024


def reduce_rows(block_m: int, block_n: int) -> int:
    """Rows per step of the split-K fixup: tiles of ~1024 fp32 values (8 registers a thread at 4 warps)."""
    return max(1, min(block_m, 1024 // block_n))


def launch_dense(x, w8, scale, y, counters, block_m, config, split_k, k_chunk) -> None:
    """y [M, N] <- x [M, K] @ dequant(w8 [N, K], scale)^T. Tensors checked and the split resolved by the caller;
    counters: int32, zero, at least cdiv(N, block_n) entries (left zero)."""
    m, k = x.shape
    n = w8.shape[0]
    interp = interpreter_mode()
    w_desc = None  # TMA where the layout allows and the weight spans a whole tile (not the case in tests' tiny shapes)
    if n >= config.block_n and k >= config.block_k:
        w_desc = weight_desc(w8.unsqueeze(0), config.block_n, config.block_k)
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    fixup = not config.two_pass
    grid = (triton.cdiv(n, config.block_n), split_k)
    _dense_kernel[grid](
        x, w8, scale, y, part, counters, w_desc, m, n, k, k_chunk, x.stride(0), w8.stride(0), scale.stride(0),
        y.stride(0), n, m * n,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split_k,
        RED_M=reduce_rows(block_m, config.block_n), FIXUP=fixup, TMA=w_desc is not None,
        EVEN_K=k % config.block_k == 0, MANUAL_BF16=interp, USE_WHILE=interp, num_stages=config.num_stages,
        num_warps=config.num_warps,
    )
    if split_k > 1 and not fixup:  # y is contiguous [M, N] (allocated by the caller)
        _sum_splits_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](part, y, m * n, m * n, SPLIT_K=split_k, BLOCK=SUM_BLOCK,
                                                             MANUAL_BF16=interp, num_warps=4)


def aot_compile(config, rows: int, n: int, k: int, split_k: int, k_chunk: int, dtype: torch.dtype = torch.bfloat16,
                capability: int = 90):
    """triton.compile of the dense kernel as launch_dense would specialise it for these shapes and split (block_m =
    config.block_m), for a CUDA GPU of this capability, without a GPU. Needs TRITON_INTERPRET unset at import."""
    fp8 = torch.float8_e4m3fn
    values = dict(x_ptr=torch.empty(1, dtype=dtype), w_ptr=torch.empty(1, dtype=fp8), s_ptr=torch.empty(1),
                  y_ptr=torch.empty(1, dtype=dtype), part_ptr=torch.empty(1),
                  count_ptr=torch.empty(1, dtype=torch.int32), M=rows, N=n, K=k, k_chunk=k_chunk, s_xm=k, s_wn=k,
                  s_sn=-(-k // 128), s_ym=n, s_pm=n, s_ps=rows * n)
    use_tma = (TensorDescriptor is not None and k % 16 == 0  # launch_dense's rule on a contiguous weight
               and n >= config.block_n and k >= config.block_k)
    values["w_desc"] = None
    if use_tma:  # a CPU stand-in: specialisation reads the block shape and dtype
        values["w_desc"] = TensorDescriptor(torch.empty(64, k, dtype=fp8), [n, k], [k, 1],
                                            [config.block_n, config.block_k])
    constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split_k,
                      RED_M=reduce_rows(config.block_m, config.block_n), FIXUP=not config.two_pass, TMA=use_tma,
                      EVEN_K=k % config.block_k == 0, MANUAL_BF16=False, USE_WHILE=False)
    return aot_compile_kernel(_dense_kernel, values, constexprs, config.num_warps, config.num_stages, capability)
