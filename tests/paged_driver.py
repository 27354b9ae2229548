"""Test helper: drives LongcatFlashForCausalLM through the paged cache like a minimal engine would.

Blocks come from a shuffled pool so that block tables are non-trivial (not 0, 1, 2, ...).
"""

from __future__ import annotations

import random

import torch

from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.model.kv_cache import allocate_kv_caches


class PagedDriver:
    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, seed: int = 0):
        self.model, self.block_size = model, block_size
        self.kv_caches = allocate_kv_caches(model.config, num_blocks, block_size, model.dtype, model.device)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tokens: dict[int, list[int]] = {}  # seq id -> all tokens written so far
        self.blocks: dict[int, list[int]] = {}

    @torch.no_grad()
    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence its new tokens in one flat batch; returns fp32 logits [q_len, V] per sequence."""
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for sid, toks in new_tokens.items():
            done = self.tokens.setdefault(sid, [])
            blocks = self.blocks.setdefault(sid, [])
            start = len(done)
            done.extend(toks)
            while len(blocks) * self.block_size < len(done):
                blocks.append(self.free.pop())
            ids += toks
            positions += range(start, len(done))
            query_lens.append(len(toks))
            seq_lens.append(len(done))
            tables.append(list(blocks))
        device = self.model.device
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, device)
        hidden = self.model(
            torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta, self.kv_caches
        )
        logits = self.model.compute_logits(hidden)
        return dict(zip(new_tokens, logits.split(query_lens), strict=True))

    def greedy(self, prompts: dict[int, list[int]], max_new_tokens: int) -> dict[int, list[int]]:
        """Prefill all prompts together, then decode all sequences together, one token per step."""
        out = {sid: [] for sid in prompts}
        logits = self.step(prompts)
        for i in range(max_new_tokens):
            nxt = {sid: [int(lg[-1].argmax())] for sid, lg in logits.items()}
            for sid, tok in nxt.items():
                out[sid] += tok
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        return out
