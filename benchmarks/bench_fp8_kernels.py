"""Block-FP8 kernels on one GPU against the bf16 kernels they replace and torch's blockwise scaled-mm.

    python benchmarks/bench_fp8_kernels.py [--sections rates,dense,dense_decode,experts,grouped] [--reps 20]
        [--out fp8.json] [--splitk auto,0,1,3,mma] [--sweep-batches 8,16,64,128]
        [--configs all|variants|base|N | --config-list 'c1;c2'] [--tokens 4096[,1024,...]] [--no-fusion]
        [--dense-rows 16,32,64,128] [--dense-configs sweep|default|'bn,split,stages,warps[,swap][,tma][,fuse];...']

dense_decode: the Triton split-K w8a8 GEMM (kernels/fp8_splitk.py, incl. the activation quantization) against
kernels/fp8_gemm.w8a8_linear (quantization + cuBLAS blockwise scaled-mm, what fp8_linear runs above DECODE_ROWS
where SHAPE_CONFIGS has no entry) and the byte floor (weight + scale + x + y bytes / the measured copy
rate), on the LongCat-Flash-2L dense shapes (DENSE_SHAPES, each 4 times a decode step: 2 layers x 2 sublayers) at
--dense-rows rows: split-K at its default config (fp8_splitk.config_for) and, with --dense-configs sweep (the
default), fp8_splitk.SWEEP_CONFIGS at their auto split plus the default config at half and double its split (or a
';'-list of configs, each at every shape and row count). Then the step table (the 20 linears: floor, cuBLAS,
split-K default, split-K best per shape), the largest row count up to which split-K beats cuBLAS on the step (for
LONGCAT_FP8_SPLITK_MAX_ROWS) and the SHAPE_CONFIGS entries to paste where a shape's fastest config beats cuBLAS
by more than 3% (the dispatch takes split-K on those shapes only).

dense: LongCat-Flash's dense projections (N x K) at M = 1, 2, 4, 8, 16, 64 (decode) and 4096 (prefill) rows. ours =
ops.fp8.fp8_linear, the layers' dispatch (CUDA dense_gemv_fp8 up to DECODE_ROWS rows, else kernels/fp8_gemm.w8a8_linear:
torch's blockwise scaled-mm where it takes the shape, else the Triton w8a8 GEMM, incl. the activation quantization);
At M <= DECODE_ROWS the CUDA dense_gemv_fp8 alone is also timed under each --splitk setting (auto = its default
rule; FMA kernels with LONGCAT_FP8_GEMV_SPLITK: 0 = the plain kernel, 1 = its split-K rule, 2..8 = K split that
many ways; mma = LONGCAT_FP8_GEMV_MMA=1, the tensor-core kernel; a second table).
w8a8 = the Triton w8a8 GEMM at every M (to place the thresholds); bf16 = the bf16
path today (dense_gemv up to 8 rows, else F.linear); scaled_mm = quantization + torch's blockwise scaled-mm (where
this torch has it). experts: the routed experts of one layer, E = 512, H = 6144, I = 2048 (TP1) and 256 (a TP8
shard), LongCat-like routing (~1/3 of slots on zero experts), B = 1 .. 256 (decode) and 4096 (prefill: w8a8 grouped
FP8 GEMM): ours = the dispatch (ops/extension.expert_ffn_fp8), against expert_ffn with bf16 weights and, up to
B = 256, both decode kernels forced: cuda = the CUDA expert_ffn_fp8 (2-row FMA passes; the tensor-core
expert_ffn_fp8_mma.cuh for I <= 512 from 16 tokens), triton = kernels/fp8_expert_decode.py at its default configs
(each active expert's weights read once for up to 16 rows). At I = 2048 and B = 8, 16, 64, 128 every Triton decode
config (SWEEP_CONFIGS) is timed on each launch alone (gate_up = SwiGLU, down) against that launch's byte floor, and
the whole FFN with the fastest pair: the numbers that set its defaults and
ops/extension.TRITON_FP8_DECODE_MIN_TOKENS. grouped: grouped FP8 GEMM configs (default
every one of fp8_gemm.ALL_GROUPED_CONFIGS) at the prefill shapes of
--tokens prompts (default 4096: ~64 rows per expert) against the bf16 Triton grouped GEMM, each with its fraction
of the copy floor and the fastest per GEMM at the end; then (unless --no-fusion) the activation quantization of
that prefill (kernels/moe_fp8_quant.py): gather_quant_fp8 against gather_expert_rows + per_token_group_quant_fp8 and
silu_mul_quant_fp8 against silu_and_mul + per_token_group_quant_fp8 (fused at the default and a few other tiles;
byte floor = the fused kernel's bytes: bf16 in once, e4m3 + scales out), and the whole routed-expert FFN
(ops/extension._expert_ffn_grouped_fp8, fused) against the same path with the unfused pairs.
Each timing is a CUDA graph of several calls cycling through weight copies / routings so that weights stream from
HBM, timed with CUDA events (median). byte floor = bytes moved / device copy rate; FLOP floor = FLOPs / FP8 matmul
rate (torch._scaled_mm, tensor-wise e4m3, 8192^3), both measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from bench_moe import _time, graph_of, measure_copy_tbps, measure_matmul_tflops  # noqa: E402

import longcat_service.ops as ops  # noqa: E402
from longcat_service.ops import fp8 as fp8_ops  # noqa: E402  (the layers' FP8 dispatch)
from longcat_service.ops.testing import make_router_inputs  # noqa: E402

FP8 = torch.float8_e4m3fn
DENSE_SHAPES = {  # (N, K) of LongCat-Flash (benchmarks/configs/longcat-flash-2l)
    "q_a_kv_a": (2176, 6144),  # fused q_a (1536) + kv_a (512 + 64), zero rows up to whole blocks (mla_attention)
    "q_b": (12288, 1536),  # 64 heads x 192
    "o_proj": (6144, 8192),  # 64 heads x 128
    "dense_gate_up": (24576, 6144),  # 2 x 12288
    "dense_down": (6144, 12288),
}
BATCHES = (1, 2, 4, 8, 16, 64, 4096)
E, Z, H, TOP_K = 512, 256, 6144, 12
EXPERT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 4096)
TRITON_DECODE_MAX_BATCH = 256  # the decode kernels are timed up to here (4096: the grouped FP8 GEMM regime)
SWEEP_INTERS, SWEEP_BATCHES = (2048,), (8, 16, 64, 128)  # where every Triton decode config is timed
CALLS = 8  # calls per timed graph
ROTATION_BYTES = 256 * 1024**2


def measure_fp8_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda").to(FP8)
    b = torch.randn(8192, 8192, device="cuda").to(FP8)
    one = torch.ones((), device="cuda")
    fn = lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    return 2 * 8192**3 / statistics.median(_time(fn, reps=20)) / 1e6


def random_fp8(shape, seed, device="cuda"):
    """Random finite e4m3 bytes (no NaN encodings), generated on the device in place."""
    g = torch.Generator(device=device).manual_seed(seed)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)
    return raw.bitwise_and_(0xF7).view(FP8)  # clearing bit 3 keeps the exponent below the NaN pattern S.1111.111


def scales_for(w8, value=1.0 / 64):
    n, k = w8.shape[-2:]
    return torch.full((*w8.shape[:-2], -(-n // 128), -(-k // 128)), value, device=w8.device)


def timed(fn_calls, reps):
    """Median time per call of a graph of len(fn_calls) calls (us), or None with the error if it cannot run."""
    def run():
        for f in fn_calls:
            f()
    try:
        graph = graph_of(run)
        return statistics.median(_time(graph.replay, reps)) / len(fn_calls), None
    except Exception as exc:  # e.g. torch without blockwise scaled-mm: reported, not fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def _quant_scaled_mm(x, w8, scale):
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8, scaled_mm_blockwise

    x8, xs = per_token_group_quant_fp8(x)
    return scaled_mm_blockwise(x8, xs, w8, scale)


SPLITK_MAX_ROWS = fp8_ops.DECODE_ROWS  # fp8_linear's GEMV rows
SPLITK_SETTINGS = "auto,0,1,3,mma"


def gemv_variant_env(setting):
    """--splitk setting -> the switches: auto = the kernel's default rule (tensor cores from 3 rows and for short K,
    else the FMA kernels with their split rule); mma = LONGCAT_FP8_GEMV_MMA=1; else the FMA kernels with
    LONGCAT_FP8_GEMV_SPLITK=setting."""
    if setting == "auto":
        return {"LONGCAT_FP8_GEMV_MMA": "auto", "LONGCAT_FP8_GEMV_SPLITK": "1"}
    mma = setting == "mma"
    return {"LONGCAT_FP8_GEMV_MMA": "1" if mma else "0", "LONGCAT_FP8_GEMV_SPLITK": "0" if mma else setting}


@contextlib.contextmanager
def _env(values):
    """The variables set for the block (the C++ op reads them at each call, i.e. at graph capture)."""
    saved = {name: os.environ.pop(name, None) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def bench_dense(copy_tbps, fp8_tflops, reps, splitk_settings=()):
    from longcat_service.kernels.fp8_gemm import w8a8_block_gemm
    from longcat_service.ops import extension

    rows = []
    for name, (n, k) in DENSE_SHAPES.items():
        copies = max(2, math.ceil(ROTATION_BYTES / (n * k)))
        w8s = [random_fp8((n, k), seed=i) for i in range(copies)]
        scale = scales_for(w8s[0], 1.0 / (64 * k**0.5))
        w16s = [w.to(torch.bfloat16) for w in w8s[: max(2, copies // 2)]]
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            cyc = copies if m <= 64 else 1
            ours, _ = timed([functools.partial(fp8_ops.fp8_linear, x, w, scale) for w in w8s[:cyc]], reps)
            splitk = {}
            if m <= SPLITK_MAX_ROWS:  # the CUDA dense_gemv_fp8 under each LONGCAT_FP8_GEMV_SPLITK setting
                for setting in splitk_settings:
                    with _env(gemv_variant_env(setting)):
                        splitk[setting], _ = timed([functools.partial(torch.ops.longcat.dense_gemv_fp8, x, w, scale)
                                                    for w in w8s[:cyc]], reps)
            w8a8, _ = timed([functools.partial(w8a8_block_gemm, x, w, scale) for w in w8s[:cyc]], reps)
            bf16_fn = extension.dense_gemv if m <= 8 else F.linear
            bf16, _ = timed([functools.partial(bf16_fn, x, w) for w in w16s[: min(cyc, len(w16s))]], reps)
            smm, smm_err = timed([functools.partial(_quant_scaled_mm, x, w, scale) for w in w8s[:cyc]], reps)
            bytes_moved = n * k + scale.numel() * 4 + m * k * 2 + m * n * 2
            row = {"shape": name, "N": n, "K": k, "M": m, "ours_us": ours, "w8a8_us": w8a8, "bf16_us": bf16,
                   "scaled_mm_us": smm, "scaled_mm_error": smm_err, "splitk_us": splitk,
                   "byte_floor_us": bytes_moved / (copy_tbps * 1e6),
                   "flop_floor_us": 2 * m * n * k / (fp8_tflops * 1e6)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        w8s = w16s = None
        torch.cuda.empty_cache()
    return rows


DENSE_DECODE_ROWS = (16, 32, 64, 128)
DENSE_PER_STEP = 4  # each dense shape runs 2 layers x 2 sublayers times in a LongCat-Flash-2L decode step


def dense_decode_candidates(rows: int, n: int, k: int, spec: str = "sweep", sms: int = 132):
    """The split-K configs timed beside the default at (rows, n, k), splits resolved (fp8_splitk.resolve_split), the
    default's left out: 'default' none; 'sweep' SWEEP_CONFIGS at their auto split and the default at half and
    double its split; else a ';'-list of config strings (split 0: auto)."""
    import dataclasses

    from longcat_service.kernels import fp8_splitk as fs

    default = fs.config_for(rows, n, k, sms)
    if spec == "default":
        listed = []
    elif spec == "sweep":
        listed = list(fs.SWEEP_CONFIGS) + [dataclasses.replace(default, split=max(1, default.split // 2)),
                                           dataclasses.replace(default, split=min(fs.MAX_SPLIT, default.split * 2))]
    else:
        listed = [fs.parse_splitk_config(c) for c in spec.split(";") if c.strip()]
    out = []
    for cfg in listed:
        split = cfg.split or fs.auto_split(n, k, cfg.block_n, sms)
        cfg = dataclasses.replace(cfg, split=fs.resolve_split(k, split)[0])
        if cfg != dataclasses.replace(default, split=fs.resolve_split(k, default.split)[0]) and cfg not in out:
            out.append(cfg)
    return out


def bench_dense_decode(copy_tbps, reps, rows_list=DENSE_DECODE_ROWS, spec="sweep", shapes=None, device="cuda"):
    """Per (shape, rows): cuBLAS w8a8_linear, split-K at its default config and the candidates, the byte floor.
    shapes / device: DENSE_SHAPES on CUDA; the CPU test passes tiny shapes and the CPU (kernels in the interpreter)."""
    import dataclasses

    from longcat_service.kernels import fp8_splitk as fs
    from longcat_service.kernels.fp8_gemm import w8a8_linear

    sms = fs.sm_count(torch.device(device))
    rows_out = []
    for name, (n, k) in (shapes or DENSE_SHAPES).items():
        copies = max(2, math.ceil(ROTATION_BYTES / (n * k)))
        w8s = [random_fp8((n, k), seed=i, device=device) for i in range(copies)]
        scale = scales_for(w8s[0], 1.0 / (64 * k**0.5))
        for m in rows_list:
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            default = fs.config_for(m, n, k, sms)
            cublas, cublas_err = timed([functools.partial(w8a8_linear, x, w, scale) for w in w8s], reps)
            splitk, splitk_err = timed([functools.partial(fs.w8a8_splitk_linear, x, w, scale) for w in w8s], reps)
            variants = {}
            for cfg in dense_decode_candidates(m, n, k, spec, sms):
                t, err = timed([functools.partial(fs.w8a8_splitk_linear, x, w, scale, cfg) for w in w8s], reps)
                variants[str(cfg)] = t if err is None else err
            bytes_moved = n * k + scale.numel() * 4 + m * k * 2 + m * n * 2
            row = {"shape": name, "N": n, "K": k, "M": m, "block_m": fs.block_m_for(m),
                   "default_config": str(dataclasses.replace(default, split=fs.resolve_split(k, default.split)[0])),
                   "cublas_us": cublas, "cublas_error": cublas_err, "splitk_us": splitk, "splitk_error": splitk_err,
                   "variants_us": variants, "byte_floor_us": bytes_moved / (copy_tbps * 1e6)}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        w8s = None
        torch.cuda.empty_cache()
    return rows_out


def _best_splitk(r):
    """(config, us) of the fastest split-K timing of a dense_decode row (default or candidate), (None, None) if none."""
    timings = {r["default_config"]: r["splitk_us"]} if isinstance(r["splitk_us"], float) else {}
    timings.update({c: t for c, t in r["variants_us"].items() if isinstance(t, float)})
    if not timings:
        return None, None
    best = min(timings, key=timings.get)
    return best, timings[best]


def _step_total(group, key_fn):
    """The decode step's time of the dense linears (each shape DENSE_PER_STEP times), None if one is missing."""
    vals = [key_fn(r) for r in group]
    return DENSE_PER_STEP * sum(vals) if vals and all(isinstance(v, float) for v in vals) else None


