"""Expert parallelism by simulation on one GPU: what one rank of TP8 and one rank of EP8 compute for a LongCat-Flash
MoE layer, plus the bytes their collectives move, combined with the NVLink bandwidth of an 8-GPU H200 node into a
modelled per-layer MoE time and a modelled decode step of the full 28-layer model.

    python benchmarks/bench_ep.py [--batches 1,16,64,256] [--out ep.json]

- TP8 rank: all 512 experts at 256 of their 2048 intermediate rows; every rank routes all B tokens; one all-reduce
  of the fp32 [B, 6144] partial sums.
- EP8 rank (this project's EP): 64 whole experts; a rank routes its B/8 tokens, sends one bf16 row per real-expert
  slot to the expert's rank (zero-expert slots stay), gets the outputs back (same bytes), combines, then an
  all-gather of the fp32 [B/8, 6144] shares. Its expert compute is timed on the rows that the B tokens route to
  experts 0..63 (uniform random router logits: about 2/3 of the 12 slots are real, i.e. ~8 rows per token over
  all ranks, ~B rows per rank).
- Collective model: time = ALPHA_US + bytes per rank / NVLINK_GBPS. NVLINK_GBPS = 450 GB/s per direction (NVIDIA's
  H200 SXM data sheet: NVLink 900 GB/s per GPU, both directions together); ALPHA_US = 15 us per NCCL call is an
  assumption (small-message latency on one NVLink node), printed with the results. Ring all-reduce moves
  2(N-1)/N of the tensor per rank, all-gather (N-1)/N; all-to-all (N-1)/N of what a rank sends.
- Decode steps in CUDA graphs send a fixed number of rows per peer instead (distributed/ep_static_dispatch.py):
  `ep8_graph_comm_us` / `ep8_graph_comm_us_f2` model that all-to-all at the default capacity (the largest share x
  top-k, never overflows) and at --ep-capacity-factor 2 (same expert compute: padding rows get no expert).
- The attention and dense-MLP part of a decode step is the same under TP8 and TP8+EP8; it is modelled by its byte
  floor per rank (weights / measured copy rate) and 4 fp32 all-reduces per layer, so the step comparison isolates
  the MoE. KV-cache reads are left out (short contexts).
Times of our kernels are medians of CUDA-graph replays over several routings (so L2 cannot serve the weights).
FP8 columns appear when the extension has `expert_ffn_fp8` (issue 15).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import longcat_service.ops as ops
from longcat_service.distributed.ep_static_dispatch import capacity_per_peer
from longcat_service.ops import reference as ref

H, E, Z, K, SCALE, INTER, WORLD, LAYERS = 6144, 512, 256, 12, 6.0, 2048, 8, 28
NVLINK_GBPS, ALPHA_US = 450.0, 15.0
NUM_ROUTINGS = 6


def measure_copy_tbps() -> float:
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / statistics.median(_time(lambda: dst.copy_(src), 20)) / 1e6


def _time(fn, reps: int) -> list[float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3)
    return out


def _graph(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _replay_median(fns, reps: int) -> float:
    """Median time of CUDA-graph replays, cycling over one graph per routing."""
    graphs = [_graph(fn) for fn in fns]
    times = []
    for r in range(reps):
        times += _time(graphs[r % len(graphs)].replay, 1)
    return statistics.median(times)


def collective_us(bytes_per_rank: float) -> float:
    return ALPHA_US + bytes_per_rank / (NVLINK_GBPS * 1e3)


def fixed_a2a_bytes_per_rank(batch: int, capacity_factor: float | None) -> float:
    """One way, one rank, bf16 rows: capacity rows to each of the other N-1 ranks (its own block stays)."""
    return (WORLD - 1) * capacity_per_peer(batch, WORLD, K, capacity_factor) * H * 2


def weights(num_experts: int, inter: int, fp8: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (0.02 * torch.randn(num_experts, 2 * inter, H, device="cuda", generator=g)).to(torch.bfloat16)
    w2 = (0.02 * torch.randn(num_experts, H, inter, device="cuda", generator=g)).to(torch.bfloat16)
    if not fp8:
        return {"w13": w13, "w2": w2}
    from longcat_service.ops.fp8_reference import block_quant

    (q13, s13), (q2, s2) = block_quant(w13), block_quant(w2)
    return {"w13": q13, "w13_scale": s13, "w2": q2, "w2_scale": s2}


def _expert_ffn(hidden, w, offsets, sorted_slots, top_k):
    if "w13_scale" in w:
        from longcat_service.ops.extension import expert_ffn_fp8

        return expert_ffn_fp8(hidden, w["w13"], w["w13_scale"], w["w2"], w["w2_scale"], offsets, sorted_slots, top_k)
    return ops.expert_ffn(hidden, w["w13"], w["w2"], offsets, sorted_slots, top_k)


def tp_rank_fn(hidden, logits, bias, w):
    """One TP8 rank: route all tokens, all 512 experts' 256-wide slivers, combine (then the all-reduce)."""
    def run():
        ids, weights_, zero = ops.router_topk(logits, bias, K, SCALE, E)
        offsets, sorted_slots, slot_rows, _, _ = ops.moe_align(ids, E)
        y = _expert_ffn(hidden, w, offsets, sorted_slots, K)
        return ops.combine(y, slot_rows, weights_, hidden, zero, True)
    return run


