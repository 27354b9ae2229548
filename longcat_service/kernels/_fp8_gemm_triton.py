"""The Triton side of fp8_gemm.py: per-token-group activation quantization and block-scaled FP8 GEMMs.

GEMMs take e4m3 operands on Hopper's FP8 tensor cores (tl.dot of float8e4nv tiles, fp32 accumulate) one K step at
a time; BLOCK_K divides the 128-wide scale group, so a step lies in one group g and its partial product is scaled by
x_scale[m, g] * w_scale[n // 128, g] in fp32 before it joins the accumulator.
The CPU interpreter's fp32 -> e4m3 cast mis-rounds values whose rounding carries into the exponent (31.9 -> 16):
with MANUAL_FP8 the quantizer rounds to the e4m3 grid in fp32 first (the cast of an exact value is then right).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode, next_pow2
from longcat_service.kernels._silu_mul_triton import _round, _to_f32

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - triton < 3.4
    TensorDescriptor = None

FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3
GROUP = 128


@triton.jit
def _e4m3_grid_round(v):
    """v (fp32, |v| <= 448) rounded to nearest-even on the e4m3 grid, still fp32 (exact arithmetic only). The sign
    is kept, also where the magnitude rounds to zero (-tiny -> -0, as torch's cast)."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    exp = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    ulp_exp = tl.maximum(exp, -6) - 3  # 3 mantissa bits; subnormals below 2^-6 share the 2^-9 step
    ulp = ((ulp_exp + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    q = tl.abs(v) / ulp  # exact: ulp is a power of two, q < 16
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds q < 2^22 to an integer, ties to even
    r = ((q + magic) - magic) * ulp
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quant_groups(x, MANUAL_FP8: tl.constexpr):
    """x fp32 [S, 128], one scale group per row (zeros where masked) -> (q e4m3 [S, 128], s fp32 [S]):
    s = max(|x|, 1e-10) / 448, q = clamp(x / s) rounded to nearest. The fused kernels share it, so they quantize
    bit for bit like _quant_kernel."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10)
    s = tl.div_rn(amax, FP8_MAX)
    q = tl.div_rn(x, s[:, None])
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    if MANUAL_FP8:
        q = _e4m3_grid_round(q)
    return q.to(tl.float8e4nv), s


@triton.jit
def _quant_kernel(
    x_ptr, q_ptr, s_ptr, M, M_OUT, K, s_xm, s_qm, s_sm, s_sg,
    BLOCK_M: tl.constexpr, GROUP_SIZE: tl.constexpr, MANUAL_FP8: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    """Rows [pid0 * BLOCK_M, +BLOCK_M), group pid1: s = max(|x|, 1e-10) / 448, q = clamp(x / s) in e4m3. Rows
    M..M_OUT-1 (padding) get q = 0 and s = 1. The scale is stored at s_ptr + row * s_sm + group * s_sg."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    cols = g * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * s_xm + cols[None, :], mask=mask, other=0.0)
    q, s = _quant_groups(_to_f32(x, MANUAL_BF16), MANUAL_FP8)  # padding rows: x = 0, so q = +0
    tl.store(q_ptr + r64 * s_qm + cols[None, :], q, mask=(rows < M_OUT)[:, None] & (cols < K)[None, :])
    s = tl.where(rows < M, s, 1.0)
    tl.store(s_ptr + rows.to(tl.int64) * s_sm + g * s_sg, s, mask=rows < M_OUT)


def launch_quant(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block_m: int = 16, num_warps: int = 4) -> None:
    """q [M_out, K], s [M_out, G] (any strides) for x [M, K], M <= M_out: rows past M are padding."""
    m, k = x.shape
    m_out = q.shape[0]
    grid = (triton.cdiv(m_out, block_m), triton.cdiv(k, GROUP))
    interp = interpreter_mode()
    _quant_kernel[grid](x, q, s, m, m_out, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1), BLOCK_M=block_m,
                        GROUP_SIZE=GROUP, MANUAL_FP8=interp, MANUAL_BF16=interp, num_warps=num_warps)


# ---- dense: out[M, N] = x8 @ w8^T, block-scaled ---------------------------------------------------------------


@triton.jit
def _w8a8_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, s_am, s_bn, s_cm, s_asm, s_bsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share each column tile while it is in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * s_am + ks[None, :]
    b_ptrs = b_ptr + cols.to(tl.int64)[:, None] * s_bn + ks[None, :]
    as_ptrs = as_ptr + rows.to(tl.int64) * s_asm
    bs_ptrs = bs_ptr + (cols // 128).to(tl.int64) * s_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_WHILE:  # the interpreter cannot take runtime values as range() bounds
        k0 = 0
        while k0 < K:
            acc = _scaled_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, k0, K, row_ok, col_ok, ks, EVEN_K)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _scaled_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, k0, K, row_ok, col_ok, ks, EVEN_K)
    out = _round(acc, c_ptr.dtype.element_ty, MANUAL_BF16)
    tl.store(c_ptr + rows.to(tl.int64)[:, None] * s_cm + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scaled_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, k0, K, row_ok, col_ok, ks, EVEN_K: tl.constexpr):
    """acc += (a[:, k0:k0+BK] @ b[:, k0:k0+BK]^T) * a_scale[:, g] * b_scale[:, g], g = k0 // 128."""
    if EVEN_K:
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs + k0, mask=col_ok[:, None], other=0.0)
    else:
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    g = k0 // 128
    a_s = tl.load(as_ptrs + g, mask=row_ok, other=0.0)
    b_s = tl.load(bs_ptrs + g, mask=col_ok, other=0.0)
    part = tl.dot(a, tl.trans(b))
    return acc + part * a_s[:, None] * b_s[None, :]


