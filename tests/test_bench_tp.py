"""benchmarks/bench_tp.py on CPU (gloo): its TP=2-vs-TP=1 check passes on the tiny model, and its TP-invariant
dummy init equals loading the same tensors from a safetensors checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_tp_check_tp2_matches_tp1(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/bench_tp.py"),
            "check",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--tp-sizes",
            "1,2",
            "--batches",
            "1",
            "--max-tokens",
            "6",
            "--crosscheck-dummy",
            "--out",
            str(out),
        ],
        check=True,
        env=env,
        cwd=REPO,
        timeout=120,
        capture_output=True,
    )
    r = json.loads(out.read_text())
    tp2 = r["by_tp"]["2"]
    assert tp2["logits_ok"] and tp2["logits_rel"] < 1e-5
    assert tp2["greedy_equal"] and len(tp2["llm"]["tokens"][0]) == 6
    assert tp2["comm"]["1"]["calls"] == 12  # 2 layers x (2 o_proj + 2 dense MLP + MoE) + embedding + lm_head
    assert r["dummy_vs_checkpoint_max_abs"] == 0.0


def test_bench_tp_check_expert_parallel_2_matches_tp1(tmp_path):
    """tp_session.sh's check_tiny_ep step on CPU: EP=2 logits and greedy tokens equal TP=1."""
    out = tmp_path / "check_ep.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks/bench_tp.py"), "check", "--model", "tiny", "--device", "cpu",
         "--tp-sizes", "1,2", "--batches", "1", "--max-tokens", "6", "--expert-parallel", "--out", str(out)],
        check=True, env=env, cwd=REPO, timeout=120, capture_output=True,
    )
    r = json.loads(out.read_text())
    assert r["expert_parallel"]
    ep2 = r["by_tp"]["2"]
    assert ep2["logits_ok"] and ep2["logits_rel"] < 1e-5
    assert ep2["greedy_equal"] and len(ep2["llm"]["tokens"][0]) == 6
