"""bench_tp.py serve: longcat-serve under torchrun at TP=N, one streamed completion, then bench_serve.py against it;
stopped with SIGTERM to rank 0 (which drains and tells the workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT
from tp_common import DEFAULT_DTYPE, MODELS, OVERRIDES, gpu_count, prompts_for

from longcat_service.distributed.local_ranks import free_port


def cmd_serve(a) -> dict:
    dtype = a.dtype or DEFAULT_DTYPE[a.model]
    res: dict = {"tp": a.tp, "model": a.model, "dtype": dtype, "device": a.device}
    if a.device == "cuda" and gpu_count() < a.tp:
        res["skipped"] = f"needs {a.tp} GPUs, {gpu_count()} visible"
        return res
    model_dir = str(MODELS[a.model])
    port = free_port()
    serve_args = [
        "--model",
        model_dir,
        "--load-format",
        "dummy",
        "--dtype",
        dtype,
        "--device",
        a.device,
        "--tensor-parallel-size",
        str(a.tp),
        "--port",
        str(port),
        "--num-kv-blocks",
        str(a.num_kv_blocks),
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        str(a.concurrency),
        "--log-level",
        "INFO",
    ]
    if OVERRIDES[a.model]:
        serve_args += ["--hf-overrides", json.dumps(OVERRIDES[a.model])]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(a.tp),
        "-m",
        "longcat_service.server.cli",
        *serve_args,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(a.server_log, "w") if a.server_log else subprocess.DEVNULL
    t0 = time.perf_counter()
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    res["cmd"] = " ".join(cmd)
    from longcat_service.client import LongCatClient

    address = f"127.0.0.1:{port}"
    try:
        client = None
        deadline = time.monotonic() + a.start_timeout
        while time.monotonic() < deadline and srv.poll() is None:
            try:
                client = LongCatClient(address)
                if client.health(timeout=2.0) == "SERVING":
                    break
            except Exception:
                pass
            client = None
            time.sleep(1.0)
        if client is None:
            res["error"] = f"server not SERVING within {a.start_timeout}s (exit {srv.poll()})"
            return res
        res["ready_s"] = time.perf_counter() - t0
        vocab = client.model_info().config.vocab_size
        prompt = prompts_for(vocab, 1, seed=3)[0]
        t1, chunks, ttft = time.perf_counter(), [], None
        with client.generate_stream(prompt, max_tokens=32, temperature=0.0) as stream:
            for chunk in stream:
                ttft = ttft if ttft is not None else time.perf_counter() - t1
                chunks.append(chunk)
        final = getattr(stream, "result", None) or getattr(stream, "final", None)
        ids = [t for ch in chunks for t in (getattr(ch, "token_ids", None) or [])]
        res["stream"] = {
            "chunks": len(chunks),
            "token_ids": ids,
            "ttft_ms": (ttft or 0) * 1e3,
            "total_ms": (time.perf_counter() - t1) * 1e3,
            "final": repr(final)[-200:],
        }
        res["stream_ok"] = len(chunks) > 0
        print(f"stream: {json.dumps(res['stream'])}", flush=True)
        bench = [
            sys.executable,
            str(ROOT / "benchmarks/bench_serve.py"),
            "--address",
            address,
            "--concurrency",
            str(a.concurrency),
            "--num-requests",
            str(a.num_requests),
            "--prompt-len",
            str(a.prompt_len),
            "--max-tokens",
            str(a.max_tokens),
            "--skip-offline",
        ]
        p = subprocess.run(bench, capture_output=True, text=True, timeout=a.bench_timeout, env=env, cwd=ROOT)
        res["bench_serve_rc"], res["bench_serve"] = p.returncode, (p.stdout + p.stderr)[-3000:]
        print(p.stdout[-3000:], p.stderr[-2000:], flush=True)
    finally:
        if srv.poll() is None:
            # SIGTERM to rank 0 only: it drains, tells the workers, all exit 0 (torchrun's agent would exit 1 on it)
            rank0 = _rank0_pid(srv.pid)
            res["stopped_via"] = "SIGTERM to rank 0" if rank0 else "SIGTERM to the process group"
            if rank0:
                os.kill(rank0, signal.SIGTERM)
            else:
                os.killpg(srv.pid, signal.SIGTERM)
            try:
                srv.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(srv.pid, signal.SIGKILL)
                srv.wait()
        res["server_exit"] = srv.returncode
    return res


def _rank0_pid(agent_pid: int) -> int | None:
    """The torchrun child with RANK=0 running longcat_service.server.cli (as tests/test_tp_server.py finds it)."""
    try:
        kids = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    except OSError:
        return None
    for pid in kids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"RANK=0" in env and b"longcat_service.server.cli" in cmdline:
            return int(pid)
    return None