def launch_w8a8(x8, x_scale, w8, w_scale, out, block_m, block_n, block_k, group_m, num_stages, num_warps) -> None:
    m, k = x8.shape
    n = w8.shape[0]
    interp = interpreter_mode()
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _w8a8_kernel[grid](
        x8, w8, out, x_scale, w_scale, m, n, k, x8.stride(0), w8.stride(0), out.stride(0), x_scale.stride(0),
        w_scale.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        EVEN_K=k % block_k == 0, MANUAL_BF16=interp, USE_WHILE=interp, num_stages=num_stages, num_warps=num_warps,
    )


# ---- grouped (MoE prefill experts): y[r] = x8[r] @ w8[e]^T for expert e's rows -------------------------------
# The structure of _grouped_gemm_triton.py: one program per (N tile, expert), walking the expert's rows; or
# (fp8_gemm.GroupedFp8Config.persistent) _grouped_fp8_persistent_kernel: a fixed grid over a device-side list of
# equal tiles (_row_tiles_kernel), its tile and K loops optionally flattened into one software pipeline. TMA loads
# where the operands' layout allows (tma_supported), else pointer loads: the path for the other layouts.


@triton.jit
def _g_step(
    acc, x_ptrs, w_ptrs, xs_ptrs, ws_ptrs, x_desc, w_desc, row0, w_row0, k0, K, row_ok, col_ok, ks,
    EVEN_K: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if TMA:
        a = x_desc.load([row0, k0])
        b = w_desc.load([w_row0, k0])
    else:
        if EVEN_K:
            a = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs + k0, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + ks) < K
            a = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    g = k0 // 128
    a_s = tl.load(xs_ptrs + g, mask=row_ok, other=0.0)
    if BLOCK_N <= 128:  # the tile lies in one 128-row block of the weight: one scale (ws_ptrs is a scalar)
        b_s = tl.load(ws_ptrs + g)
    else:
        b_s = tl.load(ws_ptrs + g, mask=col_ok, other=0.0)[None, :]
    part = tl.dot(a, tl.trans(b))
    return acc + part * a_s[:, None] * b_s


