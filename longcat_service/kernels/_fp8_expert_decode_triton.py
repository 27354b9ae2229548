"""The Triton side of fp8_expert_decode.py: w8a16 grouped GEMMs of the decode experts, weights streamed once.

Grid (cdiv(N, BLOCK_N), experts), axis 0 fastest: the programs running at one time stream neighbouring N tiles of
a few experts. Axis 1 walks the compact active-expert list (moe_align's active_experts; a program past num_active,
read on the device, exits at once) or, without one, every expert (those without rows exit at once). A program
walks its expert's rows in BLOCK_M tiles (decode: one tile, so the weight tile is read from HBM exactly once for
all of the expert's rows; an expert with more than BLOCK_M rows re-reads it per extra tile).

One K step: the e4m3 weight tile [BLOCK_N, BLOCK_K] is dequantized in registers to the activation dtype with its
rows' block scales (bf16(w8 * scale), the reference's weights bit for bit; BLOCK_K divides 128: a step lies in one
scale block) and the tensor cores accumulate the transposed product in place (fp32): the weight rows are the MMA's
M side, so a 16-row token tile still gives Hopper's wgmma a 64+ wide M. Weight tiles come through a TMA descriptor
of the weight viewed as [E * N, K] where its layout allows (rows of 16-byte multiples, aligned base), else through
pointer loads: that fallback is not a tuning variant but the path for layouts TMA cannot take. The activation rows
are always gathered with pointer loads (rows past the expert's end masked: no memory traffic). The H200 sweep
(fp8_expert_decode.py) was won by this form; the unswapped, exact-products-scaled-in-fp32 and pointer-load (on
TMA-able weights) forms measured slower than the winner and are gone.

SwiGLU kernel: one program owns gate rows n and up rows I + n of its N tile (two accumulators); the epilogue
rounds gate and up to the activation dtype, then silu(gate) * up as eager torch does (_silu_mul_triton), and
stores h. Down kernel: y = h @ W2^T rounded to the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode
from longcat_service.kernels._silu_mul_triton import _round, _silu_mul, _to_f32

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - triton < 3.4
    TensorDescriptor = None


@triton.jit
def _scaled_partial(acc, x, w8, s, MANUAL_BF16: tl.constexpr):
    """acc [BN, BM] + (w8 * s) @ x^T, x [BM, BK], w8 e4m3 [BN, BK], s fp32 [BN] (its rows' block scales): the tile
    is dequantized to x's dtype (bf16(w8 * s): the reference's weights, bit for bit) and the tensor cores accumulate
    in place; the weight rows are the MMA's M side (Hopper's wgmma needs 64), the token rows its N side (16 do)."""
    w = _round(w8.to(tl.float32) * s[:, None], x.dtype, MANUAL_BF16)
    if MANUAL_BF16:  # the interpreter's dot multiplies bf16 as raw uint16 bits: exact fp32 operands instead
        return tl.dot(_to_f32(w, MANUAL_BF16), tl.trans(_to_f32(x, MANUAL_BF16)), acc, input_precision="ieee")
    else:
        return tl.dot(w, tl.trans(x), acc)


@triton.jit
def _load_w(w_ptrs, s_ptrs, w_desc, w_row, k0, K, col_ok, ks, EVEN_K: tl.constexpr, TMA: tl.constexpr):
    """The e4m3 weight tile at K offset k0 and its rows' scales of that K block. TMA: rows [w_row, +BLOCK_N) of
    the weight viewed as [E * N, K] (rows past the tile's N belong to the next part or expert, or are zeros past
    the end: they only meet columns that are not stored)."""
    if TMA:
        w8 = w_desc.load([w_row, k0])
    elif EVEN_K:
        w8 = tl.load(w_ptrs + k0, mask=col_ok[:, None], other=0.0)
    else:
        w8 = tl.load(w_ptrs + k0, mask=col_ok[:, None] & ((k0 + ks) < K)[None, :], other=0.0)
    s = tl.load(s_ptrs + k0 // 128, mask=col_ok, other=0.0)
    return w8, s


@triton.jit
def _load_x(x_ptrs, k0, K, row_ok, ks, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(x_ptrs + k0, mask=row_ok[:, None] & ((k0 + ks) < K)[None, :], other=0.0)


@triton.jit
def _swiglu_step(acc_g, acc_u, x_ptrs, wg_ptrs, wu_ptrs, sg_ptrs, su_ptrs, w_desc, wg_row, wu_row, k0, K, row_ok,
                 col_ok, ks, EVEN_K: tl.constexpr, TMA: tl.constexpr, MANUAL_BF16: tl.constexpr):
    x = _load_x(x_ptrs, k0, K, row_ok, ks, EVEN_K)
    wg, sg = _load_w(wg_ptrs, sg_ptrs, w_desc, wg_row, k0, K, col_ok, ks, EVEN_K, TMA)
    wu, su = _load_w(wu_ptrs, su_ptrs, w_desc, wu_row, k0, K, col_ok, ks, EVEN_K, TMA)
    acc_g = _scaled_partial(acc_g, x, wg, sg, MANUAL_BF16)
    acc_u = _scaled_partial(acc_u, x, wu, su, MANUAL_BF16)
    return acc_g, acc_u


@triton.jit
def _out_ptrs(out_ptr, rows, cols, s_om, row_ok, col_ok):
    """Pointers and mask of an accumulator-shaped output tile [BN, BM] (the transposed product)."""
    return (out_ptr + rows.to(tl.int64)[None, :] * s_om + cols[:, None]), col_ok[:, None] & row_ok[None, :]


@triton.jit
def _expert_of_program(offs_ptr, active_ptr, num_active_ptr, COMPACT: tl.constexpr):
    """(expert, first row, end row) of this program's axis-1 index; an empty range when it has no work."""
    slot = tl.program_id(1)
    if COMPACT:
        expert = tl.load(active_ptr + slot)
        valid = slot < tl.load(num_active_ptr)
        expert = tl.where(valid & (expert >= 0), expert, 0)
        start = tl.load(offs_ptr + expert)
        end = tl.where(valid, tl.load(offs_ptr + expert + 1), start)
    else:
        expert = slot
        start = tl.load(offs_ptr + expert)
        end = tl.load(offs_ptr + expert + 1)
    return expert, start, end


