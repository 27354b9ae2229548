"""Everything attention needs about one forward step over a paged latent KV cache.

The model runs on a flat token batch: the new tokens of all sequences, concatenated.
Sequence i owns tokens query_start_loc[i]:query_start_loc[i+1]; its keys are the first
seq_lens[i] cache entries named by block_tables[i] (the new tokens included, written first
through slot_mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    block_size: int
    query_start_loc: torch.Tensor  # [B+1] int32, on the model's device
    seq_lens: torch.Tensor  # [B] int32 (int64 in CUDA-graph decode), context length after this step
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
        """Derive the tensors from plain lists (new tokens are the last query_len of each context).

        Built on the host, then sent as two packed copies (int32: starts, lengths, block table; int64: slots)
        through pinned memory without waiting (host_to_device): a 4096-token prefill paid four blocking pageable
        copies and a 4096-step Python loop here while the GPU idled."""
        from longcat_service.layers.host_to_device import host_tensor, to_device

        device = torch.device(device)
        batch = len(block_tables)
        max_blocks = max(max((len(b) for b in block_tables), default=0), 1)
        table = torch.full((batch, max_blocks), -1, dtype=torch.int32)
        slots: list[int] = []  # short chunks (decode rows)
        parts: list[torch.Tensor] = []  # in batch order: runs of `slots`, and long chunks' slot tensors
        for i, (q, s, blocks) in enumerate(zip(query_lens, seq_lens, block_tables, strict=True)):
            if blocks:
                table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            if -(-s // block_size) > len(blocks):
                raise ValueError(f"attention metadata: seq_len {s} needs more than the {len(blocks)} blocks given")
            if q >= VECTORIZE_MIN_TOKENS:  # a long prefill chunk: one tensor expression instead of a Python loop
                if slots:
                    parts.append(host_tensor(slots, torch.int64))
                    slots = []
                # numpy: torch's CPU advanced indexing took ~11 ms here for 4096 positions (index_select: 8 us)
                pos = np.arange(s - q, s)
                parts.append(torch.from_numpy(np.asarray(blocks, dtype=np.int64)[pos // block_size] * block_size
                                              + pos % block_size))
            else:
                slots.extend(blocks[pos // block_size] * block_size + pos % block_size for pos in range(s - q, s))
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        ints = torch.cat((host_tensor(starts + list(seq_lens), torch.int32), table.flatten()))
        ints = to_device(ints, torch.int32, device)
        return AttentionMetadata(
            block_size=block_size,
            query_start_loc=ints[: batch + 1],
            seq_lens=ints[batch + 1 : 2 * batch + 1],
            block_tables=ints[2 * batch + 1 :].view(batch, max_blocks),
            slot_mapping=to_device(torch.cat([*parts, host_tensor(slots, torch.int64)]), torch.int64, device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )


VECTORIZE_MIN_TOKENS = 64
