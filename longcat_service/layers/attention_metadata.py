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

        Built on the host in numpy, then sent as two packed copies (int32: starts, lengths, block table; int64:
        slots) through pinned memory without waiting (host_to_device): a 4096-token prefill paid four blocking
        pageable copies and a 4096-step Python loop here while the GPU idled."""
        from longcat_service.layers.host_to_device import to_device

        device = torch.device(device)
        batch = len(block_tables)
        if not len(query_lens) == len(seq_lens) == batch:
            raise ValueError(f"attention metadata: {len(query_lens)} query_lens, {len(seq_lens)} seq_lens and "
                             f"{batch} block tables")
        max_blocks = max(max((len(b) for b in block_tables), default=0), 1)
        # int32 [starts (B+1) | seq_lens (B) | block table (B x max_blocks, -1 past each row's blocks)]
        flat: list[int] = [0]
        for q in query_lens:
            flat.append(flat[-1] + q)
        flat += seq_lens
        slots: list[int] = []  # short chunks (decode rows)
        parts: list[np.ndarray] = []  # in batch order: runs of `slots`, and long chunks' slot arrays
        for q, s, blocks in zip(query_lens, seq_lens, block_tables, strict=True):
            if -(-s // block_size) > len(blocks):
                raise ValueError(f"attention metadata: seq_len {s} needs more than the {len(blocks)} blocks given")
            flat += blocks
            if len(blocks) < max_blocks:
                flat += [-1] * (max_blocks - len(blocks))
            if q >= VECTORIZE_MIN_TOKENS:  # a long prefill chunk: numpy instead of a Python loop per token
                if slots:
                    parts.append(np.asarray(slots, dtype=np.int64))
                    slots = []
                parts.append(_chunk_slots(blocks, s - q, s, block_size))
            else:
                slots.extend(blocks[pos // block_size] * block_size + pos % block_size for pos in range(s - q, s))
        if slots or not parts:
            parts.append(np.asarray(slots, dtype=np.int64))
        ints = to_device(torch.from_numpy(np.asarray(flat, dtype=np.int32)), torch.int32, device)
        slot_array = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return AttentionMetadata(
            block_size=block_size,
            query_start_loc=ints[: batch + 1],
            seq_lens=ints[batch + 1 : 2 * batch + 1],
            block_tables=ints[2 * batch + 1 :].view(batch, max_blocks),
            slot_mapping=to_device(torch.from_numpy(slot_array), torch.int64, device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )


def _chunk_slots(blocks: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    """int64 cache slots of positions start..end-1 of a sequence with this block table: whole blocks' slots
    (block * block_size + 0..block_size-1) laid out in position order, then the range cut from them."""
    first, last = start // block_size, -(-end // block_size)
    base = np.asarray(blocks[first:last], dtype=np.int64) * block_size
    return (base[:, None] + np.arange(block_size, dtype=np.int64)).reshape(-1)[start - first * block_size :
                                                                               end - first * block_size]


VECTORIZE_MIN_TOKENS = 64
