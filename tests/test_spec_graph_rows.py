"""The host side of the spec-step CUDA graphs (engine/spec_graph_runner.py) on CPU: bucket choice, the flat
verify / MTP / draft rows with their padding, and whole engines whose decode spec steps go through those rows
(an eager twin of the graphs, tests/spec_rows_twin.py): greedy tokens and logprobs equal the eager spec step and
MTP off for k = 1..3, with batches inside, between and above the buckets (eager fallback)."""

from __future__ import annotations

import pytest
import torch

from longcat_service.engine.spec_graph_runner import (
    MAX_GRAPH_ROWS,
    draft_rows,
    mtp_rows,
    spec_buckets,
    verify_rows,
)
from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint
from tests.spec_rows_twin import EagerSpecRows

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread


def test_spec_buckets_fit_the_row_cap_and_the_seat_count():
    assert spec_buckets(1, 256) == (1, 2, 4, 8, 16, 32, 64, 128)  # 128 * 2 rows = MAX_GRAPH_ROWS
    assert spec_buckets(3, 256) == (1, 2, 4, 8, 16, 32, 64)
    assert spec_buckets(2, 256) == (1, 2, 4, 8, 16, 32, 64)  # 64 * 3 = 192 rows; 128 * 3 would not fit
    assert spec_buckets(1, 5) == (1, 2, 4, 8)  # the smallest bucket holding 5 seats, nothing above
    assert spec_buckets(3, 1) == (1,)
    assert spec_buckets(3, 256, max_rows=3) == ()  # not even one sequence of 4 rows
    assert all(b * 4 <= MAX_GRAPH_ROWS for b in spec_buckets(3, 10_000))


def test_verify_rows_flatten_each_query_and_pad_to_k_plus_one():
    # block_size 4; sequence 0 at position 9 with 2 drafts, sequence 1 at position 3 with none
    rows = verify_rows([(50, [51, 52], 9, [7, 2, 5], None), (60, [], 3, [4, 8], None)], k=3, block_size=4)
    assert rows.input_ids == [50, 51, 52, 0, 60, 0, 0, 0]
    assert rows.positions == [9, 10, 11, 0, 3, 0, 0, 0]
    assert rows.slots == [5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, -1, 4 * 4 + 3, -1, -1, -1]
    assert rows.seq_lens == [10, 11, 12, 0, 4, 0, 0, 0]  # token j attends to positions 0..start+j
    assert rows.tables == [[7, 2, 5]] * 3 + [[]] + [[4, 8]] + [[]] * 3
    # a recomputed shared token: its entry goes to the scratch slot, its drafts to their own slots
    rows = verify_rows([(50, [51], 7, [7, 2, 5], 99)], k=1, block_size=4)
    assert rows.slots == [99, 5 * 4 + 0] and rows.seq_lens == [8, 9]
    with pytest.raises(ValueError, match="drafts"):
        verify_rows([(1, [2, 3], 0, [0], None)], k=1, block_size=4)


def test_mtp_rows_read_the_emitted_tokens_and_write_the_next_slot():
    # sequence 0 emitted 2 tokens at start 7 (MTP positions 7, 8 -> slots of 8, 9), sequence 1 failed (none)
    rows = mtp_rows([([70, 71], 7, [3, 6, 1]), ([], 2, [9])], k=2, block_size=4)
    assert rows.input_ids == [70, 71, 0, 0, 0, 0]
    assert rows.positions == [7, 8, 0, 0, 0, 0]
    assert rows.slots == [1 * 4 + 0, 1 * 4 + 1, -1, -1, -1, -1]
    assert rows.seq_lens == [9, 10, 0, 0, 0, 0]  # positions 1..t+1 with first_pos 1
    with pytest.raises(ValueError, match="emitted"):
        mtp_rows([([1, 2, 3], 0, [0])], k=1, block_size=4)


def test_draft_rows_one_position_each():
    rows = draft_rows([3, 10], [[2, 0], [1, 4, 6]], block_size=4)
    assert rows.positions == [3, 10] and rows.slots == [0 * 4 + 0, 6 * 4 + 3] and rows.seq_lens == [5, 12]


# ---- whole engines through the twin ---------------------------------------------------------------------
PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 26)), [60, 61, 62, 63],
           [90, 3, 3, 8], [44], [120, 121, 122]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_rows")
    return {mode: write_mtp_checkpoint(root / mode, mode, seed=1) for mode in ("exact", "partial")}