SHAPE_EXCEPTION_GAIN = 0.03  # a shape's fastest config is a SHAPE_CONFIGS entry when this much faster than cuBLAS


def print_dense_decode(rows, copy_tbps):
    def frac(floor, t):
        return f"{floor / t:.2f}" if isinstance(t, float) and t > 0 else "-"

    print(f"\ndense decode (split-K w8a8 Triton vs w8a8 cuBLAS), copy rate {copy_tbps:.2f} TB/s; frac = byte floor / "
          "time; configs 'block_n,split,stages,warps[,swap][,tma][,fuse]'")
    print(f"{'shape':>14} {'N x K':>12} {'M':>4} {'floor':>9} {'cuBLAS':>9} {'frac':>5} {'split-K':>9} {'frac':>5} "
          f"{'default':>16} {'best':>9} {'frac':>5} {'best config':>16}  other candidates")
    for r in rows:
        cfg, best = _best_splitk(r)
        others = " ".join(f"{c}:{_fmt(t).strip()}" if isinstance(t, float) else f"{c}:error"
                          for c, t in r["variants_us"].items())
        err = r.get("splitk_error") or r.get("cublas_error")
        print(f"{r['shape']:>14} {r['N']:>5}x{r['K']:<6} {r['M']:>4} {_fmt(r['byte_floor_us'])} "
              f"{_fmt(r['cublas_us'])} {frac(r['byte_floor_us'], r['cublas_us']):>5} {_fmt(r['splitk_us'])} "
              f"{frac(r['byte_floor_us'], r['splitk_us']):>5} {r['default_config']:>16} {_fmt(best)} "
              f"{frac(r['byte_floor_us'], best):>5} {cfg or '-':>16}  {others}{'  ' + err if err else ''}")
    by_rows = {}
    for r in rows:
        by_rows.setdefault(r["M"], []).append(r)
    print(f"\n{'step (20 linears)':>18} {'rows':>4} {'floor':>9} {'cuBLAS w8a8':>11} {'split-K':>9} {'best':>9} "
          f"{'frac cuBLAS':>11} {'frac split-K':>12} {'frac best':>9}")
    bounds = {"default": [0, False], "best": [0, False]}  # (largest row count so far, lost once)
    for m, group in sorted(by_rows.items()):
        floor, cublas, splitk = (_step_total(group, lambda r, key=key: r[key]) for key in
                                 ("byte_floor_us", "cublas_us", "splitk_us"))
        best = _step_total(group, lambda r: _best_splitk(r)[1])
        print(f"{'':>18} {m:>4} {_fmt(floor)} {_fmt(cublas, 11)} {_fmt(splitk)} {_fmt(best)} "
              f"{frac(floor, cublas):>11} {frac(floor, splitk):>12} {frac(floor, best):>9}")
        for name, t in (("default", splitk), ("best", best)):
            wins = t is not None and cublas is not None and t < cublas
            if wins and not bounds[name][1]:
                bounds[name][0] = m
            bounds[name][1] = bounds[name][1] or not wins
    for name, (max_rows, _) in bounds.items():
        print(f"split-K ({name} configs) beats cuBLAS on the step at every measured row count up to "
              f"{max_rows or 'none'} (-> LONGCAT_FP8_SPLITK_MAX_ROWS={max_rows})")
    winners = {}
    for r in rows:
        cfg, t = _best_splitk(r)
        if cfg is None or not isinstance(r["cublas_us"], float):
            continue
        key = (r.get("block_m", r["M"]), r["N"], r["K"])
        if key in winners and r["M"] <= winners[key][0]:
            continue  # the row tile's largest row count decides (the first shape of equal ones)
        winners[key] = (r["M"], cfg, t, r["cublas_us"], t < (1 - SHAPE_EXCEPTION_GAIN) * r["cublas_us"])
    print("SHAPE_CONFIGS = {  # (row tile, N, K): the fastest split-K config where it beats cuBLAS (us split-K / cuBLAS)")
    for (tile, n, k), (m, cfg, t, cublas, wins) in sorted(winners.items()):
        line = f'({tile}, {n}, {k}): parse_splitk_config("{cfg}"),  # {t:.1f} / {cublas:.1f} at {m} rows'
        print(f"    {line}" if wins else f"    # not faster: {line}")
    print("}")


