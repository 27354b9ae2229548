"""Pure-PyTorch MLA attention over the paged latent KV cache (the reference for the GPU kernels).

Cache entry per token (one tensor per attention sublayer, [num_blocks, block_size, kv_lora_rank + rope_dim]):
the normalised, mla_scale_kv_lora-scaled latent, then the post-RoPE rope key.

Two paths:
- prefill / chunked prefill (query_len > 1): expand the sequence's latent through kv_b_proj into per-head
  K and V, causal with query offset seq_len - query_len, softmax in fp32 (as transformers' eager path).
  Two backends (prefill_attention_backend): 'triton' wherever the Triton fast path runs (CUDA), our causal
  flash-attention kernel (kernels/prefill_attn.py) on k_nope / v as views of kv_b_proj's output and the rope
  key shared by all heads, concatenating nothing; 'eager' elsewhere (CPU, LONGCAT_DISABLE_TRITON=1), the
  reference, builds k = [k_nope | rope key] per head and the [h, Q, S] scores (on the H200 a 4096-token prefill
  ran at 44.6% of the matmul rate with 'triton', 21.0% with 'eager'; F.scaled_dot_product_attention, 43.7%,
  was deleted);
- decode (query_len == 1), weight-absorbed and batched: q_nope goes through W_UK into the latent space,
  scores are taken against [latent | rope key] directly, and the output P @ latent goes through W_UV.
An `AttentionPlan` (index tensors shared by every attention sublayer) is built once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_service.kernels import fast_path_enabled
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.layers.host_to_device import to_device


@dataclass
class PrefillSegment:
    token_start: int  # rows token_start:token_end of the flat batch
    token_end: int
    slots: torch.Tensor  # [seq_len] int64 cache slots of the sequence's context, in position order
    allowed_mask: torch.Tensor | None = None  # built by `allowed` on first use (the flash kernel never needs it)

    @property
    def allowed(self) -> torch.Tensor:
        """[query_len, seq_len] bool causal mask (query i sees keys <= seq_len - query_len + i)."""
        if self.allowed_mask is None:
            seq_len, query_len = self.slots.shape[0], self.token_end - self.token_start
            key_pos = torch.arange(seq_len, device=self.slots.device)
            query_pos = torch.arange(seq_len - query_len, seq_len, device=self.slots.device)
            self.allowed_mask = key_pos[None, :] <= query_pos[:, None]
        return self.allowed_mask


@dataclass
class AttentionPlan:
    num_tokens: int
    decode_tokens: torch.Tensor | None  # [Bd] rows of the decode tokens; None when every token decodes
    decode_slots: torch.Tensor | None  # [Bd, L] int64, padded with slot 0
    decode_valid: torch.Tensor | None  # [Bd, L] bool
    prefills: list[PrefillSegment]
    slot_mapping: torch.Tensor  # [N] int64


def _context_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length, device=block_table.device)
    blocks = block_table.long()[..., pos // block_size].clamp(min=0)  # -1 padding only past seq_len: masked
    return blocks * block_size + pos % block_size


def build_attention_plan(meta: AttentionMetadata) -> AttentionPlan:
    """Host-side bookkeeping from the metadata's CPU lists; no device synchronisation."""
    query_lens, seq_lens = meta.query_lens_cpu, meta.seq_lens_cpu
    if len(query_lens) != len(seq_lens) or len(seq_lens) != meta.block_tables.shape[0]:
        raise ValueError("attention metadata: query_lens, seq_lens and block_tables disagree on the batch size")
    starts = [0]
    for q, s in zip(query_lens, seq_lens, strict=True):
        if q < 1 or s < q:
            raise ValueError(f"attention metadata: need 1 <= query_len <= seq_len, got query_len={q}, seq_len={s}")
        if -(-s // meta.block_size) > meta.block_tables.shape[1]:
            raise ValueError(f"attention metadata: seq_len {s} needs more blocks than the block table holds")
        starts.append(starts[-1] + q)
    num_tokens = starts[-1]
    if meta.slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"attention metadata: slot_mapping has {meta.slot_mapping.shape[0]} entries, expected {num_tokens}")
    device = meta.block_tables.device

    decode_seqs = [i for i, q in enumerate(query_lens) if q == 1]
    decode_tokens = decode_slots = decode_valid = None
    if decode_seqs:
        max_len = max(seq_lens[i] for i in decode_seqs)
        all_decode = len(decode_seqs) == len(query_lens)
        # host lists through pinned memory (host_to_device): a blocking copy here would wait for the GPU's queue
        idx = None if all_decode else to_device(decode_seqs + [starts[i] for i in decode_seqs], torch.long, device)
        table = meta.block_tables if all_decode else meta.block_tables[idx[: len(decode_seqs)]]
        lens = to_device([seq_lens[i] for i in decode_seqs], torch.long, device)
        decode_slots = _context_slots(table, max_len, meta.block_size)
        decode_valid = torch.arange(max_len, device=device)[None, :] < lens[:, None]
        if not all_decode:
            decode_tokens = idx[len(decode_seqs) :]

    prefills = []
    for i, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if q == 1:
            continue
        # a whole prompt's context is its new tokens: their slots are already in slot_mapping (no kernels)
        slots = (meta.slot_mapping[starts[i] : starts[i + 1]] if q == s
                 else _context_slots(meta.block_tables[i], s, meta.block_size))
        prefills.append(PrefillSegment(starts[i], starts[i + 1], slots))
    return AttentionPlan(num_tokens, decode_tokens, decode_slots, decode_valid, prefills, meta.slot_mapping)


