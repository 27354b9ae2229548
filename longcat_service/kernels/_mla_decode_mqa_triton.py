"""The Triton side of mla_decode, MQA form: after W_UK absorption all heads of a sequence share its latent cache,
so one stage-1 program takes a whole block of heads (up to 64) as the M side of its tensor-core dots and loads
each cache tile once for all of them (kept apart from mla_decode so that importing that never imports triton).

Softmax in base 2: scores are pre-multiplied by scale * log2(e) and exponentiated with exp2 (same math as
exp(scale * s)); the partial log-sum-exps are base 2 too, which only this file's merge reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split of a row (stage 1 and the merge must agree): the row cut into NUM_SPLITS even chunks
    rounded up to BLOCK_N (at least BLOCK_N, also for an empty row). Splits 0 .. cdiv(seq_len, split_len) - 1
    hold tokens, the rest none (all of them when seq_len is 0)."""
    even = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return tl.maximum(even, BLOCK_N)


@triton.jit
def _tile(n0, end, m_i, l_i, acc, q_lat, q_rope, cache_ptr, tables_ptr, b, s_tb, s_cb, s_ct, block_size, qk_scale,
          offs_n, offs_r, offs_d, rmask, dmask, RANK: tl.constexpr, DOT_PRECISION: tl.constexpr,
          UPCAST: tl.constexpr, FIRST_POS: tl.constexpr):
    """One BLOCK_N-token step of the online softmax for all BLOCK_H heads (positions < FIRST_POS masked out)."""
    pos = n0 + offs_n
    pmask = (pos < end) & (pos >= FIRST_POS)
    page = tl.load(tables_ptr + b * s_tb + pos // block_size, mask=pmask, other=0).to(tl.int64)
    row = page * s_cb + (pos % block_size).to(tl.int64) * s_ct
    lat = tl.load(cache_ptr + row[:, None] + offs_r[None, :], mask=pmask[:, None] & rmask[None, :], other=0.0)
    rope = tl.load(cache_ptr + row[:, None] + RANK + offs_d[None, :], mask=pmask[:, None] & dmask[None, :],
                   other=0.0)
    if UPCAST:
        lat = lat.to(tl.float32)
        rope = rope.to(tl.float32)
    s = tl.dot(q_lat, tl.trans(lat), input_precision=DOT_PRECISION)
    s = tl.dot(q_rope, tl.trans(rope), s, input_precision=DOT_PRECISION)
    s = tl.where(pmask[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows with nothing seen yet keep m = -inf: shift by 0 there so no (-inf) - (-inf) NaN appears
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(lat.dtype), lat, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _split_attention(q_lat_ptr, q_rope_ptr, cache_ptr, tables_ptr, b, heads, hmask, start, end, qk_scale, block_size,
                     s_qlb, s_qlh, s_qrb, s_qrh, s_cb, s_ct, s_tb,
                     RANK: tl.constexpr, ROPE: tl.constexpr, RANK_PAD: tl.constexpr, ROPE_PAD: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     USE_WHILE: tl.constexpr, FIRST_POS: tl.constexpr):
    """Positions start..end-1 of row b for BLOCK_H heads -> normalised output [BLOCK_H, RANK_PAD] (zeros where no
    position is attended) and base-2 log-sum-exp [BLOCK_H] (-inf there)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK_PAD)
    offs_d = tl.arange(0, ROPE_PAD)
    rmask = offs_r < RANK
    dmask = offs_d < ROPE
    q_lat = tl.load(q_lat_ptr + b * s_qlb + heads[:, None] * s_qlh + offs_r[None, :],
                    mask=hmask[:, None] & rmask[None, :], other=0.0)
    q_rope = tl.load(q_rope_ptr + b * s_qrb + heads[:, None] * s_qrh + offs_d[None, :],
                     mask=hmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter has no bf16 matmul
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RANK_PAD], tl.float32)
    if USE_WHILE:  # Triton's CPU interpreter cannot take device values as range() bounds
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _tile(n0, end, m_i, l_i, acc, q_lat, q_rope, cache_ptr, tables_ptr, b, s_tb, s_cb, s_ct,
                                  block_size, qk_scale, offs_n, offs_r, offs_d, rmask, dmask, RANK, DOT_PRECISION,
                                  UPCAST, FIRST_POS)
            n0 += BLOCK_N
    else:  # a for loop, so that the compiler software-pipelines the cache loads (num_stages)
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _tile(n0, end, m_i, l_i, acc, q_lat, q_rope, cache_ptr, tables_ptr, b, s_tb, s_cb, s_ct,
                                  block_size, qk_scale, offs_n, offs_r, offs_d, rmask, dmask, RANK, DOT_PRECISION,
                                  UPCAST, FIRST_POS)
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def stage1(
    q_lat_ptr, q_rope_ptr, cache_ptr, tables_ptr, lens_ptr, part_out_ptr, part_lse_ptr, out_ptr,
    qk_scale, num_heads, block_size,
    s_qlb, s_qlh, s_qrb, s_qrh, s_cb, s_ct, s_tb,
    s_pob, s_poh, s_pos, s_plb, s_plh, s_ob, s_oh,
    RANK: tl.constexpr, ROPE: tl.constexpr, RANK_PAD: tl.constexpr, ROPE_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_WHILE: tl.constexpr, FIRST_POS: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
):
    """Program (head block, split, row): the split's normalised partial output [BLOCK_H, RANK] and base-2
    log-sum-exp [BLOCK_H]. DIRECT_OUT (one split, no W_UV): the final output in the model dtype instead, zeros for
    an empty row, and no merge launch."""
    hb = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    length = split_len(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * length
    end = tl.minimum(start + length, seq_len)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < num_heads
    offs_r = tl.arange(0, RANK_PAD)
    rmask = offs_r < RANK
    if DIRECT_OUT:
        out, lse = _split_attention(q_lat_ptr, q_rope_ptr, cache_ptr, tables_ptr, b, heads, hmask, start, end,
                                    qk_scale, block_size, s_qlb, s_qlh, s_qrb, s_qrh, s_cb, s_ct, s_tb, RANK, ROPE,
                                    RANK_PAD, ROPE_PAD, BLOCK_H, BLOCK_N, DOT_PRECISION, UPCAST, USE_WHILE, FIRST_POS)
        tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + offs_r[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=hmask[:, None] & rmask[None, :])
    elif start < seq_len:  # a split past the row's end loads and stores nothing: the merge reads only active ones
        out, lse = _split_attention(q_lat_ptr, q_rope_ptr, cache_ptr, tables_ptr, b, heads, hmask, start, end,
                                    qk_scale, block_size, s_qlb, s_qlh, s_qrb, s_qrh, s_cb, s_ct, s_tb, RANK, ROPE,
                                    RANK_PAD, ROPE_PAD, BLOCK_H, BLOCK_N, DOT_PRECISION, UPCAST, USE_WHILE, FIRST_POS)
        tl.store(part_out_ptr + b * s_pob + heads[:, None] * s_poh + split * s_pos + offs_r[None, :], out,
                 mask=hmask[:, None] & rmask[None, :])
        tl.store(part_lse_ptr + b * s_plb + heads * s_plh + split, lse, mask=hmask)


@triton.jit
def _merge(part_out_ptr, part_lse_ptr, lens_ptr, b, h, s_pob, s_poh, s_pos, s_plb, s_plh, offs_r, rmask,
           NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (row, head)'s active split partials merged by their log-sum-exps -> normalised fp32 [RANK_PAD]. All
    splits in one masked load (no serial chain of loads), not waiting for the log-sum-exps (every active split's
    partial is written by stage 1, zeros where FIRST_POS masks all its tokens, whose weight is 0); inactive splits
    are masked, so they are never read and a row with seq_len 0 gives zeros. This early issue measured faster than
    masking the partials' load with the log-sum-exps' weights (H200, 2026-12-04, 64 heads, tile 32,2: 0.0-0.8 us
    less a call at batches 1-64, contexts 256 and 1024)."""
    seq_len = tl.load(lens_ptr + b)
    n_active = tl.minimum(tl.cdiv(seq_len, split_len(seq_len, NUM_SPLITS, BLOCK_N)), NUM_SPLITS)
    offs_s = tl.arange(0, SPLITS_PAD)
    smask = offs_s < n_active
    lse = tl.load(part_lse_ptr + b * s_plb + h * s_plh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    part = tl.load(part_out_ptr + b * s_pob + h * s_poh + offs_s[:, None] * s_pos + offs_r[None, :],
                   mask=smask[:, None] & rmask[None, :], other=0.0)
    total = tl.sum(w, 0)
    return tl.sum(part * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)


@triton.jit
def stage2(
    part_out_ptr, part_lse_ptr, lens_ptr, out_ptr,
    s_pob, s_poh, s_pos, s_plb, s_plh, s_ob, s_oh,
    RANK: tl.constexpr, RANK_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    offs_r = tl.arange(0, RANK_PAD)
    rmask = offs_r < RANK
    out = _merge(part_out_ptr, part_lse_ptr, lens_ptr, b, h, s_pob, s_poh, s_pos, s_plb, s_plh, offs_r, rmask,
                 NUM_SPLITS, SPLITS_PAD, BLOCK_N)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_r, out.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def stage2_uv(
    part_out_ptr, part_lse_ptr, lens_ptr, w_ptr, out_ptr,
    s_pob, s_poh, s_pos, s_plb, s_plh, s_wh, s_wd, s_ob, s_oh,
    RANK: tl.constexpr, RANK_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr,
):
    """stage2, then this head's W_UV: out[b, h, d] = o_latent[b, h] . w_uv[h, d] for BLOCK_D columns d. Each of the
    DV / BLOCK_D programs of a head merges the (L2-resident) partials itself: no o_latent round trip, no bmm."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    offs_r = tl.arange(0, RANK_PAD)
    rmask = offs_r < RANK
    offs_d = d0 + tl.arange(0, BLOCK_D)
    dmask = offs_d < DV
    # the W_UV tile's load issued before the merge's, so that both are in flight together
    wt = tl.load(w_ptr + h * s_wh + offs_d[:, None] * s_wd + offs_r[None, :], mask=dmask[:, None] & rmask[None, :],
                 other=0.0)
    o = _merge(part_out_ptr, part_lse_ptr, lens_ptr, b, h, s_pob, s_poh, s_pos, s_plb, s_plh, offs_r, rmask,
               NUM_SPLITS, SPLITS_PAD, BLOCK_N)
    # o_latent rounded to the model dtype first, as the unfused path stores it before its bmm
    o = o.to(out_ptr.dtype.element_ty).to(tl.float32)
    y = tl.sum(wt.to(tl.float32) * o[None, :], axis=1)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_d, y.to(out_ptr.dtype.element_ty), mask=dmask)


def launch(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale, cfg, w_uv=None, parts=None):
    """cfg: mla_decode.launch_config for this batch (grids and constexprs: nothing here depends on seq_lens).
    parts: (part_out [B, h, splits, r], part_lse [B, h, splits]) fp32 buffers for stage 1 (tests; default new)."""
    batch, heads, rank = q_latent.shape
    dev = q_latent.device
    direct = cfg.stage1["DIRECT_OUT"]
    if parts is not None:
        part_out, part_lse = parts
    elif direct:  # stage 1 writes no partials: a placeholder for the unused pointer arguments
        part_out = part_lse = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=dev)
    else:
        part_out = torch.empty(batch, heads, cfg.num_splits, rank, dtype=torch.float32, device=dev)
        part_lse = torch.empty(batch, heads, cfg.num_splits, dtype=torch.float32, device=dev)
    out = (torch.empty_like(q_latent, memory_format=torch.contiguous_format) if w_uv is None
           else torch.empty(batch, heads, w_uv.shape[1], dtype=q_latent.dtype, device=dev))
    if batch == 0:
        return out
    strides = (part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1))
    stage1[cfg.grid1](
        q_latent, q_rope, kv_cache, block_tables, seq_lens, part_out, part_lse, out,
        float(scale) * LOG2E, heads, kv_cache.shape[1],
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        *strides, out.stride(0), out.stride(1),
        **cfg.stage1,
    )
    if direct:
        return out
    if w_uv is not None:
        stage2_uv[cfg.grid2](part_out, part_lse, seq_lens, w_uv, out, *strides, w_uv.stride(0), w_uv.stride(1),
                             out.stride(0), out.stride(1), **cfg.stage2)
    else:
        stage2[cfg.grid2](part_out, part_lse, seq_lens, out, *strides, out.stride(0), out.stride(1), **cfg.stage2)
    return out