def _run(path, k, requests, twin_buckets=None):
    engine = make_engine(model=path, speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None)
    twin = None
    if twin_buckets is not None:
        twin = engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, k, twin_buckets)
    final, _ = run_to_completion(engine, requests)
    assert_all_blocks_free(engine)
    return final, twin


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        x, y = a[rid].outputs[0], b[rid].outputs[0]
        assert x.token_ids == y.token_ids, rid
        for p, q in zip(x.logprobs, y.logprobs, strict=True):
            assert p.token_id == q.token_id and abs(p.logprob - q.logprob) < 1e-4, rid


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["exact", "partial"])
def test_graph_rows_spec_steps_equal_eager_spec_steps_and_mtp_off(ckpts, mode, k):
    # 7 prompts, finishing at different lengths: batches of 7 (above the largest bucket 4: eager), then fewer
    # (3: between buckets 2 and 4, padded) down to 1
    requests = {f"r{i}": (p, SamplingParams(temperature=0.0, max_tokens=6 + 5 * i, ignore_eos=True, logprobs=2))
                for i, p in enumerate(PROMPTS)}
    off, _ = _run(ckpts[mode], None, requests)
    eager, _ = _run(ckpts[mode], k, requests)
    rows, twin = _run(ckpts[mode], k, requests, twin_buckets=(1, 2, 4))
    _assert_same(off, rows)
    _assert_same(eager, rows)
    assert twin.calls["verify"] > 0 and twin.calls["mtp"] == twin.calls["verify"]
    assert twin.calls["draft"] > 0 if k > 1 else twin.calls["draft"] == 0
    assert {1, 3, 4} <= set(twin.batch_sizes) and max(twin.batch_sizes) <= 4
    if mode == "exact":
        assert all(o.metrics.spec_acceptance_rate == 1.0 for o in rows.values())


def test_graph_rows_with_sampling_options_and_seeds_equal_eager(ckpts):
    """Penalties, logit_bias, a seeded sampled request: the graph rows only change where the forwards run."""
    requests = {
        "pen": (PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.4,
                                           presence_penalty=0.5, logprobs=1)),
        "bias": (PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias={7: 3.0},
                                            logprobs=1)),
        "seed": (PROMPTS[2], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, ignore_eos=True, seed=5,
                                            logprobs=1)),
    }
    eager, _ = _run(ckpts["partial"], 2, requests)
    rows, twin = _run(ckpts["partial"], 2, requests, twin_buckets=(1, 2, 4))
    _assert_same(eager, rows)
    assert twin.calls["verify"] > 0


def test_graph_rows_with_a_prefix_cache_hit_and_forks_equal_mtp_off(ckpts):
    """Prefix-cache hits and n > 1 forks with the graph rows: the recomputed shared tokens (chunks of >= 2 tokens
    here, so eager steps; a 1-token recompute would be redirected to the scratch slot in the rows, see
    test_verify_rows_...) leave the shared blocks' entries as they were, later decode steps go through the rows,
    outputs equal MTP off, every block is freed."""
    shared = list(range(20, 38))
    waves = [{"a": (shared + [3], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1))},
             {"b": (shared + [4, 5], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)),
              "c": (shared[:9], SamplingParams(n=3, temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1))}]
    outs = []
    for k in (None, 2):
        engine = make_engine(model=ckpts["partial"], speculative_config={"method": "mtp", "num_speculative_tokens": 2}
                             if k else None)
        twin = None
        if k:
            twin = engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, k, (1, 2, 4))
        final, _ = run_to_completion(engine, waves[0])
        cached = sorted(engine.block_manager.cached.values())
        before = [c[cached].clone() for c in engine.runner.kv_caches]
        out, _ = run_to_completion(engine, waves[1])
        final.update(out)
        assert all(torch.equal(b, c[cached]) for b, c in zip(before, engine.runner.kv_caches, strict=True))
        assert final["b"].num_cached_tokens > 0
        assert_all_blocks_free(engine)
        outs.append(final)
        if twin is not None:
            assert twin.calls["verify"] > 0 and twin.calls["redirected"] == 0
    for rid in outs[0]:
        for x, y in zip(outs[0][rid].outputs, outs[1][rid].outputs, strict=True):
            assert x.token_ids == y.token_ids, rid
