"""AttentionMetadata.build (numpy host construction) against the per-token definition of its tensors."""

from __future__ import annotations

import random

import pytest
import torch

from longcat_service.layers.attention_metadata import VECTORIZE_MIN_TOKENS, AttentionMetadata, _chunk_slots


def _expected(query_lens, seq_lens, block_tables, block_size):
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    width = max([len(b) for b in block_tables] + [1])
    table = [list(b) + [-1] * (width - len(b)) for b in block_tables]
    slots = [b[p // block_size] * block_size + p % block_size
             for q, s, b in zip(query_lens, seq_lens, block_tables, strict=True) for p in range(s - q, s)]
    return starts, table, slots


@pytest.mark.parametrize("seed", range(6))
def test_build_matches_the_per_token_definition(seed):
    rng = random.Random(seed)
    for _ in range(40):
        block_size = rng.choice([1, 4, 16])
        query_lens, seq_lens, tables = [], [], []
        for _ in range(rng.randint(1, 6)):  # decode rows, short and long chunks (numpy path), extra blocks
            s = rng.randint(1, 3 * VECTORIZE_MIN_TOKENS)
            q = rng.choice([1, rng.randint(1, s), s, min(s, VECTORIZE_MIN_TOKENS)])
            query_lens.append(q)
            seq_lens.append(s)
            tables.append(rng.sample(range(5000), -(-s // block_size) + rng.randint(0, 2)))
        md = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
        starts, table, slots = _expected(query_lens, seq_lens, tables, block_size)
        assert md.query_start_loc.dtype == torch.int32 and md.query_start_loc.tolist() == starts
        assert md.seq_lens.dtype == torch.int32 and md.seq_lens.tolist() == seq_lens
        assert md.block_tables.dtype == torch.int32 and md.block_tables.tolist() == table
        assert md.slot_mapping.dtype == torch.int64 and md.slot_mapping.tolist() == slots
        assert md.query_lens_cpu == query_lens and md.seq_lens_cpu == seq_lens


def test_build_of_an_empty_batch_and_errors():
    md = AttentionMetadata.build([], [], [], 4)
    assert md.slot_mapping.shape == (0,) and md.block_tables.shape == (0, 1) and md.query_start_loc.tolist() == [0]
    with pytest.raises(ValueError, match="seq_len 9 needs more than the 2 blocks"):
        AttentionMetadata.build([9], [9], [[0, 1]], 4)
    with pytest.raises(ValueError, match="block tables"):
        AttentionMetadata.build([1, 1], [1, 1], [[0]], 4)


def test_chunk_slots_cut_inside_blocks():
    blocks = [7, 3, 9]
    want = [blocks[p // 4] * 4 + p % 4 for p in range(2, 11)]
    assert _chunk_slots(blocks, 2, 11, 4).tolist() == want
    assert _chunk_slots(blocks, 4, 8, 4).tolist() == [12, 13, 14, 15]
    assert _chunk_slots(blocks, 5, 5, 4).tolist() == []
