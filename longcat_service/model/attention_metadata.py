"""Everything attention needs about one forward step over a paged latent KV cache.

The model runs on a flat token batch: the new tokens of all sequences, concatenated.
Sequence i owns tokens query_start_loc[i]:query_start_loc[i+1]; its keys are the first
seq_lens[i] cache entries named by block_tables[i] (the new tokens included, written first
through slot_mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    block_size: int
    query_start_loc: torch.Tensor  # [B+1] int32, on the model's device
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, -1 or any value past the used blocks
    slot_mapping: torch.Tensor  # [N] int64, cache slot (block * block_size + offset) of each new token
    # host copies so that CPU code never syncs with the device
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @staticmethod
    def build(
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Derive the tensors from plain lists (new tokens are the last query_len of each context)."""
        max_blocks = max((len(b) for b in block_tables), default=0)
        table = torch.full((len(block_tables), max(max_blocks, 1)), -1, dtype=torch.int32)
        for i, blocks in enumerate(block_tables):
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots: list[int] = []
        for q, s, blocks in zip(query_lens, seq_lens, block_tables, strict=True):
            for pos in range(s - q, s):
                slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        return AttentionMetadata(
            block_size=block_size,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=table.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )
