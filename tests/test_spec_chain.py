"""Async scheduling of speculative steps (engine/spec_chain.py, spec_chain_rows.py; issue 17): a device-side greedy
spec step launched before the in-flight one is read back, its inputs built on the device, its blocks reserved for
every draft accepted and trimmed once the in-flight step is applied.

The device-side row building against hand-made results and the host's verify_rows; the block reservation and its
rollback; the eligibility rules; and whole engines (through the eager twin of the spec graphs,
tests/spec_rows_twin.py, which runs the production row building and greedy step on CPU): tokens equal MTP off and the
unchained spec engine for k = 1..3 at acceptance ~0 and 1, with stops and length limits inside accepted runs, aborts,
preemption and mixed batches; every chained step's device-built rows equal the host's rows of its committed batch;
every KV block comes back free. Each engine test fails if no step is chained."""

from __future__ import annotations

import pytest
import torch

from longcat_service.engine.block_manager import BlockManager
from longcat_service.engine.sampler import Sampler
from longcat_service.engine.scheduler import Scheduler
from longcat_service.engine.sequence import SequenceGroup
from longcat_service.engine.spec_chain import SpecChain
from longcat_service.engine.spec_chain_rows import chained_verify_inputs
from longcat_service.engine.spec_graph_runner import verify_rows
from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint
from tests.spec_rows_twin import EagerSpecRows, install_uncaptured_spec_graphs, interpreted_triton_only

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread

EOS = 2


# ---- the chained step's rows, built on the device ------------------------------------------------------------------
def test_chained_rows_follow_the_in_flight_result():
    """k = 2, block size 4, 3 sequences in a bucket of 4: all accepted, one accepted of none, a failed sequence."""
    k, bs = 2, 4
    #               emitted (k+1)  count  drafts (k)  num_drafts
    prev = torch.tensor([[11, 12, 13, 3, 40, 41, 2],
                         [22, 0, 0, 1, 50, 0, 1],
                         [0, 0, 0, 0, 0, 0, 0]])  # count 0: failed (non-finite logits)
    starts, rooms = torch.tensor([5, 2, 9]), torch.tensor([10, 3, 4])
    tables = torch.zeros(12, 4, dtype=torch.int32)
    tables[0:3] = torch.tensor([3, 6, 1, 7], dtype=torch.int32)
    tables[3:6] = torch.tensor([4, 9, 0, 0], dtype=torch.int32)
    tables[6:9] = torch.tensor([5, 8, 2, 0], dtype=torch.int32)
    packed, info = chained_verify_inputs(k, bs, prev, starts, rooms, tables, 4)
    ids, pos, slots, lens = packed.tolist()
    # seq 0: last token 13 at 5 + 3 = 8 (block 1), drafts 40, 41 at 9, 10
    assert ids[0:3] == [13, 40, 41] and pos[0:3] == [8, 9, 10]
    assert slots[0:3] == [1 * 4 + 0, 1 * 4 + 1, 1 * 4 + 2] and lens[0:3] == [9, 10, 11]
    # seq 1: last token 22 at 3 (block 4, offset 3), draft 50 at 4 (block 9), then a padding row
    assert ids[3:6] == [22, 50, 0] and pos[3:6] == [3, 4, 0]
    assert slots[3:6] == [4 * 4 + 3, 9 * 4 + 0, -1] and lens[3:6] == [4, 5, 0]
    # the failed sequence and the bucket's padding sequence: nothing
    assert ids[6:] == [0] * 6 and slots[6:] == [-1] * 6 and lens[6:] == [0] * 6
    assert info.tolist() == [[2, 1, -1, -1], [7, 2, 0, 0]]  # drafts (-1: padding), draft room less the emitted


