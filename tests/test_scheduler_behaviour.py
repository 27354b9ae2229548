"""Scheduler rules beyond the basic policy (tests/test_scheduler.py): the token budget and seat limit at their exact
edges, prefix-cache admission, preemption bookkeeping, n > 1 forking, and the speculative-decoding (MTP) schedule:
drafts, the k positions reserved ahead, the recomputed shared token."""

from __future__ import annotations

import pytest

from longcat_service.engine.block_manager import BlockManager
from longcat_service.engine.scheduler import Scheduler
from longcat_service.engine.sequence import SequenceGroup, SequenceStatus
from longcat_service.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, prefix=True, k=0, max_model_len=None):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(bm, max_num_seqs, budget, num_speculative_tokens=k, max_model_len=max_model_len), bm


def add(sched, rid, n_tokens, first=0, **params):
    group = SequenceGroup(rid, list(range(first, first + n_tokens)), SamplingParams(**params), 0.0)
    sched.add(group)
    return group


def run_step(sched, now=0.0, token=7):
    """Schedule, pretend the model ran every chunk, append a token where one is sampled."""
    out = sched.schedule(now)
    for s in out.scheduled:
        sched.on_computed(s)
        if s.needs_sample:
            s.seq.append_token(token)
    return out


def plan(out):
    return [(s.seq.request_id, s.seq.index, s.start_pos, s.num_new_tokens) for s in out.scheduled]


# ---- requests ---------------------------------------------------------------------------------------------------

def test_duplicate_request_id_is_refused_by_name():
    sched, _ = make()
    add(sched, "a", 3)
    with pytest.raises(ValueError, match="request_id: 'a'"):
        add(sched, "a", 3)


def test_abort_finishes_every_sample_with_its_reason():
    sched, _ = make()
    g = add(sched, "a", 3, n=2)
    run_step(sched)
    sched.abort("a")
    assert [(s.finish_reason, s.stop_reason, s.status) for s in g.seqs] == [("abort", None, SequenceStatus.FINISHED)] * 2
    g = add(sched, "b", 3)
    sched.abort("b", "deadline")
    assert g.seqs[0].finish_reason == "deadline"


def test_finish_seq_records_the_stop_reason_and_forgets_the_group_with_its_last_sample():
    sched, bm = make()
    g = add(sched, "a", 3, n=2)
    run_step(sched)
    run_step(sched)
    sched.finish_seq(g.seqs[0], "stop", "</s>")
    assert (g.seqs[0].finish_reason, g.seqs[0].stop_reason) == ("stop", "</s>")
    assert sched.has_unfinished() and "a" in sched.groups
    sched.finish_seq(g.seqs[1], "length")
    assert not sched.has_unfinished() and bm.num_free_blocks == 64


def test_first_scheduled_time_is_the_first_step_only():
    sched, _ = make(budget=4)
    g = add(sched, "a", 10)
    assert g.first_scheduled_time is None
    run_step(sched, now=1.5)
    run_step(sched, now=2.5)
    assert g.first_scheduled_time == 1.5


def test_waiting_tokens_count_what_is_left_to_compute():
    sched, _ = make(budget=4, max_num_seqs=1)
    add(sched, "a", 10)
    add(sched, "b", 6, first=50)
    assert sched.num_waiting_tokens == 16
    run_step(sched)
    assert sched.num_waiting_tokens == 6  # a is running now


# ---- budget and seats at their edges ----------------------------------------------------------------------------

def test_budget_exactly_filled_by_decodes_then_waiting_get_the_rest():
    sched, _ = make(budget=3)
    for r in "abc":
        add(sched, r, 1, first=ord(r) * 10)
    run_step(sched)
    assert plan(run_step(sched)) == [("a", 0, 1, 1), ("b", 0, 1, 1), ("c", 0, 1, 1)]  # 3 decodes, budget 3
    add(sched, "d", 5, first=500)
    sched.abort("c")
    out = run_step(sched)  # a, b decode; d's prompt gets the 1 token left
    assert plan(out) == [("a", 0, 2, 1), ("b", 0, 2, 1), ("d", 0, 0, 1)]
    assert out.num_batched_tokens == 3


def test_running_prefill_chunk_uses_the_budget_before_later_running_sequences():
    sched, _ = make(budget=4)
    add(sched, "a", 10)
    add(sched, "b", 1, first=50)
    out = run_step(sched)
    assert plan(out) == [("a", 0, 0, 4)]  # the budget is a's; b waits
    assert plan(run_step(sched)) == [("a", 0, 4, 4)]  # running a first, nothing left for b
    assert plan(run_step(sched)) == [("a", 0, 8, 2), ("b", 0, 0, 1)]


def test_waiting_admission_shares_the_budget_in_order():
    sched, _ = make(budget=8)
    for i, r in enumerate("abc"):
        add(sched, r, 3, first=100 * i)
    assert plan(run_step(sched)) == [("a", 0, 0, 3), ("b", 0, 0, 3), ("c", 0, 0, 2)]