def _routings(batch, num, seed):
    g = torch.Generator().manual_seed(seed)  # make_router_inputs draws on the CPU
    out = []
    for _ in range(num):
        logits, bias = make_router_inputs(batch, E, Z, zero_share="mixed", generator=g, device="cuda")
        ids, _, _ = torch.ops.longcat.router_topk(logits, bias, TOP_K, 6.0, E)
        offsets, sorted_slots, _, active, num_active = torch.ops.longcat.moe_align(ids, E)
        out.append((offsets, sorted_slots, active, num_active, int(num_active), int(offsets[-1])))
    return out


def bench_experts(copy_tbps, fp8_tflops, reps, inters=(2048, 256), sweep_batches=SWEEP_BATCHES):
    from longcat_service.kernels import fp8_expert_decode as fd
    from longcat_service.ops import extension

    rows = []
    for inter in inters:
        w13 = random_fp8((E, 2 * inter, H), seed=1)
        w2 = random_fp8((E, H, inter), seed=2)
        s13, s2 = scales_for(w13, 1.0 / (64 * H**0.5)), scales_for(w2, 1.0 / (64 * inter**0.5))
        w13b = torch.empty(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16)
        w2b = torch.empty(E, H, inter, device="cuda", dtype=torch.bfloat16)
        for e0 in range(0, E, 64):  # chunked: one full-size fp32 temporary would not fit
            w13b[e0:e0 + 64].copy_(w13[e0:e0 + 64].float() * (1.0 / (64 * H**0.5)))
            w2b[e0:e0 + 64].copy_(w2[e0:e0 + 64].float() * (1.0 / (64 * inter**0.5)))
        per_expert = 3 * H * inter
        for batch in EXPERT_BATCHES:
            routes = _routings(batch, CALLS if batch <= 64 else 2, seed=batch)
            hidden = torch.randn(batch, H, device="cuda").to(torch.bfloat16)
            ours, err = timed([functools.partial(extension.expert_ffn_fp8, hidden, w13, s13, w2, s2, r[0], r[1], TOP_K,
                                                 r[2], r[3]) for r in routes], reps)
            bf16, _ = timed([functools.partial(extension.expert_ffn, hidden, w13b, w2b, r[0], r[1], TOP_K, r[2], r[3])
                             for r in routes], reps)
            cuda = triton_us = triton_err = None
            if batch <= TRITON_DECODE_MAX_BATCH:  # the two decode kernels, whatever the dispatch picks
                cuda, _ = timed([functools.partial(torch.ops.longcat.expert_ffn_fp8, hidden, w13, s13, w2, s2, r[0],
                                                   r[1], TOP_K, r[2], r[3]) for r in routes], reps)
                triton_us, triton_err = timed([functools.partial(fd.expert_ffn_fp8_decode, hidden, w13, s13, w2, s2,
                                                                 r[0], r[1], TOP_K, r[2], r[3]) for r in routes], reps)
            active = statistics.mean(r[4] for r in routes)
            real_rows = statistics.mean(r[5] for r in routes)
            bytes_fp8 = active * per_expert + real_rows * (H + inter) * 2 * 2
            row = {"I": inter, "B": batch, "active_experts": active, "rows": real_rows, "ours_us": ours,
                   "ours_error": err, "cuda_decode_us": cuda, "triton_decode_us": triton_us,
                   "triton_error": triton_err, "bf16_us": bf16, "byte_floor_us": bytes_fp8 / (copy_tbps * 1e6),
                   "bf16_byte_floor_us": (active * per_expert * 2) / (copy_tbps * 1e6),
                   "flop_floor_us": 2 * real_rows * per_expert / (fp8_tflops * 1e6)}
            if inter in SWEEP_INTERS and batch in sweep_batches:
                row["sweep"] = sweep_decode_configs(hidden, w13, s13, w2, s2, routes, copy_tbps, reps)
            rows.append(row)
            print(json.dumps(row), flush=True)
        w13 = w2 = w13b = w2b = None
        torch.cuda.empty_cache()
    return rows


