"""What rank 0 tells the other ranks about one step, and the stand-ins the workers rebuild from it.

A worker runs the very same `ModelRunner.execute` as rank 0 on stand-in objects that carry exactly what
execute reads from a ScheduledSeq and its Sequence, so every rank issues the same collectives in the same
order (forward, prompt-logprob chunks, the sampled rows' logits) by construction. Only what the step needs
travels: each sequence's tokens from start_pos (one past the chunk, for prompt logprobs) and its block table
as a delta against what this worker already holds (tables only grow, except after preemption: then resent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One sequence on the wire (a tuple: compact to pickle):
# (seq_id, index, start_pos, num_new_tokens, needs_sample, num_prompt_tokens, prompt_logprobs,
#  window_tokens, keep_blocks, new_blocks, draft_token_ids, shared_recompute_pos)
WireSeq = tuple


class TokenWindow:
    """token_ids[start : start+len(tokens)] of a sequence, indexed with absolute positions."""

    def __init__(self, start: int, tokens: list[int]):
        self.start, self.tokens = start, tokens

    def __getitem__(self, index):
        if isinstance(index, slice):
            if index.step not in (None, 1) or index.start is None or index.stop is None:
                raise IndexError(f"TokenWindow supports [a:b] slices only, got {index}")
            lo, hi = index.start - self.start, index.stop - self.start
            if lo < 0 or hi > len(self.tokens):
                raise IndexError(f"positions [{index.start}, {index.stop}) outside the window {self._span()}")
            return self.tokens[lo:hi]
        i = index - self.start
        if not 0 <= i < len(self.tokens):
            raise IndexError(f"position {index} outside the window {self._span()}")
        return self.tokens[i]

    def _span(self) -> str:
        return f"[{self.start}, {self.start + len(self.tokens)})"


@dataclass
class ReplicaParams:
    prompt_logprobs: int | None
    seed: None = None


@dataclass
class ReplicaSeq:
    seq_id: int
    index: int
    num_prompt_tokens: int
    token_ids: TokenWindow
    block_table: list[int]
    params: ReplicaParams
    shared_recompute_pos: int | None = None  # speculative decoding: a recomputed shared token (spec_decode.py)


@dataclass
class ReplicaScheduled:
    seq: ReplicaSeq
    num_new_tokens: int
    start_pos: int
    needs_sample: bool
    draft_token_ids: list[int] = field(default_factory=list)  # speculative decoding: the drafts this step verifies

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens

    @property
    def block_table(self) -> list[int]:  # ScheduledSeq's interface (no scratch blocks under TP)
        return self.seq.block_table


class StepEncoder:
    """Rank 0: ScheduledSeqs -> wire tuples, remembering the block tables each worker holds."""

    def __init__(self):
        self._sent_tables: dict[int, list[int]] = {}
        self._released: list[int] = []

    def encode(self, batch) -> tuple[list[WireSeq], list[int]]:
        rows = []
        for s in batch:
            seq = s.seq
            table = seq.block_table
            sent = self._sent_tables.get(seq.seq_id)
            keep = len(sent) if sent is not None and len(sent) <= len(table) and table[: len(sent)] == sent else 0
            new_blocks = list(table[keep:])
            self._sent_tables[seq.seq_id] = list(table)
            end = s.start_pos + s.num_new_tokens
            window = seq.token_ids[s.start_pos : min(end + 1, len(seq.token_ids))]
            rows.append((
                seq.seq_id, seq.index, s.start_pos, s.num_new_tokens, s.needs_sample, seq.num_prompt_tokens,
                seq.params.prompt_logprobs, window, keep, new_blocks, list(getattr(s, "draft_token_ids", ())),
                getattr(seq, "shared_recompute_pos", None),
            ))  # fmt: skip
        released, self._released = self._released, []
        return rows, released

    def forget(self, seq_id: int) -> None:
        """The sequence is done: the workers drop its table with the next step."""
        if self._sent_tables.pop(seq_id, None) is not None:
            self._released.append(seq_id)


class StepDecoder:
    """A worker: wire tuples -> ReplicaScheduled, keeping each live sequence's block table."""

    def __init__(self):
        self.tables: dict[int, list[int]] = {}

    def decode(self, message: tuple[list[WireSeq], list[int]]) -> list[ReplicaScheduled]:
        rows, released = message
        for seq_id in released:
            self.tables.pop(seq_id, None)
        batch = []
        for (seq_id, index, start, num_new, needs_sample, num_prompt, prompt_lp, window, keep, new_blocks, drafts,
             shared_pos) in rows:
            held = self.tables.get(seq_id, [])
            if keep > len(held):
                raise RuntimeError(f"step message: seq {seq_id} keeps {keep} blocks but this rank holds {len(held)}")
            if keep == len(held):  # the usual case: the table only grew
                held.extend(new_blocks)
                table = self.tables[seq_id] = held
            else:
                table = self.tables[seq_id] = held[:keep] + new_blocks
            seq = ReplicaSeq(seq_id, index, num_prompt, TokenWindow(start, window), table, ReplicaParams(prompt_lp),
                             shared_pos)
            batch.append(ReplicaScheduled(seq, num_new, start, needs_sample, drafts))
        return batch