def test_chained_rows_equal_the_host_rows_of_the_applied_result():
    """Random in-flight results: the device-built rows are verify_rows of what the host knows after applying them."""
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 3):
        bs, m, b = 4, 5, 8
        count = torch.randint(0, k + 2, (m,), generator=gen)
        nd = torch.where(count > 0, torch.randint(0, k + 1, (m,), generator=gen), 0)
        toks = torch.randint(3, 100, (m, 2 * k + 1), generator=gen)
        prev = torch.cat((toks[:, : k + 1], count[:, None], toks[:, k + 1 :], nd[:, None]), dim=1)
        starts = torch.randint(0, 20, (m,), generator=gen)
        host_tables = [torch.randperm(30, generator=gen)[:12].tolist() for _ in range(m)]
        tables = torch.zeros(b * (k + 1), 12, dtype=torch.int32)
        for i, t in enumerate(host_tables):
            tables[i * (k + 1) : (i + 1) * (k + 1)] = torch.tensor(t, dtype=torch.int32)
        packed, info = chained_verify_inputs(k, bs, prev, starts, torch.full((m,), 50), tables, b)
        for i in range(m):
            c, d = int(count[i]), int(nd[i])
            rows = packed[:, i * (k + 1) : (i + 1) * (k + 1)].tolist()
            if c == 0:
                assert rows[2] == [-1] * (k + 1) and info[0, i] == -1
                continue
            host = verify_rows([(int(prev[i, c - 1]), prev[i, k + 2 : k + 2 + d].tolist(), int(starts[i]) + c,
                                 host_tables[i], None)], k, bs)
            assert rows == [host.input_ids, host.positions, host.slots, host.seq_lens], (k, i)
            assert info[:, i].tolist() == [d, 50 - c]


# ---- block reservation and its rollback -----------------------------------------------------------------------------
def _decoding(scheduler: Scheduler, prompts: dict[str, tuple[list[int], SamplingParams]], deadline=None):
    """Requests admitted, prompts computed and a first token appended: the next schedule is a decode batch."""
    for rid, (prompt, params) in prompts.items():
        scheduler.add(SequenceGroup(rid, prompt, params, 0.0, deadline))
    for s in scheduler.schedule(0.0).scheduled:
        scheduler.on_computed(s)
        s.seq.append_token(7)
        s.seq.draft_token_ids = [8] * scheduler.num_speculative_tokens
    return scheduler.schedule(0.0).scheduled


def test_trim_gives_back_reserved_blocks_as_if_never_taken():
    bm = BlockManager(10, 4)
    scheduler = Scheduler(bm, 4, 64, 2, 100)
    (s,) = _decoding(scheduler, {"a": ([3] * 5, SamplingParams(temperature=0.0, max_tokens=50))})
    table, queue = list(s.seq.block_table), list(bm.free_queue)
    before = scheduler.reserve_for_chain([(s.seq, 30)])
    assert before == [len(table)] and len(s.seq.block_table) == 8  # 30 tokens + 2 look-ahead = 8 blocks
    assert bm.num_free_blocks == 10 - 8
    scheduler.release_reserved(s.seq, 9, before[0])  # 9 tokens + 2 look-ahead: 3 blocks, fewer than held before
    assert s.seq.block_table == table and list(bm.free_queue) == queue
    assert scheduler.reserve_for_chain([(s.seq, 38)]) is not None and bm.num_free_blocks == 0
    scheduler.release_reserved(s.seq, 17, len(table))  # 17 + 2 tokens: 5 blocks
    assert len(s.seq.block_table) == 5 and bm.num_free_blocks == 5
    scheduler.finish_seq(s.seq, "abort")
    assert bm.num_free_blocks == 10 and all(b.ref_count == 0 for b in bm.blocks)


def test_reservation_is_all_or_nothing():
    bm = BlockManager(12, 4)
    scheduler = Scheduler(bm, 4, 64, 1, 100)
    batch = _decoding(scheduler, {r: ([3] * 5, SamplingParams(temperature=0.0, max_tokens=50)) for r in "ab"})
    free, tables = bm.num_free_blocks, [list(s.seq.block_table) for s in batch]
    assert scheduler.reserve_for_chain([(s.seq, 4 * 8) for s in batch]) is None  # 2 x 9 blocks: too many
    assert bm.num_free_blocks == free and [s.seq.block_table for s in batch] == tables


def test_trim_refuses_a_shared_block():
    bm = BlockManager(8, 4)
    scheduler = Scheduler(bm, 4, 64, 1, 100)
    (s,) = _decoding(scheduler, {"a": ([3] * 9, SamplingParams(temperature=0.0, max_tokens=50))})
    bm.blocks[s.seq.block_table[0]].ref_count += 1  # as a fork would share it
    with pytest.raises(AssertionError):
        bm.trim(s.seq, 0)


