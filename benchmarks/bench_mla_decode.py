"""MLA decode attention on one GPU at LongCat-Flash shapes: both kernel families side by side, with the latent-cache
byte floor, and the MLA chain with and without the W_UK absorb in the prep kernel, in one run.

    python benchmarks/bench_mla_decode.py [--batches 1,16,64] [--contexts 256,1024,4096] [--heads 64]
                                          [--block-size 16] [--sweep] [--out f.json]

(`--batches 1,2,4,8 --contexts 1024` times the absorb at the rows LONGCAT_MLA_ABSORB_PREP_MAX_ROWS may cover.)
Per (batch, context), every row at that context, pages scattered over the cache:
- latent columns: mla_decode alone (o_latent out, both stages), us per call, for the 16-head kernels (`old st2`:
  LONGCAT_MLA_DECODE_KERNEL=old, 2 pipeline stages; the default below 16 rows) and the MQA-form ones (`new 64,3`:
  LONGCAT_MLA_DECODE_KERNEL=new, 64-token steps at 3 stages; the default from 16 rows).
- chain columns: one attention's MLA chain between q_b_proj and o_proj as layers/fast_decode.py runs it (mla_prep,
  the W_UK product, mla_decode with W_UV fused into the merge up to FUSED_UV_MAX_BATCH rows, else o_latent then the
  W_UV bmm), the kernels chosen by the batch: `chain` with the W_UK product as a cuBLAS bmm after mla_prep;
  `chain absorb` with it inside the prep kernel (one launch less; what fast_decode runs up to
  LONGCAT_MLA_ABSORB_PREP_MAX_ROWS rows; timed up to ABSORB_MAX_BATCH rows); `chain best` with the faster latent
  kernel of this row forced; `chain absorb best` both.
- floor: the latent cache bytes (B x context x 576 x 2) at the copy rate measured in this run.
- err: the largest relative error of any variant's output against mla_decode_reference (GPU tests allow 1e-2);
  `chain absorb` against `chain`.
--sweep adds the MQA kernels' latent time at forced split counts (1..32).
Times: one CUDA graph of REPEAT calls replayed (no launch overhead, as in the served decode step), median per call.
Writes the JSON to --out, else to $OUT/bench_mla_decode.json when OUT is set; the table also to $OUT/bench_mla_decode.md.
"""

from __future__ import annotations

import argparse
import json
import os

import harness
import torch

from longcat_service.kernels import mla_decode as md
from longcat_service.kernels.mla_prep import mla_prep, mla_prep_absorb
from longcat_service.layers.fast_decode import FUSED_UV_MAX_BATCH

RANK, ROPE, NOPE, DV, SCALE = 512, 64, 128, 128, 0.0722
REPEAT = 20
ABSORB_MAX_BATCH = 8
DEVICE = "cuda"  # (a CPU smoke run of the table logic sets "cpu")
SWITCHES = ("LONGCAT_MLA_DECODE_KERNEL", "LONGCAT_MLA_ABSORB_PREP_MAX_ROWS")
# the latent variants: name -> switches (the column names of the earlier runs in benchmarks/RESULTS.md)
LATENT_VARIANTS = {"old st2": {"LONGCAT_MLA_DECODE_KERNEL": "old"}, "new 64,3": {"LONGCAT_MLA_DECODE_KERNEL": "new"}}


