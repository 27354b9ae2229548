"""Causal flash-attention forward for the MLA prefill (Triton): one sequence's segment, never materialising
the [heads, Q, S] score tensor that the eager path builds (~70 of 107 ms of a 4096-token prefill on the H200).

The Q queries are the LAST Q positions of the S keys (bottom-right-aligned causal: query i sees keys
j <= S - Q + i), so one kernel serves whole prompts (Q == S) and chunks after cached context (Q < S).
MLA's q/k head dim (qk_nope + qk_rope = 192) differs from v's (128); the kernel takes both as they are.

Design: grid (cdiv(Q, BLOCK_M), heads); each program keeps its q tile in registers and streams the head's
K/V in BLOCK_N blocks with an fp32 online softmax (base 2). Key blocks wholly below the diagonal run
without masks, those straddling it with the causal mask, and those above it are skipped.
"""

from __future__ import annotations

import torch

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Not yet timed on a GPU; chosen from an offline sm_90a compile
# (Triton 3.6 + ptxas) at dqk 192 / dv 128: bf16 128x64, 8 warps, 3 stages: 204 registers, no spills, wgmma,
# 168 KiB shared memory (one CTA per SM). fp32 (tests only; its ieee dots run on FMAs) spills least at 64x32.
TILES = {torch.bfloat16: (128, 64, 8, 3), torch.float16: (128, 64, 8, 3), torch.float32: (64, 32, 8, 2)}


def prefill_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The spec: fp32 scores and softmax over the bottom-right causal window, output in q's dtype."""
    num_queries, seq_len = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    allowed = torch.arange(seq_len, device=q.device)[None, :] <= torch.arange(seq_len - num_queries, seq_len,
                                                                           device=q.device)[:, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def _check_inputs(q, k, v) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [tokens, heads, dim]")
    if k.shape[:2] != v.shape[:2] or q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} / v {tuple(v.shape)}: heads or head dims disagree")
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"{q.shape[0]} queries need at least as many keys, got {k.shape[0]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a unit last stride")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q on {q.device}, k on {k.device}, v on {v.device}")


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
) -> torch.Tensor:
    """q [Q, h, dqk], k [S, h, dqk], v [S, h, dv] (S >= Q, any head strides) -> [Q, h, dv] in q's dtype.
    Tile arguments left None come from TILES; wide_offsets (default: only when needed) forces 64-bit K/V offsets."""
    _check_inputs(q, k, v)
    from longcat_service.kernels._prefill_attn_triton import launch

    tiles = TILES.get(q.dtype, TILES[torch.float32])
    picked = [tiles[i] if arg is None else arg for i, arg in enumerate((block_m, block_n, num_warps, num_stages))]
    return launch(q, k, v, scale, *picked, wide_offsets)
