"""The spec-step graphs under tensor parallelism (LONGCAT_TP_CUDA_GRAPHS=1, issue 17): every rank holds the production
SpecGraphRunner with the host-verified kinds only (verify, mtp, draft; the device-side greedy / sampled steps off,
no q buffer), replays the same graphs in the same order, and greedy tokens equal TP=1 with MTP off. On CPU the
runner is uncaptured: its forwards run eagerly on its static buffers with the Triton decode kernels interpreted, in
rank 0 and in the spawned worker (patched there by _worker_main)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from longcat_service.engine import spec_graph_runner as sgr
from longcat_service.sampling_params import SamplingParams
from tests.decode_splits import cap_mla_decode_splits
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint
from tests.spec_rows_twin import interpreted_triton_only

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread

LOG_ENV = "TP_SPEC_GRAPHS_TEST_LOG"  # where each rank appends the graph kinds it launches (a test-only variable)
PROMPTS = [[5, 17, 100, 31, 9], [101, 102], [60, 61, 62, 63, 64, 65, 66]]
ENGINE = dict(block_size=4, num_kv_blocks=64, max_model_len=48, max_num_seqs=4, capture_graphs_at_startup=False)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_spec_graphs")
    return {mode: write_mtp_checkpoint(root / mode, mode, seed=1) for mode in ("random", "exact")}


def requests(max_tokens: int = 6) -> dict:
    return {f"r{i}": (p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)) for i, p in
            enumerate(PROMPTS)}


# ---- the runner under TP ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _as_tp(monkeypatch, tp: int):
    from longcat_service import kernels
    from longcat_service.distributed import parallel_state

    with monkeypatch.context() as m:
        m.setattr(parallel_state, "get_tp_size", lambda: tp)
        m.setattr(kernels, "fast_path_enabled", lambda t: True)
        yield


@pytest.mark.parametrize("k", [1, 2])
def test_under_tp_the_runner_captures_only_the_host_verified_kinds(ckpts, monkeypatch, k):
    engine = make_engine(model=ckpts["exact"], speculative_config={"method": "mtp", "num_speculative_tokens": k},
                         max_num_seqs=2)
    r = engine.runner
    monkeypatch.setenv("LONGCAT_TP_CUDA_GRAPHS", "1")
    with _as_tp(monkeypatch, 2):
        graphs = sgr.create_spec_graph_runner(r, k)
    assert graphs is not None and graphs.lockstep
    assert not graphs.greedy_ok and not graphs.sampled_ok and graphs.draft_dists.numel() == 0
    captured = []
    monkeypatch.setattr(graphs, "capture", lambda kind, b: captured.append((kind, b)))
    graphs.capture_all()
    kinds = ("verify", "mtp", "draft") if k > 1 else ("verify", "mtp")
    assert sorted(captured) == sorted((kind, b) for kind in kinds for b in graphs.buckets)
    # TP=1 keeps the device-side kinds; TP without the switch, or with expert parallelism, has no spec graphs
    with _as_tp(monkeypatch, 1):
        one = sgr.create_spec_graph_runner(r, k)
    assert one.greedy_ok and one.sampled_ok and not one.lockstep
    monkeypatch.setenv("LONGCAT_TP_CUDA_GRAPHS", "0")
    with _as_tp(monkeypatch, 2):
        assert sgr.create_spec_graph_runner(r, k) is None
    monkeypatch.setenv("LONGCAT_TP_CUDA_GRAPHS", "1")
    monkeypatch.setattr(r.args, "enable_expert_parallel", True)
    with _as_tp(monkeypatch, 2):
        assert sgr.create_spec_graph_runner(r, k) is None


def test_a_lockstep_graph_failure_raises_instead_of_going_eager_on_one_rank(ckpts, monkeypatch):
    """Going eager on one rank would leave the others in a collective: the step fails instead."""
    engine = make_engine(model=ckpts["exact"], speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    r = engine.runner
    graphs = sgr.SpecGraphRunner(r.model, r.kv_caches, r.mtp_kv_cache, r.block_size, 16, 1, (1, 2), fused=False,
                                 lockstep=True)
    monkeypatch.setattr(graphs, "verify", lambda batch: (_ for _ in ()).throw(RuntimeError("replay failed")))
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prompt step (eager)
    r.spec_decoder.graphs = graphs
    final, _ = run_to_completion(engine, {})
    # the step raised (at TP=1 the engine fails its requests; under TP the driver ends the job) and the graphs stay
    assert final["a"].outputs[0].finish_reason == "error" and r.spec_decoder.graphs is graphs


# ---- TP=2 engines on the production runner, uncaptured -------------------------------------------------------
def _patch_rank() -> None:
    """This process: the Triton decode kernels on CPU tensors (interpreted), the production create_spec_graph_runner
    seeing a fast path, and every SpecGraphRunner launch logged to $TP_SPEC_GRAPHS_TEST_LOG.<pid>."""
    from unittest import mock

    from longcat_service import kernels
    from longcat_service.layers import fast_decode, layernorm

    fast_decode.fast_path_enabled = layernorm.fast_path_enabled = lambda t: True
    create = sgr.create_spec_graph_runner

    def create_with_fast_path(model_runner, k):
        with mock.patch.object(kernels, "fast_path_enabled", lambda t: True):
            return create(model_runner, k)

    sgr.create_spec_graph_runner = create_with_fast_path
    launch = sgr.SpecGraphRunner._launch

    def logged(self, kind, b):
        with open(f"{os.environ[LOG_ENV]}.{os.getpid()}", "a") as f:
            f.write(f"{kind} {b}\n")
        return launch(self, kind, b)

    sgr.SpecGraphRunner._launch = logged


def _worker_main(*args) -> None:
    from longcat_service.engine import tp_worker

    _patch_rank()
    cap_mla_decode_splits()  # as the test's few_mla_decode_splits fixture does on rank 0
    tp_worker._spawned_worker_main(*args)


def _tp2_with_spec_graphs(path, k: int, log: Path, max_tokens: int) -> tuple[dict, list[list[str]], object]:
    """A TP=2 engine (rank 0 here, rank 1 spawned through _worker_main) -> its outputs, each rank's launch log (rank
    0's first), rank 0's SpecGraphRunner. Every patch is undone."""
    from longcat_service.engine import tp_worker
    from longcat_service.layers import fast_decode, layernorm

    saved = (sgr.create_spec_graph_runner, sgr.SpecGraphRunner._launch)
    saved_fast = (fast_decode.fast_path_enabled, layernorm.fast_path_enabled)
    main, tp_worker._spawned_worker_main = tp_worker._spawned_worker_main, _worker_main
    os.environ[LOG_ENV] = str(log)
    try:
        _patch_rank()
        engine = make_engine(model=path, speculative_config={"method": "mtp", "num_speculative_tokens": k},
                             tensor_parallel_size=2, **ENGINE)
        try:
            graphs = engine.runner.spec_decoder.graphs
            assert isinstance(graphs, sgr.SpecGraphRunner) and not graphs.use_graphs
            final, _ = run_to_completion(engine, requests(max_tokens))
            assert_all_blocks_free(engine)
        finally:
            engine.runner.close()
    finally:
        tp_worker._spawned_worker_main = main
        sgr.create_spec_graph_runner, sgr.SpecGraphRunner._launch = saved
        fast_decode.fast_path_enabled, layernorm.fast_path_enabled = saved_fast
        os.environ.pop(LOG_ENV)
    logs = sorted(log.parent.glob(log.name + ".*"), key=lambda p: p.name != f"{log.name}.{os.getpid()}")
    return final, [p.read_text().split("\n") for p in logs], graphs


@pytest.mark.slow
@interpreted_triton_only
@pytest.mark.usefixtures("few_mla_decode_splits")  # conftest: 4 decode splits, not 32 (the same outputs here)
# random weights: drafts rejected (padded verify and MTP rows); exact: all accepted (recursive drafts at k = 2). The
# random run is shorter (a step emits one token): each costs ~20 s on two CPU cores
@pytest.mark.parametrize(("mode", "k", "max_tokens"), [("random", 1, 3), ("exact", 2, 6)])
def test_tp2_on_the_production_spec_graph_runner_equals_tp1_mtp_off(ckpts, monkeypatch, tmp_path, mode, k,
                                                                    max_tokens):
    monkeypatch.setenv("LONGCAT_TP_CUDA_GRAPHS", "1")
    off, _ = run_to_completion(make_engine(model=ckpts[mode], **ENGINE), requests(max_tokens))
    final, logs, graphs = _tp2_with_spec_graphs(ckpts[mode], k, tmp_path / "launches", max_tokens)
    assert final.keys() == off.keys()
    for rid in off:
        assert final[rid].outputs[0].token_ids == off[rid].outputs[0].token_ids, rid
    assert not graphs.greedy_ok and not graphs.sampled_ok
    # both ranks launched the same graphs of the same buckets in the same order: the host-verified kinds only
    assert len(logs) == 2 and logs[0] == logs[1]
    kinds = {line.split()[0] for line in logs[0] if line}
    assert kinds == ({"verify", "mtp", "draft"} if k > 1 else {"verify", "mtp"})
    assert {line.split()[1] for line in logs[0] if line} >= {"4"}  # three sequences: the bucket of 4, padded


class _FailingDecodeGraphs:
    """A decode graph runner whose replay fails (as a capture-unsafe op would)."""

    block_size = 16

    def can_run(self, batch_size: int, max_seq_len: int) -> bool:
        return True

    def run(self, *args):
        raise RuntimeError("replay failed")


@pytest.mark.parametrize("tp", [1, 2])
def test_a_failed_decode_graph_replay_goes_eager_only_on_one_gpu(ckpts, monkeypatch, tp):
    """Plain decode graphs: at TP=1 a failed replay serves the step eagerly from then on; under TP the other ranks
    replay (collectives inside), so the step fails instead of leaving this rank eager alone."""
    from longcat_service.engine import model_runner as model_runner_mod

    engine = make_engine(model=ckpts["exact"])
    r = engine.runner
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prompt step (eager)
    failing = r.graph_runner = _FailingDecodeGraphs()
    monkeypatch.setattr(model_runner_mod, "get_tp_size", lambda: tp)
    final, _ = run_to_completion(engine, {})
    if tp == 1:
        assert final["a"].outputs[0].finish_reason == "length" and r.graph_runner is None
    else:
        assert final["a"].outputs[0].finish_reason == "error" and r.graph_runner is failing
    assert_all_blocks_free(engine)
