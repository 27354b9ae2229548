"""The Triton side of mla_prep.py: one program per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rot(xe, xo, c, s, dt: tl.constexpr):
    # eager rounding order: each product, then the difference / sum, rounded to the model dtype
    first = ((xe * c).to(dt).to(tl.float32) - (xo * s).to(dt).to(tl.float32)).to(dt)
    second = ((xo * c).to(dt).to(tl.float32) + (xe * s).to(dt).to(tl.float32)).to(dt)
    return first, second


@triton.jit
def _store_cache_entry(kva_ptr, w_ptr, cache_ptr, tok, slot, s_kn, c, s, eps, kv_scale, dt: tl.constexpr,
                       RANK: tl.constexpr, ROPE: tl.constexpr, RANK_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """Token tok's cache entry at slot (none for a padding slot < 0): the latent's RMSNorm (fp32 math, rounded,
    then the model-dtype weight product) times the LoRA scale, and the shared rope key rotated by (c, s)."""
    HALF: tl.constexpr = ROPE // 2
    write = slot >= 0
    cache_row = cache_ptr + slot * (RANK + ROPE)
    offs_i = tl.arange(0, HALF_PAD)
    imask = offs_i < HALF
    offs_r = tl.arange(0, RANK_PAD)
    rmask = offs_r < RANK
    lat = tl.load(kva_ptr + tok * s_kn + offs_r, mask=rmask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(lat * lat, 0) / RANK + eps)
    w = tl.load(w_ptr + offs_r, mask=rmask, other=0.0).to(tl.float32)
    lat = ((lat * rstd).to(dt).to(tl.float32) * w).to(dt)
    lat = (lat.to(tl.float32) * kv_scale).to(dt)
    tl.store(cache_row + offs_r, lat.to(cache_ptr.dtype.element_ty), mask=rmask & write)
    ke = tl.load(kva_ptr + tok * s_kn + RANK + 2 * offs_i, mask=imask, other=0.0).to(tl.float32)
    ko = tl.load(kva_ptr + tok * s_kn + RANK + 2 * offs_i + 1, mask=imask, other=0.0).to(tl.float32)
    k1, k2 = _rot(ke, ko, c, s, dt)
    tl.store(cache_row + RANK + offs_i, k1.to(cache_ptr.dtype.element_ty), mask=imask & write)
    tl.store(cache_row + RANK + HALF + offs_i, k2.to(cache_ptr.dtype.element_ty), mask=imask & write)


@triton.jit
def _mla_prep_kernel(
    q_ptr, kva_ptr, cos_ptr, sin_ptr, w_ptr, slot_ptr, cache_ptr, qout_ptr,
    eps, q_scale, kv_scale, heads,
    s_qn, s_qh, s_kn, s_cn, s_on, s_oh, s_cos, s_sin,
    RANK: tl.constexpr, ROPE: tl.constexpr, NOPE: tl.constexpr,
    RANK_PAD: tl.constexpr, HALF_PAD: tl.constexpr, NOPE_PAD: tl.constexpr, HEADS_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    dt = qout_ptr.dtype.element_ty
    HALF: tl.constexpr = ROPE // 2
    offs_i = tl.arange(0, HALF_PAD)
    imask = offs_i < HALF
    c = tl.load(cos_ptr + row * s_cos + offs_i, mask=imask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + row * s_sin + offs_i, mask=imask, other=0.0).to(tl.float32)
    if head_block == 0:  # the token's cache entry, once
        slot = tl.load(slot_ptr + row).to(tl.int64)
        _store_cache_entry(kva_ptr, w_ptr, cache_ptr, row, slot, s_kn, c, s, eps, kv_scale, dt,
                           RANK, ROPE, RANK_PAD, HALF_PAD)

    # queries of this program's heads: scale everything, rotate the rope part
    offs_h = head_block * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    hmask = offs_h < heads
    offs_d = tl.arange(0, NOPE_PAD)
    nmask = hmask[:, None] & (offs_d < NOPE)[None, :]
    q_base = q_ptr + row * s_qn + offs_h[:, None] * s_qh
    o_base = qout_ptr + row * s_on + offs_h[:, None] * s_oh
    qn = tl.load(q_base + offs_d[None, :], mask=nmask, other=0.0).to(tl.float32)
    tl.store(o_base + offs_d[None, :], (qn * q_scale).to(dt), mask=nmask)
    rmask2 = hmask[:, None] & imask[None, :]
    qe = tl.load(q_base + NOPE + 2 * offs_i[None, :], mask=rmask2, other=0.0).to(tl.float32)
    qo = tl.load(q_base + NOPE + 2 * offs_i[None, :] + 1, mask=rmask2, other=0.0).to(tl.float32)
    qe = (qe * q_scale).to(dt).to(tl.float32)
    qo = (qo * q_scale).to(dt).to(tl.float32)
    q1, q2 = _rot(qe, qo, c[None, :], s[None, :], dt)
    tl.store(o_base + NOPE + offs_i[None, :], q1, mask=rmask2)
    tl.store(o_base + NOPE + HALF + offs_i[None, :], q2, mask=rmask2)


PREP_HEADS_BLOCK = 16  # heads per program


def launch(q, kv_a, cos, sin, norm_weight, eps, q_scale, kv_scale, slot_mapping, kv_cache, rope_dim):
    n, heads, head_dim = q.shape
    rank = kv_a.shape[-1] - rope_dim
    nope = head_dim - rope_dim
    out = torch.empty(n, heads, head_dim, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    # a token's heads over several programs: at batch 1 one program did all 64 heads (5 us on the H200, latency)
    heads_block = min(triton.next_power_of_2(heads), PREP_HEADS_BLOCK)
    _mla_prep_kernel[(n, triton.cdiv(heads, heads_block))](
        q, kv_a, cos, sin, norm_weight, slot_mapping, kv_cache, out,
        float(eps), float(q_scale), float(kv_scale), heads,
        q.stride(0), q.stride(1), kv_a.stride(0), kv_cache.stride(1), out.stride(0), out.stride(1),
        cos.stride(0), sin.stride(0),
        RANK=rank, ROPE=rope_dim, NOPE=nope,
        RANK_PAD=triton.next_power_of_2(rank), HALF_PAD=max(triton.next_power_of_2(rope_dim // 2), 2),
        NOPE_PAD=triton.next_power_of_2(nope), HEADS_BLOCK=heads_block,
        num_warps=4,
    )
    return out


@triton.jit
def _mla_prep_absorb_kernel(
    q_ptr, kva_ptr, cos_ptr, sin_ptr, w_ptr, slot_ptr, cache_ptr, wuk_ptr, qlat_ptr, qpe_ptr,
    eps, q_scale, kv_scale, heads,
    s_qn, s_qh, s_kn, s_cn, s_cos, s_sin, s_wh, s_wd, s_ln, s_lh, s_pn, s_ph,
    N_TOKENS: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr, NOPE: tl.constexpr,
    RANK_PAD: tl.constexpr, HALF_PAD: tl.constexpr, NOPE_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (p, c). p < heads: head p's q_latent columns [c * BLOCK_R, +BLOCK_R) for every token, its W_UK slice
    [NOPE, BLOCK_R] read once for all of them; with c == 0 also the head's rotated q_pe. p >= heads, c == 0: token
    p - heads's cache entry (as _mla_prep_kernel)."""
    p = tl.program_id(0)
    c = tl.program_id(1)
    dt = qlat_ptr.dtype.element_ty
    HALF: tl.constexpr = ROPE // 2
    offs_i = tl.arange(0, HALF_PAD)
    imask = offs_i < HALF
    if p >= heads:
        tok = (p - heads).to(tl.int64)
        if c == 0:
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            kc = tl.load(cos_ptr + tok * s_cos + offs_i, mask=imask, other=0.0).to(tl.float32)
            ks = tl.load(sin_ptr + tok * s_sin + offs_i, mask=imask, other=0.0).to(tl.float32)
            _store_cache_entry(kva_ptr, w_ptr, cache_ptr, tok, slot, s_kn, kc, ks, eps, kv_scale, dt,
                               RANK, ROPE, RANK_PAD, HALF_PAD)
    else:
        h = p.to(tl.int64)
        offs_d = tl.arange(0, NOPE_PAD)
        dmask = offs_d < NOPE
        offs_c = c * BLOCK_R + tl.arange(0, BLOCK_R)
        cmask = offs_c < RANK
        wuk = tl.load(wuk_ptr + h * s_wh + offs_d[:, None] * s_wd + offs_c[None, :],
                      mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        for t in tl.static_range(N_TOKENS):  # unrolled (few rows): every row's loads in flight together
            row = tl.full([], t, tl.int64)
            q_base = q_ptr + row * s_qn + h * s_qh
            # q_nope * q_scale rounded to the model dtype (mla_prep's output), then the absorb in fp32
            qn = (tl.load(q_base + offs_d, mask=dmask, other=0.0).to(tl.float32) * q_scale).to(dt).to(tl.float32)
            q_lat = tl.sum(qn[:, None] * wuk, 0)
            tl.store(qlat_ptr + row * s_ln + h * s_lh + offs_c, q_lat.to(dt), mask=cmask)
            if c == 0:
                cs = tl.load(cos_ptr + row * s_cos + offs_i, mask=imask, other=0.0).to(tl.float32)
                sn = tl.load(sin_ptr + row * s_sin + offs_i, mask=imask, other=0.0).to(tl.float32)
                qe = tl.load(q_base + NOPE + 2 * offs_i, mask=imask, other=0.0).to(tl.float32)
                qo = tl.load(q_base + NOPE + 2 * offs_i + 1, mask=imask, other=0.0).to(tl.float32)
                qe = (qe * q_scale).to(dt).to(tl.float32)
                qo = (qo * q_scale).to(dt).to(tl.float32)
                q1, q2 = _rot(qe, qo, cs, sn, dt)
                tl.store(qpe_ptr + row * s_pn + h * s_ph + offs_i, q1, mask=imask)
                tl.store(qpe_ptr + row * s_pn + h * s_ph + HALF + offs_i, q2, mask=imask)


ABSORB_BLOCK_R = 64  # q_latent columns per program: 64 heads x 8 = 512 programs at LongCat shapes, 16 KB of W_UK each


def launch_absorb(q, kv_a, cos, sin, norm_weight, eps, q_scale, kv_scale, slot_mapping, kv_cache, rope_dim, w_uk):
    n, heads, head_dim = q.shape
    rank = kv_a.shape[-1] - rope_dim
    nope = head_dim - rope_dim
    q_latent = torch.empty(n, heads, rank, dtype=q.dtype, device=q.device)
    q_pe = torch.empty(n, heads, rope_dim, dtype=q.dtype, device=q.device)
    if n == 0:
        return q_latent, q_pe
    block_r = min(ABSORB_BLOCK_R, triton.next_power_of_2(rank))
    _mla_prep_absorb_kernel[(heads + n, triton.cdiv(rank, block_r))](
        q, kv_a, cos, sin, norm_weight, slot_mapping, kv_cache, w_uk, q_latent, q_pe,
        float(eps), float(q_scale), float(kv_scale), heads,
        q.stride(0), q.stride(1), kv_a.stride(0), kv_cache.stride(1), cos.stride(0), sin.stride(0),
        w_uk.stride(0), w_uk.stride(1), q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
        N_TOKENS=n, RANK=rank, ROPE=rope_dim, NOPE=nope,
        RANK_PAD=triton.next_power_of_2(rank), HALF_PAD=max(triton.next_power_of_2(rope_dim // 2), 2),
        NOPE_PAD=triton.next_power_of_2(nope), BLOCK_R=block_r,
        num_warps=4,
    )
    return q_latent, q_pe
