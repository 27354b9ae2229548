"""Continuous batching with chunked prefill, prefix caching, preemption by recompute and deadlines. Pure Python.

Every sequence is "tokens known" vs "tokens computed": a step computes the next chunk of the uncomputed
tokens (a prompt chunk, a whole prompt, a recompute after preemption, or one decode token) within a per-step
token budget. Running sequences go first, oldest first; when the cache cannot take a running sequence's next
tokens the newest running sequence is preempted (blocks freed, back to the front of the waiting queue, later
recomputed). Waiting sequences are then admitted in FIFO order while budget, seats and blocks allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from longcat_service.engine.block_manager import BlockManager
from longcat_service.engine.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start_pos: int  # num_computed_tokens before this step
    needs_sample: bool = False  # the chunk reaches the last known token, so its logits give the next token
    # a chained decode step (LLMEngine async scheduling) runs on a table whose last block may be a scratch block
    block_table_override: list[int] | None = None

    def __post_init__(self) -> None:
        self.needs_sample = self.end_pos == self.seq.num_tokens

    @property
    def block_table(self) -> list[int]:
        return self.block_table_override if self.block_table_override is not None else self.seq.block_table

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    expired: list[SequenceGroup] = field(default_factory=list)  # finished by their deadline this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.groups: dict[str, SequenceGroup] = {}

    # ---- requests ------------------------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        if group.request_id in self.groups:
            raise ValueError(f"request_id: {group.request_id!r} is already running")
        self.groups[group.request_id] = group
        self.waiting.append(group.seqs[0])

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)

    def abort(self, request_id: str, reason: str = "abort") -> SequenceGroup | None:
        """Finish every sample of the request now and free its blocks; None if it is not unfinished here."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        self.finish_group(group, reason)
        return group

    def finish_group(self, group: SequenceGroup, reason: str) -> None:
        for seq in group.seqs:
            if not seq.is_finished:
                self.finish_seq(seq, reason)

    def finish_seq(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.group.is_finished:
            self.groups.pop(seq.request_id, None)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        for group in list(self.groups.values()):
            if group.deadline is not None and now >= group.deadline:
                self.finish_group(group, "deadline")
                out.expired.append(group)
        budget = self.max_num_batched_tokens
        self._schedule_running(out, budget)
        budget -= out.num_batched_tokens
        if not out.preempted:
            self._schedule_waiting(out, budget)
        for s in out.scheduled:
            if s.seq.group.first_scheduled_time is None:
                s.seq.group.first_scheduled_time = now
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < self.max_num_seqs:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, seq
            while not bm.can_allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running.pop()  # the newest; never one already scheduled (those precede i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, seq.num_computed_tokens + num_new)
                out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
                budget -= num_new
                i += 1

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # prompt logprobs need every prompt position computed, so such requests skip the prefix cache
            cached = [] if seq.params.prompt_logprobs is not None else bm.find_cached_blocks(seq)
            num_computed = len(cached) * bm.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if not bm.can_allocate(seq, num_computed + num_new, cached):
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            bm.allocate(seq, num_computed + num_new, cached)
            if seq.num_preemptions == 0 and seq.index == 0:
                seq.num_cached_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, num_computed))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def on_computed(self, sched: ScheduledSeq) -> None:
        """Account for a chunk the model has written to the cache; fork n > 1 samples once the prompt is in."""
        seq = sched.seq
        seq.num_computed_tokens = sched.end_pos
        self.block_manager.register_full_blocks(seq)
        if seq.index == 0 and seq.prompt_computed:
            for child in seq.group.seqs[1:]:
                if child.status == SequenceStatus.PENDING_FORK:
                    self.block_manager.fork(seq, child)
                    child.status = SequenceStatus.RUNNING
                    self.running.append(child)