def sweep_decode_configs(hidden, w13, s13, w2, s2, routes, copy_tbps, reps):
    """Each Triton decode config on each of the two launches alone (us and fraction of that launch's byte floor),
    then the whole FFN with the fastest of each: the numbers that set DEFAULT_GATE_UP_CONFIG / DEFAULT_DOWN_CONFIG."""
    from longcat_service.kernels import fp8_expert_decode as fd

    inter = w2.shape[-1]
    active = statistics.mean(r[4] for r in routes)
    real_rows = statistics.mean(r[5] for r in routes)
    floors = {"gate_up": (active * 2 * inter * H + real_rows * (H + inter) * 2) / (copy_tbps * 1e6),
              "down": (active * H * inter + real_rows * (inter + H) * 2) / (copy_tbps * 1e6)}
    hs = [fd.swiglu_fp8_decode(hidden, w13, s13, r[0], r[1], TOP_K, r[2], r[3]) for r in routes]
    out = {"floor_us": floors, "gate_up": {}, "down": {}}
    for cfg in fd.SWEEP_CONFIGS:
        t, err = timed([functools.partial(fd.swiglu_fp8_decode, hidden, w13, s13, r[0], r[1], TOP_K, r[2], r[3],
                                          config=cfg) for r in routes], reps)
        out["gate_up"][str(cfg)] = t if err is None else err
        t, err = timed([functools.partial(fd.down_fp8_decode, h, w2, s2, r[0], r[2], r[3], config=cfg)
                        for h, r in zip(hs, routes, strict=True)], reps)
        out["down"][str(cfg)] = t if err is None else err
        print(f"  sweep I={inter} B={hidden.shape[0]} {str(cfg):>22}: gate_up {_fmt(out['gate_up'][str(cfg)])} "
              f"down {_fmt(out['down'][str(cfg)])} (floors {floors['gate_up']:.1f} / {floors['down']:.1f} us)",
              flush=True)
    best = {}
    for gemm in ("gate_up", "down"):
        timings = {c: t for c, t in out[gemm].items() if isinstance(t, float)}
        best[gemm] = min(timings, key=timings.get) if timings else None
    out["best"] = best
    if best["gate_up"] and best["down"]:
        gu, dn = fd.parse_config(best["gate_up"]), fd.parse_config(best["down"])
        out["best_ffn_us"], _ = timed([functools.partial(fd.expert_ffn_fp8_decode, hidden, w13, s13, w2, s2, r[0], r[1],
                                                         TOP_K, r[2], r[3], gu, dn) for r in routes], reps)
    return out


