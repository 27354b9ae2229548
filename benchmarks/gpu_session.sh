#!/usr/bin/env bash
# The one combined H200 run (issues 3 and 5), from the repo root, as one device call:
#   run(carry=[".whl"], timeout_s=600, command="OUT=$OUT bash benchmarks/gpu_session.sh > $OUT/trace.log 2>&1;
#       cat $OUT/summary.txt")
# Wheels it installs from .whl/: make them first on the CPU machine with benchmarks/fetch_device_wheels.sh.
# Budget: every step runs under `timeout`, capped by what is left of a 560 s budget (BUDGET), in priority order,
# so a hang or a slow step drops the optional steps at the end, never the summary. Steps: build; GPU tests; MoE
# layer; serving (with the engine step trace); decode + prefill with the transformers baseline and profiles; the
# decode step with the shortcut MoE inline (the tuning knob LONGCAT_MOE_OVERLAP_MAX_TOKENS=0); the prefill without
# Triton (LONGCAT_DISABLE_TRITON=1: eager attention, torch._grouped_mm); the full MoE list.
# SKIP_BUILD=1 (with a carried longcat_service/_C*.so), GPU_TESTS, MOE_NEW_ENV, DECODE_NEW_ENV: see below.
# The default numbers alone (build, GPU tests, MoE layer, decode + prefill with the baseline; ~8 min):
#   STEPS="pytest_default moe_default decode_default" bash benchmarks/gpu_session.sh
set -x
OUT=${OUT:-$PWD/gpu_out}
L=$OUT/logs
mkdir -p "$L"
BUDGET=${BUDGET:-560}
: > "$L/steps.tsv"

source "$(dirname "${BASH_SOURCE[0]}")/session_steps.sh"  # step NAME CAP CMD...

session_python  # PY, the carried wheels, PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv >"$L/gpu.txt" 2>&1
echo "${LONGCAT_COMMIT:-$(git log --oneline -1)}" >"$L/commit.txt" 2>&1
# the device copy of the tree may carry a stale .git: the caller passes LONGCAT_COMMIT
export LONGCAT_COMMIT=${LONGCAT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}

# SKIP_BUILD=1: use a carried longcat_service/_C*.so built by an earlier call (saves ~110 s)
if [[ -z ${SKIP_BUILD:-} ]]; then
  step build 200 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e .
  cp longcat_service/_C*.so "$OUT/" 2>/dev/null  # carry it back in a later call to skip the build
fi

TESTS=${GPU_TESTS:-"tests/test_ops.py tests/test_ops_gpu.py tests/test_gpu_twins.py tests/test_kernels.py tests/test_engine_correctness.py tests/test_async_scheduling_gpu.py tests/test_prefill_attn_triton.py tests/test_silu_mul.py tests/test_moe_prefill.py tests/test_dense_gemv.py tests/test_mla_decode_splits.py tests/test_mla_decode_gpu.py tests/test_rope_table.py tests/test_grouped_gemm.py tests/test_compile_watch.py"}
MINE=${GPU_VARIANT_TESTS-"tests/test_decode_variants_gpu.py"}
step pytest_default 240 $PY -m pytest -q -rs -p no:cacheprovider $TESTS $MINE

# MoE layer, B in {1, 64}, both shapes; per-kernel profile of I=2048 B=1 first (router, GEMVs, combine).
step moe_default 60 $PY benchmarks/bench_moe.py --batches 1,64 --reps 50 --profile 2048,1 --out "$L/moe_default.json"
# MOE_NEW_ENV="VAR=value": the "new" MoE column with that environment instead of the variants
if [[ -n ${MOE_NEW_ENV:-} ]]; then
  step moe_new 60 $MOE_NEW_ENV $PY benchmarks/bench_moe.py --batches 1,16,64,256 --reps 50 --out "$L/moe_new.json"
fi
# decode-batch dense projections: our dense_gemv vs cuBLAS (LONGCAT_DENSE_GEMV_ROWS), and the prefill experts'
# grouped GEMMs: the Triton grouped_gemm configs (LONGCAT_GROUPED_GEMM_CONFIG) vs torch._grouped_mm
step dense_gemv 40 $PY benchmarks/bench_dense_gemv.py --out "$L/dense_gemv.json"
[[ -f benchmarks/bench_grouped_gemm.py ]] && step grouped_gemm ${GROUPED_GEMM_CAP:-90} $PY benchmarks/bench_grouped_gemm.py \
  --out "$L/grouped_gemm.json"
[[ -z ${SKIP_SERVE:-} ]] && step serve 100 $PY benchmarks/bench_serve.py --model benchmarks/configs/longcat-flash-2l --load-format dummy \
  --device cuda --dtype bfloat16 --concurrency 64 --num-requests 128 --prompt-len 512 --max-tokens 128 \
  --step-trace-dir "$L/serve_trace"
