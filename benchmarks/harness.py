"""What the benchmark scripts share: timing, the hardware ceilings, engine-step timing, profiles, result tables and
child processes. Imported by bench_decode.py and bench_tp.py (and their helper modules) from the benchmarks/ dir."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


# ---- small helpers ------------------------------------------------------------------------------------
def ints(s) -> list[int]:
    """'1,16,64' -> [1, 16, 64] ('' -> [])."""
    return [int(x) for x in str(s).split(",") if x.strip()]


def fmt(x, spec: str = "{:.2f}") -> str:
    """A table cell: '-' for a missing value."""
    return "-" if x is None else spec.format(x)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """Lines of a markdown table (cells already formatted)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def commit() -> str:
    """The commit the results belong to: LONGCAT_COMMIT (a device copy's .git may be stale), else git's HEAD."""
    from longcat_service import envs

    return envs.LONGCAT_COMMIT or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def non_default_settings(eargs) -> dict:
    """The engine settings of a tuned run that differ from what a user of LLM / longcat-serve gets by default
    (model, dtype, device and load format are the workload, not settings)."""
    import dataclasses

    from longcat_service.engine.engine_args import EngineArgs

    workload = {"model", "dtype", "device", "load_format"}
    defaults = EngineArgs(device=eargs.device)  # some defaults depend on the device (max_num_batched_tokens)
    return {f.name: getattr(eargs, f.name) for f in dataclasses.fields(eargs)
            if f.name not in workload and getattr(eargs, f.name) != getattr(defaults, f.name)}


def run_child(argv: list[str], marker: str, timeout_s: float | None = None, echo: bool = False) -> dict:
    """python <argv> in a fresh process (so the caller holds no device memory): the JSON of its last stdout line
    that starts with `marker`. RuntimeError with the output's tail when there is none. echo: print the tail of the
    child's stdout first."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout_s)
    if echo:
        sys.stdout.write(proc.stdout[-4000:])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise RuntimeError(f"child {argv[:3]} rc {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# ---- timing and ceilings ------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn(): CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(device: torch.device, small: bool = False) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, counting read + write; bf16 matmul FLOP/s), medians of timed repeats.
    small: a 64 MB copy and a 512^3 matmul (CPU smoke runs) instead of 2 GB and 8192^3."""
    big = device.type == "cuda" and not small
    n_bytes = (2 << 30) if big else (64 << 20)
    src = torch.randn(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t_copy = median_time(lambda: dst.copy_(src), device, reps=10)
    m = 8192 if big else 512
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t_mm = median_time(lambda: a @ b, device, reps=10)
    return 2 * n_bytes / t_copy, 2 * m**3 / t_mm


# ---- the engine loop ----------------------------------------------------------------------------------
def engine_decode_ms(engine, prompts: list[list[int]], new_tokens: int, phases: dict | None = None) -> float:
    """Median wall time of LLMEngine.step() while every request decodes (after all prompts are in, before any
    finishes): what a user of the engine sees per token, host work and read-back included. phases, if given,
    receives the median per-phase host times (ms) of those steps (engine/step_trace.py; collect = waiting for
    the device: near 0 means the engine is host-bound)."""
    from longcat_service.engine.step_trace import StepTrace
    from longcat_service.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench{i}", p, params)
    counts = dict.fromkeys(range(len(prompts)), 0)
    times, steady_flags = [], []
    saved_trace = engine.trace
    trace_file = Path(tempfile.mkdtemp(prefix="steps_")) / "steps.jsonl"
    engine.trace = StepTrace(str(trace_file))  # perf_counter marks only: a few us per step
    try:
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            steady = all(c >= 2 for c in counts.values()) and not any(o.finished for o in outs)
            for o in outs:
                counts[int(o.request_id[5:])] = len(o.outputs[0].token_ids)
            if steady:
                times.append(dt)
            steady_flags.append(steady)
    finally:
        engine.trace.close()
        engine.trace = saved_trace
    if phases is not None:
        rows = [json.loads(line) for line in trace_file.read_text().splitlines() if line.strip()]
        steady_rows = [r for r, keep in zip(rows, steady_flags, strict=False) if keep]
        steady_rows = steady_rows[3:] if len(steady_rows) > 6 else steady_rows
        phases.clear()
        for key in sorted({k for r in steady_rows for k in r if k.endswith("_ms")}):
            phases[key] = statistics.median(r.get(key, 0.0) for r in steady_rows)
    timed = times[3:] if len(times) > 6 else times
    return statistics.median(timed) * 1e3 if timed else float("nan")


# ---- profiles -----------------------------------------------------------------------------------------
def profile_step(fn, path: Path, title: str, rows: int = 25) -> str:
    """torch.profiler table of fn() appended to `path` (and returned); its Chrome trace goes to path's traces/."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    # The Chrome trace keeps each kernel's stream and start time: benchmarks/trace_timeline.py reads it for
    # the critical path, the gaps and the side-stream overlap that the summed table cannot show.
    trace_dir = path.parent / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)
    trace = trace_dir / (re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") + ".json")
    prof.export_chrome_trace(str(trace))
    with open(path, "a") as fh:
        fh.write(f"\n=== {title} ===\n{table}\n")
    return table


def gpu_timeline(fn, device, save_trace: Path | None = None) -> dict:
    """Where the wall time of fn goes on the device: a CUDA-only profile (no CPU-op recording, so the host runs
    at nearly its normal speed) -> wall ms, ms from the call to the first kernel, the kernel window, the time
    with a kernel running (busy) and without (idle gaps inside the window), and host_launch: how the host's CUDA
    API calls line up with it (trace_timeline.host_launch_view; its last API call is the final synchronize, so
    last_gpu_to_last_api_end_ms is the host time after the last GPU activity). save_trace: also keep the Chrome
    trace there."""
    from torch.profiler import ProfilerActivity, profile
    from trace_timeline import GPU_CATS, events_of, host_launch_view, load_events, union_length

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        # a cheap CUDA API call (cudaStreamQuery) at the start: the trace's first API event marks when fn began, so
        # host_launch_view's first_api_to_first_gpu_ms is all host time before the first GPU activity
        torch.cuda.current_stream(device).query()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    path = save_trace if save_trace is not None else Path(tempfile.mkdtemp(prefix="gpu_tl_")) / "trace.json"
    prof.export_chrome_trace(str(path))
    events = load_events(path)
    kernels = events_of(events, GPU_CATS)
    if not kernels:
        return {"wall_ms": wall * 1e3}
    start, end = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
    busy = union_length([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
    return {"wall_ms": wall * 1e3, "kernel_window_ms": (end - start) / 1e3, "busy_ms": busy / 1e3,
            "idle_in_window_ms": (end - start - busy) / 1e3, "outside_window_ms": wall * 1e3 - (end - start) / 1e3,
            "kernels": len(kernels), "host_launch": host_launch_view(events)}
