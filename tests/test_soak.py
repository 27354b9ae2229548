"""The soak harness (benchmarks/soak.py) at CI size: ~300 mixed streams against a longcat-serve on the demo model,
then a shorter run with SIGTERM half-way. The harness asserts; the test fails on any failure it reports."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from soak import run_soak  # noqa: E402


def test_soak_mixed_streams_leave_the_server_clean():
    report = run_soak(streams=300, concurrency=16, seed=0, time_limit_s=60)
    print(report.table())
    assert report.streams == 300
    assert not report.failures, report.table()
    assert sum(report.by_kind["cancel"].values()) > 0 and sum(report.by_kind["garbage"].values()) > 0


def test_soak_with_sigterm_half_way_drains_cleanly():
    report = run_soak(streams=200, concurrency=16, seed=1, sigterm=True, time_limit_s=60, drain_grace_s=1.0)
    print(report.table())
    assert not report.failures, report.table()
    assert report.exit_s is not None