# ---- eligibility ------------------------------------------------------------------------------------------------
def _plan(k=2, deadline=None, waiting=0, max_num_seqs=4, budget=64, num_blocks=64, **params):
    """Two decoding sequences ("b" with `params`), then SpecChain.plan at now = 1.0 -> (chain, batch, tables before
    the plan, plan)."""
    scheduler = Scheduler(BlockManager(num_blocks, 4), max_num_seqs, 64, k, 100)
    p = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = {"a": ([5, 6, 7, 8, 9], SamplingParams(**p)), "b": ([3] * 9, SamplingParams(**{**p, **params}))}
    batch = _decoding(scheduler, prompts, deadline)
    for i in range(waiting):
        scheduler.add(SequenceGroup(f"w{i}", [4, 4], SamplingParams(**p), 0.0))
    scheduler.max_num_batched_tokens = budget
    chain = SpecChain(scheduler, Sampler(128, EOS, "cpu"), k)
    tables = [list(s.seq.block_table) for s in batch]
    return chain, batch, tables, chain.plan(batch, 1.0)


def test_a_plain_greedy_batch_chains_with_blocks_for_every_draft_accepted():
    chain, batch, _, plan = _plan(k=3)
    assert plan is not None and [c.seq for c in plan.batch] == [s.seq for s in batch]
    for s, before in zip(batch, plan.reserved_from, strict=True):
        # in flight: the last token at start_pos and 3 drafts, all accepted (4 emitted); then 3 more drafts verified,
        # and the MTP block writes 3 ahead: start_pos + 2k + 2 + k tokens
        assert len(s.seq.block_table) == -(-(s.start_pos + 2 * 3 + 2 + 3) // 4) > before
    chain.cancel(plan)
    assert [len(s.seq.block_table) for s in batch] == plan.reserved_from
    # a batch the scheduler would not make again (a running sequence left out, or another order): no chain
    assert chain.plan(batch[:1], 1.0) is None and chain.plan(batch[::-1], 1.0) is None


@pytest.mark.parametrize("case", [
    dict(stop=["x"]),  # stop strings
    dict(repetition_penalty=1.2), dict(frequency_penalty=0.5), dict(presence_penalty=0.5),
    dict(logit_bias={5: 1.0}), dict(logprobs=0),
    dict(min_tokens=20, ignore_eos=False),  # EOS masked until then
    dict(temperature=0.8),  # sampled
    dict(max_tokens=3),  # 1 output + 3 in flight reaches max_tokens
    dict(waiting=1),  # a free seat for a waiting request
    dict(deadline=0.5),  # due (now = 1.0)
    dict(budget=5),  # 2 x (k + 1) verify tokens over the budget
    dict(num_blocks=8),  # too few free blocks for the worst case
])
def test_no_chain_where_the_scheduler_would_decide_otherwise(case):
    chain, batch, tables, plan = _plan(**case)
    assert plan is None
    assert [s.seq.block_table for s in batch] == tables  # nothing reserved
    free = chain.scheduler.block_manager.num_free_blocks
    assert free == chain.scheduler.block_manager.num_blocks - sum(len(s.seq.block_table) for s in batch)


def test_chains_while_every_seat_is_taken_and_with_a_later_deadline():
    assert _plan(waiting=2, max_num_seqs=2)[3] is not None
    assert _plan(deadline=5.0)[3] is not None
    assert _plan(max_tokens=5, min_tokens=1)[3] is not None  # 1 + 3 < 5; min_tokens reached


# ---- whole engines -----------------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 26)), [60, 61, 62, 63],
           [90, 3, 3, 8], [44], [120, 121, 122]]
TWIN_BUCKETS = (1, 2, 4, 8)  # every batch of the 7 prompts fits a bucket: all decode steps are device-side


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_chain")
    return {mode: write_mtp_checkpoint(root / mode, mode, seed=1) for mode in ("random", "exact", "partial")}


