"""Paged KV-cache bookkeeping: block ids, reference counts and automatic prefix caching. Pure Python.

The cache stores MLA's compressed latent per token; a block holds `block_size` consecutive tokens of one
sequence. A FULL block whose tokens have been computed is registered under a hash chain
(parent block's hash, its token ids), so a later prompt with the same prefix reuses it. Blocks whose
reference count drops to 0 keep their hash and wait in an LRU free queue: new blocks are taken least
recently freed first (evicting the hash then), and a prefix hit on a still-queued block revives it.
"""

from __future__ import annotations

from collections import OrderedDict

from longcat_service.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "parent_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.parent_hash: int | None = None


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 blocks, least recently freed first; cached ones stay findable until evicted
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _seq_block_hash(self, seq: Sequence, i: int) -> int:
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[j - 1] if j else None
            tokens = tuple(seq.token_ids[j * self.block_size : (j + 1) * self.block_size])
            seq.block_hashes.append(chain_hash(parent, tokens))
        return seq.block_hashes[i]

    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Leading full blocks of `seq` already in the cache. Never the whole sequence: the last token is
        always left to compute, since its logits are needed."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        parent = None
        for i in range(max_blocks):
            h = self._seq_block_hash(seq, i)
            bid = self.cached.get(h)
            if bid is None:
                break
            block = self.blocks[bid]
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block.token_ids != tokens or block.parent_hash != parent:  # hash collision
                break
            hits.append(bid)
            parent = h
        return hits

    def can_allocate(self, seq: Sequence, num_total_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Enough free blocks for `seq` to hold `num_total_tokens`, after taking `cached_blocks`."""
        have = len(seq.block_table) + len(cached_blocks)
        need = max(0, self.blocks_for(num_total_tokens) - have)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return need + revived <= self.num_free_blocks

    # ---- mutations -----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_total_tokens: int, cached_blocks: list[int] = ()) -> None:
        """Take `cached_blocks` (a prefix hit; only for a sequence without blocks) and new blocks until
        `seq.block_table` covers `num_total_tokens` tokens. Call can_allocate first."""
        if cached_blocks:
            assert not seq.block_table and seq.num_computed_tokens == 0
            for bid in cached_blocks:
                self._acquire(bid)
            seq.block_table.extend(cached_blocks)
            seq.num_computed_tokens = len(cached_blocks) * self.block_size
            seq.num_registered_blocks = len(cached_blocks)
        while len(seq.block_table) < self.blocks_for(num_total_tokens):
            seq.block_table.append(self._take_free_block())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` (same prompt, no blocks) share the parent's full prompt blocks, leaving it at least
        the last prompt token to compute."""
        assert not child.block_table
        n = min(len(parent.block_table), (child.num_prompt_tokens - 1) // self.block_size)
        for bid in parent.block_table[:n]:
            self.blocks[bid].ref_count += 1
        child.block_table = list(parent.block_table[:n])
        child.block_hashes = list(parent.block_hashes[:n])
        child.num_computed_tokens = n * self.block_size
        child.num_registered_blocks = n

    def register_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks that became full of computed tokens to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            h = self._seq_block_hash(seq, i)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash = h
                block.parent_hash = seq.block_hashes[i - 1] if i else None
                block.token_ids = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
                self.cached[h] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def uncache(self, seq: Sequence) -> None:
        """Withdraw the sequence's blocks from the prefix cache (their content is suspect: its logits were not
        finite), so that no later prompt reuses them; the blocks themselves stay with their holders."""
        for bid in seq.block_table:
            block = self.blocks[bid]
            if block.hash is not None:
                if self.cached.get(block.hash) == bid:
                    del self.cached[block.hash]
                block.hash = block.token_ids = block.parent_hash = None

    def free(self, seq: Sequence) -> None:
        # tail first, so that a sequence's prefix blocks are the last of its blocks to be evicted
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed twice"
            if block.ref_count == 0:
                self.free_queue[bid] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def trim(self, seq: Sequence, num_blocks: int) -> None:
        """Give back the blocks past the first num_blocks of the table: blocks reserved ahead and not needed after all
        (spec_chain.py), never computed into, so neither cached nor shared. They go to the front of the free queue,
        as if never taken: the next allocation takes them again before any cached block."""
        while len(seq.block_table) > num_blocks:
            bid = seq.block_table.pop()
            block = self.blocks[bid]
            assert block.ref_count == 1 and block.hash is None, f"block {bid} is in use elsewhere or cached"
            block.ref_count = 0
            self.free_queue[bid] = None
            self.free_queue.move_to_end(bid, last=False)

    def _acquire(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.free_queue[bid]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        bid, _ = self.free_queue.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:  # evict: its content is about to be overwritten
            if self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash = block.token_ids = block.parent_hash = None
        block.ref_count = 1
        return bid
