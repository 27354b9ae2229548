"""Decode / prefill benchmark of LongCat-Flash-2L (the real config, 2 layers, dummy weights) against its
memory-bandwidth floor and transformers.

    python benchmarks/bench_decode.py                       # H200: ours (graphs + eager), floors, defaults column,
                                                            # transformers
    python benchmarks/bench_decode.py --device cpu --tiny   # smoke test of the same code on a tiny config
    python benchmarks/bench_decode.py --public-api-defaults # LLM.generate with every engine default (what a user gets)

Ours runs through engine.ModelRunner.execute (CUDA-graph replay for decode, sampler read-back included);
the transformers baseline runs in a child process after our model is freed (two 2-layer full-width models do
not fit together). The floor of a decode step is the bytes it must read (the experts its router actually
hit, attention, dense MLPs, router, lm_head, KV cache) over the device-to-device copy bandwidth measured here.
Ours runs with the engine settings it prints (those that differ from the defaults); the defaults column times
LLM.generate with every setting at its default (public_api.py). The floors: decode_driver.decode_floor_bytes and
prefill_flops (unit-tested in tests/test_bench_floors.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported as a package
from decode_driver import (  # noqa: E402  (re-exported: tests import the floors from here)
    FULL_2L,
    TINY,
    Driver,
    RouterProbe,
    decode_floor_bytes,
    gpu_alone_prefill,
    param_bytes,
    prefill_flops,
    profile_decode,
    traced_prefill,
)
from harness import (  # noqa: E402
    ROOT,
    commit,
    engine_decode_ms,
    fmt,
    gpu_timeline,
    ints,
    measure_ceilings,
    median_time,
    non_default_settings,
    profile_step,
    sync,
)
from hf_baseline import run_hf_child  # noqa: E402
from public_api import bench_public_api_defaults, default_llm, defaults_decode_ms  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--eager-steps", type=int, default=6, help="eager decode steps per batch (0 = skip)")
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--hf-batches", default="1,64", help="transformers baseline batches ('' = skip)")
    p.add_argument("--hf-steps", type=int, default=10, help="timed transformers decode steps (after the warm-up)")
    p.add_argument("--hf-warmup", type=int, default=3, help="untimed transformers decode steps first")
    p.add_argument("--defaults-batches", default="1,64",
                   help="also time these batches with every engine setting at its default, through LLM.generate: "
                        "(t(new tokens) - t(1)) / (new tokens - 1) ('' = skip)")
    p.add_argument("--profile-batches", default="1,64", help="torch.profiler tables for these batches")
    p.add_argument("--profile-prefill", action="store_true", help="torch.profiler table of one prefill")
    p.add_argument("--out-dir", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "out")))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--public-api-defaults", action="store_true",
                   help="only time LLM.generate (a --prefill-len prompt, then a short decode) with every engine "
                        "setting at its default, on benchmarks/configs/longcat-flash-2l (or --tiny), dummy bf16")
    return p.parse_args(argv)


# ---- our model ----------------------------------------------------------------------------------------
def bench_ours(args, raw: dict, device: torch.device, ceil_bw: float, ceil_flops: float, out_dir: Path) -> dict:
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.engine.llm_engine import LLMEngine

    batches = ints(args.batches)
    cap = args.new_tokens + args.eager_steps + 2
    seq_blocks = -(-(args.prompt_len + cap) // 16)
    num_blocks = max(batches) * seq_blocks + -(-(args.prefill_len + 2) // 16) + 8
    tmp = Path(tempfile.mkdtemp(prefix="lc2l_"))
    (tmp / "config.json").write_text(json.dumps(dict(raw, model_type="longcat_flash")))
    eargs = EngineArgs(model=str(tmp), dtype="bfloat16", device=str(device), load_format="dummy", block_size=16,
                       quantization=getattr(args, "quantization", None),
                       num_kv_blocks=num_blocks, max_num_seqs=max(batches),
                       max_model_len=max(args.prompt_len + cap, args.prefill_len + 2) + 16)
    t0 = time.perf_counter()
    # The LLMEngine owns the runner: the Driver below times the runner alone, engine_decode_ms the whole engine
    # loop (scheduler, overlap, async scheduling) on the same model. Prefix caching off: both share the blocks.
    eargs = dataclasses.replace(eargs, enable_prefix_caching=False,
                                max_num_batched_tokens=16384)
    engine = LLMEngine(eargs)
    runner = engine.runner
    settings = non_default_settings(eargs)
    print("engine settings that differ from the defaults: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
          flush=True)
    print(f"model ready in {time.perf_counter() - t0:.1f}s; graphs: {runner.graph_runner is not None}", flush=True)
    model, drv = runner.model, Driver(runner, 16)
    with torch.no_grad():
        # The dummy correction bias, N(0, 0.01), dwarfs softmax probabilities of ~1/768, so every token would
        # pick the same experts; the real bias balances load. Zero bias spreads tokens like spec §4's D(B).
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.zero_()
    pb = param_bytes(model)
    gen = torch.Generator().manual_seed(0)
    res: dict = {"decode": {}, "prefill": None, "non_default_settings": settings}
    profile_set = set(ints(args.profile_batches))

    # prefill first, in the fresh process: one prompt of prefill_len tokens, one chunk (3 timed runs)
    times, probe_slots = [], None
    for rep in range(4):
        prompt = torch.randint(3, raw["vocab_size"], (args.prefill_len,), generator=gen).tolist()
        seq = drv.new_seq(prompt, 1)
        if rep == 0:
            with RouterProbe(model) as probe:
                drv.prefill([seq], max_tokens=args.prefill_len)
            probe_slots = probe.real_slots
        else:
            sync(device)
            t0 = time.perf_counter()
            drv.prefill([seq], max_tokens=args.prefill_len)
            times.append(time.perf_counter() - t0)
        drv.release([seq])
    # host phases of a prefill (engine/step_trace.py marks; median of 3 unprofiled runs): where the time outside
    # the GPU's kernel window goes (prepare before the first copy, readback after the last)
    prompt = torch.randint(3, raw["vocab_size"], (args.prefill_len,), generator=gen).tolist()
    phase_runs = []
    for _ in range(3):
        seq = drv.new_seq(prompt, 1)
        phase_runs.append(traced_prefill(drv, seq, lambda: sync(device)))
        drv.release([seq])
    prefill_phases = {k: statistics.median(r.get(k, 0.0) for r in phase_runs) for k in phase_runs[0]}
    print(f"prefill host phases ms (median of 3): {json.dumps(prefill_phases)}", flush=True)
    gpu_alone = None
    if device.type == "cuda":
        # the same prefill with the host's launches hidden behind a sleep kernel (median of 3): the GPU's share
        runs = []
        for _ in range(3):
            seq = drv.new_seq(prompt, 1)
            runs.append(gpu_alone_prefill(drv, seq))
            drv.release([seq])
        gpu_alone = sorted(runs, key=lambda r: r["gpu_alone_ms"])[1]
        print(f"prefill behind a sleep kernel (GPU alone, host phases): {json.dumps(gpu_alone)}", flush=True)
        phases_profiled: dict = {}
        seq = drv.new_seq(prompt, 1)
        prefill_gpu = gpu_timeline(lambda: phases_profiled.update(traced_prefill(drv, seq, lambda: None)), device,
                                   save_trace=out_dir / "prefill_gpu_timeline_trace.json")
        drv.release([seq])
        prefill_gpu["host_phases_ms"] = phases_profiled
        print(f"prefill GPU timeline: {json.dumps(prefill_gpu)}", flush=True)
        # and where the host spends the call (cProfile: slows Python, so only for the ranking)
        import cProfile
        import io
        import pstats

        seq = drv.new_seq(prompt, 1)
        sync(device)
        host_prof = cProfile.Profile()
        host_prof.enable()
        drv.prefill([seq], max_tokens=args.prefill_len)
        host_prof.disable()
        drv.release([seq])
        text = io.StringIO()
        pstats.Stats(host_prof, stream=text).sort_stats("tottime").print_stats(30)
        (out_dir / "prefill_host_profile.txt").write_text(text.getvalue())
    else:
        prefill_gpu = None
    if args.profile_prefill:
        prompt = torch.randint(3, raw["vocab_size"], (args.prefill_len,), generator=gen).tolist()
        seq = drv.new_seq(prompt, 1)
        table = profile_step(lambda: drv.prefill([seq], max_tokens=args.prefill_len), out_dir / "profiles.txt",
                             f"prefill of {args.prefill_len} tokens", rows=60)
        print(f"--- prefill {args.prefill_len}: top kernels ---\n{table}", flush=True)
        drv.release([seq])
    s = args.prefill_len
    flops = prefill_flops(pb, raw, s, sum(probe_slots))
    t = statistics.median(times)
    res["prefill"] = {"tokens": s, "seconds": t, "tokens_per_s": s / t, "tflops": flops / t / 1e12,
                      "share_of_matmul": flops / t / ceil_flops, "gpu_timeline": prefill_gpu,
                      "host_phases_ms": prefill_phases, "gpu_alone": gpu_alone,
                      "all_seconds": times}
    print(f"prefill: {json.dumps(res['prefill'])}", flush=True)

    for bsz in batches:
        prompts = torch.randint(3, raw["vocab_size"], (bsz, args.prompt_len), generator=gen).tolist()
        seqs = [drv.new_seq(p, cap) for p in prompts]
        drv.prefill(seqs, max_tokens=16384)
        eager_times, distinct = [], []
        if args.eager_steps:
            saved, runner.graph_runner = runner.graph_runner, None
            for _ in range(args.eager_steps):
                with RouterProbe(model) as probe:
                    eager_times.append(drv.decode(seqs))
                distinct.append(probe.distinct)
            runner.graph_runner = saved
        step_times = [drv.decode(seqs) for _ in range(args.new_tokens)]
        timed = step_times[3:] if len(step_times) > 6 else step_times  # the first steps capture the graph
        gpu_ms = None
        gr = runner.graph_runner
        if gr is not None:
            from longcat_service.engine.cuda_graph_runner import bucket_for

            graph = gr.graphs[bucket_for(bsz, gr.buckets)]
            gpu_ms = median_time(graph.replay, device, reps=20) * 1e3
        # floor: bytes of this step (KV read at the median step's length)
        kv_tokens = sum(s.num_tokens for s in seqs) - bsz * (len(step_times) // 2)
        hit = statistics.median(sum(d) for d in distinct) if distinct else float("nan")
        floor_bytes = decode_floor_bytes(pb, hit, kv_tokens, raw)
        floor_ms = floor_bytes / ceil_bw * 1e3
        step_ms = statistics.median(timed) * 1e3
        drv.release(seqs)
        seqs = []
        phases: dict[str, float] = {}
        engine_ms = engine_decode_ms(engine, prompts, args.new_tokens, phases)
        res["decode"][bsz] = {
            "engine_ms": engine_ms, "engine_phases_ms": phases, "step_ms": step_ms,
            "gpu_replay_ms": gpu_ms,
            "eager_ms": statistics.median(eager_times[1:] or eager_times) * 1e3 if eager_times else None,
            "experts_hit_per_layer": [statistics.median(x) for x in zip(*distinct, strict=True)] if distinct else None,
            "floor_gb": floor_bytes / 1e9, "floor_ms": floor_ms, "ratio": engine_ms / floor_ms,
        }
        print(f"batch {bsz}: {json.dumps(res['decode'][bsz])}", flush=True)
        if bsz in profile_set:  # after every timing of this batch: the profiler leaves CUDA launches slower
            profile_decode(drv, runner, prompts, cap, bsz, out_dir / "profiles.txt", device)

    return res  # the caller frees the model (gc + empty_cache) before the transformers child starts


# ---- report -------------------------------------------------------------------------------------------
def report(args, ours: dict, hf: dict | None, bw: float, flops: float, device: torch.device,
           defaults: dict[int, float] | None = None) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | {gpu} | commit {commit()} | torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/bench_decode.py {' '.join(sys.argv[1:])}`"
        f" ({'tiny config' if args.tiny else 'LongCat-Flash-2L'}, dummy bf16 weights, prompt {args.prompt_len},"
        f" {args.new_tokens} new tokens, ignore_eos).",
        f"Measured ceilings: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s.",
        "Engine settings of the tuned run that differ from the defaults: "
        + (", ".join(f"{k}={v}" for k, v in ours.get("non_default_settings", {}).items()) or "none") + ".",
        "Defaults column: every engine setting at its default, through LLM.generate: (t(n tokens) - t(1)) / (n - 1)"
        + (f", n = {args.new_tokens}." if defaults else " (not run)."),
        f"transformers: median of {args.hf_steps} decode steps after {args.hf_warmup} warm-up steps." if hf else
        "transformers: not run.",
        "",
        "| batch | ours ms/step (engine) | defaults ms/step (LLM) | runner execute ms | graph replay ms | eager ms "
        "| floor ms | ours/floor | experts hit/layer | transformers ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    for bsz, r in ours["decode"].items():
        hf_ms = (hf or {}).get("decode", {}).get(str(bsz)) or (hf or {}).get("decode", {}).get(bsz)
        lines.append(f"| {bsz} | {fmt(r.get('engine_ms'))} | {fmt((defaults or {}).get(bsz))} | {r['step_ms']:.2f} | {fmt(r['gpu_replay_ms'])} | {fmt(r['eager_ms'])} | "
                     f"{r['floor_ms']:.2f} | {r['ratio']:.2f} | {fmt(r['experts_hit_per_layer'], '{}')} | {fmt(hf_ms)} |")
    for bsz in sorted(set(defaults or {}) - set(ours["decode"])):  # --defaults-batches outside --batches
        lines.append(f"| {bsz} | - | {defaults[bsz]:.2f} | - | - | - | - | - | - | - |")
    p = ours["prefill"]
    lines += ["", f"Prefill {p['tokens']} tokens: {p['tokens_per_s']:.0f} tokens/s, {p['tflops']:.0f} TFLOP/s = "
                  f"{100 * p['share_of_matmul']:.0f}% of the measured bf16 matmul rate."]
    if hf:
        lines.append(f"transformers {hf['transformers']} (its own LongcatFlashForCausalLM, bf16, random weights).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    raw = TINY if args.tiny else FULL_2L
    device = torch.device(args.device)
    if args.public_api_defaults:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        res = bench_public_api_defaults(args, raw, device)
        (out_dir / "bench_public_api_defaults.json").write_text(json.dumps(res, indent=1))
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bw, flops = measure_ceilings(device, args.tiny)
    print(f"ceilings: copy {bw / 1e12:.3f} TB/s, bf16 matmul {flops / 1e12:.1f} TFLOP/s", flush=True)
    ours = bench_ours(args, raw, device, bw, flops, out_dir)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        print(f"GPU memory still allocated before transformers: {torch.cuda.memory_allocated() / 1e9:.2f} GB")
    defaults = None
    if ints(args.defaults_batches):
        llm = default_llm(raw, device, args.tiny)[0]
        defaults = defaults_decode_ms(llm, raw, ints(args.defaults_batches), args.prompt_len, args.new_tokens, device)
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    hf = (run_hf_child(args.device, args.hf_batches, args.prompt_len, args.hf_steps, args.tiny, args.hf_warmup)
          if args.hf_batches else None)
    text = report(args, ours, hf, bw, flops, device, defaults)
    (out_dir / "bench_decode.json").write_text(json.dumps({"ours": ours, "defaults": defaults, "hf": hf,
                                                            "copy_Bps": bw, "matmul_flops": flops}, indent=1))
    with open(args.results_md, "a") as fh:
        fh.write("\n" + text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
