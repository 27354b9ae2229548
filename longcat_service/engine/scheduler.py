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
    # speculative decoding: the drafts verified in this step (the last len(draft_token_ids) of the new tokens),
    # and the number of tokens the sequence may reach (max_tokens, max_model_len), which caps its next drafts
    draft_token_ids: list[int] = field(default_factory=list)
    token_limit: int | None = None

    def __post_init__(self) -> None:
        self.needs_sample = self.end_pos - len(self.draft_token_ids) == self.seq.num_tokens

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
        num_speculative_tokens: int = 0,
        max_model_len: int | None = None,
    ):
        self.block_manager = block_manager
        # speculative decoding (k > 0): a decoding sequence is scheduled with its drafts, its table covers k more
        # tokens (the MTP drafts' cache writes), and a prefix hit or fork recomputes the last shared token (its
        # hidden state feeds the MTP block); see engine/spec_decode.py
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
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
            drafts = seq.draft_token_ids[: budget - 1] if num_new == seq.num_tokens - seq.num_computed_tokens == 1 else []
            num_new += len(drafts)
            need = self._tokens_to_allocate(seq, seq.num_computed_tokens + num_new)
            while not bm.can_allocate(seq, need):
                victim = self.running.pop()  # the newest; never one already scheduled (those precede i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, need)
                out.scheduled.append(self._scheduled(seq, num_new, seq.num_computed_tokens, drafts))
                budget -= num_new
                i += 1

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # prompt logprobs need every prompt position computed, so such requests skip the prefix cache
            cached = [] if seq.params.prompt_logprobs is not None else bm.find_cached_blocks(seq)
            num_computed = len(cached) * bm.block_size
            seq.shared_recompute_pos = None
            if self.num_speculative_tokens and num_computed:
                num_computed -= 1  # recompute the last cached token: the MTP block needs its hidden state
                seq.shared_recompute_pos = num_computed
            num_new = min(seq.num_tokens - num_computed, budget)
            need = self._tokens_to_allocate(seq, num_computed + num_new)
            if not bm.can_allocate(seq, need, cached):
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            bm.allocate(seq, need, cached)
            seq.num_computed_tokens = num_computed
            if seq.num_preemptions == 0 and seq.index == 0:
                seq.num_cached_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(self._scheduled(seq, num_new, num_computed, []))
            budget -= num_new

    def _tokens_to_allocate(self, seq: Sequence, end: int) -> int:
        """Tokens the block table must cover to compute up to `end`: with MTP also the k positions its drafts
        write ahead (never past what the sequence may reach)."""
        k = self.num_speculative_tokens
        if not k:
            return end
        return max(end, min(end + k, self.token_limit(seq)))

    def token_limit(self, seq: Sequence) -> int:
        limit = seq.num_prompt_tokens + seq.params.max_tokens if seq.params.max_tokens is not None else 1 << 62
        return min(limit, self.max_model_len) if self.max_model_len is not None else limit

    def reserve_for_chain(self, ends: list[tuple[Sequence, int]]) -> list[int] | None:
        """Async scheduling of spec steps (spec_chain.py): blocks for each sequence to compute up to its end (with the
        drafts' look-ahead), all or none. -> each table's length before, for release_reserved; None: too few free
        blocks (nothing taken)."""
        bm = self.block_manager
        needs = [bm.blocks_for(self._tokens_to_allocate(seq, end)) for seq, end in ends]
        if sum(max(0, n - len(seq.block_table)) for (seq, _), n in zip(ends, needs, strict=True)) > bm.num_free_blocks:
            return None
        before = [len(seq.block_table) for seq, _ in ends]
        for seq, end in ends:
            bm.allocate(seq, self._tokens_to_allocate(seq, end))
        return before

    def release_reserved(self, seq: Sequence, end: int, keep_blocks: int) -> None:
        """Give back the reserved blocks past what computing up to `end` needs (as _schedule_running would allocate),
        never the first keep_blocks (held before the reservation). A finished sequence's blocks are free already."""
        if seq.is_finished:
            return
        bm = self.block_manager
        bm.trim(seq, max(keep_blocks, bm.blocks_for(self._tokens_to_allocate(seq, end)) if end else 0))

    def _scheduled(self, seq: Sequence, num_new: int, start: int, drafts: list[int]) -> ScheduledSeq:
        s = ScheduledSeq(seq, num_new, start, draft_token_ids=drafts)
        if self.num_speculative_tokens:
            s.token_limit = self.token_limit(seq)
        return s

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.draft_token_ids = []  # recomputed from the prompt and outputs: drafts come anew
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def on_computed(self, sched: ScheduledSeq, num_computed: int | None = None) -> None:
        """Account for a chunk the model has written to the cache; fork n > 1 samples once the prompt is in.
        num_computed: where the valid cache entries end when not at end_pos (rejected drafts)."""
        seq = sched.seq
        seq.num_computed_tokens = sched.end_pos if num_computed is None else num_computed
        self.block_manager.register_full_blocks(seq)
        if seq.index == 0 and seq.prompt_computed:
            for child in seq.group.seqs[1:]:
                if child.status == SequenceStatus.PENDING_FORK:
                    self.block_manager.fork(seq, child)
                    if self.num_speculative_tokens and child.num_computed_tokens:
                        child.num_computed_tokens -= 1  # the MTP block needs the last shared token's hidden
                        child.shared_recompute_pos = child.num_computed_tokens
                    child.status = SequenceStatus.RUNNING
                    self.running.append(child)