def plain(max_tokens: int | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


class ChainCheck:
    """Checks every chained step's bookkeeping as it is committed: the rows the device built from the in-flight
    result (recorded by the twin) are the host's verify_rows of the committed batch, and each table keeps exactly
    what the scheduler would allocate (or what it held before); counts chained steps, rows dropped (their sequence
    finished while the step ran) and preemptions."""

    def __init__(self, engine, twin: EagerSpecRows):
        self.engine, self.twin = engine, twin
        self.commits = self.rows_checked = self.dropped = self.preempted = 0
        chain, scheduler = engine.spec_chain, engine.scheduler
        commit, preempt = chain.commit, scheduler._preempt

        def checked_commit(plan):
            commit(plan)
            self._check(plan)

        def counted_preempt(seq):
            self.preempted += 1
            preempt(seq)

        chain.commit, scheduler._preempt = checked_commit, counted_preempt

    def _check(self, plan) -> None:
        k, bs, scheduler = self.twin.k, self.twin.block_size, self.engine.scheduler
        built = self.twin.chained_rows[-1]  # the step committed now is the one launched in this engine call
        self.commits += 1
        for i, (s, before) in enumerate(zip(plan.batch, plan.reserved_from, strict=True)):
            seq = s.seq
            if seq.is_finished:
                self.dropped += 1
                assert seq.block_table == []
                continue
            host = verify_rows([(seq.token_ids[s.start_pos], s.draft_token_ids, s.start_pos, seq.block_table, None)],
                               k, bs)
            got = [col[i * (k + 1) : (i + 1) * (k + 1)] for col in built]
            assert got == [host.input_ids, host.positions, host.slots, host.seq_lens], seq
            assert s.end_pos == seq.num_tokens + len(seq.draft_token_ids) and s.needs_sample
            need = -(-scheduler._tokens_to_allocate(seq, s.end_pos) // bs)
            assert len(seq.block_table) == max(need, before), seq
            self.rows_checked += 1


def run(path, k: int | None, requests: dict, chained: bool = True, aborts: dict | None = None, **engine_kw):
    """Run to completion; aborts: request id -> abort it right after this many engine calls with a chained step in
    flight. -> (final outputs, the twin, ChainCheck or None)."""
    engine = make_engine(model=path, async_scheduling=chained,
                         speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None, **engine_kw)
    twin = check = None
    if k:
        twin = engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, k, TWIN_BUCKETS)
        check = ChainCheck(engine, twin)
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    final, chained_calls = {}, 0
    pending = dict(aborts or {})
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        inflight = engine._inflight
        if inflight is not None and inflight.spec_plan is not None:
            chained_calls += 1
            for rid, after in list(pending.items()):
                if chained_calls >= after and rid in engine.states:
                    assert engine.abort_request(rid)
                    del pending[rid]
    assert not pending, pending
    assert_all_blocks_free(engine)
    if k:
        assert engine.runner.spec_decoder.draft_probs == {}
        assert engine.spec_chain.num_chained == twin.calls["chained_greedy"] == check.commits
        if not chained:
            assert check.commits == 0
    return final, twin, check


def assert_same_tokens(a: dict, b: dict, skip=()) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        if rid in skip:
            continue
        for x, y in zip(a[rid].outputs, b[rid].outputs, strict=True):
            assert x.token_ids == y.token_ids, rid
            assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason), rid


def plain_requests() -> dict:
    return {f"r{i}": (p, plain(20 + 3 * i)) for i, p in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def off_plain(ckpts):
    return {mode: run(ckpts[mode], None, plain_requests())[0] for mode in ("random", "exact")}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["random", "exact"])
def test_chained_steps_equal_mtp_off_and_the_unchained_steps(ckpts, off_plain, mode, k):
    on, twin, check = run(ckpts[mode], k, plain_requests())
    unchained, u_twin, _ = run(ckpts[mode], k, plain_requests(), chained=False)
    assert_same_tokens(off_plain[mode], on)
    assert_same_tokens(off_plain[mode], unchained)
    # chaining happened, often: after the first device-side step of a batch, most steps are chained
    device_steps = twin.calls["greedy"] + twin.calls["chained_greedy"]
    assert check.rows_checked > 0 and twin.calls["chained_greedy"] >= device_steps // 3, twin.calls
    assert u_twin.calls["chained_greedy"] == 0 and twin.calls["verify"] == 0
    assert device_steps == u_twin.calls["greedy"]  # the same spec steps, only launched earlier
    drafts = {rid: (o.metrics.num_draft_tokens, o.metrics.num_accepted_tokens) for rid, o in on.items()}
    assert drafts == {rid: (o.metrics.num_draft_tokens, o.metrics.num_accepted_tokens) for rid, o in unchained.items()}
    rate = sum(a for _, a in drafts.values()) / sum(d for d, _ in drafts.values())
    assert rate == 1.0 if mode == "exact" else rate < 0.2


def test_spec_steps_are_chained_by_default_only_with_async_scheduling(ckpts):
    """Chaining is part of async scheduling: the default engine chains device-side greedy steps; with async
    scheduling off every step is launched after the previous read-back; the tokens are the same."""
    chained, c_twin, _ = run(ckpts["exact"], 2, plain_requests())
    assert c_twin.calls["chained_greedy"] > 0
    sync, s_twin, _ = run(ckpts["exact"], 2, plain_requests(), chained=False)
    assert s_twin.calls["chained_greedy"] == 0 and s_twin.calls["greedy"] > 0
    assert_same_tokens(sync, chained)