def grouped_configs(spec: str | None, config_list: str | None):
    """--configs N (the first N of fp8_gemm.ALL_GROUPED_CONFIGS), 'all' (every one; the default), 'variants'
    (VARIANT_CONFIGS) or 'base' (GROUPED_CONFIGS); --config-list 'c1;c2;...' (parse_fp8_config strings) instead."""
    from longcat_service.kernels import fp8_gemm as fg

    if config_list:
        return [fg.parse_fp8_config(c) for c in config_list.split(";") if c.strip()]
    named = {"all": fg.ALL_GROUPED_CONFIGS, "variants": fg.VARIANT_CONFIGS, "base": fg.GROUPED_CONFIGS}
    if spec is None or spec in named:
        return list(named[spec or "all"])
    return list(fg.ALL_GROUPED_CONFIGS[: int(spec)])


def bench_grouped(copy_tbps, fp8_tflops, reps, configs, token_counts=(4096,)):
    """Every config at the prefill GEMM shapes of each token count (LongCat routing: rows per expert ~ tokens *
    12 / 768, 16 at 1024 tokens, 64 at 4096, 512 at 32768); copy_frac = byte floor / time."""
    from longcat_service.kernels.fp8_gemm import grouped_gemm_fp8, per_token_group_quant_fp8
    from longcat_service.kernels.grouped_gemm import grouped_gemm

    inter = 2048
    rows = []
    for tokens in token_counts:
        routes = _routings(tokens, 1, seed=7)
        offsets, n_rows = routes[0][0], routes[0][5]
        rows_total = tokens * TOP_K
        for name, (n, k) in {"gate_up": (2 * inter, H), "down": (H, inter)}.items():
            w8 = random_fp8((E, n, k), seed=n)
            ws = scales_for(w8, 1.0 / (64 * k**0.5))
            wb = torch.empty(E, n, k, device="cuda", dtype=torch.bfloat16)
            for e0 in range(0, E, 64):
                wb[e0:e0 + 64].copy_(w8[e0:e0 + 64].float() * (1.0 / (64 * k**0.5)))
            x = torch.randn(rows_total, k, device="cuda").to(torch.bfloat16)
            x8, xs = per_token_group_quant_fp8(x)
            quant, _ = timed([functools.partial(per_token_group_quant_fp8, x)], reps)
            bf16, _ = timed([functools.partial(grouped_gemm, x, wb, offsets, tokens)], reps)
            floor_b = (E * n * k + n_rows * (k + 2 * n)) / (copy_tbps * 1e6)
            floor_f = 2 * n_rows * n * k / (fp8_tflops * 1e6)
            for cfg in configs:
                t, err = timed([functools.partial(grouped_gemm_fp8, x8, xs, w8, ws, offsets, tokens, config=cfg)], reps)
                row = {"gemm": name, "tokens": tokens, "N": n, "K": k, "rows": n_rows, "config": str(cfg),
                       "ours_us": t, "error": err, "quant_us": quant, "bf16_grouped_us": bf16,
                       "byte_floor_us": floor_b, "flop_floor_us": floor_f,
                       "copy_frac": floor_b / t if t else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
            w8 = wb = x = x8 = None
            torch.cuda.empty_cache()
    return rows


FUSED_TILES = ((4, 8, 4), (1, 16, 4), (2, 8, 4), (8, 4, 4), (16, 1, 4), (4, 16, 8))  # (block_m, groups, warps)


def _unfused_ffn(hidden, w13, s13, w2, s2, offsets, sorted_slots, tokens):
    """_expert_ffn_grouped_fp8 with the unfused gather / SwiGLU and quantization kernels (same GEMM configs)."""
    from longcat_service.kernels import fp8_gemm as fg
    from longcat_service.kernels.moe_gather import gather_expert_rows
    from longcat_service.kernels.silu_mul import silu_and_mul

    num_rows = offsets[-1:]
    x8, xs = fg.per_token_group_quant_fp8(gather_expert_rows(hidden, sorted_slots, TOP_K, num_rows))
    gate_up = fg.grouped_gemm_fp8(x8, xs, w13, s13, offsets, tokens, config=fg.DEFAULT_GATE_UP_CONFIG)
    a8, a_s = fg.per_token_group_quant_fp8(silu_and_mul(gate_up, num_rows))
    return fg.grouped_gemm_fp8(a8, a_s, w2, s2, offsets, tokens, config=fg.DEFAULT_DOWN_CONFIG)


def bench_quant_fusion(copy_tbps, reps, tokens=4096, inter=2048):
    """The prefill's two activation quantizations, fused vs unfused, and the expert FFN with each."""
    from longcat_service.kernels import _moe_fp8_quant_triton as mq
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8
    from longcat_service.kernels.moe_fp8_quant import gather_quant_fp8, silu_mul_quant_fp8
    from longcat_service.kernels.moe_gather import gather_expert_rows
    from longcat_service.kernels.silu_mul import silu_and_mul
    from longcat_service.ops import extension

    offsets, sorted_slots, _, _, _, n_rows = _routings(tokens, 1, seed=7)[0]
    offsets = offsets.to(torch.int32)
    num_rows, rows_total = offsets[-1:], tokens * TOP_K
    hidden = torch.randn(tokens, H, device="cuda").to(torch.bfloat16)
    gate_up = torch.randn(rows_total, 2 * inter, device="cuda").to(torch.bfloat16)
    stages = {
        "gather_quant": (H, 1, lambda: per_token_group_quant_fp8(gather_expert_rows(hidden, sorted_slots, TOP_K,
                                                                                    num_rows)),
                         lambda: gather_quant_fp8(hidden, sorted_slots, TOP_K, num_rows),
                         lambda q, s, t: mq.launch_gather_quant(hidden, sorted_slots, TOP_K, num_rows, q, s, *t)),
        "silu_mul_quant": (inter, 2, lambda: per_token_group_quant_fp8(silu_and_mul(gate_up, num_rows)),
                           lambda: silu_mul_quant_fp8(gate_up, num_rows),
                           lambda q, s, t: mq.launch_silu_mul_quant(gate_up, num_rows, q, s, *t)),
    }
    rows = []
    for name, (k, inputs, unfused, fused, launch) in stages.items():
        q = torch.empty(rows_total, k, dtype=FP8, device="cuda")
        s = torch.empty(rows_total, -(-k // 128), device="cuda")
        tiles = {}
        for tile in FUSED_TILES:
            tiles[",".join(map(str, tile))], _ = timed([functools.partial(launch, q, s, tile)], reps)
        row = {"stage": name, "rows": n_rows, "K": k, "unfused_us": timed([unfused], reps)[0],
               "fused_us": timed([fused], reps)[0], "fused_tiles_us": tiles,
               "byte_floor_us": n_rows * k * (2 * inputs + 1 + 4 / 128) / (copy_tbps * 1e6)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    w13, w2 = random_fp8((E, 2 * inter, H), seed=1), random_fp8((E, H, inter), seed=2)
    s13, s2 = scales_for(w13, 1.0 / (64 * H**0.5)), scales_for(w2, 1.0 / (64 * inter**0.5))
    args = (hidden, w13, s13, w2, s2, offsets, sorted_slots)
    row = {"stage": "expert_ffn", "rows": n_rows, "K": H,
           "unfused_us": timed([functools.partial(_unfused_ffn, *args, tokens)], reps)[0],
           "fused_us": timed([functools.partial(extension._expert_ffn_grouped_fp8, *args, TOP_K)], reps)[0]}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def _fmt(v, width=9):
    return f"{v:>{width - 2}.1f}us" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def print_tables(res):
    if res.get("dense"):
        print(f"\n{'dense':>14} {'N x K':>12} {'M':>5} {'ours':>9} {'w8a8':>9} {'bf16':>9} {'scaled_mm':>9} "
              f"{'bytes':>9} {'flops':>9} {'floor/ours':>10}")
        for r in res["dense"]:
            floor = max(r["byte_floor_us"], r["flop_floor_us"])
            eff = f"{floor / r['ours_us']:.2f}" if r["ours_us"] else "-"
            print(f"{r['shape']:>14} {r['N']:>5}x{r['K']:<6} {r['M']:>5} {_fmt(r['ours_us'])} {_fmt(r['w8a8_us'])} "
                  f"{_fmt(r['bf16_us'])} {_fmt(r['scaled_mm_us'])} {_fmt(r['byte_floor_us'])} "
                  f"{_fmt(r['flop_floor_us'])} {eff:>10}")
        split_rows = [r for r in res["dense"] if r.get("splitk_us")]
        if split_rows:
            settings = list(split_rows[0]["splitk_us"])
            print(f"\n{'dense_gemv_fp8':>14} {'N x K':>12} {'M':>5} "
                  + " ".join(f"{'S=' + s:>9}" for s in settings) + f" {'bytes':>9}  floor/time per setting")
            for r in split_rows:
                times = [r["splitk_us"].get(s) for s in settings]
                effs = " ".join(f"{r['byte_floor_us'] / t:.2f}" if t else "-" for t in times)
                print(f"{r['shape']:>14} {r['N']:>5}x{r['K']:<6} {r['M']:>5} " + " ".join(_fmt(t) for t in times)
                      + f" {_fmt(r['byte_floor_us'])}  {effs}")
            print("S=auto the default rule, S=0 the plain FMA kernel, S=1 its split-K rule, S=2..8 K split that many "
                  "ways (LONGCAT_FP8_GEMV_SPLITK), S=mma the tensor-core kernel (LONGCAT_FP8_GEMV_MMA=1)")
    if res.get("dense_decode"):
        print_dense_decode(res["dense_decode"], res["copy_TBps"])
    if res.get("experts"):
        print(f"\n{'experts I':>9} {'B':>5} {'active':>6} {'ours':>10} {'cuda':>10} {'triton':>10} {'bf16':>10} "
              f"{'bytes':>9} {'flops':>9} {'floor/ours':>10} {'floor/cuda':>10} {'floor/triton':>12} {'bf16/ours':>9}")

        def eff(floor, t):
            return f"{floor / t:.2f}" if isinstance(t, float) and t > 0 else "-"

        for r in res["experts"]:
            floor = max(r["byte_floor_us"], r["flop_floor_us"])
            ratio = f"{r['bf16_us'] / r['ours_us']:.2f}" if r["ours_us"] and r["bf16_us"] else "-"
            print(f"{r['I']:>9} {r['B']:>5} {r['active_experts']:>6.0f} {_fmt(r['ours_us'], 10)} "
                  f"{_fmt(r.get('cuda_decode_us'), 10)} {_fmt(r.get('triton_decode_us'), 10)} "
                  f"{_fmt(r['bf16_us'], 10)} {_fmt(r['byte_floor_us'])} {_fmt(r['flop_floor_us'])} "
                  f"{eff(floor, r['ours_us']):>10} {eff(floor, r.get('cuda_decode_us')):>10} "
                  f"{eff(floor, r.get('triton_decode_us')):>12} {ratio:>9}")
        sweeps = [r for r in res["experts"] if r.get("sweep")]
        if sweeps:
            print(f"\n{'triton decode sweep':>20} {'I':>5} {'B':>4} {'config':>22} {'gate_up':>9} {'(floor)':>7} "
                  f"{'down':>9} {'(floor)':>7}")
            for r in sweeps:
                sw = r["sweep"]
                for cfg, t in sw["gate_up"].items():
                    d = sw["down"][cfg]
                    print(f"{'':>20} {r['I']:>5} {r['B']:>4} {cfg:>22} {_fmt(t)} "
                          f"{eff(sw['floor_us']['gate_up'], t):>7} {_fmt(d)} {eff(sw['floor_us']['down'], d):>7}")
                print(f"{'best':>20} {r['I']:>5} {r['B']:>4} gate_up {sw['best']['gate_up']} + down "
                      f"{sw['best']['down']}: FFN {_fmt(sw.get('best_ffn_us'))} (cuda {_fmt(r.get('cuda_decode_us'))}, "
                      f"byte floor {_fmt(r['byte_floor_us'])})")
    if res.get("grouped"):
        print(f"\n{'grouped':>8} {'tokens':>6} {'config':>40} {'ours':>9} {'copy_frac':>9} {'quant':>9} {'bf16':>9} "
              f"{'bytes':>9} {'flops':>9}")
        for r in res["grouped"]:
            frac = f"{r['copy_frac']:.3f}" if r.get("copy_frac") else "-"
            print(f"{r['gemm']:>8} {r.get('tokens', 4096):>6} {r['config']:>40} {_fmt(r['ours_us'])} {frac:>9} "
                  f"{_fmt(r['quant_us'])} {_fmt(r['bf16_grouped_us'])} {_fmt(r['byte_floor_us'])} "
                  f"{_fmt(r['flop_floor_us'])}{'  ' + r['error'] if r.get('error') else ''}")
        best = {}
        for r in res["grouped"]:
            key = (r["gemm"], r.get("tokens", 4096))
            if r["ours_us"] and (key not in best or r["ours_us"] < best[key]["ours_us"]):
                best[key] = r
        for (gemm, tokens), r in best.items():
            print(f"fastest {gemm} at {tokens} tokens: \"{r['config']}\" {r['ours_us']:.1f} us, "
                  f"{r['copy_frac']:.3f} of the copy floor")
    if res.get("quant_fusion"):
        print(f"\n{'quant fusion':>14} {'unfused':>9} {'fused':>9} {'bytes':>9}  fused per tile (block_m,groups,warps)")
        for r in res["quant_fusion"]:
            tiles = " ".join(f"{t}:{_fmt(v).strip()}" for t, v in r.get("fused_tiles_us", {}).items())
            print(f"{r['stage']:>14} {_fmt(r['unfused_us'])} {_fmt(r['fused_us'])} "
                  f"{_fmt(r.get('byte_floor_us'))}  {tiles}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="dense,experts,grouped")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep-batches", default=",".join(map(str, SWEEP_BATCHES)),
                        help="experts: batches at which every Triton decode config is timed ('' for none)")
    parser.add_argument("--configs", default=None,
                        help="grouped: N (the first N of ALL_GROUPED_CONFIGS), all (default), variants or base")
    parser.add_argument("--config-list", default=None,
                        help="grouped: configs separated by ';', e.g. '128,128,64,4,4,tma;128,128,64,4,4,tma,persist2'")
    parser.add_argument("--tokens", default="4096", help="grouped: prompt lengths, e.g. 1024,4096,32768")
    parser.add_argument("--no-fusion", action="store_true", help="grouped: skip the quantization-fusion timings")
    parser.add_argument("--dense-rows", default=",".join(map(str, DENSE_DECODE_ROWS)), help="dense_decode: row counts")
    parser.add_argument("--dense-configs", default="sweep",
                        help="dense_decode: sweep (default), default (the per-shape default only) or 'c1;c2' "
                             "(split-K configs 'bn,split,stages,warps[,swap][,tma][,fuse]', split 0 = auto)")
    parser.add_argument("--splitk", default=SPLITK_SETTINGS,
                        help="dense: LONGCAT_FP8_GEMV_SPLITK settings (and mma: LONGCAT_FP8_GEMV_MMA=1) to time the "
                             "GEMV under at M <= 4 ('' for none)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_kernels: no CUDA device; nothing to time.")
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  ops backend: {ops.ACTIVE_BACKEND}  "
          f"FP8 ops: {hasattr(torch.ops.longcat, 'dense_gemv_fp8')}")
    copy_tbps, bf16_tflops, fp8_tflops = measure_copy_tbps(), measure_matmul_tflops(), measure_fp8_tflops()
    torch.cuda.empty_cache()
    print(f"measured: d2d copy {copy_tbps:.2f} TB/s, bf16 matmul {bf16_tflops:.0f} TFLOP/s, "
          f"fp8 scaled_mm {fp8_tflops:.0f} TFLOP/s (8192^3)", flush=True)
    res = {"copy_TBps": copy_tbps, "bf16_TFLOPs": bf16_tflops, "fp8_TFLOPs": fp8_tflops}
    sections = args.sections.split(",")
    if "dense" in sections:
        splitk = tuple(v.strip() for v in args.splitk.split(",") if v.strip())
        res["dense"] = bench_dense(copy_tbps, fp8_tflops, args.reps, splitk)
    if "dense_decode" in sections:
        res["dense_decode"] = bench_dense_decode(
            copy_tbps, args.reps, tuple(int(r) for r in args.dense_rows.split(",") if r.strip()), args.dense_configs)
        torch.cuda.empty_cache()
    if "experts" in sections:
        sweep = tuple(int(b) for b in args.sweep_batches.split(",") if b.strip())
        res["experts"] = bench_experts(copy_tbps, fp8_tflops, args.reps, sweep_batches=sweep)
    if "grouped" in sections:
        configs = grouped_configs(args.configs, args.config_list)
        tokens = tuple(int(t) for t in args.tokens.split(","))
        res["grouped"] = bench_grouped(copy_tbps, fp8_tflops, args.reps, configs, tokens)
        torch.cuda.empty_cache()
        if not args.no_fusion:
            res["quant_fusion"] = bench_quant_fusion(copy_tbps, args.reps)
    print_tables(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