# SERVE_NEW_ENV="VAR=value": the serving run again with that environment (its log: serve_new.log)
if [[ -n ${SERVE_NEW_ENV:-} ]]; then
  step serve_new 100 $SERVE_NEW_ENV $PY benchmarks/bench_serve.py --model benchmarks/configs/longcat-flash-2l \
    --load-format dummy --device cuda --dtype bfloat16 --concurrency 64 --num-requests 128 --prompt-len 512 \
    --max-tokens 128 --step-trace-dir "$L/serve_new_trace"
fi
# DECODE_NEW_ENV="VAR=value": a second decode run (no baseline, no profiles) as the summary's "new" column
if [[ -n ${DECODE_NEW_ENV:-} ]]; then
  step decode_new 90 $DECODE_NEW_ENV $PY benchmarks/bench_decode.py --batches 1,16,64 --hf-batches= --defaults-batches= \
    --eager-steps 0 --new-tokens 48 --profile-batches= --prefill-len 512 --out-dir "$L/decode_new" --results-md "$L/decode_new.md"
fi
# The default decode run carries the transformers baseline and the defaults column (LLM.generate with every engine
# setting at its default; batch 1 and 64) in the same process tree; the other decode runs skip both.
step decode_default 200 $PY benchmarks/bench_decode.py --hf-batches 1,64 --eager-steps 2 --new-tokens 48 \
  --profile-batches 1,64 --profile-prefill --out-dir "$L/decode_default" --results-md "$L/decode_default.md"