def test_stop_ids_and_max_tokens_inside_accepted_runs(ckpts):
    """Acceptance 1, k = 3: stops and length limits land inside accepted runs, often while the next step is chained
    (its row is dropped; the sequence's reserved blocks come back with the rest)."""
    p = ckpts["exact"]
    base, _, _ = run(p, None, {f"r{i}": (prompt, plain(30)) for i, prompt in enumerate(PROMPTS[:4])})
    requests = {}
    for i, prompt in enumerate(PROMPTS[:4]):
        toks = base[f"r{i}"].outputs[0].token_ids
        requests[f"s{i}"] = (prompt, plain(30, stop_token_ids=[toks[9 + i]]))
        requests[f"m{i}"] = (prompt, plain(9 + i))
    off, _, _ = run(p, None, requests)
    on, twin, check = run(p, 3, requests)
    assert_same_tokens(off, on)
    assert twin.calls["chained_greedy"] > 0 and check.dropped > 0
    assert any(on[f"s{i}"].outputs[0].finish_reason == "stop" for i in range(4))
    assert [len(on[f"m{i}"].outputs[0].token_ids) for i in range(4)] == [9, 10, 11, 12]


def test_aborts_while_a_chained_step_is_in_flight(ckpts):
    p = ckpts["partial"]
    requests = {f"r{i}": (prompt, plain(24)) for i, prompt in enumerate(PROMPTS)}
    off, _, _ = run(p, None, requests)
    on, twin, check = run(p, 2, requests, aborts={"r1": 2, "r4": 3})  # (run checks they were aborted in flight)
    assert twin.calls["chained_greedy"] > 2
    assert_same_tokens(off, on, skip=("r1", "r4"))
    for rid in ("r1", "r4"):
        assert on[rid].outputs[0].finish_reason == "abort"
        got = on[rid].outputs[0].token_ids
        assert got == off[rid].outputs[0].token_ids[: len(got)]


def test_preemption_and_too_few_blocks_for_the_worst_case(ckpts):
    """A cache too small for every sequence's worst case: some steps are not chained (the scheduler preempts), the
    rest chain; outputs equal MTP off and every block comes back."""
    p = ckpts["partial"]
    requests = {f"r{i}": (prompt, plain(20)) for i, prompt in enumerate(PROMPTS)}
    off, _, _ = run(p, None, requests, num_kv_blocks=64)
    on, twin, check = run(p, 2, requests, num_kv_blocks=30, max_model_len=64)
    assert_same_tokens(off, on)
    assert check.preempted > 0 and twin.calls["chained_greedy"] > 0


def test_mixed_batches_chain_only_when_every_row_is_plain_greedy(ckpts):
    """A seeded sampled row, a logprobs row and a min_tokens row beside greedy ones: no chained batch holds them
    (they are verified on the host); once they are done the greedy rows chain. Greedy rows equal MTP off, every row
    equals the unchained engine."""
    p = ckpts["partial"]
    requests = {f"g{i}": (prompt, plain(30)) for i, prompt in enumerate(PROMPTS[:3])}
    requests["sampled"] = (PROMPTS[3], SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=3))
    requests["logprobs"] = (PROMPTS[4], plain(6, logprobs=1))
    requests["min"] = (PROMPTS[5], SamplingParams(temperature=0.0, max_tokens=14, min_tokens=10,
                                                  stop_token_ids=[5, 6, 7]))
    on, twin, check = run(p, 2, requests)
    unchained, _, _ = run(p, 2, requests, chained=False)
    off, _, _ = run(p, None, requests)
    assert_same_tokens(unchained, on)
    assert_same_tokens(off, on, skip=("sampled",))
    assert twin.calls["verify"] > 0 and twin.calls["chained_greedy"] > 0
    assert max(twin.chained_sizes) <= 3  # never the batches with the other rows (4 and more sequences)


