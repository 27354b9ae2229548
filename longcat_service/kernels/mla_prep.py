"""One kernel for everything MLA does between its projections and attention (decode and prefill alike):

    q      = q * q_scale;  q_rope part <- RoPE(q_rope)                  (returned, [N, h, dn+dr])
    latent = kv_a_layernorm(latent) * kv_scale;  k_rope <- RoPE(k_rope)
    kv_cache[slot] = [latent | k_rope]                                  (skipped where slot < 0: batch padding)

The eager layer (layers/mla_attention.py + rotary.py + paged_attention.write_kv_cache) runs ~25 small kernels
for this. Every elementwise step rounds to the model dtype where the eager code does, so the two agree to
rounding of the fp32 norm reduction. RoPE is the interleaved-pair form with de-interleaved output (spec §3).
"""

from __future__ import annotations

import torch


def mla_prep(
    q: torch.Tensor,
    kv_a: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    q_scale: float,
    kv_scale: float,
    slot_mapping: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_dim: int,
) -> torch.Tensor:
    _check(q, kv_a, cos, sin, norm_weight, slot_mapping, kv_cache, rope_dim)
    from longcat_service.kernels._mla_prep_triton import launch

    # cos / sin may be row-strided views (the rotary table's [cos | sin] rows): only the last stride must be 1
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    return launch(q, kv_a, cos, sin, norm_weight, eps, q_scale, kv_scale, slot_mapping, kv_cache, rope_dim)


def _check(q, kv_a, cos, sin, norm_weight, slot_mapping, kv_cache, rope_dim) -> None:
    n = q.shape[0]
    rank = kv_a.shape[-1] - rope_dim
    if kv_a.dim() != 2 or kv_a.shape[0] != n or kv_cache.shape[-1] != rank + rope_dim:
        raise ValueError(f"kv_a {tuple(kv_a.shape)} / kv_cache {tuple(kv_cache.shape)} do not fit q {tuple(q.shape)}")
    if cos.shape != (n, rope_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin {tuple(cos.shape)} must be [{n}, {rope_dim // 2}]")
    if slot_mapping.shape != (n,) or norm_weight.shape != (rank,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{n}], norm weight [{rank}]")
    if q.stride(-1) != 1 or kv_a.stride(-1) != 1 or not kv_cache.is_contiguous():
        raise ValueError("mla_prep: q and kv_a need a unit last stride and kv_cache must be contiguous")


def mla_prep_absorb(q, kv_a, cos, sin, norm_weight, eps, q_scale, kv_scale, slot_mapping, kv_cache, rope_dim,
                    w_uk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mla_prep, then the decode's W_UK absorb, in one launch: -> (q_latent [N, h, r] = q_nope @ w_uk[h] with
    q_nope as mla_prep returns it (scaled, rounded to the model dtype), fp32 accumulation; q_pe [N, h, dr] =
    mla_prep's rotated rope part). w_uk [h, dn, r] (unit last stride, e.g. a view of kv_b_proj's weight). Each
    program reads its W_UK slice once for all N rows, so this pays for few rows (decode batch 1: a cuBLAS bmm
    launch less); for many, prep + one batched GEMM read W_UK once."""
    n, heads, head_dim = q.shape
    nope, rank = head_dim - rope_dim, kv_a.shape[-1] - rope_dim
    if w_uk.dim() != 3 or w_uk.shape != (heads, nope, rank) or w_uk.stride(-1) != 1:
        raise ValueError(f"w_uk {tuple(w_uk.shape)} must be [{heads}, {nope}, {rank}] with a unit last stride")
    if w_uk.dtype != q.dtype or w_uk.device != q.device:
        raise ValueError(f"w_uk is {w_uk.dtype} on {w_uk.device}, q {q.dtype} on {q.device}")
    _check(q, kv_a, cos, sin, norm_weight, slot_mapping, kv_cache, rope_dim)
    from longcat_service.kernels._mla_prep_triton import launch_absorb

    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    return launch_absorb(q, kv_a, cos, sin, norm_weight, eps, q_scale, kv_scale, slot_mapping, kv_cache, rope_dim,
                         w_uk)