def test_nothing_is_admitted_when_the_running_sequences_use_the_whole_budget():
    sched, _ = make(budget=2)
    add(sched, "a", 1)
    add(sched, "b", 1, first=50)
    run_step(sched)
    add(sched, "c", 1, first=90)
    out = run_step(sched)
    assert plan(out) == [("a", 0, 1, 1), ("b", 0, 1, 1)]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_forked_samples_never_exceed_max_num_seqs_per_step():
    sched, _ = make(max_num_seqs=2)
    g = add(sched, "a", 4, n=3)
    run_step(sched)
    assert [s.status for s in g.seqs] == [SequenceStatus.RUNNING] * 3  # forked once the prompt is in
    for _ in range(3):
        assert len(run_step(sched).scheduled) == 2


def test_no_fork_before_the_whole_prompt_is_computed():
    sched, _ = make(budget=4)
    g = add(sched, "a", 10, n=2)
    run_step(sched)
    run_step(sched)
    assert g.seqs[1].status == SequenceStatus.PENDING_FORK and g.seqs[1] not in sched.running
    run_step(sched)
    assert g.seqs[1].status == SequenceStatus.RUNNING and g.seqs[1] in sched.running


def test_on_computed_takes_the_valid_end_when_drafts_were_rejected():
    sched, _ = make()
    g = add(sched, "a", 6)
    s = sched.schedule(0.0).scheduled[0]
    sched.on_computed(s, 4)
    assert g.seqs[0].num_computed_tokens == 4


# ---- prefix cache -----------------------------------------------------------------------------------------------

def test_prefix_hit_shares_blocks_even_when_the_cache_is_nearly_full():
    # 4 blocks of 4: a holds 3 (8 prompt tokens + its first decode); b shares a's 2 full blocks and needs 1 new
    sched, bm = make(num_blocks=4, block_size=4)
    a = add(sched, "a", 8).seqs[0]
    run_step(sched)
    b = add(sched, "b", 9).seqs[0]
    out = run_step(sched)
    assert plan(out) == [("a", 0, 8, 1), ("b", 0, 8, 1)]
    assert b.block_table[:2] == a.block_table[:2] and len(b.block_table) == 3
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert (b.num_cached_tokens, b.num_computed_tokens) == (8, 9)


def test_cached_tokens_count_as_computed_from_admission():
    sched, _ = make(block_size=4)
    add(sched, "a", 10)
    run_step(sched)
    b = add(sched, "b", 10).seqs[0]
    out = sched.schedule(0.0)
    assert plan(out)[-1] == ("b", 0, 8, 2) and b.num_computed_tokens == 8


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    sched, _ = make(block_size=4)
    add(sched, "a", 10)
    run_step(sched)
    g = add(sched, "b", 10, prompt_logprobs=0)
    out = run_step(sched)
    assert plan(out)[-1] == ("b", 0, 0, 10) and g.num_cached_tokens == 0


def test_cached_tokens_are_those_of_the_first_admission_not_of_a_recompute():
    # b is preempted; its own prompt blocks stay cached, so its re-admission hits them: still 0 cached reported
    sched, bm = make(num_blocks=6, block_size=2, budget=64)
    a = add(sched, "a", 5).seqs[0]
    b = add(sched, "b", 5, first=100).seqs[0]
    run_step(sched)
    preempted = []
    for _ in range(40):
        out = run_step(sched)
        preempted += out.preempted
        if a.num_output_tokens >= 4 and not a.is_finished:
            sched.finish_seq(a, "length")
        if b in preempted and b.status == SequenceStatus.RUNNING:
            break
    assert b in preempted and b.status == SequenceStatus.RUNNING
    assert b.num_computed_tokens >= 4  # re-admitted on its cached prompt blocks
    assert (b.num_cached_tokens, a.num_cached_tokens) == (0, 0)


# ---- preemption -------------------------------------------------------------------------------------------------

def test_preemption_count_matches_the_preemptions_seen():
    sched, bm = make(num_blocks=5, block_size=2, budget=64, prefix=False)
    groups = [add(sched, r, 2, first=100 * i) for i, r in enumerate("abcd")]
    seen = {r: 0 for r in "abcd"}
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out = run_step(sched)
        for seq in out.preempted:
            seen[seq.request_id] += 1
        for g in groups:
            seq = g.seqs[0]
            if not seq.is_finished and seq.num_output_tokens >= 8:
                sched.finish_seq(seq, "length")
    assert not sched.has_unfinished() and bm.num_free_blocks == 5
    assert {g.request_id: g.seqs[0].num_preemptions for g in groups} == seen
    assert max(seen.values()) >= 2