@triton.jit
def _g_tile(
    x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, x_desc, w_desc, row0, row_end, expert, n0, N, K,
    s_xm, s_we, s_wn, s_ym, s_xsm, s_wse, s_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
    MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile."""
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * s_xm + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * s_we + cols.to(tl.int64)[:, None] * s_wn + ks[None, :]
    xs_ptrs = xs_ptr + rows.to(tl.int64) * s_xsm
    if BLOCK_N <= 128:
        ws_ptrs = ws_ptr + expert.to(tl.int64) * s_wse + (n0 // 128).to(tl.int64) * s_wsn
    else:
        ws_ptrs = ws_ptr + expert.to(tl.int64) * s_wse + (cols // 128).to(tl.int64) * s_wsn
    w_row0 = expert * N + n0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_WHILE:
        k0 = 0
        while k0 < K:
            acc = _g_step(acc, x_ptrs, w_ptrs, xs_ptrs, ws_ptrs, x_desc, w_desc, row0, w_row0, k0, K, row_ok, col_ok,
                          ks, EVEN_K, TMA, BLOCK_N)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _g_step(acc, x_ptrs, w_ptrs, xs_ptrs, ws_ptrs, x_desc, w_desc, row0, w_row0, k0, K, row_ok, col_ok,
                          ks, EVEN_K, TMA, BLOCK_N)
    out = _round(acc, y_ptr.dtype.element_ty, MANUAL_BF16)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * s_ym + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_fp8_kernel(
    x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, offs_ptr, x_desc, x_half_desc, w_desc, N, K,
    s_xm, s_we, s_wn, s_ym, s_xsm, s_wse, s_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_TAIL: tl.constexpr,
    EVEN_K: tl.constexpr, TMA: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    expert = tl.program_id(1)
    start = tl.load(offs_ptr + expert)
    end = tl.load(offs_ptr + expert + 1)
    if end <= start:
        return
    full_end = end
    if SPLIT_TAIL:
        full_end = start + ((end - start) // BLOCK_M) * BLOCK_M
    if USE_WHILE:
        row0 = start
        while row0 < full_end:
            _g_tile(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, x_desc, w_desc, row0, end, expert, n0, N, K, s_xm, s_we,
                    s_wn, s_ym, s_xsm, s_wse, s_wsn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, MANUAL_BF16, USE_WHILE)
            row0 += BLOCK_M
    else:
        for row0 in range(start, full_end, BLOCK_M):
            _g_tile(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, x_desc, w_desc, row0, end, expert, n0, N, K, s_xm, s_we,
                    s_wn, s_ym, s_xsm, s_wse, s_wsn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, MANUAL_BF16, USE_WHILE)
    if SPLIT_TAIL:
        if full_end < end:
            if end - full_end <= BLOCK_M // 2:
                _g_tile(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, x_half_desc, w_desc, full_end, end, expert, n0, N, K,
                        s_xm, s_we, s_wn, s_ym, s_xsm, s_wse, s_wsn, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, TMA,
                        MANUAL_BF16, USE_WHILE)
            else:
                _g_tile(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, x_desc, w_desc, full_end, end, expert, n0, N, K,
                        s_xm, s_we, s_wn, s_ym, s_xsm, s_wse, s_wsn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA,
                        MANUAL_BF16, USE_WHILE)


@triton.jit
def _row_tiles_kernel(
    offs_ptr, num_experts, tile_expert_ptr, tile_row_ptr, count_ptr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """Program e lists expert e's row tiles (expert, first row) at their place in the expert-ordered list of all
    row tiles of BLOCK_M rows; the last program writes the list's length (empty experts have no tiles)."""
    e = tl.program_id(0)
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx < num_experts
    starts = tl.load(offs_ptr + e_idx, mask=e_ok, other=0)
    ends = tl.load(offs_ptr + e_idx + 1, mask=e_ok, other=0)
    m_tiles = tl.where(ends > starts, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    first = tl.sum(tl.where(e_idx < e, m_tiles, 0), axis=0)
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1)
    count = tl.where(end > start, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
    if USE_WHILE:
        j0 = 0
        while j0 < count:
            _list_row_tiles(tile_expert_ptr, tile_row_ptr, e, start, first, j0, count, BLOCK_M, BLOCK_T)
            j0 += BLOCK_T
    else:
        for j0 in range(0, count, BLOCK_T):
            _list_row_tiles(tile_expert_ptr, tile_row_ptr, e, start, first, j0, count, BLOCK_M, BLOCK_T)
    if e == num_experts - 1:
        tl.store(count_ptr, first + count)


@triton.jit
def _list_row_tiles(tile_expert_ptr, tile_row_ptr, e, start, first, j0, count, BLOCK_M: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    j = j0 + tl.arange(0, BLOCK_T)
    ok = j < count
    tl.store(tile_expert_ptr + first + j, tl.zeros_like(j) + e, mask=ok)
    tl.store(tile_row_ptr + first + j, start + j * BLOCK_M, mask=ok)


@triton.jit
def _grouped_fp8_persistent_kernel(
    x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr, count_ptr, x_desc, w_desc, N, K,
    s_xm, s_we, s_wn, s_ym, s_xsm, s_wse, s_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
    FLATTEN: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """A fixed grid walks the tiles (row tile g of _row_tiles_kernel's list, N tile), N tile fastest: programs in
    flight together read consecutive weight tiles of one expert, and an expert's row tiles of one weight tile
    are num_n tiles apart, in flight together too (the weight tile comes from HBM once). FLATTEN: Triton fuses the
    tile and K loops into one software pipeline, so a tile's first loads are issued during the previous tile's last
    steps (no ramp per tile)."""
    num_n = tl.cdiv(N, BLOCK_N)
    total = tl.load(count_ptr) * num_n
    if USE_WHILE:
        tile = tl.program_id(0)
        while tile < total:
            _persistent_tile(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr, x_desc,
                             w_desc, tile, num_n, N, K, s_xm, s_we, s_wn, s_ym, s_xsm, s_wse, s_wsn, BLOCK_M, BLOCK_N,
                             BLOCK_K, EVEN_K, TMA, MANUAL_BF16, USE_WHILE)
            tile += tl.num_programs(0)
    else:
        for tile in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=FLATTEN):
            _persistent_tile(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr, x_desc,
                             w_desc, tile, num_n, N, K, s_xm, s_we, s_wn, s_ym, s_xsm, s_wse, s_wsn, BLOCK_M, BLOCK_N,
                             BLOCK_K, EVEN_K, TMA, MANUAL_BF16, USE_WHILE)


@triton.jit
def _persistent_tile(
    x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr, x_desc, w_desc, tile, num_n, N, K,
    s_xm, s_we, s_wn, s_ym, s_xsm, s_wse, s_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
    MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    g = tile // num_n
    n0 = (tile - g * num_n) * BLOCK_N
    expert = tl.load(tile_expert_ptr + g)
    row0 = tl.load(tile_row_ptr + g)
    end = tl.load(offs_ptr + expert + 1)
    _g_tile(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, x_desc, w_desc, row0, end, expert, n0, N, K, s_xm, s_we, s_wn, s_ym,
            s_xsm, s_wse, s_wsn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, MANUAL_BF16, USE_WHILE)


def tma_supported(x8: torch.Tensor, w8: torch.Tensor) -> bool:
    """TMA descriptors for x8 [R, K] and w8 viewed as [E*N, K]: contiguous rows of 16-byte multiples, aligned bases."""
    if TensorDescriptor is None:
        return False
    num_experts, n, k = w8.shape
    if k == 0 or x8.shape[0] == 0 or num_experts * n == 0 or k % 16:
        return False
    mergeable = n == 1 or num_experts == 1 or w8.stride(0) == n * w8.stride(1)
    return (mergeable and x8.stride(1) == 1 and w8.stride(2) == 1 and x8.data_ptr() % 16 == 0
            and w8.data_ptr() % 16 == 0 and x8.stride(0) % 16 == 0 and w8.stride(1) % 16 == 0)


def num_sms(device: torch.device) -> int:
    """Programs per unit of a persistent grid: the GPU's SM count; 3 under the interpreter (CPU tensors), so that
    the tests' programs each walk several tiles."""
    if device.type != "cuda":
        return 3
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_grouped(x8, x_scale, w8, w_scale, offsets, y, block_m, block_n, block_k, num_stages, num_warps, tma,
                   split_tail, persistent=0, flatten=False) -> None:
    """persistent > 0: a grid of persistent x SMs programs (_grouped_fp8_persistent_kernel; no split tail)."""
    rows, k = x8.shape
    num_experts, n, _ = w8.shape
    interp = interpreter_mode()
    use_tma = tma and tma_supported(x8, w8)
    if use_tma:
        x_desc = TensorDescriptor(x8, [rows, k], [x8.stride(0), 1], [block_m, block_k])
        x_half_desc = TensorDescriptor(x8, [rows, k], [x8.stride(0), 1], [block_m // 2, block_k]) if split_tail else None
        w_desc = TensorDescriptor(w8, [num_experts * n, k], [w8.stride(1), 1], [block_n, block_k])
    else:
        x_desc = x_half_desc = w_desc = None
    strides = (x8.stride(0), w8.stride(0), w8.stride(1), y.stride(0), x_scale.stride(0), w_scale.stride(0),
               w_scale.stride(1))
    if persistent:
        if split_tail:
            raise ValueError("launch_grouped: the persistent kernel has no split tail")
        max_row_tiles = triton.cdiv(rows, block_m) + num_experts
        tile_expert = torch.empty(2 * max_row_tiles + 1, dtype=torch.int32, device=x8.device)
        tile_row, count = tile_expert[max_row_tiles: 2 * max_row_tiles], tile_expert[2 * max_row_tiles:]
        _row_tiles_kernel[(num_experts,)](offsets, num_experts, tile_expert, tile_row, count, BLOCK_M=block_m,
                                          BLOCK_E=next_pow2(num_experts), BLOCK_T=64, USE_WHILE=interp, num_warps=4)
        grid = (max(1, min(persistent * num_sms(x8.device), triton.cdiv(n, block_n) * max_row_tiles)),)
        _grouped_fp8_persistent_kernel[grid](
            x8, w8, y, x_scale, w_scale, offsets, tile_expert, tile_row, count, x_desc, w_desc, n, k, *strides,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, TMA=use_tma,
            FLATTEN=flatten and not interp, MANUAL_BF16=interp, USE_WHILE=interp,
            num_stages=num_stages, num_warps=num_warps,
        )
        return
    grid = (triton.cdiv(n, block_n), num_experts)
    _grouped_fp8_kernel[grid](
        x8, w8, y, x_scale, w_scale, offsets, x_desc, x_half_desc, w_desc, n, k, *strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_TAIL=split_tail,
        EVEN_K=k % block_k == 0, TMA=use_tma, MANUAL_BF16=interp, USE_WHILE=interp,
        num_stages=num_stages, num_warps=num_warps,
    )


def _aot(fn, values: dict, constexprs: dict, num_warps: int, num_stages: int, capability: int):
    """triton.compile of fn for a CUDA GPU of this capability without a GPU (values: CPU stand-ins that carry the
    dtypes, alignments and strides launch() would pass)."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or values.get(name) is None:
            constexprs.setdefault(name, None)
            signature[name] = "constexpr"
            continue
        ty, key = native_specialize_impl(BaseBackend, values[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # an int equal to 1 is specialised to a constant
            constexprs[name] = values[name]
        if key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def aot_compile_grouped(config, n: int, k: int, rows: int = 49152, num_experts: int = 512, capability: int = 90):
    """Compile the grouped kernel launch_grouped() would run for config (_grouped_fp8_persistent_kernel where
    config.persistent) as it would specialise it (an offline check of the GPU build; needs TRITON_INTERPRET unset
    at import). Returns triton's CompiledKernel."""
    x8 = torch.empty(rows, k, dtype=torch.float8_e4m3fn)
    w_rows = torch.empty(64, k, dtype=torch.float8_e4m3fn)
    use_tma = config.tma and tma_supported(x8, w_rows.view(1, 64, k))
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    persistent = getattr(config, "persistent", 0)
    f32 = torch.empty(rows, 1)
    values = dict(x_ptr=x8, w_ptr=x8, y_ptr=torch.empty(1, dtype=torch.bfloat16), xs_ptr=f32, ws_ptr=f32,
                  offs_ptr=torch.empty(num_experts + 1, dtype=torch.int32), N=n, K=k, s_xm=k, s_we=n * k, s_wn=k,
                  s_ym=n, s_xsm=-(-k // GROUP), s_wse=-(-n // GROUP) * -(-k // GROUP), s_wsn=-(-k // GROUP))
    if use_tma:
        values["x_desc"] = TensorDescriptor(x8, [rows, k], [k, 1], [bm, bk])
        if config.split_tail:
            values["x_half_desc"] = TensorDescriptor(x8, [rows, k], [k, 1], [bm // 2, bk])
        values["w_desc"] = TensorDescriptor(w_rows, [num_experts * n, k], [k, 1], [bn, bk])
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, TMA=use_tma, MANUAL_BF16=False,
                      USE_WHILE=False)
    if persistent:
        constexprs["FLATTEN"] = getattr(config, "flatten", False)
        i32 = torch.empty(rows, dtype=torch.int32)
        values.update(tile_expert_ptr=i32, tile_row_ptr=i32, count_ptr=i32)
        return _aot(_grouped_fp8_persistent_kernel, values, constexprs, config.num_warps, config.num_stages,
                    capability)
    constexprs["SPLIT_TAIL"] = config.split_tail
    return _aot(_grouped_fp8_kernel, values, constexprs, config.num_warps, config.num_stages, capability)


def aot_compile_dense(config, m: int, n: int, k: int, capability: int = 90):
    """Compile _w8a8_kernel as launch_w8a8() would specialise it for x [m, k], w [n, k] (offline check)."""
    x8 = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    f32 = torch.empty(m, 1)
    values = dict(a_ptr=x8, b_ptr=x8, c_ptr=torch.empty(1, dtype=torch.bfloat16), as_ptr=f32, bs_ptr=f32, M=m, N=n,
                  K=k, s_am=k, s_bn=k, s_cm=n, s_asm=-(-k // GROUP), s_bsn=-(-k // GROUP))
    block_m = min(config.block_m, max(16, 1 << (max(m, 1) - 1).bit_length()))
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                      EVEN_K=k % config.block_k == 0, MANUAL_BF16=False, USE_WHILE=False)
    return _aot(_w8a8_kernel, values, constexprs, config.num_warps, config.num_stages, capability)


def aot_compile_quant(k: int = 6144, capability: int = 90):
    """Compile _quant_kernel as launch_quant() would for bf16 x [4096, k] (offline check)."""
    x = torch.empty(4096, k, dtype=torch.bfloat16)
    values = dict(x_ptr=x, q_ptr=torch.empty(1, dtype=torch.float8_e4m3fn), s_ptr=torch.empty(1), M=4096,
                  M_OUT=4096, K=k, s_xm=k, s_qm=k, s_sm=-(-k // GROUP), s_sg=1)
    constexprs = dict(BLOCK_M=16, GROUP_SIZE=GROUP, MANUAL_FP8=False, MANUAL_BF16=False)
    return _aot(_quant_kernel, values, constexprs, 4, 1, capability)
