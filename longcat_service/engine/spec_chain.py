"""Async scheduling of speculative steps (issue 17): the engine's side of a greedy spec step chained to the in-flight one.

A device-side greedy spec step (spec_greedy.py) leaves everything the next step needs on the device. So, as vLLM's
async scheduling with spec decode, the next step of the same sequences can be launched before the in-flight one is
read back (SpecDecoder.launch_chained builds its rows from the in-flight step's output). The host does not know yet
how many drafts the in-flight step accepts, so:
- plan: each sequence's blocks are reserved for the worst case, every draft accepted (the in-flight step emits k + 1
  tokens, the next step verifies k drafts and its MTP block writes k positions ahead), all or none; the batch's
  ScheduledSeqs carry provisional positions and drafts;
- commit (after the in-flight step was applied): the real start position and drafts, from the applied result, and
  the reserved blocks past what the step really needs go back to the block manager (Scheduler.release_reserved).
The chained step's cache writes stay inside what commit keeps (its real inputs bound them as the scheduler's own
allocation would), so nothing it writes lands in a block given back.

Only where the scheduler would make exactly that step from the applied result: the same running sequences, all
plain greedy (Sampler.plain_greedy: no penalties, logit_bias, logprobs, min_tokens masking), no stop strings, none
that may end by length within the in-flight step's k + 1 tokens, no waiting request wanting a free seat, no
deadline due, the whole worst case within the token budget and the free blocks. A sequence that stops (EOS, stop id)
inside the in-flight step, fails or is aborted is in the chained batch anyway; its row is dropped at collect. Under
tensor parallelism, without the spec graphs (the eager CPU path) or for a sampled step nothing is chained.
"""

from __future__ import annotations

from dataclasses import dataclass

from longcat_service.engine.scheduler import ScheduledSeq, Scheduler


@dataclass
class ChainedSpecPlan:
    batch: list[ScheduledSeq]  # provisional until commit
    reserved_from: list[int]  # each table's length before the worst-case reservation (never trimmed below it)


class SpecChain:
    def __init__(self, scheduler: Scheduler, sampler, num_speculative_tokens: int):
        self.scheduler = scheduler
        self.sampler = sampler
        self.k = num_speculative_tokens
        self.num_chained = 0  # chained spec steps launched (tests and benchmarks read it)
        # on with async scheduling (H200, LongCat-Flash-2L engine loop, k=1: 361 vs 315 tok/s per user unchained at
        # batch 1, 129 vs 120 at 16); False after a chained launch failed: every step is then scheduled after the
        # read-back
        self.enabled = True

    def plan(self, inflight: list[ScheduledSeq], now: float) -> ChainedSpecPlan | None:
        """The chained step after the in-flight batch, its blocks reserved; None (nothing changed): not chainable."""
        sched, k = self.scheduler, self.k
        seqs = [s.seq for s in inflight]
        if not self.enabled or seqs != sched.running or len(seqs) * (k + 1) > sched.max_num_batched_tokens:
            return None
        if sched.waiting and len(sched.running) < sched.max_num_seqs:
            return None  # a free seat: the scheduler admits a waiting request into the next batch
        if any(g.deadline is not None and now >= g.deadline for g in sched.groups.values()):
            return None
        ends = []
        for s in inflight:
            seq, p = s.seq, s.seq.params
            limit = sched.token_limit(seq)
            if (seq.is_finished or p.stop or not self.sampler.plain_greedy(p, seq.num_output_tokens)
                    or seq.num_tokens + k + 1 >= limit):
                return None
            # worst case: k + 1 tokens emitted in flight, then the last of them and k drafts verified
            ends.append((seq, min(s.start_pos + 2 * k + 2, limit)))
        reserved_from = sched.reserve_for_chain(ends)
        if reserved_from is None:
            return None  # not enough free blocks: the scheduler preempts; let it
        batch = []
        for s in inflight:  # provisional: the in-flight step's last verify token then k drafts
            c = ScheduledSeq(s.seq, 1 + k, s.start_pos + 1, token_limit=sched.token_limit(s.seq))
            c.needs_sample = True
            batch.append(c)
        return ChainedSpecPlan(batch, reserved_from)

    def cancel(self, plan: ChainedSpecPlan) -> None:
        """The chained launch did not happen: its reservations go back."""
        for s, n in zip(plan.batch, plan.reserved_from, strict=True):
            self.scheduler.release_reserved(s.seq, 0, n)

    def commit(self, plan: ChainedSpecPlan) -> None:
        """After the in-flight step was applied: the chained step's real positions and drafts, and the blocks it does
        not need given back. Sequences finished meanwhile (stopped, failed, aborted) have freed all their blocks."""
        for s, n in zip(plan.batch, plan.reserved_from, strict=True):
            seq = s.seq
            if seq.is_finished:
                continue
            s.start_pos = seq.num_computed_tokens
            s.draft_token_ids = list(seq.draft_token_ids)
            s.num_new_tokens = 1 + len(s.draft_token_ids)
            if s.start_pos != seq.num_tokens - 1:
                raise AssertionError(f"chained spec step: {seq} computed {s.start_pos} of {seq.num_tokens} tokens")
            self.scheduler.release_reserved(seq, s.end_pos, n)
