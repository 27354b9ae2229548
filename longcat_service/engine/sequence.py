"""A sequence (one sample of a request) and its request group: plain data, no tensors.

A request with n samples is one SequenceGroup of n Sequences. Only sample 0 is scheduled at first; when its
prompt has been computed the others are forked from it (they share its full prompt blocks) so the prompt is
prefilled once.
"""

from __future__ import annotations

import enum
import itertools

from longcat_service.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, owns no blocks
    RUNNING = "running"  # owns blocks, computing prompt chunks or decoding
    PENDING_FORK = "pending_fork"  # sample > 0 of an n > 1 request, waiting for sample 0's prompt
    FINISHED = "finished"


class Sequence:
    def __init__(self, group: SequenceGroup, index: int):
        self.seq_id = next(_seq_ids)
        self.group = group
        self.index = index
        self.token_ids: list[int] = list(group.prompt_token_ids)
        self.num_prompt_tokens = len(group.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache on first scheduling
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash chain of the full blocks seen so far (valid across preemption)
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.status = SequenceStatus.PENDING_FORK if index > 0 else SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.num_preemptions = 0
        # speculative decoding: the drafts for the next step, and this sample's totals so far
        self.draft_token_ids: list[int] = []
        self.shared_recompute_pos: int | None = None  # a shared (cached / forked) token recomputed for the MTP
        self.num_spec_steps = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    @property
    def request_id(self) -> str:
        return self.group.request_id

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, idx={self.index}, status={self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )


class SequenceGroup:
    """All samples of one request."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        deadline: float | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        self.deadline = deadline
        self.first_scheduled_time: float | None = None
        self.seqs = [Sequence(self, i) for i in range(params.n)]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        return self.seqs[0].num_cached_tokens
