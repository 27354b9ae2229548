"""Scheduler policy on a fake model: every sampled token is 7."""

from longcat_service.engine.block_manager import BlockManager
from longcat_service.engine.scheduler import Scheduler
from longcat_service.engine.sequence import SequenceGroup, SequenceStatus
from longcat_service.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(bm, max_num_seqs, budget), bm


def add(sched, rid, n_tokens, n=1, deadline=None, first=0):
    group = SequenceGroup(rid, list(range(first, first + n_tokens)), SamplingParams(n=n), 0.0, deadline)
    sched.add(group)
    return group


def run_step(sched, now=0.0, max_tokens=None):
    """Schedule, pretend the model ran, append token 7 where a token is sampled."""
    out = sched.schedule(now)
    for s in out.scheduled:
        sched.on_computed(s)
        if s.needs_sample:
            s.seq.append_token(7)
            if max_tokens is not None and s.seq.num_output_tokens >= max_tokens:
                sched.finish_seq(s.seq, "length")
    return out


def test_chunked_prefill_respects_token_budget():
    sched, _ = make(budget=8)
    add(sched, "a", 20)
    chunks = []
    for _ in range(3):
        out = run_step(sched)
        chunks.append([(s.start_pos, s.num_new_tokens, s.needs_sample) for s in out.scheduled])
    assert chunks == [[(0, 8, False)], [(8, 8, False)], [(16, 4, True)]]


def test_new_requests_join_between_decode_steps_fifo():
    sched, _ = make(budget=64)
    add(sched, "a", 5)
    run_step(sched)
    add(sched, "b", 3)
    add(sched, "c", 3)
    out = run_step(sched)
    # the decode of a goes first, then b and c are admitted in arrival order
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 3), ("c", 3)]


def test_max_num_seqs_limits_running():
    sched, _ = make(max_num_seqs=2)
    for r in "abc":
        add(sched, r, 3)
    out = run_step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_preemption_frees_newest_and_requeues_it_first():
    # 6 blocks of 2 tokens; two sequences of 5 tokens take 3 blocks each, then both need a 4th for position 6
    sched, bm = make(num_blocks=6, block_size=2, budget=64, prefix=False)
    add(sched, "a", 5)
    add(sched, "b", 5, first=100)
    run_step(sched)  # both prefilled and sampled -> 6 tokens, 3 blocks each
    assert bm.num_free_blocks == 0
    run_step(sched)  # position 5 still fits in block 3
    out = run_step(sched)  # a needs a 4th block: b (newest) is preempted
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    b = sched.groups["b"].seqs[0]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert sched.waiting[0] is b
    # keep going until both finish: nothing is lost, every block comes back
    for _ in range(50):
        if not sched.has_unfinished():
            break
        run_step(sched, max_tokens=4)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == 6
    assert b.output_token_ids == [7, 7, 7, 7]
    assert b.num_preemptions >= 1


def test_running_sequence_preempts_itself_when_alone_and_cache_is_full():
    sched, bm = make(num_blocks=2, block_size=2, budget=64, prefix=False)
    add(sched, "a", 3)
    add(sched, "b", 1, first=50)
    run_step(sched)  # a: 2 blocks, b cannot enter (cache full)
    assert [s.request_id for s in sched.waiting] == ["b"]
    out = run_step(sched)  # a has 4 tokens, needs no new block for position 3
    assert [s.seq.request_id for s in out.scheduled] == ["a"]


def test_abort_frees_blocks_in_every_state():
    sched, bm = make(num_blocks=16, block_size=4, budget=8)
    add(sched, "prefilling", 20)
    add(sched, "waiting", 4)
    run_step(sched)  # first chunk of "prefilling"; "waiting" still queued
    assert bm.num_free_blocks < 16
    assert sched.abort("waiting") is not None
    assert sched.abort("prefilling") is not None
    assert sched.abort("unknown") is None
    assert bm.num_free_blocks == 16 and not sched.has_unfinished()
    assert not sched.waiting and not sched.running


def test_deadline_finishes_waiting_and_running():
    sched, bm = make(budget=64)
    add(sched, "a", 4, deadline=10.0)
    add(sched, "b", 4, deadline=100.0, first=50)
    run_step(sched, now=0.0)
    out = sched.schedule(now=10.0)
    assert [g.request_id for g in out.expired] == ["a"]
    assert sched.groups.keys() == {"b"}
    a = out.expired[0].seqs[0]
    assert a.finish_reason == "deadline" and a.output_token_ids == [7]


def test_prefix_cache_hit_counts_cached_tokens():
    sched, _ = make(block_size=4)
    add(sched, "a", 10)
    run_step(sched, max_tokens=1)
    g = add(sched, "b", 10)
    out = run_step(sched)
    assert out.scheduled[0].start_pos == 8 and out.scheduled[0].num_new_tokens == 2
    assert g.num_cached_tokens == 8


def test_n_samples_fork_after_prompt_and_share_blocks():
    sched, bm = make(block_size=4)
    g = add(sched, "a", 10, n=3)
    out = run_step(sched)
    assert [s.seq.index for s in out.scheduled] == [0]
    # samples 1 and 2 share the 2 full prompt blocks and compute only the last 2 prompt tokens
    out = run_step(sched)
    assert [(s.seq.index, s.start_pos, s.num_new_tokens) for s in out.scheduled] == [(0, 10, 1), (1, 8, 2), (2, 8, 2)]
    shared = g.seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in g.seqs)
    assert [bm.blocks[b].ref_count for b in shared] == [3, 3]
    sched.abort("a")
    assert bm.num_free_blocks == 64
