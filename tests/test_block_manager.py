from longcat_service.engine.block_manager import BlockManager
from longcat_service.engine.sequence import SequenceGroup
from longcat_service.sampling_params import SamplingParams


def make_seq(tokens, n=1, rid="r"):
    return SequenceGroup(rid, tokens, SamplingParams(n=n), 0.0).seqs[0]


def compute_all(bm, seq):
    """What the engine does after a step that computed every known token."""
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_can_allocate_refuses_when_full():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(9)))
    assert not bm.can_allocate(seq, 9)
    assert bm.can_allocate(seq, 8)


def test_prefix_hit_reuses_full_blocks_but_never_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(12)), rid="a")
    bm.allocate(a, 12)
    compute_all(bm, a)
    # identical prompt: 3 full blocks are cached, but only 2 may be reused (the last token must be computed)
    b = make_seq(list(range(12)), rid="b")
    hits = bm.find_cached_blocks(b)
    assert hits == a.block_table[:2]
    # longer prompt sharing the first 12 tokens: all 3 full blocks are hits
    c = make_seq(list(range(12)) + [99, 98], rid="c")
    assert bm.find_cached_blocks(c) == a.block_table[:3]
    bm.allocate(c, c.num_tokens, bm.find_cached_blocks(c))
    assert c.num_computed_tokens == 12
    assert [bm.blocks[x].ref_count for x in a.block_table] == [2, 2, 2]


def test_prefix_hit_requires_same_parent_chain():
    bm = BlockManager(num_blocks=16, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    compute_all(bm, a)
    # same second block, different first block: no hit at all
    b = make_seq([9, 9, 3, 4, 5])
    assert bm.find_cached_blocks(b) == []


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_seq([1, 2, 3, 4, 7])
    hits = bm.find_cached_blocks(b)
    assert hits == a_blocks[:2]
    assert bm.can_allocate(b, 5, hits)
    bm.allocate(b, 5, hits)
    assert bm.num_free_blocks == 1
    bm.free(b)
    # a new unrelated sequence takes all 4 blocks: every cached hash gets evicted
    c = make_seq([50, 51, 52, 53, 54, 55, 56, 57])
    bm.allocate(c, 8)
    assert bm.cached == {}
    assert bm.find_cached_blocks(make_seq([1, 2, 3, 4, 5])) == []


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    compute_all(bm, a)
    assert bm.find_cached_blocks(make_seq([1, 2, 3, 4, 5])) == []


def test_fork_shares_full_prompt_blocks_and_leaves_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    group = SequenceGroup("r", list(range(8)), SamplingParams(n=2), 0.0)
    parent, child = group.seqs
    bm.allocate(parent, 8)
    compute_all(bm, parent)
    bm.fork(parent, child)
    # 8 tokens = 2 full blocks, but the child must compute its last prompt token itself
    assert child.block_table == parent.block_table[:1]
    assert child.num_computed_tokens == 4
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8