# The prefill pieces against the code they replaced (fused SwiGLU, row gather, grouped expert FFN without the
# zeroing pass, bf16x3 router GEMM at 256..4096 tokens), with bit-identity and routing checks.
step prefill_ops 60 $PY benchmarks/bench_prefill_ops.py --out "$L/prefill_ops.json"
# Decode variants (name:VAR=value+VAR2=value: "+" joins several), batch 1 and 64: the shortcut MoE inline
# (LONGCAT_MOE_OVERLAP_MAX_TOKENS=0), the measured reason for its side stream at small batches.
for variant in ${DECODE_VARIANTS-moe_inline:LONGCAT_MOE_OVERLAP_MAX_TOKENS=0}; do
  name=${variant%%:*}
  envs=${variant#*:}
  step decode_$name 60 ${envs//+/ } $PY benchmarks/bench_decode.py --batches 1,64 --hf-batches= --defaults-batches= --eager-steps 0 \
    --new-tokens 32 --profile-batches= --prefill-len 512 --out-dir "$L/decode_$name" --results-md "$L/decode_$name.md"
done
# The prefill without Triton (eager S x S attention, torch._grouped_mm experts) against the default in
# decode_default. DECODE_VARIANTS and PREFILL_VARIANTS ("name:VAR=value,VAR2=value ...") replace either list.
for variant in ${PREFILL_VARIANTS-no_triton:LONGCAT_DISABLE_TRITON=1}; do
  name=${variant%%:*}
  envs=${variant#*:}
  step prefill_$name 70 ${envs//,/ } $PY benchmarks/bench_decode.py --batches 1 --hf-batches= --defaults-batches= \
    --eager-steps 0 --new-tokens 8 --profile-batches= --profile-prefill --out-dir "$L/prefill_$name" \
    --results-md "$L/prefill_$name.md"
done


# Optional, only if time is left: the full B list of the default MoE.
step moe_default_full 60 $PY benchmarks/bench_moe.py --reps 30 --out "$L/moe_default_full.json"

$PY - "$L" >"$OUT/summary.txt" 2>&1 <<'EOF'
import json, re, sys
from pathlib import Path

L = Path(sys.argv[1])
print("== steps (name, exit code: 0 ok, 124 timeout, skipped; seconds) ==")
print((L / "steps.tsv").read_text())
for name in ("pytest_default",):
    f = L / f"{name}.log"
    lines = f.read_text().splitlines() if f.exists() else []
    tail = [ln for ln in lines if re.search(r"passed|failed|error", ln)][-1:]
    if not tail:  # no pytest summary line: cut off by its cap (see steps), or it never started
        progress = [ln for ln in lines if re.search(r"\[\s*\d+%\]", ln)][-1:]
        tail = [f"no summary line (timed out?); last progress: {progress[0].split('[')[-1]}" if progress
                else "(no log)"]
    fails = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    print(f"{name}: {tail[0]}")
    for ln in fails[:15]:
        print("   ", ln)
print("\n== MoE layer (bench_moe): us, CUDA-graph replay; x floor; rel err vs grouped_mm ==")
print(f"{'I':>5} {'B':>4} | {'default':>9} {'xfl':>5} | {'new':>9} {'xfl':>5} {'relerr':>8} | new/default")
runs = {k: json.loads((L / f"moe_{k}.json").read_text())["results"] for k in ("default", "new")
        if (L / f"moe_{k}.json").exists()}
keys = sorted({(r["I"], r["B"]) for rs in runs.values() for r in rs}, key=lambda x: (-x[0], x[1]))
for key in keys:
    row = {k: next((r for r in rs if (r["I"], r["B"]) == key), None) for k, rs in runs.items()}
    d, n = row.get("default"), row.get("new")
    cell = lambda r: f"{r['ours_graph_us']:>9.1f} {r['ours_graph_us'] / r['floor_us']:>5.2f}" if r else f"{'-':>9} {'-':>5}"
    ratio = f"{n['ours_graph_us'] / d['ours_graph_us']:.3f}" if d and n else "-"
    err = f"{n['rel_err_vs_grouped']:>8.1e}" if n else f"{'-':>8}"
    print(f"{key[0]:>5} {key[1]:>4} | {cell(d)} | {cell(n)} {err} | {ratio}")
print("\n== decode / prefill (bench_decode, LongCat-Flash-2L) ==")
dec = {k: json.loads((L / f"decode_{k}" / "bench_decode.json").read_text())["ours"] for k in ("default", "new")
       if (L / f"decode_{k}" / "bench_decode.json").exists()}
print(f"{'batch':>5} | {'default engine':>14} {'runner':>7} {'replay':>7} | {'new engine':>10} {'replay':>7} | floor ms")
for b in sorted({int(b) for v in dec.values() for b in v["decode"]}):
    get = lambda k: dec.get(k, {}).get("decode", {}).get(str(b)) or dec.get(k, {}).get("decode", {}).get(b)
    d, n = get("default"), get("new")
    f = lambda r, key: f"{r[key]:.2f}" if r and r.get(key) is not None else "-"
    print(f"{b:>5} | {f(d, 'engine_ms'):>14} {f(d, 'step_ms'):>7} {f(d, 'gpu_replay_ms'):>7} | "
          f"{f(n, 'engine_ms'):>10} {f(n, 'gpu_replay_ms'):>7} | {f(d or n, 'floor_ms')}")
for f in sorted(L.glob("decode_*/bench_decode.json")):
    t = f.parent.name[len("decode_"):]
    if t in ("default", "new"):
        continue
    r = json.loads(f.read_text())["ours"]
    print(f"decode variant {t}: " + ", ".join(f"b={b} engine {v['engine_ms']:.2f} replay {v['gpu_replay_ms']:.2f} ms"
                                              for b, v in r["decode"].items()))
    dec[f"decode_{t}"] = r
for f in sorted(L.glob("prefill_*/bench_decode.json")):
    dec[f.parent.name] = json.loads(f.read_text())["ours"]
for k, v in dec.items():
    p = v.get("prefill") or {}
    if p:
        runs = ", ".join(f"{1e3 * x:.1f}" for x in p.get("all_seconds", []))
        print(f"prefill {p['tokens']} tokens, {k}: {p['tokens_per_s']:.0f} tok/s, {p['tflops']:.0f} TFLOP/s "
              f"= {100 * p['share_of_matmul']:.1f}% of matmul (runs ms: {runs})")
        if p.get("gpu_timeline"):
            print(f"    GPU timeline of one more prefill: {p['gpu_timeline']}")
for k, v in dec.items():
    for b, r in v.get("decode", {}).items():
        if r.get("engine_phases_ms"):
            print(f"engine host phases {k} b={b} (median ms): " +
                  ", ".join(f"{n[:-3]} {x:.3f}" for n, x in r["engine_phases_ms"].items()))
for name in ("dense_gemv", "grouped_gemm"):
    f = L / f"{name}.log"
    if f.exists():
        print(f"\n== {name}: last lines ==")
        print("\n".join(f.read_text().splitlines()[-45:]))
f = L / "prefill_ops.log"
if f.exists():
    print("\n== prefill pieces (bench_prefill_ops): last lines ==")
    print("\n".join(f.read_text().splitlines()[-25:]))
print("\n== serving (bench_serve, default variant): last lines ==")
f = L / "serve.log"
print("\n".join(f.read_text().splitlines()[-12:]) if f.exists() else "(no log)")
f = L / "serve_new.log"
if f.exists():
    print("\n== serving with SERVE_NEW_ENV: last lines ==")
    print("\n".join(f.read_text().splitlines()[-9:]))
f = L / "decode_default.md"
if f.exists():
    print("\n== decode table with the transformers baseline (decode_default.md) ==")
    print(f.read_text()[-3000:])
for trace in sorted((L / "decode_default" / "traces").glob("3_cuda_graph_replays_batch_*.json")):
    import subprocess
    print(f"\n== critical path of {trace.name} (benchmarks/trace_timeline.py) ==")
    print(subprocess.run([sys.executable, "benchmarks/trace_timeline.py", str(trace), "--windows", "3", "--top-gaps", "5"],
                         capture_output=True, text=True).stdout[-2500:])
EOF
cp "$OUT/summary.txt" "$L/"
tar -czf "$OUT/gpu_session_logs.tar.gz" -C "$OUT" logs
rm -rf "$L"
echo "total ${SECONDS}s"
cat "$OUT/summary.txt"
