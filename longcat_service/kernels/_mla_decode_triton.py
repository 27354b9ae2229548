"""The small-batch Triton side of mla_decode (below mla_decode.MQA_MIN_ROWS rows, where it measured faster than the
MQA-form kernels on the H200): 16-head programs (each cache tile loaded once per 16 heads), a split merge of all
active splits in one load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_service.kernels import interpreter_mode, next_pow2

BLOCK_N = 32  # cache tokens per inner step
BLOCK_H = 16  # heads per program
TARGET_PROGRAMS = 2 * 132  # ~2 programs per H200 SM
MAX_SPLITS = 32
# 2 pipeline stages: each 32-token step waits for a synchronous page-index load, then its cache rows. 3 (page
# indices loaded asynchronously) and 5 (also two cache tiles in flight) measured slower on the H200 (2026-12-04,
# 64 heads, us per call, stages 2 / 3 / 5): batch 1 at 256 tokens 9.9 / 11.1 / 13.4, at 1024 15.3 / 16.7 / 18.6;
# batch 16 at 1024 47.1 / 56.1 / 59.0; batch 64 at 1024 127.9 / 148.0 / 141.3.
STAGE1_WARPS, STAGE1_STAGES = 4, 2
UV_BLOCK_D = 32  # W_UV columns per program of the W_UV merge stage


def choose_num_splits(batch: int, num_heads: int) -> int:
    programs = batch * -(-num_heads // BLOCK_H)
    return max(1, min(MAX_SPLITS, -(-TARGET_PROGRAMS // programs)))


def launch_config(batch, heads, rank, rope, dtype, dv=None, num_splits=None, first_pos=0):
    """The fields of these kernels' mla_decode.LaunchConfig, in its order (that module builds it: importing it here
    would make an import cycle)."""
    if num_splits is None:
        num_splits = choose_num_splits(batch, heads)
    interp = interpreter_mode()
    rank_pad = next_pow2(rank)
    stage1 = dict(
        RANK=rank, ROPE=rope, RANK_PAD=rank_pad, ROPE_PAD=next_pow2(rope), NUM_SPLITS=num_splits, BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=interp,
        USE_WHILE=interp, FIRST_POS=first_pos, num_warps=STAGE1_WARPS, num_stages=STAGE1_STAGES,
    )
    # the merge holds every split's partial in registers at once: 8 warps from 16 splits (as the MQA merge)
    splits_pad = next_pow2(num_splits, minimum=2)
    stage2 = dict(RANK=rank, RANK_PAD=rank_pad, NUM_SPLITS=num_splits, BLOCK_N=BLOCK_N, SPLITS_PAD=splits_pad,
                  num_warps=8 if splits_pad >= 16 else 4)
    grid1 = (-(-heads // BLOCK_H), num_splits, batch)
    if dv is None:
        return num_splits, grid1, (heads, batch), stage1, stage2
    block_d = min(UV_BLOCK_D, next_pow2(dv))
    stage2.update(BLOCK_D=block_d, DV=dv)
    return num_splits, grid1, (heads, batch, -(-dv // block_d)), stage1, stage2


@triton.jit
def _chunk(n0, end, m_i, l_i, acc, q_lat, q_rope, cache_ptr, tables_ptr, b, s_tb, s_cb, s_ct, block_size, scale,
           offs_r, offs_d, rmask, dmask, RANK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
           UPCAST: tl.constexpr, FIRST_POS: tl.constexpr):
    """One BLOCK_N-token step of the online softmax (positions before FIRST_POS are masked out)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    pmask = (pos < end) & (pos >= FIRST_POS)
    page = tl.load(tables_ptr + b * s_tb + pos // block_size, mask=pmask, other=0).to(tl.int64)
    row = page * s_cb + (pos % block_size).to(tl.int64) * s_ct
    lat = tl.load(cache_ptr + row[:, None] + offs_r[None, :], mask=pmask[:, None] & rmask[None, :], other=0.0)
    rope = tl.load(cache_ptr + row[:, None] + RANK + offs_d[None, :], mask=pmask[:, None] & dmask[None, :],
                   other=0.0)
    if UPCAST:
        lat = lat.to(tl.float32)
        rope = rope.to(tl.float32)
    qk = tl.dot(q_lat, tl.trans(lat), input_precision=DOT_PRECISION)
    qk += tl.dot(q_rope, tl.trans(rope), input_precision=DOT_PRECISION)
    qk = tl.where(pmask[None, :], qk * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp(qk - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split of a row (stage 1 and the merge must agree): the row cut into NUM_SPLITS even chunks
    rounded up to BLOCK_N (at least BLOCK_N, also for an empty row). Splits 0 .. cdiv(seq_len, split_len) - 1
    hold tokens, the rest none (all of them when seq_len is 0)."""
    even = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return tl.maximum(even, BLOCK_N)


@triton.jit
def _stage1(
    q_lat_ptr, q_rope_ptr, cache_ptr, tables_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
    scale, num_heads, block_size,
    s_qlb, s_qlh, s_qrb, s_qrh, s_cb, s_ct, s_tb,
    s_pob, s_poh, s_pos, s_plb, s_plh,
    RANK: tl.constexpr, ROPE: tl.constexpr, RANK_PAD: tl.constexpr, ROPE_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_WHILE: tl.constexpr, FIRST_POS: tl.constexpr,
):
    # head block varies fastest so programs that read the same cache chunk run together (L2 reuse)
    hb = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    split_len = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    # a split past the row's end loads and stores nothing: the merge reads only the splits that hold tokens
    active = start < seq_len

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = (heads < num_heads) & active
    offs_r = tl.arange(0, RANK_PAD)
    offs_d = tl.arange(0, ROPE_PAD)
    rmask = offs_r < RANK
    dmask = offs_d < ROPE
    q_lat = tl.load(q_lat_ptr + b * s_qlb + heads[:, None] * s_qlh + offs_r[None, :],
                    mask=hmask[:, None] & rmask[None, :], other=0.0)
    q_rope = tl.load(q_rope_ptr + b * s_qrb + heads[:, None] * s_qrh + offs_d[None, :],
                     mask=hmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RANK_PAD], tl.float32)
    if USE_WHILE:  # Triton's CPU interpreter cannot take device values as range() bounds
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _chunk(n0, end, m_i, l_i, acc, q_lat, q_rope, cache_ptr, tables_ptr, b, s_tb, s_cb, s_ct,
                                   block_size, scale, offs_r, offs_d, rmask, dmask, RANK, BLOCK_N, DOT_PRECISION,
                                   UPCAST, FIRST_POS)
            n0 += BLOCK_N
    else:  # a for loop, so that the compiler software-pipelines the cache loads (num_stages)
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _chunk(n0, end, m_i, l_i, acc, q_lat, q_rope, cache_ptr, tables_ptr, b, s_tb, s_cb, s_ct,
                                   block_size, scale, offs_r, offs_d, rmask, dmask, RANK, BLOCK_N, DOT_PRECISION,
                                   UPCAST, FIRST_POS)

    has = l_i > 0.0  # true for a split that holds tokens (the merge reads no other) unless FIRST_POS masks them all
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(part_out_ptr + b * s_pob + heads[:, None] * s_poh + split * s_pos + offs_r[None, :], out,
             mask=hmask[:, None] & rmask[None, :])
    tl.store(part_lse_ptr + b * s_plb + heads * s_plh + split, lse, mask=hmask)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, lens_ptr, b, h, s_pob, s_poh, s_pos, s_plb, s_plh, offs_r, rmask,
                  NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One (row, head)'s split partials merged by their log-sum-exps -> the normalised fp32 output [RANK_PAD].
    Only the splits that hold tokens (stage 1's split length of this row's seq_len): a short row merges a few
    partials, not NUM_SPLITS; a row with seq_len 0 merges none and gives zeros. One masked load of all active
    splits' partials and one of their log-sum-exps, issued together (every active split's partial is written by
    stage 1, zeros where FIRST_POS masks all its tokens, whose weight is 0). It replaced a loop over the splits, one
    memory round trip each (~16 at batch 1, 512 tokens), which measured slower on the H200 (2026-12-04, 64 heads,
    us per call, loop / this): batch 1 at 256 tokens 9.9 / 9.5, at 1024 15.3 / 10.6; batch 64 at 1024 127.9 /
    126.9 (0.4-4.7 us less at batches 1-64, contexts 256 and 1024)."""
    seq_len = tl.load(lens_ptr + b)
    n_active = tl.minimum(tl.cdiv(seq_len, _split_len(seq_len, NUM_SPLITS, BLOCK_N)), NUM_SPLITS)
    offs_s = tl.arange(0, SPLITS_PAD)
    smask = offs_s < n_active
    lse = tl.load(part_lse_ptr + b * s_plb + h * s_plh + offs_s, mask=smask, other=float("-inf"))
    part = tl.load(part_out_ptr + b * s_pob + h * s_poh + offs_s[:, None] * s_pos + offs_r[None, :],
                   mask=smask[:, None] & rmask[None, :], other=0.0)
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    total = tl.sum(w, 0)
    return tl.sum(part * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)


@triton.jit
def _stage2(
    part_out_ptr, part_lse_ptr, lens_ptr, out_ptr,
    s_pob, s_poh, s_pos, s_plb, s_plh, s_ob, s_oh,
    RANK: tl.constexpr, RANK_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    offs_r = tl.arange(0, RANK_PAD)
    rmask = offs_r < RANK
    out = _merge_splits(part_out_ptr, part_lse_ptr, lens_ptr, b, h, s_pob, s_poh, s_pos, s_plb, s_plh, offs_r, rmask,
                        NUM_SPLITS, BLOCK_N, SPLITS_PAD)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_r, out.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _stage2_uv(
    part_out_ptr, part_lse_ptr, lens_ptr, w_ptr, out_ptr,
    s_pob, s_poh, s_pos, s_plb, s_plh, s_wh, s_wd, s_ob, s_oh,
    RANK: tl.constexpr, RANK_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr,
):
    """_stage2, then this head's W_UV: out[b, h, d] = o_latent[b, h] . w_uv[h, d] for BLOCK_D columns d. Each of the
    DV / BLOCK_D programs of a head merges the (L2-resident) partials itself, so no o_latent round trip and no
    separate bmm launch."""
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
    o = _merge_splits(part_out_ptr, part_lse_ptr, lens_ptr, b, h, s_pob, s_poh, s_pos, s_plb, s_plh, offs_r, rmask,
                      NUM_SPLITS, BLOCK_N, SPLITS_PAD)
    # o_latent rounded to the model dtype first, as the unfused path stores it before its bmm
    o = o.to(out_ptr.dtype.element_ty).to(tl.float32)
    y = tl.sum(wt.to(tl.float32) * o[None, :], axis=1)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_d, y.to(out_ptr.dtype.element_ty), mask=dmask)


def launch(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale, cfg, w_uv=None, parts=None):
    """cfg: mla_decode.launch_config for this batch (grids and constexprs: nothing here depends on seq_lens).
    parts: (part_out [B, h, splits, r], part_lse [B, h, splits]) fp32 buffers for stage 1 (tests; default new)."""
    batch, heads, rank = q_latent.shape
    dev = q_latent.device
    if parts is None:
        part_out = torch.empty(batch, heads, cfg.num_splits, rank, dtype=torch.float32, device=dev)
        part_lse = torch.empty(batch, heads, cfg.num_splits, dtype=torch.float32, device=dev)
    else:
        part_out, part_lse = parts
    out = (torch.empty_like(q_latent, memory_format=torch.contiguous_format) if w_uv is None
           else torch.empty(batch, heads, w_uv.shape[1], dtype=q_latent.dtype, device=dev))
    if batch == 0:
        return out
    _stage1[cfg.grid1](
        q_latent, q_rope, kv_cache, block_tables, seq_lens, part_out, part_lse,
        float(scale), heads, kv_cache.shape[1],
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        **cfg.stage1,
    )
    if w_uv is not None:
        _stage2_uv[cfg.grid2](
            part_out, part_lse, seq_lens, w_uv, out,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            w_uv.stride(0), w_uv.stride(1), out.stride(0), out.stride(1),
            **cfg.stage2,
        )
        return out
    _stage2[cfg.grid2](
        part_out, part_lse, seq_lens, out,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        **cfg.stage2,
    )
    return out