def ep_rank_fn(hidden, logits, bias, w):
    """One EP8 rank: route its B/8 tokens; run its 64 experts on the rows the B tokens send to experts 0..63;
    combine its share (the rows it gets back are stood in for by its own outputs: same shapes, same work)."""
    batch = hidden.shape[0]
    share = max(1, -(-batch // WORLD))
    ids_all = ref.router_topk(logits, bias, K, SCALE, E)[0]
    slots = torch.nonzero(ids_all.flatten() < E // WORLD).flatten()
    recv_rows = hidden.index_select(0, torch.div(slots, K, rounding_mode="floor"))
    recv_local = ids_all.flatten()[slots].to(torch.int32).reshape(-1, 1)
    num_recv = recv_rows.shape[0]

    def run():
        ids, weights_, zero = ops.router_topk(logits[:share], bias, K, SCALE, E)
        offsets, sorted_slots, slot_rows, _, _ = ops.moe_align(recv_local, E // WORLD)
        y = _expert_ffn(recv_rows, w, offsets, sorted_slots, 1)
        back = y.index_select(0, slot_rows.long())
        rows = torch.zeros(share * K, dtype=torch.int32, device=hidden.device)
        rows[: min(share * K, num_recv)] = torch.arange(min(share * K, num_recv), dtype=torch.int32,
                                                        device=hidden.device)
        return ops.combine(back if num_recv else hidden[:1], rows, weights_, hidden[:share], zero, True)
    return run, num_recv


def common_layer_bytes_per_rank(dtype_bytes: float) -> float:
    """Attention (2 MLA sublayers) + 2 dense MLPs of one layer on one TP8 rank (q_a / kv_a replicated)."""
    q_a, kv_a = H * 1536, H * 576
    q_b, kv_b, o = 1536 * 64 * 192 / WORLD, 512 * 64 * 256 / WORLD, 64 * 128 * H / WORLD
    mlp = 3 * H * 12288 / WORLD
    return dtype_bytes * (2 * (q_a + kv_a + q_b + kv_b + o) + 2 * mlp)


def bench_batch(batch: int, tp_w, ep_w, tp_w8, ep_w8, copy_tbps: float, reps: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(batch)
    hidden = torch.randn(batch, H, device="cuda", generator=g).to(torch.bfloat16)
    bias = torch.zeros(E + Z, device="cuda")
    routings = [torch.randn(batch, E + Z, device="cuda", generator=g) for _ in range(NUM_ROUTINGS)]
    real = statistics.mean(float((ref.router_topk(r, bias, K, SCALE, E)[0] < E).sum()) for r in routings)
    row = {"B": batch, "real_slots_per_token": real / batch}
    share = -(-batch // WORLD)
    for tag, tw, ew in (("bf16", tp_w, ep_w), ("fp8", tp_w8, ep_w8)):
        if tw is None:
            continue
        row[f"tp8_moe_us_{tag}"] = _replay_median([tp_rank_fn(hidden, r, bias, tw) for r in routings], reps)
        eps = [ep_rank_fn(hidden, r, bias, ew) for r in routings]
        row[f"ep8_moe_us_{tag}"] = _replay_median([fn for fn, _ in eps], reps)
        row["ep8_rows_per_rank"] = statistics.mean(n for _, n in eps)
    # collectives per MoE layer
    allreduce_bytes = 2 * (WORLD - 1) / WORLD * batch * H * 4
    a2a_bytes = (WORLD - 1) / WORLD * share * (real / batch) * H * 2  # bf16 rows of real slots, one way
    gather_bytes = (WORLD - 1) / WORLD * share * WORLD * H * 4
    row["tp8_comm_us"] = collective_us(allreduce_bytes)
    row["ep8_comm_us"] = 2 * collective_us(a2a_bytes) + collective_us(gather_bytes) + collective_us(0)  # + counts
    row["a2a_bytes_per_rank_one_way"] = a2a_bytes
    for key, factor in (("ep8_graph_comm_us", None), ("ep8_graph_comm_us_f2", 2.0)):
        fixed = fixed_a2a_bytes_per_rank(batch, factor)
        row[key] = 2 * collective_us(fixed) + collective_us(gather_bytes) + collective_us(0)  # + overflow max
        row[key.replace("comm_us", "a2a_bytes")] = fixed
    row["allreduce_bytes_per_rank"] = allreduce_bytes
    for tag in ("bf16", "fp8"):
        if f"tp8_moe_us_{tag}" not in row:
            continue
        common_us = (common_layer_bytes_per_rank(2 if tag == "bf16" else 1) / (copy_tbps * 1e6)
                     + 4 * collective_us(2 * (WORLD - 1) / WORLD * batch * H * 4))
        tp_layer = row[f"tp8_moe_us_{tag}"] + row["tp8_comm_us"]
        ep_layer = row[f"ep8_moe_us_{tag}"] + row["ep8_comm_us"]
        row[f"tp8_layer_moe_us_{tag}"], row[f"ep8_layer_moe_us_{tag}"] = tp_layer, ep_layer
        row[f"tp8_step_ms_{tag}"] = LAYERS * (tp_layer + common_us) / 1e3
        row[f"ep8_step_ms_{tag}"] = LAYERS * (ep_layer + common_us) / 1e3
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ep.py needs a CUDA device")
    copy_tbps = measure_copy_tbps()
    tp_w, ep_w = weights(E, INTER // WORLD, False), weights(E // WORLD, INTER, False)
    tp_w8 = ep_w8 = None
    if hasattr(torch.ops.longcat, "expert_ffn_fp8"):
        try:
            tp_w8, ep_w8 = weights(E, INTER // WORLD, True), weights(E // WORLD, INTER, True)
        except Exception as exc:  # the FP8 path is optional here
            print(f"fp8 weights unavailable: {exc}")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        try:
            rows.append(bench_batch(batch, tp_w, ep_w, tp_w8, ep_w8, copy_tbps, args.reps))
        except Exception as exc:
            if tp_w8 is None:
                raise
            print(f"fp8 failed at B={batch} ({exc}); bf16 only")
            tp_w8 = ep_w8 = None
            rows.append(bench_batch(batch, tp_w, ep_w, None, None, copy_tbps, args.reps))
    print(f"copy {copy_tbps:.2f} TB/s; NVLink model {NVLINK_GBPS:.0f} GB/s per direction + {ALPHA_US:.0f} us per "
          f"collective (assumed); {LAYERS} layers")
    head = ("B", "rows/rank", "TP8 moe us", "EP8 moe us", "TP8 comm us", "EP8 comm us", "TP8 layer", "EP8 layer",
            "TP8 step ms", "EP8 step ms")
    for tag in ("bf16", "fp8"):
        if not rows or f"tp8_moe_us_{tag}" not in rows[0]:
            continue
        print(f"\n{tag}\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for r in rows:
            vals = (r["B"], f"{r['ep8_rows_per_rank']:.1f}", f"{r[f'tp8_moe_us_{tag}']:.1f}",
                    f"{r[f'ep8_moe_us_{tag}']:.1f}", f"{r['tp8_comm_us']:.1f}", f"{r['ep8_comm_us']:.1f}",
                    f"{r[f'tp8_layer_moe_us_{tag}']:.1f}", f"{r[f'ep8_layer_moe_us_{tag}']:.1f}",
                    f"{r[f'tp8_step_ms_{tag}']:.2f}", f"{r[f'ep8_step_ms_{tag}']:.2f}")
            print("| " + " | ".join(str(v) for v in vals) + " |")
    for r in rows:
        print(f"B={r['B']}: EP8 comm in a CUDA-graph decode step (fixed capacity) {r['ep8_graph_comm_us']:.1f} us "
              f"(--ep-capacity-factor 2: {r['ep8_graph_comm_us_f2']:.1f} us) vs {r['ep8_comm_us']:.1f} us eager")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_tbps": copy_tbps, "nvlink_gbps": NVLINK_GBPS, "alpha_us": ALPHA_US, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
