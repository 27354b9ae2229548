"""LongCat-Flash-2L with block-FP8 dummy weights next to BF16, in one run (issue 15's targets).

    python benchmarks/bench_fp8.py                        # H200: ceilings, BF16 then FP8 (decode 1 and 64, prefill 4096)
    python benchmarks/bench_fp8.py --device cpu --tiny    # smoke test of the same code on a tiny config

Each model runs through bench_decode.bench_ours (engine + model runner, CUDA graphs for decode), one after the
other (both 2-layer full-width models do not fit together with their KV caches). FP8 = `quantization="fp8"` on the
dummy weights: every MLA projection, dense MLP and expert in e4m3 with 128 x 128 block scales, kv_b_proj
dequantized to bf16, router fp32, embeddings and lm_head bf16. Ceilings measured in the same run: copy rate, bf16
matmul and FP8 matmul (torch._scaled_mm, e4m3 8192^3, tensor-wise and row-wise scales).
Targets (issue 15): FP8 decode batch 1 <= 0.95 ms, batch 64 <= 7.3 ms, 4096-token prefill <= 28 ms.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
from public_api import default_llm, defaults_decode_ms  # noqa: E402

TARGETS_MS = {"decode_1": 0.95, "decode_64": 7.3, "prefill": 28.0}


def fp8_matmul_rates(device: torch.device, tiny: bool) -> dict[str, float | str]:
    """torch._scaled_mm FLOP/s on m^3 e4m3 (bf16 out) with tensor-wise and row-wise scales, or why not."""
    m = 8192 if device.type == "cuda" and not tiny else 256
    a = torch.randn(m, m, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device=device).to(torch.float8_e4m3fn).t()  # column-major second operand
    rates: dict[str, float | str] = {}
    scales = {
        "tensorwise": (torch.tensor(1.0, device=device), torch.tensor(1.0, device=device)),
        "rowwise": (torch.ones(m, 1, device=device), torch.ones(1, m, device=device)),
    }
    for name, (sa, sb) in scales.items():
        try:
            t = bd.median_time(lambda sa=sa, sb=sb: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16),
                                device, reps=10)
            rates[name] = 2 * m**3 / t
        except (RuntimeError, NotImplementedError) as e:  # no FP8 GEMM on this device / build
            rates[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
    return rates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    p.add_argument("--formats", default="bf16,fp8", help="which weight formats to run, in order")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--profile", action="store_true", help="torch.profiler tables (decode 1 and 64, prefill)")
    p.add_argument("--defaults-batches", default="1,64",
                   help="also time these batches through LLM.generate with every engine setting at its default "
                        "('' = skip)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", str(bd.ROOT / "benchmarks" / "out")))
    p.add_argument("--results-md", default=None, help="append the report to this markdown file")
    return p.parse_args(argv)


def decode_args(args, fmt: str) -> argparse.Namespace:
    """bench_decode's arguments for one format (no transformers baseline)."""
    ns = bd.parse_args(["--device", args.device, "--batches", args.batches, "--prompt-len", str(args.prompt_len),
                        "--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len),
                        "--eager-steps", "2", "--hf-batches", "",
                        "--profile-batches", args.batches if args.profile else ""]
                       + (["--tiny"] if args.tiny else []) + (["--profile-prefill"] if args.profile else []))
    ns.quantization = "fp8" if fmt == "fp8" else None
    return ns


def report(args, results: dict, bw: float, flops: float, fp8_rates: dict, device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    commit = bd.commit()

    def rate(x):
        return f"{x / 1e12:.0f} TFLOP/s" if isinstance(x, float) else str(x)

    lines = [
        f"## FP8 vs BF16 | {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | {gpu} | commit {commit} | "
        f"torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/bench_fp8.py {' '.join(sys.argv[1:])}` "
        f"({'tiny config' if args.tiny else 'LongCat-Flash-2L'}, dummy weights, prompt {args.prompt_len}).",
        f"Ceilings in this run: copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s, FP8 _scaled_mm "
        f"tensor-wise {rate(fp8_rates.get('tensorwise'))}, row-wise {rate(fp8_rates.get('rowwise'))}.",
        "",
        "| format | batch | engine ms/step | LLM defaults ms/step | runner ms | graph replay ms | floor ms | "
        "engine/floor | target ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, res in results.items():
        for bsz, r in res["decode"].items():
            target = TARGETS_MS.get(f"decode_{bsz}") if fmt == "fp8" else None
            replay = "-" if r["gpu_replay_ms"] is None else f"{r['gpu_replay_ms']:.2f}"
            dflt = res.get("defaults", {}).get(bsz)
            dflt = "-" if dflt is None else f"{dflt:.2f}"
            lines.append(f"| {fmt} | {bsz} | {r['engine_ms']:.2f} | {dflt} | {r['step_ms']:.2f} | {replay} | "
                         f"{r['floor_ms']:.2f} | {r['ratio']:.2f} | {target or '-'} |")
    lines.append("")
    for fmt, res in results.items():
        p = res["prefill"]
        fp8_tensorwise = fp8_rates.get("tensorwise")
        share_fp8 = (f", {100 * p['tflops'] * 1e12 / fp8_tensorwise:.0f}% of the FP8 rate"
                     if isinstance(fp8_tensorwise, float) else "")
        alone = p.get("gpu_alone")
        gpu_alone = (f"; the GPU alone {alone['gpu_alone_ms']:.1f} ms (queued behind a sleep kernel), the host's "
                     f"launches {alone['host_ms'].get('forward_ms', 0.0):.1f} ms" if alone else "")
        lines.append(f"Prefill {p['tokens']} tokens, {fmt}: {p['seconds'] * 1e3:.1f} ms, {p['tflops']:.0f} TFLOP/s = "
                     f"{100 * p['share_of_matmul']:.0f}% of the bf16 matmul rate{share_fp8}"
                     + (f" (target {TARGETS_MS['prefill']} ms)" if fmt == "fp8" else "") + gpu_alone + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    raw = bd.TINY if args.tiny else bd.FULL_2L
    device = torch.device(args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bw, flops = bd.measure_ceilings(device, args.tiny)
    fp8_rates = fp8_matmul_rates(device, args.tiny)
    print(f"ceilings: copy {bw / 1e12:.3f} TB/s, bf16 matmul {flops / 1e12:.1f} TFLOP/s, fp8 {fp8_rates}", flush=True)
    results = {}
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        if fmt not in ("bf16", "fp8"):
            raise SystemExit(f"--formats: unknown format {fmt!r} (bf16, fp8)")
        print(f"=== {fmt} ===", flush=True)
        results[fmt] = bd.bench_ours(decode_args(args, fmt), raw, device, bw, flops, out_dir)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if bd.ints(args.defaults_batches):  # what a user of LLM gets: every engine setting at its default
            llm = default_llm(raw, device, args.tiny, quantization="fp8" if fmt == "fp8" else None)[0]
            results[fmt]["defaults"] = defaults_decode_ms(llm, raw, bd.ints(args.defaults_batches), args.prompt_len,
                                                          args.new_tokens, device)
            del llm
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = report(args, results, bw, flops, fp8_rates, device)
    (out_dir / "bench_fp8.json").write_text(json.dumps({"results": results, "copy_Bps": bw, "matmul_flops": flops,
                                                        "fp8_matmul_flops": fp8_rates}, indent=1, default=str))
    if args.results_md:
        with open(args.results_md, "a") as fh:
            fh.write("\n" + text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
