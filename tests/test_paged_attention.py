"""Paged MLA attention (pure torch) vs a naive dense reference; plan bookkeeping; cache allocation."""

from __future__ import annotations

import random

import pytest
import torch

from longcat_service.config import ModelConfig
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.layers.paged_attention import (
    build_attention_plan,
    decode_attention,
    prefill_attention,
    write_kv_cache,
)
from longcat_service.model.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block

H, DN, DR, DV, R = 3, 8, 4, 6, 10  # heads, nope, rope, v dims, latent rank
BS = 4
SCALE = (DN + DR) ** -0.5


def _naive_attention(q, latent, k_rope, w_kv_b, offset):
    """Per head, per query: softmax over keys 0..offset+i of [k_nope | k_rope] . q, times V."""
    kv = (latent @ w_kv_b.T).view(latent.shape[0], H, DN + DV)
    out = torch.empty(q.shape[0], H, DV)
    for h in range(H):
        k = torch.cat([kv[:, h, :DN], k_rope], -1)
        v = kv[:, h, DN:]
        for i in range(q.shape[0]):
            n = offset + i + 1
            out[i, h] = torch.softmax((k[:n] @ q[i, h]) * SCALE, 0) @ v[:n]
    return out


def _fill_cache(seq_lens, num_blocks=32, seed=0):
    """Random context per sequence written through shuffled blocks; returns cache, tables, contexts."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.zeros(num_blocks, BS, R + DR)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables, contexts = [], []
    for s in seq_lens:
        blocks = [free.pop() for _ in range(-(-s // BS))]
        latent, k_rope = torch.randn(s, R, generator=g), torch.randn(s, DR, generator=g)
        slots = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(s)])
        write_kv_cache(cache, slots, latent, k_rope)
        tables.append(blocks)
        contexts.append((latent, k_rope))
    return cache, tables, contexts


def test_write_kv_cache_puts_entries_at_block_offsets():
    cache = torch.zeros(5, BS, R + DR)
    latent, k_rope = torch.randn(3, R), torch.randn(3, DR)
    write_kv_cache(cache, torch.tensor([3 * BS + 1, 0, 4 * BS + 3]), latent, k_rope)
    assert torch.equal(cache[3, 1], torch.cat([latent[0], k_rope[0]]))
    assert torch.equal(cache[0, 0], torch.cat([latent[1], k_rope[1]]))
    assert torch.equal(cache[4, 3], torch.cat([latent[2], k_rope[2]]))
    assert int((cache != 0).any(-1).sum()) == 3


def test_prefill_and_chunked_prefill_match_naive():
    seq_lens, query_lens = [11, 6], [4, 6]  # seq 0: a chunk at offset 7; seq 1: a whole prompt
    cache, tables, contexts = _fill_cache(seq_lens)
    w = torch.randn(H * (DN + DV), R) * 0.3
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, BS)
    plan = build_attention_plan(meta)
    assert plan.decode_slots is None and len(plan.prefills) == 2
    for seg, s, q_len, (latent, k_rope) in zip(plan.prefills, seq_lens, query_lens, contexts, strict=True):
        q = torch.randn(q_len, H, DN + DR)
        ours = prefill_attention(q, cache, seg, w, H, DN, DV, SCALE)
        torch.testing.assert_close(ours, _naive_attention(q, latent, k_rope, w, s - q_len), rtol=1e-5, atol=1e-5)


def test_batched_absorbed_decode_matches_naive_expanded_attention():
    seq_lens = [1, 7, 13, 4]
    cache, tables, contexts = _fill_cache(seq_lens, seed=1)
    w = torch.randn(H * (DN + DV), R) * 0.3
    meta = AttentionMetadata.build([1] * 4, seq_lens, tables, BS)  # block table rows padded with -1
    assert (meta.block_tables == -1).any()
    plan = build_attention_plan(meta)
    assert plan.decode_tokens is None and plan.prefills == []
    q = torch.randn(4, H, DN + DR)
    ours = decode_attention(q[..., :DN], q[..., DN:], cache, plan.decode_slots, plan.decode_valid, w, H, DN, DV, SCALE)
    for i, (s, (latent, k_rope)) in enumerate(zip(seq_lens, contexts, strict=True)):
        expect = _naive_attention(q[i : i + 1], latent, k_rope, w, s - 1)[0]
        torch.testing.assert_close(ours[i], expect, rtol=1e-5, atol=1e-5)


def test_plan_partitions_a_mixed_batch():
    meta = AttentionMetadata.build([1, 3, 1], [5, 3, 9], [[0, 1], [2], [3, 4, 5]], BS)
    plan = build_attention_plan(meta)
    assert plan.decode_tokens.tolist() == [0, 4]
    assert plan.decode_valid.sum(-1).tolist() == [5, 9]
    assert [(p.token_start, p.token_end) for p in plan.prefills] == [(1, 4)]
    assert plan.prefills[0].slots.tolist() == [8, 9, 10]
    assert plan.prefills[0].allowed.tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize(
    "query_lens, seq_lens, tables, match",
    [
        ([3], [2], [[0]], "query_len <= seq_len"),
        ([1], [9], [[0, 1]], "more blocks"),
        ([1, 1], [2], [[0]], "disagree"),
    ],
)
def test_plan_rejects_inconsistent_metadata(query_lens, seq_lens, tables, match):
    meta = AttentionMetadata(
        block_size=BS,
        query_start_loc=torch.zeros(len(query_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    with pytest.raises(ValueError, match=match):
        build_attention_plan(meta)


def test_plan_rejects_slot_mapping_of_wrong_length():
    meta = AttentionMetadata.build([2], [2], [[0]], BS)
    meta.slot_mapping = meta.slot_mapping[:1]
    with pytest.raises(ValueError, match="slot_mapping"):
        build_attention_plan(meta)


def test_allocate_kv_caches_shapes():
    cfg = ModelConfig.from_dict(
        {"vocab_size": 32, "hidden_size": 16, "num_layers": 3, "num_attention_heads": 2, "q_lora_rank": 8,
         "kv_lora_rank": 12, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 4, "ffn_hidden_size": 8,
         "expert_ffn_hidden_size": 4, "n_routed_experts": 2, "zero_expert_num": 0, "moe_topk": 1}
    )  # fmt: skip
    caches = allocate_kv_caches(cfg, num_blocks=7, block_size=16, dtype=torch.bfloat16, device="cpu")
    assert len(caches) == 6
    assert all(c.shape == (7, 16, 14) and c.dtype == torch.bfloat16 and not c.any() for c in caches)
    assert kv_cache_bytes_per_block(cfg, 16, torch.bfloat16) == 6 * 16 * 14 * 2
    with pytest.raises(ValueError, match="num_blocks"):
        allocate_kv_caches(cfg, 0, 16, torch.float32, "cpu")


def test_metadata_slots_of_long_chunks_equal_the_per_token_rule():
    """Chunks of >= VECTORIZE_MIN_TOKENS tokens take a tensor path: same slots as block[pos // bs] * bs + pos % bs,
    for a whole prompt, a chunk after cached context and short rows in the same batch."""
    from longcat_service.layers import attention_metadata as am

    g = torch.Generator().manual_seed(3)
    q_lens, s_lens = [am.VECTORIZE_MIN_TOKENS + 5, 1, am.VECTORIZE_MIN_TOKENS, 3], [69, 40, 150, 3]
    tables = [torch.randperm(64, generator=g)[: -(-s // BS)].tolist() for s in s_lens]
    meta = AttentionMetadata.build(q_lens, s_lens, tables, BS)
    want = [t[p // BS] * BS + p % BS for q, s, t in zip(q_lens, s_lens, tables, strict=True)
            for p in range(s - q, s)]
    assert meta.slot_mapping.tolist() == want
    assert meta.query_start_loc.tolist() == [0, 69, 70, 134, 137] and meta.seq_lens.tolist() == s_lens
    assert meta.block_tables.shape == (4, max(len(t) for t in tables))
    with pytest.raises(ValueError, match="seq_len 150"):
        AttentionMetadata.build([100], [150], [tables[2][:-1]], BS)
