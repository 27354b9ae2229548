"""The inputs of a chained greedy spec step, built on the device from the in-flight step's packed output (issue 17).

With async scheduling (LLMEngine._launch_chained) the spec step after an in-flight device-side greedy step
(spec_greedy.py) is launched before that step is read back. Everything the next step's flat verify rows need
(spec_graph_runner.verify_rows) follows from the in-flight step's packed result (GreedyLayout) and what the host
knows from before it: per sequence, with `count` tokens emitted and `nd` drafts made by the in-flight step,
- its last known token is the last emitted one, at position start + count (start: the in-flight step's first verify
  position, whose token was the last known one then), and its drafts follow at start + count + 1 .. + nd;
- its draft room shrinks by the emitted count (spec_greedy.draft_room of num_tokens + count).
A sequence the in-flight step failed (count 0: non-finite logits) and the bucket's padding sequences become padding
(num_drafts -1: nothing emitted, no cache write). The block tables are the host's, reserved for the worst case (every
draft accepted) before the launch; rows past a sequence's drafts are padding (slot -1, seq_len 0), as in verify_rows.
"""

from __future__ import annotations

import torch

from longcat_service.engine.spec_greedy import GreedyLayout, slot_at


def chained_verify_inputs(k: int, block_size: int, prev_packed: torch.Tensor, prev_start: torch.Tensor,
                          prev_room: torch.Tensor, tables: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prev_packed [m, 2k+3]: the in-flight step's result of m <= b sequences; prev_start, prev_room [m] int64: their
    first verify position and draft room in that step; tables [b*(k+1), W] int32: the next step's flat-row block
    tables. -> (packed rows [4, b*(k+1)]: ids, positions, slots, seq_lens; seq_info [2, b]: drafts (-1: padding),
    draft room), greedy_spec_step's inputs."""
    layout = GreedyLayout(k)
    m, dev = prev_packed.shape[0], prev_packed.device
    count = prev_packed[:, layout.count]
    alive = count > 0
    last = prev_packed[:, : k + 1].gather(1, (count - 1).clamp(min=0)[:, None])
    drafts = prev_packed[:, layout.drafts : layout.num_drafts]
    nd = torch.where(alive, prev_packed[:, layout.num_drafts], 0)
    j = torch.arange(k + 1, device=dev)
    valid = alive[:, None] & (j[None, :] <= nd[:, None])
    positions = torch.where(valid, (prev_start + count)[:, None] + j[None, :], 0)
    ids = torch.where(valid, torch.cat((last, drafts), dim=1), 0)
    info = torch.stack((torch.where(alive, nd, -1), torch.where(alive, prev_room - count, 0)))
    if b > m:  # the bucket's padding sequences
        pad = b - m
        valid = torch.cat((valid, valid.new_zeros(pad, k + 1)))
        positions = torch.cat((positions, positions.new_zeros(pad, k + 1)))
        ids = torch.cat((ids, ids.new_zeros(pad, k + 1)))
        info = torch.cat((info, torch.stack((info.new_full((pad,), -1), info.new_zeros(pad)))), dim=1)
    valid, positions, ids = valid.reshape(-1), positions.reshape(-1), ids.reshape(-1)
    slots = torch.where(valid, slot_at(tables, positions, block_size), -1)
    seq_lens = torch.where(valid, positions + 1, 0)
    return torch.stack((ids, positions, slots, seq_lens)), info
