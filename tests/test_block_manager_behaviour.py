"""BlockManager behaviour that the mutation run (tools/mutation.sh block_manager) found unchecked: argument
validation, block counts, the hash chain over several blocks, allocation budgets with revived cached blocks,
LRU eviction, re-registration after eviction, and bookkeeping across fork / free / re-allocation."""

from __future__ import annotations

import pytest

from longcat_service.engine.block_manager import BlockManager
from longcat_service.engine.sequence import SequenceGroup
from longcat_service.sampling_params import SamplingParams


def make_seq(tokens, rid="r"):
    return SequenceGroup(rid, list(tokens), SamplingParams(), 0.0).seqs[0]


def compute(bm, seq, hits=()):
    """Allocate (taking prefix hits), compute every token, register: what the engine does for a prompt."""
    bm.allocate(seq, seq.num_tokens, list(hits))
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)
    return list(seq.block_table)


def test_sizes_must_be_positive_and_one_is_enough():
    with pytest.raises(ValueError, match="num_blocks: must be >= 1, got 0"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size: must be >= 1, got 0"):
        BlockManager(num_blocks=4, block_size=0)
    bm = BlockManager(num_blocks=1, block_size=1)
    seq = make_seq([7])
    bm.allocate(seq, 1)
    assert seq.block_table == [0] and bm.usage == 1.0


def test_blocks_for_rounds_up_to_whole_blocks_and_usage_counts_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 9)] == [0, 1, 1, 2, 3]
    assert all(type(bm.blocks_for(n)) is int for n in (1, 9))
    bm.allocate(make_seq(range(9)), 9)
    assert bm.usage == 3 / 8


def test_hash_chain_covers_every_earlier_block():
    # A and B differ only in block 1: B's blocks 2 and 3 have A's tokens but another history, so they are
    # cached as B's own and a repeat of B hits all of B's blocks after the shared first one
    bm = BlockManager(num_blocks=32, block_size=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0]
    b = a[:4] + [50, 51, 52, 53] + a[8:]
    a_table = compute(bm, make_seq(a, "a"))
    b_table = compute(bm, make_seq(b, "b"))
    assert bm.find_cached_blocks(make_seq(b, "b2")) == [a_table[0]] + b_table[1:4]


def test_identical_content_computed_twice_is_found_in_the_first_copy():
    bm = BlockManager(num_blocks=32, block_size=4)
    tokens = list(range(9))
    first = compute(bm, make_seq(tokens, "a"))
    compute(bm, make_seq(tokens, "b"))  # computed without taking the hits: its blocks duplicate a's
    assert bm.find_cached_blocks(make_seq(tokens + [99], "c")) == first[:2]


def test_can_allocate_counts_cached_blocks_revived_from_the_free_queue():
    bm = BlockManager(num_blocks=3, block_size=4)
    tokens = list(range(9))  # 3 blocks, 2 of them full
    seq = make_seq(tokens, "a")
    compute(bm, seq)
    bm.free(seq)  # all 3 free, the 2 full ones still cached
    again = make_seq(tokens, "b")
    hits = bm.find_cached_blocks(again)
    assert len(hits) == 2
    assert bm.can_allocate(again, 9, hits)  # 1 new block + 2 revived = 3 free blocks
    assert not bm.can_allocate(again, 13, hits)  # 2 new + 2 revived > 3
    # a sequence that already holds every block it needs fits without a free block
    full = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(8))
    full.allocate(seq, 8)
    assert full.num_free_blocks == 0 and full.can_allocate(seq, 8)


def test_prefix_hits_only_for_a_sequence_without_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    compute(bm, make_seq(tokens, "a"))
    seq = make_seq(tokens, "b")
    bm.allocate(seq, 1)
    with pytest.raises(AssertionError):
        bm.allocate(seq, 9, bm.find_cached_blocks(make_seq(tokens, "c")))


def test_blocks_after_a_prefix_hit_are_registered_in_turn():
    bm = BlockManager(num_blocks=16, block_size=4)
    compute(bm, make_seq(range(9), "a"))
    longer = list(range(13))
    seq = make_seq(longer, "b")
    hits = bm.find_cached_blocks(seq)
    assert len(hits) == 2
    table = compute(bm, seq, hits)
    assert bm.find_cached_blocks(make_seq(longer + [99], "c")) == table[:3]


def test_fork_of_a_9_token_prompt_shares_two_blocks_and_the_child_registers_its_own():
    bm = BlockManager(num_blocks=16, block_size=4)
    group = SequenceGroup("r", list(range(9)), SamplingParams(n=2), 0.0)
    parent, child = group.seqs
    compute(bm, parent)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    bm.allocate(child, 13)
    child.token_ids.extend([20, 21, 22, 23])  # the child's own tokens fill its third block
    child.num_computed_tokens = 12
    bm.register_full_blocks(child)
    bm.register_full_blocks(child)  # registering again is a no-op
    assert bm.find_cached_blocks(make_seq(list(range(8)) + [8, 20, 21, 22, 99], "c")) == child.block_table[:3]


def test_lru_eviction_takes_the_least_recently_freed_block():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(range(5), "a")
    table = compute(bm, a)
    bm.free(a)  # tail first: the partial block is the least recently freed, the cached full block the most
    bm.allocate(make_seq([42], "b"), 1)
    assert bm.find_cached_blocks(make_seq(range(5), "c")) == table[:1]


def test_an_evicted_block_is_cached_again_under_its_new_content():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(range(5), "a")
    compute(bm, a)
    bm.free(a)
    bm.allocate(make_seq([42], "filler"), 1)  # takes the partial block
    b = make_seq([30, 31, 32, 33], "b")
    table = compute(bm, b)  # takes a's cached full block, evicting it
    assert bm.find_cached_blocks(make_seq(range(5), "a2")) == []
    assert bm.find_cached_blocks(make_seq([30, 31, 32, 33, 99], "c")) == table


def test_a_freed_sequence_registers_its_blocks_again_when_recomputed():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(range(5), "a")
    compute(bm, a)
    bm.free(a)
    other = make_seq([40, 41, 42, 43, 44], "other")
    bm.allocate(other, 5)  # evicts both of a's blocks
    bm.free(other)
    a.num_computed_tokens = 0  # preempted by recompute: its KV is gone
    table = compute(bm, a)
    assert bm.find_cached_blocks(make_seq(range(5), "a2")) == table[:1]