def test_waiting_requests_and_a_seat_freed_by_a_stop(ckpts):
    """Two seats, five requests: steps chain while the seats are full; a stop frees a seat a step late (the next
    request starts one step later than without chaining), which changes no request's tokens."""
    p = ckpts["exact"]
    base, _, _ = run(p, None, {"a": (PROMPTS[0], plain(20))})
    requests = {"a": (PROMPTS[0], plain(20, stop_token_ids=[base["a"].outputs[0].token_ids[7]]))}
    requests.update({f"w{i}": (prompt, plain(12)) for i, prompt in enumerate(PROMPTS[1:5])})
    off, _, _ = run(p, None, requests, max_num_seqs=2)
    on, twin, check = run(p, 3, requests, max_num_seqs=2)
    assert_same_tokens(off, on)
    assert twin.calls["chained_greedy"] > 0


def test_a_chained_launch_that_fails_loses_nothing_and_stops_chaining(ckpts, monkeypatch):
    """The chained step cannot fall back to the host path (its inputs are not on the host yet): a failed launch gives
    its reservations back, the in-flight step is collected and the next one scheduled as usual, and chaining stays
    off. Outputs equal MTP off, every block comes back."""
    p = ckpts["partial"]
    requests = {f"r{i}": (prompt, plain(16)) for i, prompt in enumerate(PROMPTS[:4])}
    off, _, _ = run(p, None, requests)
    failures = []

    def failing(self, *args):
        failures.append(len(self.runner.kv_caches))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(EagerSpecRows, "_run_chained_greedy", failing)
    engine = make_engine(model=p, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, 2, TWIN_BUCKETS)
    bm = engine.block_manager
    planned, around_launch = [], []
    plan, launch = engine.spec_chain.plan, engine._launch_chained_spec

    def watched_plan(batch, now):
        out = plan(batch, now)
        planned.append(out is not None)
        return out

    def watched_launch(inflight, finalize):
        free = bm.num_free_blocks
        out = launch(inflight, finalize)
        around_launch.append((free, bm.num_free_blocks, out))
        return out

    engine.spec_chain.plan, engine._launch_chained_spec = watched_plan, watched_launch
    on, _ = run_to_completion(engine, requests)
    assert_same_tokens(off, on)
    assert len(failures) == 1 and not engine.spec_chain.enabled
    assert planned[0] and not any(planned[1:])  # planned (blocks reserved) once, then never again
    assert all(before == after and out is None for before, after, out in around_launch)  # reservations given back
    assert engine.spec_chain.num_chained == 0
    assert_all_blocks_free(engine)


@pytest.mark.slow
@interpreted_triton_only
def test_the_production_graph_runner_uncaptured_chains_and_equals_mtp_off(ckpts, monkeypatch):
    """SpecGraphRunner itself (as on CUDA, minus the capture: its forwards on its static buffers, the Triton decode
    kernels interpreted on CPU) runs chained greedy steps (_run_chained_greedy: the device-built rows written over the
    loaded tables): tokens equal MTP off, every block comes back."""

    p = ckpts["exact"]
    requests = {"a": (PROMPTS[0], plain(14)), "b": (PROMPTS[1], plain(12))}
    off, _, _ = run(p, None, requests)
    engine = make_engine(model=p, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    graphs = install_uncaptured_spec_graphs(engine, monkeypatch, 1)
    on, _ = run_to_completion(engine, requests)
    assert_all_blocks_free(engine)
    assert_same_tokens(off, on)
    assert engine.spec_chain.num_chained > 0 and not graphs.use_graphs


def test_worst_case_tables_past_the_graph_buffers_are_not_chained(ckpts):
    """Table buffers of 8 blocks (32 tokens): near there the worst-case reservation does not fit while the step the
    scheduler makes still does. That step is then scheduled after the read-back (its reservation given back),
    chaining stays on, outputs equal MTP off."""
    p = ckpts["exact"]
    requests = {"a": (PROMPTS[0], plain(30)), "b": (PROMPTS[3], plain(30))}
    off, _, _ = run(p, None, requests)
    engine = make_engine(model=p, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    twin = engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, 2, TWIN_BUCKETS, max_blocks=8)
    cancelled = []
    cancel = engine.spec_chain.cancel
    engine.spec_chain.cancel = lambda plan: (cancelled.append(max(len(s.seq.block_table) for s in plan.batch)),
                                             cancel(plan))
    on, _ = run_to_completion(engine, requests)
    assert_same_tokens(off, on)
    assert_all_blocks_free(engine)
    assert cancelled and min(cancelled) > 8 and engine.spec_chain.enabled
    assert twin.calls["chained_greedy"] > 0 and twin.calls["greedy"] > 0