@triton.jit
def _swiglu_tile(
    x_ptr, h_ptr, slots_ptr, wg_ptrs, wu_ptrs, sg_ptrs, su_ptrs, w_desc, wg_row, wu_row, row0, end, cols, col_ok, ks,
    K, top_k, s_xm, s_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, MANUAL_BF16: tl.constexpr,
    USE_WHILE: tl.constexpr,
):
    """h rows [row0, min(row0 + BLOCK_M, end)) of the program's N tile."""
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(slots_ptr + rows, mask=row_ok, other=0) // top_k
    x_ptrs = x_ptr + tokens.to(tl.int64)[:, None] * s_xm + ks[None, :]
    acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros_like(acc_g)
    if USE_WHILE:  # the interpreter cannot take runtime values as range() bounds
        k0 = 0
        while k0 < K:
            acc_g, acc_u = _swiglu_step(acc_g, acc_u, x_ptrs, wg_ptrs, wu_ptrs, sg_ptrs, su_ptrs, w_desc, wg_row,
                                        wu_row, k0, K, row_ok, col_ok, ks, EVEN_K, TMA,
                                        MANUAL_BF16)
            k0 += BLOCK_K
    else:  # a for loop, so that the compiler software-pipelines the loads (num_stages)
        for k0 in range(0, K, BLOCK_K):
            acc_g, acc_u = _swiglu_step(acc_g, acc_u, x_ptrs, wg_ptrs, wu_ptrs, sg_ptrs, su_ptrs, w_desc, wg_row,
                                        wu_row, k0, K, row_ok, col_ok, ks, EVEN_K, TMA,
                                        MANUAL_BF16)
    dtype = h_ptr.dtype.element_ty
    gate = _round(acc_g, dtype, MANUAL_BF16)  # the reference's gate_up GEMM output dtype
    up = _round(acc_u, dtype, MANUAL_BF16)
    h = _silu_mul(gate, up, dtype, LIBDEVICE_EXP, MANUAL_BF16)
    h_ptrs, mask = _out_ptrs(h_ptr, rows, cols, s_hm, row_ok, col_ok)
    tl.store(h_ptrs, h, mask=mask)


