"""Decode-batch dense projections on one GPU: our weight-streaming dense_gemv vs cuBLAS (F.linear).

    python benchmarks/bench_dense_gemv.py [--batches 1,2,4,8] [--dtype bfloat16] [--out results.json]

Shapes (N, K) are LongCat-Flash's: the fused q_a+kv_a projection, q_b, o_proj, and the dense gate_up and down
projections. Each timing is a CUDA graph of CALLS_PER_GRAPH back-to-back calls (so launch gaps do not count),
timed with CUDA events; per-call time = median replay time / CALLS_PER_GRAPH. The calls cycle through
enough copies of the weight (>= WEIGHT_BYTES_IN_ROTATION in all, several times the 50 MB L2) that each call
streams its weight from HBM, as in a decode step. floor = weight bytes / device-to-device copy bandwidth
(read + write) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench_moe's timing helpers, also under python -m / pytest
from bench_moe import _time, graph_of, measure_copy_tbps  # noqa: E402

import longcat_service.ops as ops  # noqa: E402
from longcat_service.ops import extension  # noqa: E402

SHAPES = {
    "q_a_kv_a": (2112, 6144),
    "q_b": (12288, 1536),
    "o_proj": (6144, 8192),
    "dense_gate_up": (24576, 6144),
    "dense_down": (6144, 12288),
}
CALLS_PER_GRAPH = 20
WEIGHT_BYTES_IN_ROTATION = 256 * 1024**2


def graph_of_calls(fn, weights, x):
    """One CUDA graph of CALLS_PER_GRAPH calls fn(x, w), cycling through the weight copies."""

    def calls():
        for i in range(CALLS_PER_GRAPH):
            fn(x, weights[i % len(weights)])

    return graph_of(calls)


def bench_shape(name, n, k, batches, dtype, copy_tbps, reps):
    weight_bytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(2, math.ceil(WEIGHT_BYTES_IN_ROTATION / weight_bytes))
    g = torch.Generator(device="cuda").manual_seed(n + k)
    weights = [torch.randn(n, k, device="cuda", generator=g, dtype=dtype) / k**0.5 for _ in range(copies)]
    floor_us = weight_bytes / (copy_tbps * 1e6)
    results = []
    for m in batches:
        x = torch.randn(m, k, device="cuda", generator=g, dtype=dtype)
        if not extension.dense_gemv_supported(x, weights[0]):
            raise SystemExit(f"dense_gemv does not take {name} M={m} ({dtype}): nothing to compare")
        ours_graph = graph_of_calls(extension.dense_gemv, weights, x)
        cublas_graph = graph_of_calls(F.linear, weights, x)
        ours = statistics.median(_time(ours_graph.replay, reps)) / CALLS_PER_GRAPH
        cublas = statistics.median(_time(cublas_graph.replay, reps)) / CALLS_PER_GRAPH
        del ours_graph, cublas_graph
        a, b = extension.dense_gemv(x, weights[0]).float(), F.linear(x, weights[0]).float()
        rel = float((a - b).norm() / b.norm().clamp(min=1e-30))
        results.append({
            "shape": name, "N": n, "K": k, "M": m, "dtype": str(dtype).split(".")[-1],
            "ours_us": ours, "cublas_us": cublas, "floor_us": floor_us,
            "ours_TBps": weight_bytes / ours / 1e6, "cublas_TBps": weight_bytes / cublas / 1e6,
            "rel_err_vs_cublas": rel,
        })
        print(json.dumps(results[-1]), flush=True)
    del weights
    torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_dense_gemv: no CUDA device; nothing to time.")
        return
    if ops.ACTIVE_BACKEND != "extension cpu+cuda":
        print(f"bench_dense_gemv: the CUDA kernels are not built (ops backend: {ops.ACTIVE_BACKEND}); nothing to time.")
        return
    dtype = getattr(torch, args.dtype)
    batches = [int(v) for v in args.batches.split(",")]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  ops backend: {ops.ACTIVE_BACKEND}")
    copy_tbps = measure_copy_tbps()
    torch.cuda.empty_cache()
    print(f"measured: d2d copy {copy_tbps:.2f} TB/s")
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        results += bench_shape(name, n, k, batches, dtype, copy_tbps, args.reps)
    print(f"{'shape':>14} {'N x K':>13} {'M':>2} {'ours':>9} {'cuBLAS':>9} {'floor':>9} {'ours TB/s':>9} "
          f"{'cuBLAS/ours':>11} {'rel err':>8}")
    for r in results:
        print(f"{r['shape']:>14} {r['N']:>6}x{r['K']:<6} {r['M']:>2} {r['ours_us']:>7.1f}us {r['cublas_us']:>7.1f}us "
              f"{r['floor_us']:>7.1f}us {r['ours_TBps']:>9.2f} {r['cublas_us'] / r['ours_us']:>11.2f} "
              f"{r['rel_err_vs_cublas']:>8.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_TBps": copy_tbps, "dtype": args.dtype, "calls_per_graph": CALLS_PER_GRAPH,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
