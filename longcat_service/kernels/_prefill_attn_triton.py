"""The Triton side of prefill_attn (kept apart so that importing prefill_attn never imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _tile(ptrs, rmask, cmask, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """Load a [rows, cols] tile, masking only the axes that can run out of range (an unmasked load vectorises)."""
    if ROW_MASK and COL_MASK:
        x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
    elif ROW_MASK:
        x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    elif COL_MASK:
        x = tl.load(ptrs, mask=cmask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_block(acc, m_i, l_i, q_a, q_b, ka_base, kb_base, v_base, n0, rows, seq_len, offset, s_kan, s_kbn, s_vn,
               qk_scale, offs_a, offs_b, offs_v, amask, bmask, vmask,
               HAS_B: tl.constexpr, A_PAD: tl.constexpr, B_PAD: tl.constexpr, V_PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               WIDE: tl.constexpr):
    """One BLOCK_N-key step of the online softmax (base-2: qk_scale already holds log2(e))."""
    offs_n = tl.arange(0, BLOCK_N)
    cols = n0 + offs_n
    if WIDE:  # n0 * (heads * 256) passes 2**31 past ~131K keys at 64 heads (k_nope / v: views of kv_b_proj's output)
        ka_base += tl.cast(n0, tl.int64) * s_kan
        kb_base += tl.cast(n0, tl.int64) * s_kbn
        v_base += tl.cast(n0, tl.int64) * s_vn
    else:  # 32-bit: the 64-bit form made ptxas serialise the wgmmas (C7515) when compiled for sm_90a
        ka_base += n0 * s_kan
        kb_base += n0 * s_kbn
        v_base += n0 * s_vn
    # Blocks below the diagonal lie wholly inside [0, S) and the causal window: no key masks on their loads;
    # only the diagonal blocks pay for them.
    kmask = cols < seq_len
    k_a = _tile(ka_base + offs_n[:, None] * s_kan + offs_a[None, :], kmask, amask, DIAGONAL, A_PAD, UPCAST)
    qk = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
    if HAS_B:  # MLA's rope part (64 of 192): a second dot against the key shared by all heads (head stride 0)
        k_b = _tile(kb_base + offs_n[:, None] * s_kbn + offs_b[None, :], kmask, bmask, DIAGONAL, B_PAD, UPCAST)
        qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=DOT_PRECISION)
    qk = qk * qk_scale
    if DIAGONAL:  # bottom-right-aligned causal: query row i sees keys j <= offset + i
        qk = tl.where((cols[None, :] <= offset + rows[:, None]) & kmask[None, :], qk, float("-inf"))
    # Every row sees key 0 from its first block on, so m_new is finite and no NaN can arise here.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _tile(v_base + offs_n[:, None] * s_vn + offs_v[None, :], kmask, vmask, DIAGONAL, V_PAD, UPCAST)
    # rescale first, then accumulate inside the dot (a separate add makes ptxas serialise the wgmmas)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# The segment lengths change with every prompt and chunk. Specialized (== 1, divisible by 16) they make up to 9
# binaries per kernel shape, and a binary the start-up warm-up did not build compiles inside a request's time: the
# likely cause of a fresh H200 server's slow first serving run (0.75 of offline throughput, then 1.00 once Triton's
# cache was warm). They only bound row masks and the causal offset, never the contiguous dimension: an offline
# sm_90 compile gives the same loads, stores, cp.async, wgmma and shared memory either way (a few more predicates).
@triton.jit(do_not_specialize=["num_queries", "seq_len"])
def _prefill_fwd(
    qa_ptr, qb_ptr, ka_ptr, kb_ptr, v_ptr, o_ptr, qk_scale, num_queries, seq_len,
    s_qam, s_qah, s_qbm, s_qbh, s_kan, s_kah, s_kbn, s_kbh, s_vn, s_vh, s_om, s_oh,
    D_A: tl.constexpr, D_A_PAD: tl.constexpr, D_B: tl.constexpr, D_B_PAD: tl.constexpr,
    D_V: tl.constexpr, D_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_WHILE: tl.constexpr, WIDE: tl.constexpr,
):
    # Axis 0 (fastest) walks the query blocks of one head, so programs that stream the same head's K/V run
    # together (L2 reuse); the last query blocks (the most keys) go first, so the causal tail is short ones.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    offset = seq_len - num_queries
    rows = start_m + tl.arange(0, BLOCK_M)
    rmask = rows < num_queries

    offs_a = tl.arange(0, D_A_PAD)
    offs_b = tl.arange(0, D_B_PAD)
    offs_v = tl.arange(0, D_V_PAD)
    amask = offs_a < D_A
    bmask = offs_b < D_B
    vmask = offs_v < D_V
    HAS_B: tl.constexpr = D_B > 0
    A_PAD: tl.constexpr = D_A_PAD > D_A
    B_PAD: tl.constexpr = D_B_PAD > D_B
    V_PAD: tl.constexpr = D_V_PAD > D_V
    q_a = _tile(qa_ptr + head * s_qah + rows[:, None].to(tl.int64) * s_qam + offs_a[None, :], rmask, amask, True,
                A_PAD, UPCAST)
    if HAS_B:
        q_b = _tile(qb_ptr + head * s_qbh + rows[:, None].to(tl.int64) * s_qbm + offs_b[None, :], rmask, bmask,
                    True, B_PAD, UPCAST)
    else:
        q_b = q_a  # unused placeholder
    ka_base = ka_ptr + head * s_kah
    kb_base = kb_ptr + head * s_kbh  # s_kbh = 0: MLA's rope key, one for all heads
    v_base = v_ptr + head * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_V_PAD], tl.float32)
    # Keys [0, full_end) are visible to every row of this tile; [full_end, hi) straddle the diagonal; blocks
    # past hi are above it for every row and are never loaded.
    full_end = ((offset + start_m + 1) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(seq_len, offset + start_m + BLOCK_M)
    if USE_WHILE:  # Triton's CPU interpreter cannot take computed tensors as range() bounds
        n0 = 0
        while n0 < hi:
            acc, m_i, l_i = _key_block(acc, m_i, l_i, q_a, q_b, ka_base, kb_base, v_base, n0, rows, seq_len, offset,
                                       s_kan, s_kbn, s_vn, qk_scale, offs_a, offs_b, offs_v, amask, bmask, vmask,
                                       HAS_B, A_PAD, B_PAD, V_PAD, BLOCK_N, n0 >= full_end, DOT_PRECISION, UPCAST,
                                       WIDE)
            n0 += BLOCK_N
    else:  # two for loops, so that the compiler software-pipelines the K/V loads (num_stages)
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _key_block(acc, m_i, l_i, q_a, q_b, ka_base, kb_base, v_base, n0, rows, seq_len, offset,
                                       s_kan, s_kbn, s_vn, qk_scale, offs_a, offs_b, offs_v, amask, bmask, vmask,
                                       HAS_B, A_PAD, B_PAD, V_PAD, BLOCK_N, False, DOT_PRECISION, UPCAST, WIDE)
        for n0 in range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = _key_block(acc, m_i, l_i, q_a, q_b, ka_base, kb_base, v_base, n0, rows, seq_len, offset,
                                       s_kan, s_kbn, s_vn, qk_scale, offs_a, offs_b, offs_v, amask, bmask, vmask,
                                       HAS_B, A_PAD, B_PAD, V_PAD, BLOCK_N, True, DOT_PRECISION, UPCAST, WIDE)

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + head * s_oh + rows[:, None].to(tl.int64) * s_om + offs_v[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & vmask[None, :])


def _head_strides(t: torch.Tensor) -> tuple[int, int]:
    """(token stride, head stride) of a [tokens, heads, d] tensor, or of a [tokens, d] one shared by every head."""
    return (t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), 0)


def launch(q_a, q_b, k_a, k_b, v, scale, block_m, block_n, num_warps, num_stages, wide=None, out=None):
    """q_a [Q, h, da] . k_a [S, h, da] (+ q_b [Q, h, db] . k_b [S, h, db] or [S, db] when q_b is not None)."""
    num_queries, heads, d_a = q_a.shape
    seq_len, d_v = k_a.shape[0], v.shape[-1]
    if out is None:
        out = torch.empty(num_queries, heads, d_v, dtype=q_a.dtype, device=q_a.device)
    if num_queries == 0 or heads == 0:
        return out
    has_b = q_b is not None
    d_b = q_b.shape[-1] if has_b else 0
    if not has_b:  # placeholders, never read (HAS_B is false)
        q_b, k_b = q_a, k_a
    s_kbn, s_kbh = _head_strides(k_b)
    precision = "ieee" if q_a.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32; bf16 dots ignore it
    grid = (triton.cdiv(num_queries, block_m), heads)
    _prefill_fwd[grid](
        q_a, q_b, k_a, k_b, v, out, float(scale) * LOG2E, num_queries, seq_len,
        q_a.stride(0), q_a.stride(1), q_b.stride(0), q_b.stride(1), k_a.stride(0), k_a.stride(1), s_kbn, s_kbh,
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        D_A=d_a, D_A_PAD=next_pow2(d_a), D_B=d_b, D_B_PAD=next_pow2(d_b),  # tl.dot needs dims >= 16
        D_V=d_v, D_V_PAD=next_pow2(d_v),
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
        UPCAST=interpreter_mode(),  # the CPU interpreter has no bf16 matmul: compute in fp32 there
        USE_WHILE=interpreter_mode(),
        WIDE=max(k_a.stride(0), s_kbn, v.stride(0)) * seq_len >= 2**31 if wide is None else wide,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