def _case(batch: int, ctx: int, heads: int, block_size: int, gen: torch.Generator) -> dict:
    per_row = -(-ctx // block_size)
    cache = torch.randn(batch * per_row + 1, block_size, RANK + ROPE, device=DEVICE, generator=gen).bfloat16()
    tables = torch.randperm(cache.shape[0], device=DEVICE, generator=gen)[: batch * per_row].view(batch, per_row)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    w_kv_b = (torch.randn(heads, NOPE + DV, RANK, device=DEVICE, generator=gen) * 0.05).bfloat16()

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * s).bfloat16()

    ang = torch.randn(batch, ROPE // 2, device=DEVICE, generator=gen)
    slots = tables[:, -1].long() * block_size + (ctx - 1) % block_size  # each row's newest token
    return dict(
        attn=(rnd(batch, heads, RANK), rnd(batch, heads, ROPE), cache, tables.int(), seq, SCALE),
        w_uk=w_kv_b[:, :NOPE, :], w_uv=w_kv_b[:, NOPE:, :],  # strided views, as fast_decode takes kv_b_proj's weight
        prep=(rnd(batch, heads, NOPE + ROPE), rnd(batch, RANK + ROPE), ang.cos().bfloat16(), ang.sin().bfloat16(),
              1 + rnd(RANK, s=0.1), 1e-6, 0.5, 3.0, slots, cache, ROPE),
    )


def _chain(c: dict, absorb: bool):
    """fast_decode.mla_decode_forward between q_b_proj and o_proj, on c's tensors."""
    q, attn = c["prep"][0], c["attn"]
    n = q.shape[0]
    if absorb:
        q_latent, q_pe = mla_prep_absorb(*c["prep"], c["w_uk"])
    else:
        q = mla_prep(*c["prep"])
        q_latent, q_pe = torch.bmm(q[..., :NOPE].transpose(0, 1), c["w_uk"]).transpose(0, 1), q[..., NOPE:]
    args = (q_latent, q_pe) + attn[2:]
    if n <= FUSED_UV_MAX_BATCH:
        return md.mla_decode(*args, w_uv=c["w_uv"])
    o_latent = md.mla_decode(*args)
    return torch.bmm(o_latent.transpose(0, 1), c["w_uv"].transpose(1, 2)).transpose(0, 1)


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


def _with(settings: dict, fn):
    """fn() with these switches set (mla_decode and fast_decode read them at each call, capture included); the
    environment is restored afterwards. A variant that fails (e.g. out of shared memory on this GPU) gives None."""
    saved = {k: os.environ.get(k) for k in SWITCHES}
    os.environ.update(settings)
    try:
        return fn()
    except Exception as exc:
        print(f"{settings}: {type(exc).__name__}: {str(exc)[:200]}")
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _measure(batch, ctx, heads, block_size, gen, copy_bw, reps, sweep) -> dict:
    c = _case(batch, ctx, heads, block_size, gen)
    attn = c["attn"]
    ref = md.mla_decode_reference(*attn)
    row = dict(batch=batch, context=ctx, heads=heads, block_size=block_size,
               splits_new=md.choose_num_splits(batch, heads),
               floor_us=batch * ctx * (RANK + ROPE) * 2 / copy_bw * 1e6, latent_us={}, err={})
    for name, settings in LATENT_VARIANTS.items():
        row["err"][name] = _with(settings, lambda: _rel(md.mla_decode(*attn), ref))
        row["latent_us"][name] = _with(settings, lambda: _graph_us(lambda: md.mla_decode(*attn), reps))
    done = {k: v for k, v in row["latent_us"].items() if v is not None}
    row["best_latent"] = min(done, key=done.get) if done else None
    row["chain_us"] = _graph_us(lambda: _chain(c, absorb=False), reps)
    if batch <= ABSORB_MAX_BATCH:
        base = _chain(c, absorb=False)
        row["err"]["chain absorb"] = _rel(_chain(c, absorb=True), base)
        row["chain_absorb_us"] = _graph_us(lambda: _chain(c, absorb=True), reps)
    if row["best_latent"]:
        row["chain_best_us"] = _with(LATENT_VARIANTS[row["best_latent"]],
                                     lambda: _graph_us(lambda: _chain(c, absorb=False), reps))
        if batch <= ABSORB_MAX_BATCH:
            row["chain_absorb_best_us"] = _with(LATENT_VARIANTS[row["best_latent"]],
                                                lambda: _graph_us(lambda: _chain(c, absorb=True), reps))
    if sweep:
        row["sweep_latent_us"] = {}
        for splits in (1, 2, 4, 8, 16, 32):
            row["sweep_latent_us"][f"new splits {splits}"] = _with(
                LATENT_VARIANTS["new 64,3"],
                lambda n=splits: _graph_us(lambda: md.mla_decode(*attn, num_splits=n), reps))
    return row


def _table(results: list[dict]) -> list[str]:
    names = list(LATENT_VARIANTS)
    header = (["batch", "context", "splits new", "floor us"] + [f"latent {n}" for n in names]
              + ["chain", "chain absorb", "chain best", "chain absorb best", "max err"])
    rows = []
    for r in results:
        errs = [v for v in r["err"].values() if v is not None]
        rows.append([r["batch"], r["context"], r["splits_new"], harness.fmt(r["floor_us"])]
                    + [harness.fmt(r["latent_us"][n]) if r["latent_us"].get(n) is not None
                       else ("fail" if n in r["latent_us"] else "-") for n in names]
                    + [harness.fmt(r["chain_us"]), harness.fmt(r.get("chain_absorb_us")) if "chain_absorb_us" in r
                       else "-", f"{harness.fmt(r.get('chain_best_us'))} ({r['best_latent']})"
                       if r.get("chain_best_us") else "-",
                       harness.fmt(r["chain_absorb_best_us"]) if r.get("chain_absorb_best_us") else "-",
                       f"{max(errs):.1e}" if errs else "-"])
    return harness.markdown_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    out = a.out or (os.path.join(os.environ["OUT"], "bench_mla_decode.json") if os.environ.get("OUT") else "")
    dev = torch.device("cuda")
    copy_bw, _ = harness.measure_ceilings(dev)
    print(f"copy rate {copy_bw / 1e12:.2f} TB/s; heads {a.heads}, block size {a.block_size}, commit {harness.commit()}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    results = []
    for ctx in harness.ints(a.contexts):
        for batch in harness.ints(a.batches):
            results.append(_measure(batch, ctx, a.heads, a.block_size, gen, copy_bw, a.reps, a.sweep))
            print(json.dumps(results[-1]), flush=True)
            torch.cuda.empty_cache()
            if out:  # after every row: a run cut short still leaves what it measured
                with open(out, "w") as f:
                    json.dump(dict(commit=harness.commit(), copy_bytes_per_s=copy_bw, results=results), f, indent=1)
    table = "\n".join(_table(results))
    print(table)
    if out:
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