def test_a_sequence_alone_that_cannot_grow_preempts_itself():
    sched, bm = make(num_blocks=2, block_size=2, budget=64, prefix=False)
    a = add(sched, "a", 4).seqs[0]
    run_step(sched)  # 4 prompt tokens in 2 blocks, a 5th token sampled: position 4 needs a 3rd block
    out = run_step(sched)
    assert out.preempted == [a] and out.scheduled == []
    assert (a.status, a.num_computed_tokens, a.block_table, list(sched.waiting)) == (SequenceStatus.WAITING, 0, [], [a])
    assert bm.num_free_blocks == 2


# ---- speculative decoding (MTP) ---------------------------------------------------------------------------------

def test_decode_carries_its_drafts_within_the_budget():
    sched, _ = make(k=3, budget=64)
    a = add(sched, "a", 4).seqs[0]
    run_step(sched)
    a.draft_token_ids = [11, 12, 13]
    s = sched.schedule(0.0).scheduled[0]
    assert (s.start_pos, s.num_new_tokens, s.draft_token_ids, s.needs_sample) == (4, 4, [11, 12, 13], True)


def test_drafts_are_cut_to_the_budget_left_and_fill_it_exactly():
    sched, _ = make(k=3, budget=3)
    a = add(sched, "a", 1).seqs[0]
    b = add(sched, "b", 1, first=50).seqs[0]
    run_step(sched)
    a.draft_token_ids = [11, 12, 13]
    b.draft_token_ids = [21]
    out = sched.schedule(0.0)
    assert [(s.seq.request_id, s.num_new_tokens, s.draft_token_ids) for s in out.scheduled] == [("a", 3, [11, 12])]


def test_prefill_chunks_carry_no_drafts():
    sched, _ = make(k=3, budget=4)
    a = add(sched, "a", 10).seqs[0]
    a.draft_token_ids = [11, 12]  # stale drafts must not ride along a prompt chunk
    run_step(sched)  # admitted: the first chunk
    s = sched.schedule(0.0).scheduled[0]  # running: the second chunk
    assert (s.start_pos, s.num_new_tokens, s.draft_token_ids, s.needs_sample) == (4, 4, [], False)


def test_preemption_drops_the_drafts():
    sched, _ = make(num_blocks=2, block_size=2, budget=64, prefix=False, k=1)
    a = add(sched, "a", 3).seqs[0]
    run_step(sched)
    a.draft_token_ids = [5]
    out = run_step(sched)
    assert out.preempted == [a] and a.draft_token_ids == []


@pytest.mark.parametrize(
    "max_tokens, max_model_len, limit, blocks",
    [
        (100, None, 104, 4),  # 4 prompt tokens + 3 draft positions: 7 tokens in blocks of 2
        (1, None, 5, 3),  # the sample ends at 5 tokens: no room reserved past it
        (None, 6, 6, 3),  # nor past the context
        (100, 5, 5, 3),
        (None, None, None, 4),
    ],
)
def test_table_reserves_k_positions_up_to_the_token_limit(max_tokens, max_model_len, limit, blocks):
    sched, _ = make(k=3, block_size=2, max_model_len=max_model_len)
    a = add(sched, "a", 4, max_tokens=max_tokens).seqs[0]
    s = sched.schedule(0.0).scheduled[0]
    assert len(a.block_table) == blocks
    if limit is not None:
        assert s.token_limit == limit
    else:
        assert s.token_limit > 10**9  # no limit
    assert (s.start_pos, s.num_new_tokens) == (0, 4)


def test_without_speculation_no_positions_are_reserved_and_no_limit_is_set():
    sched, _ = make(k=0, block_size=2, max_model_len=6)
    a = add(sched, "a", 4, max_tokens=100).seqs[0]
    s = sched.schedule(0.0).scheduled[0]
    assert (len(a.block_table), s.token_limit, a.shared_recompute_pos) == (2, None, None)


def test_prefix_hit_with_speculation_recomputes_the_last_cached_token():
    sched, _ = make(k=2, block_size=4)
    add(sched, "a", 10)
    run_step(sched)
    b = add(sched, "b", 10).seqs[0]
    out = run_step(sched)
    assert plan(out)[-1] == ("b", 0, 7, 3)
    assert (b.shared_recompute_pos, b.num_cached_tokens) == (7, 7)
    c = add(sched, "c", 3, first=500).seqs[0]  # no hit: nothing shared to recompute
    run_step(sched)
    assert c.shared_recompute_pos is None and c.num_computed_tokens == 3


def test_forked_samples_with_speculation_recompute_the_last_shared_token():
    sched, _ = make(k=2, block_size=4)
    g = add(sched, "a", 10, n=2)
    run_step(sched)
    child = g.seqs[1]
    assert child.status == SequenceStatus.RUNNING
    assert (child.num_computed_tokens, child.shared_recompute_pos) == (7, 7)  # 2 shared blocks, the last recomputed
    s = [s for s in sched.schedule(0.0).scheduled if s.seq is child][0]
    assert (s.start_pos, s.num_new_tokens) == (7, 3)
