"""benchmarks/bench_http.py end to end on CPU (a few requests): both protocols stream every token from one server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_http_cpu_smoke_measures_grpc_and_http_in_one_run():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_http.py"), "--model",
           str(ROOT / "benchmarks" / "configs" / "longcat-flash-tiny"), "--load-format", "dummy", "--device", "cpu",
           "--hf-overrides", '{"num_layers": 1, "hidden_size": 64}', "--concurrency", "4", "--num-requests", "6",
           "--prompt-len", "8", "--max-tokens", "5", "--rounds", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| gRPC serve", "| HTTP SSE"))]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "6" and cells[2] == "30"  # every request streamed all 5 tokens (ignore_eos)
    ratio = [line for line in proc.stdout.splitlines() if line.startswith("HTTP / gRPC output tokens/s:")]
    assert len(ratio) == 1 and float(ratio[0].split(":")[1]) > 0
