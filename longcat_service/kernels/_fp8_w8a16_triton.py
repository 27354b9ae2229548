"""Building blocks of the w8a16 weight-streaming Triton GEMMs: the decode experts (_fp8_expert_decode_triton.py)
and the dense decode linears (_fp8_dense_decode_triton.py).

The form, won by the H200 sweep of the decode experts (kernels/fp8_expert_decode.py): swap-AB (the weight rows are
the MMA's M side, so a 16-row token tile still gives Hopper's wgmma a 64+ wide M); the e4m3 weight tile
[BLOCK_N, BLOCK_K] dequantized in registers to the activation dtype with its rows' block scales (bf16(w8 * scale),
the reference's weights bit for bit; BLOCK_K divides 128: a K step lies in one scale block), exact products, fp32
accumulation; weight tiles through a TMA descriptor of the weight viewed as [E * N, K] where its layout allows
(rows of 16-byte multiples, aligned base), else through pointer loads (not a tuning variant: the path for layouts
TMA cannot take); activation rows always through pointer loads (rows past the end masked: no memory traffic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels._silu_mul_triton import _round, _to_f32

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
def _out_ptrs(out_ptr, rows, cols, s_om, row_ok, col_ok):
    """Pointers and mask of an accumulator-shaped output tile [BN, BM] (the transposed product)."""
    return (out_ptr + rows.to(tl.int64)[None, :] * s_om + cols[:, None]), col_ok[:, None] & row_ok[None, :]


@triton.jit
def _product(x_ptrs, w_ptrs, s_ptrs, w_desc, w_row, k_lo, k_hi, K, row_ok, col_ok, ks,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr,
             EVEN_K: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_WHILE: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] fp32: the transposed product of one row tile with one weight tile over the K steps in
    [k_lo, k_hi) (k_lo a multiple of BLOCK_K; columns past K masked)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if USE_WHILE:  # the interpreter cannot take runtime values as range() bounds
        k0 = k_lo
        while k0 < k_hi:
            x = _load_x(x_ptrs, k0, K, row_ok, ks, EVEN_K)
            w8, s = _load_w(w_ptrs, s_ptrs, w_desc, w_row, k0, K, col_ok, ks, EVEN_K, TMA)
            acc = _scaled_partial(acc, x, w8, s, MANUAL_BF16)
            k0 += BLOCK_K
    else:  # a for loop, so that the compiler software-pipelines the loads (num_stages)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            x = _load_x(x_ptrs, k0, K, row_ok, ks, EVEN_K)
            w8, s = _load_w(w_ptrs, s_ptrs, w_desc, w_row, k0, K, col_ok, ks, EVEN_K, TMA)
            acc = _scaled_partial(acc, x, w8, s, MANUAL_BF16)
    return acc


def tma_supported(w: torch.Tensor) -> bool:
    """A TMA descriptor of the e4m3 weight w [E, N, K] viewed as [E * N, K]: rows of 16-byte multiples, an aligned
    base, expert and row dimensions mergeable (coordinates fit int32)."""
    if TensorDescriptor is None:
        return False
    num_experts, n, k = w.shape
    mergeable = n == 1 or num_experts == 1 or w.stride(0) == n * w.stride(1)
    return (mergeable and k > 0 and num_experts * n > 0 and w.stride(2) == 1 and w.stride(1) % 16 == 0
            and w.data_ptr() % 16 == 0 and num_experts * n < 2**31)


def weight_desc(w: torch.Tensor, block_n: int, block_k: int):
    """The TMA descriptor of w [E, N, K] viewed as [E * N, K] in [block_n, block_k] tiles, or None where its layout
    needs the pointer-load fallback."""
    num_experts, n, k = w.shape
    if not tma_supported(w):
        return None
    return TensorDescriptor(w, [num_experts * n, k], [w.stride(1), 1], [block_n, block_k])


def aot_compile_kernel(fn, values: dict, constexprs: dict, num_warps: int, num_stages: int, capability: int = 90):
    """triton.compile of the jit function fn as a launch with these argument values (CPU stand-ins: specialisation
    reads only dtypes, int values and divisibility; None for an absent descriptor) would specialise it, for a CUDA
    GPU of this capability, without a GPU. Needs TRITON_INTERPRET unset at import. Returns the CompiledKernel."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or values[name] is None:
            constexprs.setdefault(name, None)
            signature[name] = "constexpr"
            continue
        ty, key = native_specialize_impl(BaseBackend, values[name], False, name not in fn.do_not_specialize, True)
        signature[name] = ty
        if ty == "constexpr":  # an int equal to 1 is specialised to a constant
            constexprs[name] = values[name]
        if key == "D":  # divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
