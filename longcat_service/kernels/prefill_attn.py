"""Causal flash-attention forward for the MLA prefill (Triton): one sequence's segment, never materialising
the [heads, Q, S] score tensor that the eager path builds (~70 of 107 ms of a 4096-token prefill on the H200).

The Q queries are the LAST Q positions of the S keys (bottom-right-aligned causal: query i sees keys
j <= S - Q + i), so one kernel serves whole prompts (Q == S) and chunks after cached context (Q < S).

`prefill_attn_mla` takes MLA's operands where they already lie, so nothing is concatenated or broadcast:
q as its nope [Q, h, dn] and rope [Q, h, dr] parts (two views of one q tensor are fine), k_nope and v as the
two strided views of kv_b_proj's output [S, h, dn + dv], and the rope key as the one [S, dr] tensor that all
heads share (as the latent cache holds it; head stride 0 in the kernel). The q.k dot over dn + dr (128 + 64)
is two dots, the nope part against k_nope and the rope part against the shared key. v's head dim (128) may
differ from q/k's. `prefill_attn` is the plain form (q, k [S, h, dqk]), split the same way into two dots.

Design: grid (cdiv(Q, BLOCK_M), heads); each program keeps its q tile in registers and streams the head's
K/V in BLOCK_N blocks with an fp32 online softmax (base 2). Key blocks wholly below the diagonal run
without masks, those straddling it with the causal mask, and those above it are skipped.
"""

from __future__ import annotations

import torch

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen from an offline sm_90a compile (Triton 3.6 + ptxas) at
# dqk 192 / dv 128: bf16 128x64, 8 warps, 3 stages: 204 registers, no spills, wgmma, 168 KiB shared memory
# (one CTA per SM). The split operands (separate q/k rope pointers, rope key head stride 0) compile the same
# way offline: 209 registers, no spills, 32 wgmma, 168 KiB, as long as Triton specialises the strides as
# multiples of 16 (they are: h*256, 576, ...; 0 counts). fp32 (tests only; its ieee dots run on FMAs) spills
# least at 64x32.
TILES = {torch.bfloat16: (128, 64, 8, 3), torch.float16: (128, 64, 8, 3), torch.float32: (64, 32, 8, 2)}


def prefill_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The spec: fp32 scores and softmax over the bottom-right causal window, output in q's dtype."""
    num_queries, seq_len = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    allowed = torch.arange(seq_len, device=q.device)[None, :] <= torch.arange(seq_len - num_queries, seq_len,
                                                                           device=q.device)[:, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def prefill_attn_mla_reference(q_nope, q_rope, k_nope, k_rope, v, scale: float) -> torch.Tensor:
    """prefill_attn_reference on the concatenated operands (the rope key broadcast over the heads)."""
    if k_rope.dim() == 2:
        k_rope = k_rope[:, None, :].expand(-1, k_nope.shape[1], -1)
    return prefill_attn_reference(torch.cat((q_nope, q_rope), -1), torch.cat((k_nope, k_rope), -1), v, scale)


def _check_common(qs, ks, v, out) -> None:
    tensors = [*qs, *ks, v] + ([] if out is None else [out])
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("prefill_attn: every operand needs a unit last stride")
    if any(t.dtype != qs[0].dtype for t in tensors):
        raise ValueError(f"prefill_attn: dtypes differ: {[t.dtype for t in tensors]}")
    if any(t.device != qs[0].device for t in tensors):
        raise ValueError(f"prefill_attn: devices differ: {[str(t.device) for t in tensors]}")
    if qs[0].shape[0] > ks[0].shape[0]:
        raise ValueError(f"{qs[0].shape[0]} queries need at least as many keys, got {ks[0].shape[0]}")
    if out is not None and out.shape != (*qs[0].shape[:2], v.shape[-1]):
        raise ValueError(f"out {tuple(out.shape)} must be {(*qs[0].shape[:2], v.shape[-1])}")


def _tiles(dtype, block_m, block_n, num_warps, num_stages) -> list[int]:
    tiles = TILES.get(dtype, TILES[torch.float32])
    return [tiles[i] if arg is None else arg for i, arg in enumerate((block_m, block_n, num_warps, num_stages))]


def prefill_attn_mla(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    wide_offsets: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q_nope [Q, h, dn], q_rope [Q, h, dr], k_nope [S, h, dn], k_rope [S, dr] (one rope key for all heads) or
    [S, h, dr], v [S, h, dv] (S >= Q; any token/head strides, unit last stride) -> [Q, h, dv] in q's dtype:
    softmax(scale * (q_nope.k_nope + q_rope.k_rope)) @ v, bottom-right causal. Tile arguments left None come
    from TILES; wide_offsets (default: only when needed) forces 64-bit K/V offsets; out: [Q, h, dv] to write."""
    if q_nope.dim() != 3 or q_rope.dim() != 3 or k_nope.dim() != 3 or v.dim() != 3 or k_rope.dim() not in (2, 3):
        raise ValueError(f"q_nope {tuple(q_nope.shape)}, q_rope {tuple(q_rope.shape)}, k_nope {tuple(k_nope.shape)}, "
                         f"v {tuple(v.shape)} must be [tokens, heads, dim], k_rope {tuple(k_rope.shape)} [S, dr]")
    heads = q_nope.shape[1]
    rope_heads = () if k_rope.dim() == 2 else (heads,)
    if (q_rope.shape[:2] != q_nope.shape[:2] or k_nope.shape[1:] != (heads, q_nope.shape[2])
            or v.shape[:2] != k_nope.shape[:2] or k_rope.shape != (k_nope.shape[0], *rope_heads, q_rope.shape[2])):
        raise ValueError(f"q_nope {tuple(q_nope.shape)} / q_rope {tuple(q_rope.shape)} / k_nope {tuple(k_nope.shape)} "
                         f"/ k_rope {tuple(k_rope.shape)} / v {tuple(v.shape)}: tokens, heads or head dims disagree")
    _check_common((q_nope, q_rope), (k_nope, k_rope), v, out)
    from longcat_service.kernels._prefill_attn_triton import launch

    tiles = _tiles(q_nope.dtype, block_m, block_n, num_warps, num_stages)
    return launch(q_nope, q_rope, k_nope, k_rope, v, scale, *tiles, wide_offsets, out)


def prefill_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    wide_offsets: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [Q, h, dqk], k [S, h, dqk], v [S, h, dv] (S >= Q, any token/head strides) -> [Q, h, dv] in q's dtype.
    A dqk that is no power of two runs as two dots (192 = 128 + 64, as prefill_attn_mla), without padding to 256."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [tokens, heads, dim]")
    if k.shape[:2] != v.shape[:2] or q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} / v {tuple(v.shape)}: heads or head dims disagree")
    _check_common((q,), (k,), v, out)
    from longcat_service.kernels._prefill_attn_triton import launch

    d_qk = q.shape[-1]
    d_a = max(16, 1 << (d_qk.bit_length() - 1))  # largest power of two <= d_qk (a dim under 16 is padded to 16)
    tiles = _tiles(q.dtype, block_m, block_n, num_warps, num_stages)
    if d_a >= d_qk:
        return launch(q, None, k, None, v, scale, *tiles, wide_offsets, out)
    return launch(q[..., :d_a], q[..., d_a:], k[..., :d_a], k[..., d_a:], v, scale, *tiles, wide_offsets, out)
