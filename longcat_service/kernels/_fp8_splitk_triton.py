"""The Triton side of fp8_splitk.py: a split-K block-FP8 w8a8 GEMM for decode row counts.

Grid (cdiv(N, BLOCK_N), split, cdiv(M, BLOCK_M)), axis 0 fastest. A program owns one BLOCK_M x BLOCK_N output tile
and a contiguous range of 128-wide K scale groups (its split). Each K step is one whole group g: an e4m3 x e4m3
tl.dot (FP8 tensor cores, fp32 out) scaled in fp32 by x_scale[m, g] * w_scale[n // 128, g] and added to the fp32
accumulator (the promotion scheme of the prefill kernels in _fp8_gemm_triton.py).

SWAP_AB: the product is computed transposed, acc [BLOCK_N, BLOCK_M] = W_tile @ x_tile^T, so that the weight tile
(64 / 128 rows) is the wgmma's M side (a multiple of 64) and the few token rows its N side (16..128): on Hopper the
small row tiles then still run on FP8 wgmma (unswapped, a 16-row tile is below wgmma's 64: Triton 3.6's sm_90 build
of it emitted neither FP8 wgmma nor FP8 mma.sync, checked offline). Both operands are K-contiguous in memory, the
layout FP8 wgmma needs for A and B. TMA: both tiles by tensor descriptors. FUSE_QUANT: x arrives unquantized and each
program quantizes its groups itself (_quant_groups, bit for bit per_token_group_quant_fp8), saving that launch.

split == 1: the program rounds its tile to the output dtype and stores it. split > 1: it stores its fp32 partial
tile into part [split, M, N]; _sum_splits_kernel then adds the split partials in split order and rounds: a
deterministic sum (the same bits every run and at every graph replay), no atomics, no zeroed workspace, no counters
to keep between launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode
from longcat_service.kernels._fp8_gemm_triton import _quant_groups
from longcat_service.kernels._silu_mul_triton import _round, _to_f32

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - triton < 3.4
    TensorDescriptor = None

GROUP = 128


@triton.jit
def _group_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, a_desc, b_desc, row0, n0, g, K, row_ok, col_ok, ks,
                BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr, MASK_K: tl.constexpr, TMA: tl.constexpr,
                FUSE_QUANT: tl.constexpr, MANUAL_FP8: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """acc += (x8[:, group g] . w8[:, group g]) * x_scale[:, g] * w_scale[:, g] (transposed when SWAP_AB). MASK_K:
    the partial last group (the whole-group steps carry no K mask: in the loop it costs the sm_90 build spills).
    TMA: both tiles by tensor descriptors (out-of-bounds rows and columns arrive as zeros: no masks). FUSE_QUANT:
    a_* address the unquantized x; its group is quantized here, bit for bit as per_token_group_quant_fp8
    (_quant_groups; rows past M and columns past K load as zeros, which quantize to zeros)."""
    k0 = g * 128
    if TMA:
        a = a_desc.load([row0, k0])
        b = b_desc.load([n0, k0])
    elif not MASK_K:
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs + k0, mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
    else:
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
    if FUSE_QUANT:
        a, a_s = _quant_groups(_to_f32(a, MANUAL_BF16), MANUAL_FP8)
    else:
        a_s = tl.load(as_ptrs + g, mask=row_ok, other=0.0)
    if BLOCK_N <= 128:  # the tile lies in one 128-row weight block: one scale (bs_ptrs is a scalar pointer)
        b_s = tl.load(bs_ptrs + g)
        if SWAP_AB:
            acc += tl.dot(b, tl.trans(a)) * (a_s * b_s)[None, :]
        else:
            acc += tl.dot(a, tl.trans(b)) * (a_s * b_s)[:, None]
    else:
        b_s = tl.load(bs_ptrs + g, mask=col_ok, other=0.0)
        if SWAP_AB:
            acc += tl.dot(b, tl.trans(a)) * b_s[:, None] * a_s[None, :]
        else:
            acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    return acc


# M and the split not specialised: one binary per row tile and config serves every row count that rounds up to the
# tile (CUDA-graph buckets) and every split.
@triton.jit(do_not_specialize=["M", "groups_per_split", "s_ps"])
def _splitk_kernel(
    a_ptr, b_ptr, c_ptr, part_ptr, as_ptr, bs_ptr, a_desc, b_desc, M, N, K, groups_per_split,
    s_am, s_bn, s_cm, s_asm, s_bsn, s_ps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, SWAP_AB: tl.constexpr,
    EVEN_K: tl.constexpr, TMA: tl.constexpr, FUSE_QUANT: tl.constexpr, MANUAL_FP8: tl.constexpr,
    MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """PARTIAL (split > 1): store the fp32 partial tile of split program_id(1) instead of the rounded output (the
    split count itself is a runtime value: one binary per tile config serves every split)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, 128)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * s_am + ks[None, :]
    b_ptrs = b_ptr + cols.to(tl.int64)[:, None] * s_bn + ks[None, :]
    as_ptrs = as_ptr + rows.to(tl.int64) * s_asm
    if BLOCK_N <= 128:
        bs_ptrs = bs_ptr + ((pid_n * BLOCK_N) // 128).to(tl.int64) * s_bsn
    else:
        bs_ptrs = bs_ptr + (cols // 128).to(tl.int64) * s_bsn
    g_lo = pid_s * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, tl.cdiv(K, 128))
    g_full = tl.minimum(g_hi, K // 128)  # whole groups; a partial last group is the one step after them
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_WHILE:  # the interpreter cannot take runtime values as range() bounds
        g = g_lo
        while g < g_full:
            acc = _group_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, a_desc, b_desc, row0, n0, g, K, row_ok,
                              col_ok, ks, BLOCK_N, SWAP_AB, False, TMA, FUSE_QUANT, MANUAL_FP8, MANUAL_BF16)
            g += 1
    else:
        for g in range(g_lo, g_full):
            acc = _group_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, a_desc, b_desc, row0, n0, g, K, row_ok,
                              col_ok, ks, BLOCK_N, SWAP_AB, False, TMA, FUSE_QUANT, MANUAL_FP8, MANUAL_BF16)
    if not EVEN_K:
        if g_full < g_hi:
            acc = _group_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, a_desc, b_desc, row0, n0, g_full, K, row_ok,
                              col_ok, ks, BLOCK_N, SWAP_AB, True, TMA, FUSE_QUANT, MANUAL_FP8,
                              MANUAL_BF16)
    if SWAP_AB:  # acc[n, m]
        offs = rows.to(tl.int64)[None, :] * s_cm + cols[:, None]
        mask = row_ok[None, :] & col_ok[:, None]
    else:
        offs = rows.to(tl.int64)[:, None] * s_cm + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:  # part is contiguous [split, M, N]: its row stride is N = s_cm's of the contiguous output
        tl.store(part_ptr + pid_s.to(tl.int64) * s_ps + offs, acc, mask=mask)
    else:
        tl.store(c_ptr + offs, _round(acc, c_ptr.dtype.element_ty, MANUAL_BF16), mask=mask)