@triton.jit
def _swiglu_kernel(
    x_ptr, w_ptr, s_ptr, h_ptr, offs_ptr, slots_ptr, active_ptr, num_active_ptr, w_desc,
    inter, K, top_k, s_xm, s_we, s_wn, s_se, s_sn, s_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COMPACT: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
    LIBDEVICE_EXP: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """h[r, n] = silu(x_r . Wg[e, n]) * (x_r . Wu[e, n]) for expert e's rows r, x_r = x[slots[r] // top_k]."""
    expert, start, end = _expert_of_program(offs_ptr, active_ptr, num_active_ptr, COMPACT)
    if end <= start:
        return
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * s_we
    wg_ptrs = w_base + cols.to(tl.int64)[:, None] * s_wn + ks[None, :]
    wu_ptrs = w_base + (cols + inter).to(tl.int64)[:, None] * s_wn + ks[None, :]
    wg_row = expert * (2 * inter) + n0  # TMA rows of w13 viewed as [E * 2I, H]
    wu_row = wg_row + inter
    s_base = s_ptr + expert.to(tl.int64) * s_se
    sg_ptrs = s_base + (cols // 128) * s_sn
    su_ptrs = s_base + ((cols + inter) // 128) * s_sn
    if USE_WHILE:
        row0 = start
        while row0 < end:
            _swiglu_tile(x_ptr, h_ptr, slots_ptr, wg_ptrs, wu_ptrs, sg_ptrs, su_ptrs, w_desc, wg_row, wu_row, row0, end,
                         cols, col_ok, ks, K, top_k, s_xm, s_hm, BLOCK_M, BLOCK_N, BLOCK_K, TMA,
                         EVEN_K, LIBDEVICE_EXP, MANUAL_BF16, USE_WHILE)
            row0 += BLOCK_M
    else:  # one pass per BLOCK_M rows (decode: one)
        for row0 in range(start, end, BLOCK_M):
            _swiglu_tile(x_ptr, h_ptr, slots_ptr, wg_ptrs, wu_ptrs, sg_ptrs, su_ptrs, w_desc, wg_row, wu_row, row0, end,
                         cols, col_ok, ks, K, top_k, s_xm, s_hm, BLOCK_M, BLOCK_N, BLOCK_K, TMA,
                         EVEN_K, LIBDEVICE_EXP, MANUAL_BF16, USE_WHILE)


@triton.jit
def _down_tile(
    h_ptr, y_ptr, w_ptrs, s_ptrs, w_desc, w_row, row0, end, cols, col_ok, ks, K, s_hm, s_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    x_ptrs = h_ptr + rows.to(tl.int64)[:, None] * s_hm + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if USE_WHILE:
        k0 = 0
        while k0 < K:
            x = _load_x(x_ptrs, k0, K, row_ok, ks, EVEN_K)
            w8, s = _load_w(w_ptrs, s_ptrs, w_desc, w_row, k0, K, col_ok, ks, EVEN_K, TMA)
            acc = _scaled_partial(acc, x, w8, s, MANUAL_BF16)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            x = _load_x(x_ptrs, k0, K, row_ok, ks, EVEN_K)
            w8, s = _load_w(w_ptrs, s_ptrs, w_desc, w_row, k0, K, col_ok, ks, EVEN_K, TMA)
            acc = _scaled_partial(acc, x, w8, s, MANUAL_BF16)
    y_ptrs, mask = _out_ptrs(y_ptr, rows, cols, s_ym, row_ok, col_ok)
    tl.store(y_ptrs, _round(acc, y_ptr.dtype.element_ty, MANUAL_BF16), mask=mask)


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, s_ptr, y_ptr, offs_ptr, active_ptr, num_active_ptr, w_desc,
    N, K, s_hm, s_we, s_wn, s_se, s_sn, s_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COMPACT: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
    MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr,
):
    """y[r, n] = h_r . W2[e, n] for expert e's rows r."""
    expert, start, end = _expert_of_program(offs_ptr, active_ptr, num_active_ptr, COMPACT)
    if end <= start:
        return
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + expert.to(tl.int64) * s_we + cols.to(tl.int64)[:, None] * s_wn + ks[None, :]
    w_row = expert * N + n0  # TMA rows of w2 viewed as [E * H, I]
    s_ptrs = s_ptr + expert.to(tl.int64) * s_se + (cols // 128) * s_sn
    if USE_WHILE:
        row0 = start
        while row0 < end:
            _down_tile(h_ptr, y_ptr, w_ptrs, s_ptrs, w_desc, w_row, row0, end, cols, col_ok, ks, K, s_hm, s_ym,
                       BLOCK_M, BLOCK_N, BLOCK_K, TMA, EVEN_K, MANUAL_BF16, USE_WHILE)
            row0 += BLOCK_M
    else:
        for row0 in range(start, end, BLOCK_M):
            _down_tile(h_ptr, y_ptr, w_ptrs, s_ptrs, w_desc, w_row, row0, end, cols, col_ok, ks, K, s_hm, s_ym,
                       BLOCK_M, BLOCK_N, BLOCK_K, TMA, EVEN_K, MANUAL_BF16, USE_WHILE)


def _routing_args(expert_offsets, active_experts, num_active, num_experts, num_slots):
    """(offsets, active, num_active, grid rows, compact): the compact list bounds the grid by min(E, T*k)."""
    if active_experts is None or num_active is None:
        return expert_offsets, expert_offsets, expert_offsets, num_experts, False
    return expert_offsets, active_experts, num_active, min(num_experts, num_slots), True


def tma_supported(w: torch.Tensor) -> bool:
    """A TMA descriptor of the e4m3 weight w [E, N, K] viewed as [E * N, K]: rows of 16-byte multiples, an aligned
    base, expert and row dimensions mergeable (coordinates fit int32)."""
    if TensorDescriptor is None:
        return False
    num_experts, n, k = w.shape
    mergeable = n == 1 or num_experts == 1 or w.stride(0) == n * w.stride(1)
    return (mergeable and k > 0 and num_experts * n > 0 and w.stride(2) == 1 and w.stride(1) % 16 == 0
            and w.data_ptr() % 16 == 0 and num_experts * n < 2**31)


def _w_desc(w: torch.Tensor, config):
    """The weight's TMA descriptor, or None where its layout needs the pointer-load fallback."""
    num_experts, n, k = w.shape
    if not tma_supported(w):
        return None
    return TensorDescriptor(w, [num_experts * n, k], [w.stride(1), 1], [config.block_n, config.block_k])


def launch_swiglu(hidden, w13, w13_scale, h, expert_offsets, sorted_slots, top_k, active_experts, num_active,
                  config) -> None:
    """h [S, I] <- the SwiGLU rows (rows of no expert left unwritten). Tensors already checked by the caller."""
    num_experts, two_i, k = w13.shape
    inter = two_i // 2
    offs, active, count, grid_rows, compact = _routing_args(expert_offsets, active_experts, num_active,
                                                            num_experts, sorted_slots.shape[0])
    interp = interpreter_mode()
    w_desc = _w_desc(w13, config)
    grid = (triton.cdiv(inter, config.block_n), grid_rows)
    _swiglu_kernel[grid](
        hidden, w13, w13_scale, h, offs, sorted_slots, active, count, w_desc, inter, k, top_k, hidden.stride(0),
        w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1), h.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, COMPACT=compact,
        TMA=w_desc is not None, EVEN_K=k % config.block_k == 0,
        LIBDEVICE_EXP=not interp, MANUAL_BF16=interp, USE_WHILE=interp, num_stages=config.num_stages,
        num_warps=config.num_warps,
    )


def launch_down(h, w2, w2_scale, y, expert_offsets, active_experts, num_active, config) -> None:
    """y [S, H] <- h @ W2^T per expert's rows (rows of no expert left unwritten)."""
    num_experts, n, k = w2.shape
    offs, active, count, grid_rows, compact = _routing_args(expert_offsets, active_experts, num_active,
                                                            num_experts, h.shape[0])
    interp = interpreter_mode()
    w_desc = _w_desc(w2, config)
    grid = (triton.cdiv(n, config.block_n), grid_rows)
    _down_kernel[grid](
        h, w2, w2_scale, y, offs, active, count, w_desc, n, k, h.stride(0), w2.stride(0), w2.stride(1),
        w2_scale.stride(0), w2_scale.stride(1), y.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, COMPACT=compact,
        TMA=w_desc is not None, EVEN_K=k % config.block_k == 0,
        MANUAL_BF16=interp, USE_WHILE=interp, num_stages=config.num_stages, num_warps=config.num_warps,
    )


def aot_compile(config, kind: str, hidden: int = 6144, inter: int = 2048, num_experts: int = 512, top_k: int = 12,
                compact: bool = True, dtype: torch.dtype = torch.bfloat16, capability: int = 90):
    """triton.compile of the SwiGLU ("swiglu") or down ("down") kernel as the launches would specialise it for
    these shapes (default LongCat-Flash's), for a CUDA GPU of this capability, without a GPU (an offline check of the
    GPU path, which the interpreter does not compile). Needs TRITON_INTERPRET unset at import. Returns triton's
    CompiledKernel."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    act, fp8, i32 = dtype, torch.float8_e4m3fn, torch.int32
    ints = torch.empty(num_experts + 1, dtype=i32)
    if kind == "swiglu":
        fn, n, k, rows = _swiglu_kernel, inter, hidden, 2 * inter
        values = dict(x_ptr=torch.empty(1, dtype=act), w_ptr=torch.empty(1, dtype=fp8), s_ptr=torch.empty(1),
                      h_ptr=torch.empty(1, dtype=act), offs_ptr=ints, slots_ptr=ints, active_ptr=ints,
                      num_active_ptr=ints, inter=n, K=k, top_k=top_k, s_xm=k, s_we=2 * n * k, s_wn=k,
                      s_se=-(-2 * n // 128) * -(-k // 128), s_sn=-(-k // 128), s_hm=n)
        extra = dict(LIBDEVICE_EXP=True)
    elif kind == "down":
        fn, n, k, rows = _down_kernel, hidden, inter, hidden
        values = dict(h_ptr=torch.empty(1, dtype=act), w_ptr=torch.empty(1, dtype=fp8), s_ptr=torch.empty(1),
                      y_ptr=torch.empty(1, dtype=act), offs_ptr=ints, active_ptr=ints, num_active_ptr=ints, N=n,
                      K=k, s_hm=k, s_we=n * k, s_wn=k, s_se=-(-n // 128) * -(-k // 128), s_sn=-(-k // 128), s_ym=n)
        extra = {}
    else:
        raise ValueError(f"aot_compile: kind must be 'swiglu' or 'down', got {kind!r}")
    use_tma = TensorDescriptor is not None and k % 16 == 0  # tma_supported() on contiguous weights
    values["w_desc"] = None
    if use_tma:  # a CPU stand-in: specialisation reads the block shape and dtype
        w_rows = torch.empty(64, k, dtype=fp8)
        values["w_desc"] = TensorDescriptor(w_rows, [num_experts * rows, k], [k, 1], [config.block_n, config.block_k])
    constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, COMPACT=compact,
                      TMA=use_tma, EVEN_K=k % config.block_k == 0,
                      MANUAL_BF16=False, USE_WHILE=False, **extra)
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
