"""engine/step_trace.py: in-memory records, the runner's phase marks inside an engine step, and the benchmarks'
views of a prefill's host side (decode_driver.traced_prefill, trace_timeline.host_launch_view)."""

from __future__ import annotations

import json

import pytest

from longcat_service.engine.step_trace import StepTrace, summarize
from tests.engine_utils import greedy, make_engine

RUNNER_PHASES = {"prepare_ms", "forward_ms", "sample_ms", "wait_ms", "readback_ms"}


def test_kept_records_sum_phases_and_ignore_marks_outside_a_step():
    trace = StepTrace(keep=True)
    assert trace.enabled
    trace.mark("early")  # before start(): dropped
    trace.start()
    trace.mark("a")
    trace.mark("b")
    trace.mark("a")
    trace.end(num_seqs=1)
    trace.mark("late")  # after end(): dropped
    trace.end()
    [record] = trace.records
    assert set(record) == {"t", "wall_ms", "a_ms", "b_ms", "num_seqs"}
    assert record["a_ms"] + record["b_ms"] <= record["wall_ms"]
    assert record["num_seqs"] == 1


def test_disabled_trace_records_nothing(monkeypatch):
    monkeypatch.delenv("LONGCAT_STEP_TRACE", raising=False)
    trace = StepTrace()
    assert not trace.enabled
    trace.start()
    trace.mark("a")
    trace.end()
    assert trace.records is None


def test_engine_steps_carry_the_runner_phases(tmp_path):
    engine = make_engine()
    assert engine.runner.trace is None  # off by default: the runner marks nothing
    path = tmp_path / "steps.jsonl"
    engine.trace = StepTrace(str(path))
    assert engine.runner.trace is engine.trace
    engine.add_request("r", list(range(3, 40)), greedy(3))
    while engine.has_unfinished_requests():
        engine.step()
    engine.trace.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # overlapped steps launch one step and collect another: every phase shows up, launches are whole
    assert RUNNER_PHASES <= {k for r in rows for k in r}
    assert all({"forward_ms", "sample_ms"} <= set(r) for r in rows if "prepare_ms" in r)
    for r in rows:  # the phases partition the step
        assert sum(v for k, v in r.items() if k.endswith("_ms") and k != "wall_ms") == pytest.approx(r["wall_ms"],
                                                                                                   abs=0.05)
    assert summarize(str(path))["prefill_forward_ms"] > 0
    engine.trace = StepTrace(keep=False, path="")
    assert engine.runner.trace is None


def test_traced_prefill_reports_each_phase():
    from benchmarks.bench_decode import Driver, traced_prefill  # (puts benchmarks/ on sys.path first)

    engine = make_engine(block_size=16, num_kv_blocks=64, max_model_len=512)
    drv = Driver(engine.runner, 16)
    seq = drv.new_seq(list(range(3, 300)), 1)
    phases = traced_prefill(drv, seq, lambda: None)
    assert {"schedule_ms", *RUNNER_PHASES} <= set(phases)
    assert sum(v for k, v in phases.items() if k != "wall_ms") == pytest.approx(phases["wall_ms"], abs=0.05)
    assert engine.runner.trace is None  # restored
    assert seq.num_tokens == 298  # the prefill sampled the next token


def _ev(cat, name, ts, dur, corr):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_host_launch_view_splits_idle_time_by_who_was_late():
    from benchmarks.trace_timeline import host_launch_view

    events = [
        _ev("cuda_runtime", "cudaMemcpyAsync", 0, 5, 1), _ev("gpu_memcpy", "copy", 10, 5, 1),  # GPU 10..15
        _ev("cuda_runtime", "cudaLaunchKernel", 6, 4, 2), _ev("kernel", "a", 20, 10, 2),  # issued at 10: GPU late 5 us
        _ev("cuda_runtime", "cudaLaunchKernel", 40, 5, 3), _ev("kernel", "b", 50, 10, 3),  # issued 45 > 30: 15 of 20
        _ev("cuda_runtime", "cudaEventSynchronize", 46, 24, 4),  # returns at 70, 10 us after the last kernel
        {"ph": "X", "cat": "cpu_op", "name": "ignored", "ts": 0, "dur": 1000},
    ]
    view = host_launch_view(events)
    assert view["first_api_to_first_gpu_ms"] == pytest.approx(0.010)
    assert view["last_gpu_to_last_api_end_ms"] == pytest.approx(0.010)
    assert view["idle_ms"] == pytest.approx(0.025)
    assert view["idle_host_bound_ms"] == pytest.approx(0.015)
    assert view["largest_host_bound_gaps"] == ["15.0 us a -> b"]
    assert view["api_calls"] == 4 and view["api_ms"] == pytest.approx(0.038)
    assert view["slowest_api_calls"][0] == "24.0 us cudaEventSynchronize at +0.046 ms"
    assert host_launch_view([e for e in events if e["cat"] != "cuda_runtime"]) == {}