@triton.jit(do_not_specialize=["total", "split"])
def _sum_splits_kernel(part_ptr, c_ptr, total, split, BLOCK: tl.constexpr, MANUAL_BF16: tl.constexpr,
                       USE_WHILE: tl.constexpr):
    """c (contiguous, total = M * N values) = the split partials summed in split order, rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if USE_WHILE:
        s = 0
        while s < split:
            acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
            s += 1
    else:
        for s in range(split):
            acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0, eviction_policy="evict_first")
    tl.store(c_ptr + offs, _round(acc, c_ptr.dtype.element_ty, MANUAL_BF16), mask=ok)


SUM_BLOCK = 1024


def tma_supported(x8: torch.Tensor, w8: torch.Tensor) -> bool:
    """Tensor descriptors for x8 [M, K] (e4m3, or x itself when the quantization is fused) and w8 [N, K]: unit
    last strides, 16-byte row strides and bases."""
    if TensorDescriptor is None or x8.shape[1] % 16 or x8.shape[0] == 0 or w8.shape[0] == 0:
        return False
    size = x8.element_size()
    return (x8.stride(1) == 1 and w8.stride(1) == 1 and (x8.stride(0) * size) % 16 == 0 and w8.stride(0) % 16 == 0
            and x8.data_ptr() % 16 == 0 and w8.data_ptr() % 16 == 0)


def launch_splitk(x8, x_scale, w8, w_scale, out, block_m, block_n, split, groups_per_split, swap_ab, num_stages,
                  num_warps, tma=False) -> None:
    """out [M, N] (contiguous) <- x8 [M, K] @ w8 [N, K]^T, block-scaled; split > 1: the K groups in `split` ranges
    of groups_per_split (none empty; the caller resolves them) summed by a second launch. tma: tensor-descriptor
    loads where tma_supported (else pointer loads). x_scale None: x8 is the unquantized x (bf16 / fp16 / fp32),
    quantized per group inside the GEMM (no quantization launch)."""
    m, k = x8.shape
    n = w8.shape[0]
    interp = interpreter_mode()
    fuse = x_scale is None
    part = torch.empty(split, m, n, dtype=torch.float32, device=x8.device) if split > 1 else out
    if fuse:
        x_scale = out  # unused: a placeholder pointer
    use_tma = tma and tma_supported(x8, w8)
    a_desc = b_desc = None
    if use_tma:
        a_desc = TensorDescriptor(x8, [m, k], [x8.stride(0), 1], [block_m, GROUP])
        b_desc = TensorDescriptor(w8, [n, k], [w8.stride(0), 1], [block_n, GROUP])
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
    _splitk_kernel[grid](
        x8, w8, out, part, x_scale, w_scale, a_desc, b_desc, m, n, k, groups_per_split, x8.stride(0), w8.stride(0),
        out.stride(0), 0 if fuse else x_scale.stride(0), w_scale.stride(0), m * n,
        BLOCK_M=block_m, BLOCK_N=block_n, PARTIAL=split > 1, SWAP_AB=swap_ab, EVEN_K=k % GROUP == 0, TMA=use_tma,
        FUSE_QUANT=fuse, MANUAL_FP8=interp, MANUAL_BF16=interp, USE_WHILE=interp, num_stages=num_stages,
        num_warps=num_warps,
    )
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](part, out, m * n, split, BLOCK=SUM_BLOCK,
                                                             MANUAL_BF16=interp, USE_WHILE=interp, num_warps=4)