def write_kv_cache(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
    """Store [latent | rope key] of each new token at its slot."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat[slot_mapping] = torch.cat((latent, k_rope), dim=-1).to(kv_cache.dtype)


def prefill_attention_backend(q: torch.Tensor | None = None) -> str:
    """The prefill attention that runs for tensors like q: 'triton' where the Triton fast path runs (a CUDA tensor,
    triton importable, LONGCAT_DISABLE_TRITON unset), else 'eager' (always so when q is None)."""
    return "triton" if q is not None and fast_path_enabled(q) else "eager"


def _expand_kv_parts(kv_cache, segment, w_kv_b, num_heads, qk_nope_head_dim, v_head_dim):
    """The sequence's cache entries through kv_b_proj -> k_nope [S, h, dn], rope key [S, dr] (one for all
    heads), v [S, h, dv]: k_nope and v are strided views of the one GEMM output, the rope key a view of the
    gathered entries."""
    entries = kv_cache.view(-1, kv_cache.shape[-1])[segment.slots]  # [S, r+dr]
    rank = w_kv_b.shape[1]
    latent, k_rope = entries[:, :rank], entries[:, rank:]
    kv = torch.nn.functional.linear(latent, w_kv_b).view(-1, num_heads, qk_nope_head_dim + v_head_dim)
    k_nope, v = kv.split([qk_nope_head_dim, v_head_dim], dim=-1)
    return k_nope, k_rope, v


def _expand_kv(kv_cache, segment, w_kv_b, num_heads, qk_nope_head_dim, v_head_dim):
    """-> k [S, h, dn+dr] (the rope key concatenated to every head), v [S, h, dv]: the eager path."""
    k_nope, k_rope, v = _expand_kv_parts(kv_cache, segment, w_kv_b, num_heads, qk_nope_head_dim, v_head_dim)
    k = torch.cat((k_nope, k_rope[:, None, :].expand(-1, num_heads, -1)), dim=-1)  # [S, h, dqk]
    return k, v


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    segment: PrefillSegment,
    w_kv_b: torch.Tensor,
    num_heads: int,
    qk_nope_head_dim: int,
    v_head_dim: int,
    scale: float,
) -> torch.Tensor:
    """q [Q, h, dn+dr] of one sequence -> [Q, h, dv]. w_kv_b: this rank's kv_b_proj weight [h*(dn+dv), r]."""
    if prefill_attention_backend(q) == "triton":  # CUDA only (tests route CPU tensors through the interpreter)
        return prefill_attention_triton(q, kv_cache, segment, w_kv_b, num_heads, qk_nope_head_dim, v_head_dim, scale)
    k, v = _expand_kv(kv_cache, segment, w_kv_b, num_heads, qk_nope_head_dim, v_head_dim)
    scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) * scale  # [h, Q, S]
    scores = scores.masked_fill(~segment.allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1)  # [Q, h, dv]


def prefill_attention_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    segment: PrefillSegment,
    w_kv_b: torch.Tensor,
    num_heads: int,
    qk_nope_head_dim: int,
    v_head_dim: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """prefill_attention through the flash kernel (same arguments and result): q's nope and rope parts are read
    in place (q may be any [Q, h, dn+dr] view with a unit last stride), K is never concatenated, the rope key
    never broadcast. out: an optional [Q, h, dv] destination (e.g. rows of the layer's output) to write into."""
    from longcat_service.kernels.prefill_attn import prefill_attn_mla

    k_nope, k_rope, v = _expand_kv_parts(kv_cache, segment, w_kv_b, num_heads, qk_nope_head_dim, v_head_dim)
    return prefill_attn_mla(q[..., :qk_nope_head_dim], q[..., qk_nope_head_dim:], k_nope, k_rope, v, scale, out=out)


def decode_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    w_kv_b: torch.Tensor,
    num_heads: int,
    qk_nope_head_dim: int,
    v_head_dim: int,
    scale: float,
) -> torch.Tensor:
    """Weight-absorbed decode for B sequences at once: q_nope [B, h, dn], q_rope [B, h, dr] -> [B, h, dv]."""
    rank = w_kv_b.shape[1]
    w = w_kv_b.view(num_heads, qk_nope_head_dim + v_head_dim, rank)
    w_uk, w_uv = w[:, :qk_nope_head_dim, :], w[:, qk_nope_head_dim:, :]  # [h, dn, r], [h, dv, r]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, h, r]
    entries = kv_cache.view(-1, kv_cache.shape[-1])[slots]  # [B, L, r+dr]
    scores = torch.bmm(torch.cat((q_latent, q_rope), dim=-1), entries.transpose(1, 2)) * scale  # [B, h, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
    out_latent = torch.bmm(probs, entries[..., :rank])  # [B, h, r]
    return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, h, dv]
