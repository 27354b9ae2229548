"""Prefix caching reuses a KV block only for identical token blocks: a prompt that differs from a cached one at
any position of any block hits exactly the blocks before that position, also when the hash function collides."""

from __future__ import annotations

import pytest

from longcat_service.engine import block_manager as bm_module
from longcat_service.engine.block_manager import BlockManager
from longcat_service.engine.sequence import SequenceGroup
from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import greedy, make_engine, run_to_completion

BLOCK = 4
BASE = [11, 12, 13, 14, 21, 22, 23, 24, 31, 32, 33, 34, 41, 42, 43, 44, 50]  # 4 full blocks + 1 token


def make_seq(tokens, rid="r"):
    return SequenceGroup(rid, list(tokens), SamplingParams(), 0.0).seqs[0]


def cached_base(bm: BlockManager) -> list[int]:
    """Compute and free BASE; return the block ids that held it."""
    seq = make_seq(BASE, "base")
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)
    table = list(seq.block_table)
    bm.free(seq)  # the blocks stay cached while they wait in the free queue
    return table


def changed_at(pos: int) -> list[int]:
    tokens = list(BASE)
    tokens[pos] = 499  # not in BASE, inside the demo vocabulary
    return tokens


def test_identical_prompt_hits_every_full_block():
    bm = BlockManager(num_blocks=32, block_size=BLOCK)
    base = cached_base(bm)
    assert bm.find_cached_blocks(make_seq(BASE)) == base[:4]


@pytest.mark.parametrize("pos", range(4 * BLOCK))
def test_a_difference_at_any_position_hits_only_the_blocks_before_it(pos):
    bm = BlockManager(num_blocks=32, block_size=BLOCK)
    base = cached_base(bm)
    assert bm.find_cached_blocks(make_seq(changed_at(pos))) == base[: pos // BLOCK]


@pytest.mark.parametrize("pos", [0, BLOCK - 1, BLOCK, 2 * BLOCK - 1, 3 * BLOCK + 2, 4 * BLOCK - 1])
def test_colliding_hashes_never_give_a_block_with_other_tokens(monkeypatch, pos):
    # every block hashes by its parent and first token only: the stored tokens must decide
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: hash((parent, tokens[:1])))
    bm = BlockManager(num_blocks=32, block_size=BLOCK)
    base = cached_base(bm)
    hits = bm.find_cached_blocks(make_seq(changed_at(pos)))
    assert hits == base[: pos // BLOCK]


def test_engine_prompt_differing_in_a_later_blocks_last_token_reuses_only_the_blocks_before():
    engine = make_engine(block_size=BLOCK)
    reference = make_engine(block_size=BLOCK, enable_prefix_caching=False)
    run_to_completion(engine, {"base": (BASE, greedy(4))})
    for pos in (2 * BLOCK - 1, 4 * BLOCK - 1):  # the last token of block 1, of block 3
        prompt = changed_at(pos)
        final, _ = run_to_completion(engine, {f"p{pos}": (prompt, greedy(6))})
        expected, _ = run_to_completion(reference, {"ref": (prompt, greedy(6))})
        assert final[f"p{pos}"].num_cached_tokens == (pos // BLOCK) * BLOCK
        assert final[f"p{pos}"].outputs[0].token_ids == expected["ref"].outputs[0].token_ids
