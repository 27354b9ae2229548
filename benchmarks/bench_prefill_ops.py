"""Prefill-side MoE / MLP pieces on one GPU, each timed against the eager code it replaced (LongCat-Flash shapes).

    python benchmarks/bench_prefill_ops.py [--tokens 4096] [--router-tokens 256,512,1024,2048,4096] [--out f.json]

- swiglu: F.silu(gate) * up vs the fused Triton silu_and_mul (dense MLP [T, 2*12288] and the experts'
  [T*k, 2*2048]; the latter also with the device-side row limit the MoE passes); outputs must be bit-identical.
- gather: index_select of all T*k rows vs gather_expert_rows of the real-expert rows only.
- expert_ffn: the grouped-GEMM prefill path as it was (index_select, silu * up, torch.where zeroing of the
  rows past the last real row) vs now (Triton gather and SwiGLU, no zeroing).
- router: F.linear(x.float(), W fp32) vs linear_bf16x3 (bf16 tensor-core GEMM against the cached 3-way
  split of W, fp32 out); max |diff| against the fp32 GEMM and tokens whose top-12 experts differ.
Routing is random (zero bias), which sends about a third of the slots to the 256 zero experts.
Times are medians of CUDA-event timings in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import torch
import torch.nn.functional as F

from longcat_service.kernels.moe_gather import gather_expert_rows
from longcat_service.kernels.silu_mul import silu_and_mul
from longcat_service.layers.router import linear_bf16x3, split_bf16x3
from longcat_service.ops import extension
from longcat_service.ops import reference as ref
from longcat_service.ops.testing import make_router_inputs

H, I_DENSE, I_EXPERT, E, Z, K, SCALE = 6144, 12288, 2048, 512, 256, 12, 6.0


def _time(fn, reps: int) -> float:
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
    return statistics.median(out)


def _old_grouped_expert_ffn(hidden, w13, w2, expert_offsets, sorted_slots, top_k):
    """ops/extension._expert_ffn_grouped_mm before this change."""
    num_rows = sorted_slots.shape[0]
    inter = w2.shape[-1]
    tokens = torch.div(sorted_slots.clamp(min=0), top_k, rounding_mode="floor")
    x = hidden.index_select(0, tokens)
    ends = expert_offsets[1:]
    gate_up = torch._grouped_mm(x, w13.transpose(1, 2), offs=ends)
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=ends)
    valid = torch.arange(num_rows, device=hidden.device) < expert_offsets[-1]
    return torch.where(valid[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


def _eager_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]


def _fp32_router(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), w)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--router-tokens", default="256,512,1024,2048,4096")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    t, reps, dev = args.tokens, args.reps, "cuda"
    g = torch.Generator().manual_seed(0)
    results: dict[str, dict] = {}

    def row(name, old_us, new_us, **extra):
        results[name] = {"old_us": round(old_us, 1), "new_us": round(new_us, 1), **extra}
        more = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"{name:<34} old {old_us:9.1f} us   new {new_us:9.1f} us   saved {old_us - new_us:8.1f} us  {more}")

    logits, bias = make_router_inputs(t, E, Z, generator=g, device=dev)
    ids, _, _ = ref.router_topk(logits, bias, K, SCALE, E)
    offsets, sorted_slots, _, _, _ = extension.moe_align(ids, E)
    n_real = int(offsets[-1])
    print(f"T={t}: {n_real} of {t * K} slots on real experts")

    # SwiGLU
    for name, rows, inter in (("swiglu dense", t, I_DENSE), ("swiglu experts", t * K, I_EXPERT)):
        gate_up = (torch.randn(rows, 2 * inter, device=dev) * 3).to(torch.bfloat16)
        old, new = partial(_eager_swiglu, gate_up), partial(silu_and_mul, gate_up)
        row(f"{name} [{rows}, 2*{inter}]", _time(old, reps), _time(new, reps), bit_identical=_bits_equal(old(), new()))
        if inter == I_EXPERT:  # with the row count the MoE passes: only the real-expert rows
            limited = partial(silu_and_mul, gate_up, offsets[-1:])
            row("swiglu experts, real rows only", _time(old, reps), _time(limited, reps),
                bit_identical=_bits_equal(limited()[:n_real], old()[:n_real]))
        del gate_up, old, new

    # gather
    hidden = torch.randn(t, H, device=dev).to(torch.bfloat16)
    tokens = torch.div(sorted_slots.clamp(min=0), K, rounding_mode="floor")
    old_g = lambda: hidden.index_select(0, tokens)  # noqa: E731
    new_g = lambda: gather_expert_rows(hidden, sorted_slots, K, offsets[-1:])  # noqa: E731
    row(f"gather [{t * K}, {H}]", _time(old_g, reps), _time(new_g, reps),
        equal=bool(torch.equal(old_g()[:n_real], new_g()[:n_real])))

    # whole grouped expert FFN
    w13 = torch.randn(E, 2 * I_EXPERT, H, device=dev, dtype=torch.bfloat16) / H**0.5  # built on the GPU (26 GB)
    w2 = torch.randn(E, H, I_EXPERT, device=dev, dtype=torch.bfloat16) / I_EXPERT**0.5
    args_ffn = (hidden, w13, w2, offsets, sorted_slots, K)
    old_y, new_y = _old_grouped_expert_ffn(*args_ffn), extension._expert_ffn_grouped_mm(*args_ffn)
    row("expert_ffn grouped (old vs new)", _time(lambda: _old_grouped_expert_ffn(*args_ffn), reps),
        _time(lambda: extension._expert_ffn_grouped_mm(*args_ffn), reps),
        real_rows_equal=bool(torch.equal(old_y[:n_real], new_y[:n_real])))
    del w13, w2, old_y, new_y

    # router
    w = torch.randn(E + Z, H, generator=g).to(dev) * 0.02
    split = split_bf16x3(w)
    for rt in (int(v) for v in args.router_tokens.split(",")):
        x = torch.randn(rt, H, device=dev).to(torch.bfloat16)
        old_r, new_r = partial(_fp32_router, x, w), partial(linear_bf16x3, x, split)
        a, b = old_r(), new_r()
        ids_a = ref.router_topk(a, torch.zeros(E + Z, device=dev), K, SCALE, E)[0]
        ids_b = ref.router_topk(b, torch.zeros(E + Z, device=dev), K, SCALE, E)[0]
        row(f"router T={rt}", _time(old_r, reps), _time(new_r, reps),
            max_abs_diff=f"{(a - b).abs().max().item():.2e}", max_abs=f"{a.abs().max().item():.2e}",
            tokens_routed_differently=int((ids_a != ids_b).any(-1).sum()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
