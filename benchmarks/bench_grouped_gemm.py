"""The MoE prefill experts' two grouped GEMMs: torch._grouped_mm against the Triton grouped_gemm, every config.

    python benchmarks/bench_grouped_gemm.py [--tokens 4096] [--configs all|"bn,bk,bm,stages,warps[,tma][,split]";...]
                                            [--reps 10] [--out f.json]

LongCat-Flash shapes on one GPU: 512 real + 256 zero experts, top-12, H=6144, I=2048; a random routing of
--tokens tokens (ops/testing.make_router_inputs, reference router_topk and moe_align) sends about a third of
the slots to zero experts, ~64 rows to each real expert. Times both GEMMs of one layer:
  gate_up  x [T*k, 6144] x w13 [512, 4096, 6144] -> [T*k, 4096]   (25.8 GB of weights)
  down     a [T*k, 2048] x w2  [512, 6144, 2048] -> [T*k, 6144]   (12.9 GB of weights)
for torch._grouped_mm and every config of kernels/grouped_gemm.CONFIGS (or --configs), then the whole prefill
expert FFN (ops/extension._expert_ffn_grouped_mm) without Triton (torch._grouped_mm) and with the best config.
Columns: median ms of CUDA-event timings, GB/s of weight bytes (experts with rows; each weight read once is
the floor), that rate as % of the device copy rate measured in this run (a 2 GiB copy_, read + write bytes),
max |diff| against torch._grouped_mm on the real rows (both accumulate in fp32 and round once to bf16: ~1 bf16
ulp of the largest outputs). The best config per GEMM and overall is printed as the env value to set
(LONGCAT_GROUPED_GEMM_CONFIG); the op runs whenever the Triton fast path does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_moe's timing helpers
from bench_moe import _time, measure_copy_tbps  # noqa: E402

from longcat_service.kernels import grouped_gemm as gg
from longcat_service.ops import reference as ref
from longcat_service.ops.testing import make_router_inputs

H, I_EXPERT, E, Z, K, SCALE = 6144, 2048, 512, 256, 12, 6.0
DEVICE = "cuda"


def _time_ms(fn, reps: int) -> float:
    return statistics.median(_time(fn, reps)) / 1e3  # bench_moe times in us


def _record(entries: list, gemm: str, label: str, fn, reps: int, weight_bytes: int, copy: float,
            diff: float | None = None) -> None:
    ms = _time_ms(fn, reps)
    gbps = weight_bytes / (ms * 1e-3) / 1e9
    entries.append({"config": label, "ms": round(ms, 3), "GBps": round(gbps, 1),
                    "pct_copy": round(100 * gbps / copy, 1), "max_abs_diff": diff})
    d = "" if diff is None else f"{diff:10.3g}"
    print(f"{gemm:<8} {label:<28} {ms:8.3f} {gbps:7.0f} {100 * gbps / copy:6.1f}% {d}", flush=True)


def _weights(shape, std: float) -> torch.Tensor:
    w = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)  # in place: no fp32 temporaries (26 GB)
    w.normal_(0.0, std)
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--configs", default="all", help='"all" or configs separated by ";"')
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-ffn", action="store_true", help="skip the whole expert FFN comparison")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_grouped_gemm: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed")
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("bench_grouped_gemm: torch._grouped_mm (the baseline) needs torch >= 2.8 on sm_90+")
    configs = gg.CONFIGS if args.configs == "all" else tuple(
        gg.parse_config(c) for c in args.configs.split(";") if c.strip())
    t, reps, dev = args.tokens, args.reps, DEVICE
    g = torch.Generator().manual_seed(0)

    logits, bias = make_router_inputs(t, E, Z, generator=g, device=dev)
    ids, _, _ = ref.router_topk(logits, bias, K, SCALE, E)
    offsets, sorted_slots, _, _, _ = ref.moe_align(ids, E)
    offsets, sorted_slots = offsets.to(torch.int32), sorted_slots.to(torch.int32)
    counts = (offsets[1:] - offsets[:-1]).cpu()
    n_real, rows, active = int(offsets[-1]), t * K, int((counts > 0).sum())
    copy = measure_copy_tbps() * 1e3  # GB/s, read + write bytes of a 2 GiB copy_
    print(f"{torch.cuda.get_device_name()}: copy rate {copy:.0f} GB/s (read + write of a 2 GiB copy_)")
    print(f"T={t}: {n_real} of {rows} rows on {active} of {E} real experts; rows per expert min {int(counts.min())} "
          f"mean {n_real / E:.1f} max {int(counts.max())}; > 64: {int((counts > 64).sum())}, "
          f"> 128: {int((counts > 128).sum())}")
    def dump() -> None:  # after each section: a run stopped by a time cap keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    results: dict = {"device": torch.cuda.get_device_name(), "copy_GBps": round(copy, 1), "tokens": t,
                     "real_rows": n_real, "active_experts": active, "gemms": {}}

    hidden = torch.randn(t, H, device=dev).to(torch.bfloat16)
    w13 = _weights((E, 2 * I_EXPERT, H), H**-0.5)
    w2 = _weights((E, H, I_EXPERT), I_EXPERT**-0.5)
    gemms = {
        "gate_up": (torch.randn(rows, H, device=dev).to(torch.bfloat16), w13),
        "down": (torch.randn(rows, I_EXPERT, device=dev).to(torch.bfloat16), w2),
    }
    head = f"{'gemm':<8} {'impl / config':<28} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'max|diff|':>10}"
    for name, (x, w) in gemms.items():
        weight_bytes = active * w.shape[1] * w.shape[2] * w.element_size()
        print(f"\n{name}: x {tuple(x.shape)} w {tuple(w.shape)}, {weight_bytes / 1e9:.1f} GB of weights\n{head}")
        want = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets[1:])
        scale = float(want[:n_real].abs().max())
        entries = []
        _record(entries, name, "torch._grouped_mm",
                lambda x=x, w=w: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets[1:]), reps, weight_bytes, copy)
        for cfg in configs:
            try:
                y = gg.grouped_gemm(x, w, offsets, t, config=cfg)
                diff = float((y[:n_real].float() - want[:n_real].float()).abs().max())
                del y
                _record(entries, name, str(cfg), lambda x=x, w=w, cfg=cfg: gg.grouped_gemm(x, w, offsets, t, config=cfg),
                        reps, weight_bytes, copy, diff)
            except Exception as exc:  # e.g. out of shared memory on a smaller GPU: report, go on
                entries.append({"config": str(cfg), "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"{name:<8} {str(cfg):<28} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        results["gemms"][name] = {"weight_GB": round(weight_bytes / 1e9, 2), "max_abs_output": scale,
                                  "entries": entries}
        best = min((e for e in entries[1:] if "ms" in e), key=lambda e: e["ms"], default=None)
        if best:
            print(f"best {name}: {best['config']} {best['ms']:.3f} ms vs torch._grouped_mm {entries[0]['ms']:.3f} ms")
        del want
        dump()

    # one config for both GEMMs (the env var picks one): the least total time
    totals = {}
    for cfg in configs:
        ms = [next((e.get("ms") for e in results["gemms"][n]["entries"] if e["config"] == str(cfg)), None)
              for n in gemms]
        if all(m is not None for m in ms):
            totals[str(cfg)] = sum(ms)
    torch_total = sum(results["gemms"][n]["entries"][0]["ms"] for n in gemms)
    if totals:
        best_cfg = min(totals, key=totals.get)
        results["best_config"] = best_cfg
        results["best_total_ms"] = round(totals[best_cfg], 3)
        results["torch_total_ms"] = round(torch_total, 3)
        print(f"\nbest for both GEMMs: {gg.CONFIG_ENV}={best_cfg!r}: {totals[best_cfg]:.3f} ms per layer vs "
              f"torch._grouped_mm {torch_total:.3f} ms (default config {gg.DEFAULT_CONFIG}: "
              f"{totals.get(str(gg.DEFAULT_CONFIG), float('nan')):.3f} ms)")

    if not args.no_ffn and totals:
        from longcat_service.ops import extension

        ffn_args = (hidden, w13, w2, offsets, sorted_slots, K)
        with mock.patch.object(extension, "fast_path_enabled", lambda t: False):  # as without Triton
            want = extension._expert_ffn_grouped_mm(*ffn_args)
            torch_ms = _time_ms(lambda: extension._expert_ffn_grouped_mm(*ffn_args), reps)
        with mock.patch.dict(os.environ, {gg.CONFIG_ENV: best_cfg}):
            got = extension._expert_ffn_grouped_mm(*ffn_args)
            triton_ms = _time_ms(lambda: extension._expert_ffn_grouped_mm(*ffn_args), reps)
        diff = float((got[:n_real].float() - want[:n_real].float()).abs().max())
        results["expert_ffn"] = {"torch_ms": round(torch_ms, 3), "triton_ms": round(triton_ms, 3),
                                 "config": best_cfg, "max_abs_diff": diff,
                                 "max_abs_output": float(want[:n_real].abs().max())}
        print(f"expert_ffn (gather, gate_up, SwiGLU, down): torch._grouped_mm {torch_ms:.3f} ms, "
              f"Triton {best_cfg} {triton_ms:.3f} ms, max |diff| {diff:.3g} (max |y| "
              f"{results['expert_ffn']['max_abs_output']:.3g})")

    dump()


if __name__ == "__main__":
    main()
