"""The decode-only GPU path of MLA attention: device-resident metadata, fused kernels, no host reads.

`build_decode_plan` replaces layers/paged_attention.build_attention_plan for batches where every sequence
adds one token, on CUDA with triton: it only wraps the metadata's device tensors, so a forward that uses it
can be captured in a CUDA graph and replayed with new block tables, lengths and slots. Padded batch rows
carry slot -1 (no cache write) and seq_len 0 (zero attention output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_service import envs
from longcat_service.kernels import fast_path_enabled
from longcat_service.layers.attention_metadata import AttentionMetadata

# Largest decode batch whose MLA merge stage applies W_UV: each program reads its head's W_UV, which pays while few
# rows share it; beyond that cuBLAS's batched GEMM reads each head's W_UV once for all rows.
FUSED_UV_MAX_BATCH = 8


@dataclass
class DecodePlan:
    num_tokens: int
    slot_mapping: torch.Tensor  # [B] int64, -1 = padding row (no cache write)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32 or int64 (graph replays) on the device, 0 = padding row
    fast_decode: bool = True  # MLAAttention checks this flag to take mla_decode_forward
    first_pos: int = 0  # 1 for the MTP block's cache (model/mtp.py): no entry at position 0


def use_fast_decode(meta: AttentionMetadata, input_ids: torch.Tensor) -> bool:
    return fast_path_enabled(input_ids) and meta.is_decode_only and meta.num_seqs > 0


def build_decode_plan(meta: AttentionMetadata) -> DecodePlan:
    n = meta.slot_mapping.shape[0]
    if meta.block_tables.shape[0] != n or meta.seq_lens.shape[0] != n:
        raise ValueError(
            f"decode metadata: slot_mapping ({n}), block_tables ({meta.block_tables.shape[0]}) and "
            f"seq_lens ({meta.seq_lens.shape[0]}) must all have one row per sequence"
        )
    return DecodePlan(n, meta.slot_mapping, meta.block_tables, meta.seq_lens)


def mla_decode_forward(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: DecodePlan,
                       kv_cache: torch.Tensor) -> torch.Tensor:
    """What layers/mla_attention.MLAAttention.forward computes for a decode-only batch, with Triton kernels:
    fused q_a norm, one prep kernel (scales, RoPE, norm, cache write), absorbed split-K attention."""
    from longcat_service.kernels.mla_decode import mla_decode
    from longcat_service.kernels.mla_prep import mla_prep, mla_prep_absorb
    from longcat_service.kernels.rmsnorm import rms_norm

    n = x.shape[0]
    heads, dn, dr, dv = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    q_a, kv_a = attn.a_projections(x)
    q_a = rms_norm(q_a, attn.q_a_layernorm.weight, attn.q_a_layernorm.eps)
    q = attn.q_b_proj(q_a).view(n, heads, dn + dr)
    w = attn.kv_b_proj.weight.view(heads, dn + dv, attn.kv_lora_rank)
    w_uk, w_uv = w[:, :dn, :], w[:, dn:, :]
    prep_args = (q, kv_a, cos, sin, attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps, attn.q_scale, attn.kv_scale,
                 plan.slot_mapping, kv_cache, dr)
    if n <= envs.LONGCAT_MLA_ABSORB_PREP_MAX_ROWS:  # the prep kernel applies W_UK too: no bmm launch
        q_latent, q_pe = mla_prep_absorb(*prep_args, w_uk)
    else:
        q = mla_prep(*prep_args)
        q_latent, q_pe = torch.bmm(q[..., :dn].transpose(0, 1), w_uk).transpose(0, 1), q[..., dn:]  # [n, h, r]
    if n <= FUSED_UV_MAX_BATCH:  # the merge stage applies W_UV itself: one launch less, no o_latent round trip
        out = mla_decode(q_latent, q_pe, kv_cache, plan.block_tables, plan.seq_lens, attn.scale, w_uv=w_uv,
                         first_pos=plan.first_pos)
    else:  # many rows: cuBLAS's batched GEMM reads each head's W_UV once for all of them
        o_latent = mla_decode(q_latent, q_pe, kv_cache, plan.block_tables, plan.seq_lens, attn.scale,
                              first_pos=plan.first_pos)
        out = o_latent.new_empty(n, heads, dv)  # written in place in token-major order: o_proj's input needs no
        torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))  # reshape copy
    return attn.o_proj(out.reshape(n, heads * dv))
