"""MLA decode attention (kernels/mla_decode.py) on one GPU at LongCat-Flash shapes: the old 16-head kernels against
the new MQA-form ones (LONGCAT_MLA_DECODE_KERNEL=old|new), with the latent-cache byte floor, in one run.

    python benchmarks/bench_mla_decode.py [--batches 1,16,64] [--contexts 512,4096] [--heads 64] [--block-size 16]
                                          [--sweep] [--out f.json]

Per (batch, context), every row at that context, pages scattered over the cache:
- prod: what layers/fast_decode.py runs: W_UV fused into the merge up to FUSED_UV_MAX_BATCH rows, else o_latent
  then cuBLAS's batched W_UV GEMM.
- latent: mla_decode alone (o_latent out).
- floor: the latent cache bytes (B x context x 576 x 2) at the measured copy rate (2 GB device copy, read + write).
- err: relative error of each kernel's output against mla_decode_reference (must stay < 1e-2, as the GPU tests).
--sweep adds the new kernel's latent time at forced split counts and tilings (SWEEP_TILES).
Times: one CUDA graph of REPEAT calls replayed (no launch overhead, as in the served decode step), median per call.
"""

from __future__ import annotations

import argparse
import json
import os

import harness
import torch

from longcat_service.kernels import mla_decode as md
from longcat_service.layers.fast_decode import FUSED_UV_MAX_BATCH

RANK, ROPE, DV, SCALE = 512, 64, 128, 0.0722
REPEAT = 20


def _case(batch: int, ctx: int, heads: int, block_size: int, gen: torch.Generator):
    per_row = -(-ctx // block_size)
    cache = torch.randn(batch * per_row + 1, block_size, RANK + ROPE, device="cuda", generator=gen).bfloat16()
    tables = torch.randperm(cache.shape[0], device="cuda", generator=gen)[: batch * per_row].view(batch, per_row)
    q_lat = torch.randn(batch, heads, RANK, device="cuda", generator=gen).bfloat16()
    q_rope = torch.randn(batch, heads, ROPE, device="cuda", generator=gen).bfloat16()
    w_uv = (torch.randn(heads, DV, RANK, device="cuda", generator=gen) * 0.05).bfloat16()
    seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return (q_lat, q_rope, cache, tables.int(), seq, SCALE), w_uv


def _prod(args, w_uv):
    batch = args[0].shape[0]
    if batch <= FUSED_UV_MAX_BATCH:
        return md.mla_decode(*args, w_uv=w_uv)
    o_latent = md.mla_decode(*args)
    return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


def _graph_us(fn, reps: int) -> float:
    """Median microseconds per call of fn, REPEAT calls captured in one CUDA graph."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEAT):
            fn()
    return harness.median_time(graph.replay, torch.device("cuda"), reps) * 1e6 / REPEAT


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _with_kernel(kernel: str, fn):
    """fn() on the old or the new kernels (mla_decode reads the switch at each call, capture included); the
    switch is left at the default, new, afterwards."""
    os.environ["LONGCAT_MLA_DECODE_KERNEL"] = kernel
    try:
        return fn()
    finally:
        os.environ["LONGCAT_MLA_DECODE_KERNEL"] = "new"


# (BLOCK_N, stage-1 pipeline stages, largest head block) of the sweep; the first is the default
SWEEP_TILES = ((32, 2, 64), (32, 3, 64), (64, 2, 64), (32, 2, 32))


def _sweep(args, reps: int) -> dict:
    """The new kernel's latent time at forced split counts and tilings (module constants patched for the sweep
    only; a tiling that does not compile on this GPU is recorded as None)."""
    out = {}
    saved = md.BLOCK_N, md.STAGE1_STAGES, md.MAX_BLOCK_H
    try:
        for block_n, stages, block_h in SWEEP_TILES:
            md.BLOCK_N, md.STAGE1_STAGES, md.MAX_BLOCK_H = block_n, stages, block_h
            for splits in (1, 2, 4, 8, 16, 32):
                name = f"n{block_n}_st{stages}_h{block_h}_splits{splits}"
                try:
                    out[name] = _graph_us(lambda s=splits: md.mla_decode(*args, num_splits=s), reps)
                except Exception as exc:  # e.g. out of shared memory
                    print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
                    out[name] = None
    finally:
        md.BLOCK_N, md.STAGE1_STAGES, md.MAX_BLOCK_H = saved
    return out


def _measure(batch, ctx, heads, block_size, gen, copy_bw, reps, sweep) -> dict:
    args, w_uv = _case(batch, ctx, heads, block_size, gen)
    ref = md.mla_decode_reference(*args)
    row = dict(batch=batch, context=ctx, heads=heads, block_size=block_size,
               splits_new=md.choose_num_splits(batch, heads),
               floor_us=batch * ctx * (RANK + ROPE) * 2 / copy_bw * 1e6)
    for kernel in ("old", "new"):
        row[f"err_{kernel}"] = _with_kernel(kernel, lambda: _rel(md.mla_decode(*args), ref))
        row[f"latent_{kernel}_us"] = _with_kernel(kernel, lambda: _graph_us(lambda: md.mla_decode(*args), reps))
        row[f"prod_{kernel}_us"] = _with_kernel(kernel, lambda: _graph_us(lambda: _prod(args, w_uv), reps))
    if sweep:
        row["sweep_new_latent_us"] = _sweep(args, reps)
    return row


def _best(sweep: dict | None) -> str:
    if not sweep:
        return "-"
    done = {k: v for k, v in sweep.items() if v is not None}
    if not done:
        return "-"
    name = min(done, key=done.get)
    return f"{name} {sweep[name]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    dev = torch.device("cuda")
    copy_bw, _ = harness.measure_ceilings(dev)
    print(f"copy rate {copy_bw / 1e12:.2f} TB/s; heads {a.heads}, block size {a.block_size}, commit {harness.commit()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for ctx in harness.ints(a.contexts):
        for batch in harness.ints(a.batches):
            results.append(_measure(batch, ctx, a.heads, a.block_size, gen, copy_bw, a.reps, a.sweep))
            print(json.dumps(results[-1]))
            torch.cuda.empty_cache()
    header = ["batch", "context", "splits new", "floor us", "latent old", "latent new", "prod old", "prod new",
              "err old", "err new", "best of sweep (latent)"]
    rows = [[r["batch"], r["context"], r["splits_new"], harness.fmt(r["floor_us"]), harness.fmt(r["latent_old_us"]),
             harness.fmt(r["latent_new_us"]), harness.fmt(r["prod_old_us"]), harness.fmt(r["prod_new_us"]),
             f"{r['err_old']:.1e}", f"{r['err_new']:.1e}", _best(r.get("sweep_new_latent_us"))] for r in results]
    print("\n".join(harness.markdown_table(header, rows)))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(commit=harness.commit(), copy_bytes_per_s=copy_bw, results=results), f, indent=1)


if __name__ == "__main__":
    main()
