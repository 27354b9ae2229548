"""Critical-path view of a torch.profiler Chrome trace (bench_decode writes them: harness.profile_step).

The profiler's table sums kernel times, which over-counts kernels that overlap on two streams (the shortcut MoE
runs beside the dense path) and hides the idle gaps between kernels. This prints, per CUDA stream, the busy time
and the idle gaps inside the traced window, the union of all streams' busy time, and the largest gaps with the
kernels around them; --timeline lists every kernel of one window in start order.

    python benchmarks/trace_timeline.py gpu_out/logs/decode_default/traces/3_cuda_graph_replays_batch_1.json \
        --windows 3 --timeline
    python benchmarks/trace_timeline.py $OUT/prefill_gpu_timeline_trace.json --host   # bench_decode's prefill
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
API_CATS = ("cuda_runtime", "cuda_driver")


def load_events(path: Path) -> list[dict]:
    events = json.loads(path.read_text())
    return events.get("traceEvents", events) if isinstance(events, dict) else events


def load_kernels(path: Path) -> list[dict]:
    return events_of(load_events(path), GPU_CATS)


def events_of(events: list[dict], cats: tuple[str, ...]) -> list[dict]:
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in cats), key=lambda e: e["ts"])


def host_launch_view(events: list[dict], top: int = 8) -> dict:
    """How the host's CUDA API calls (cuda_runtime / cuda_driver events, on the same clock as the GPU's) line up
    with the GPU work of a trace: ms from the first API call to the first GPU activity and from the end of the
    last GPU activity to the end of the last API call (the read-back's wait returning); and how much of the idle
    time between GPU activities was host-bound, i.e. the next activity's launch call (matched by correlation id)
    had not returned when the GPU ran dry, with the largest such gaps (us, previous -> next activity); the API
    calls' count and summed host time, and the slowest calls (a blocking copy, sync or allocation shows there).
    Empty when the trace has no API events or no GPU activity."""
    gpu, api = events_of(events, GPU_CATS), events_of(events, API_CATS)
    if not gpu or not api:
        return {}
    launch_end = {e["args"]["correlation"]: e["ts"] + e["dur"] for e in api if "correlation" in e.get("args", {})}
    idle = host_bound = 0.0
    late: list[tuple[float, str, str]] = []
    end, prev = gpu[0]["ts"] + gpu[0]["dur"], gpu[0]
    for k in gpu[1:]:
        gap = k["ts"] - end
        if gap > 0:
            idle += gap
            issued = launch_end.get(k.get("args", {}).get("correlation"))
            waited = min(gap, issued - end) if issued is not None and issued > end else 0.0
            host_bound += waited
            if waited > 0:
                late.append((waited, prev["name"], k["name"]))
        if k["ts"] + k["dur"] >= end:
            end, prev = k["ts"] + k["dur"], k
    late.sort(reverse=True)
    slowest = sorted(api, key=lambda e: -e["dur"])[:top]  # blocking calls (syncs, allocations) stand out here
    return {"first_api_to_first_gpu_ms": (gpu[0]["ts"] - api[0]["ts"]) / 1e3,
            "last_gpu_to_last_api_end_ms": (max(e["ts"] + e["dur"] for e in api) - end) / 1e3,
            "idle_ms": idle / 1e3, "idle_host_bound_ms": host_bound / 1e3,
            "api_calls": len(api), "api_ms": sum(e["dur"] for e in api) / 1e3,
            "largest_host_bound_gaps": [f"{g:.1f} us {a[:50]} -> {b[:50]}" for g, a, b in late[:top]],
            "slowest_api_calls": [f"{e['dur']:.1f} us {e['name']} at +{(e['ts'] - api[0]['ts']) / 1e3:.3f} ms"
                                  for e in slowest]}


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(kernels: list[dict], windows: int, top_gaps: int) -> str:
    if not kernels:
        return "no kernels in the trace"
    t0, t1 = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
    span = t1 - t0
    lines = [f"window: {span:.1f} us for {windows} step(s) = {span / windows:.1f} us per step; {len(kernels)} kernels "
             f"({len(kernels) / windows:.0f} per step)"]
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for k in kernels:
        by_stream[k["args"].get("stream", k.get("tid"))].append(k)
    for stream, ks in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
        busy = union_length([(k["ts"], k["ts"] + k["dur"]) for k in ks])
        lines.append(f"stream {stream}: {len(ks) / windows:.0f} kernels/step, busy {busy / windows:.1f} us/step, "
                     f"sum of durations {sum(k['dur'] for k in ks) / windows:.1f} us/step")
    busy_all = union_length([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
    lines.append(f"any stream busy: {busy_all / windows:.1f} us/step; idle (no kernel on any stream): "
                 f"{(span - busy_all) / windows:.1f} us/step")
    gaps = []
    end, prev = kernels[0]["ts"] + kernels[0]["dur"], kernels[0]
    for k in kernels[1:]:
        if k["ts"] > end:
            gaps.append((k["ts"] - end, prev["name"], k["name"]))
        if k["ts"] + k["dur"] >= end:
            end, prev = k["ts"] + k["dur"], k
    gaps.sort(reverse=True)
    lines.append(f"idle gaps: {len(gaps) / windows:.0f} per step; largest:")
    lines += [f"  {g:7.1f} us  after {a[:60]}  before {b[:60]}" for g, a, b in gaps[:top_gaps]]
    return "\n".join(lines)


def timeline(kernels: list[dict], windows: int) -> str:
    per = max(1, len(kernels) // windows)
    ks = kernels[:per]
    t0 = ks[0]["ts"]
    rows = [f"{'start':>8} {'dur':>7} stream  name"]
    rows += [f"{k['ts'] - t0:8.1f} {k['dur']:7.1f} {str(k['args'].get('stream', '?')):>6}  {k['name'][:90]}" for k in ks]
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--windows", type=int, default=1, help="steps (graph replays) in the trace")
    p.add_argument("--top-gaps", type=int, default=12)
    p.add_argument("--timeline", action="store_true", help="every kernel of the first step, in start order")
    p.add_argument("--host", action="store_true",
                   help="also how the host's CUDA API calls line up with the GPU (host_launch_view; needs a trace with "
                        "cuda_runtime events, e.g. bench_decode's prefill_gpu_timeline_trace.json)")
    args = p.parse_args(argv)
    for path in args.traces:
        events = load_events(path)
        kernels = events_of(events, GPU_CATS)
        print(f"== {path.name} ==\n{summarize(kernels, args.windows, args.top_gaps)}")
        if args.host:
            view = host_launch_view(events, args.top_gaps)
            gaps, slow = view.pop("largest_host_bound_gaps", []), view.pop("slowest_api_calls", [])
            print("host: " + json.dumps({k: round(v, 3) for k, v in view.items()}))
            print("\n".join([f"  late launch: {g}" for g in gaps] + [f"  slow API call: {c}" for c in slow]))
        if args.timeline:
            print(timeline(kernels, args.windows))


if __name__ == "__main__":
    main()
