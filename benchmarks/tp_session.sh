#!/usr/bin/env bash
# The multi-GPU tensor-parallel session (issue 8). Run from the repo root on nvidia-h200-x8 (or -x4 / -x2: the
# TP sizes that need more GPUs than are visible are skipped and say so in the summary):
#   bash benchmarks/tp_session.sh              ($OUT: where logs go; default ./tp_out)
#   DEVICE=cpu bash benchmarks/tp_session.sh   CPU dry run: tiny model everywhere, gloo, TP 1 and 2, small loads
# Wheels it installs from .whl/ (grpc health/reflection): benchmarks/fetch_device_wheels.sh on the CPU machine.
# Every step runs under `timeout`, capped by what is left of BUDGET (default 560 s, so one 600 s call fits), in
# priority order; the summary is always written. STEPS (default: check_tiny check_tiny_ep speed check_2l serve
# check_tiny_graphs check_tiny_mtp_graphs check_tiny_ep_graphs check_tiny_ep_graphs_overflow speed_graphs) picks steps (a second call can finish what the first left: SKIP_BUILD=1 with
# the _C*.so the first call left in $OUT carried back).
# NCCL_NVLS_ENABLE=0 is forced; the machine's multicast settings are left alone.
#   check_tiny_ep  the same with --expert-parallel (whole experts per rank)
#   check_tiny_mtp_graphs  greedy MTP generation (k=2) with LONGCAT_TP_CUDA_GRAPHS=1 at every TP size vs TP=1
#               (the spec-step graphs replayed in lockstep on every rank; by_tp.N.llm.spec_graphs captured)
#   check_tiny_ep_graphs(_overflow)  check_tiny_ep with LONGCAT_TP_CUDA_GRAPHS=1 (EP decode captured with the
#               fixed-capacity all-to-all), default capacity and a tiny one (--ep-capacity-factor 0.05: overflowing
#               steps re-run eagerly, by_tp.N.llm.ep_capacity_overflows > 0, tokens still equal TP=1)
#   check_tiny  TP 1,2,4,8 on the tiny model (fp32, real safetensors checkpoint): logits of one prefill vs TP=1
#               (ranks of our own, NCCL) and greedy tokens + logprobs through LLM(tensor_parallel_size=N)
#   speed       LongCat-Flash-2L (bf16, dummy TP-invariant weights): LLMEngine decode ms/step at batch 1, 64 for
#               TP 1,2,4,8 (TP=1 also eager without chained decode, as TP>1 runs)
#   check_2l    LongCat-Flash-2L logits vs TP=1 at TP 2,4,8, plus the all-reduce time per decode step at batch
#               1 and 64 (timed replay of the recorded collectives of a B-token forward on the NCCL group)
#   serve       torchrun --nproc-per-node N longcat-serve (N = largest of 8,4,2 that fits), one streamed gRPC
#               request, benchmarks/bench_serve.py --address against it, SIGTERM to rank 0 -> exit codes
set -x
OUT=${OUT:-$PWD/tp_out}
L=$OUT/logs
mkdir -p "$L"
BUDGET=${BUDGET:-560}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-"check_tiny check_tiny_ep speed check_2l serve check_tiny_graphs check_tiny_mtp_graphs check_tiny_ep_graphs check_tiny_ep_graphs_overflow speed_graphs"}
export NCCL_NVLS_ENABLE=0
: > "$L/steps.tsv"

source "$(dirname "${BASH_SOURCE[0]}")/session_steps.sh"  # step NAME CAP CMD...

PY=$(command -v python || command -v python3)
if [[ $DEVICE == cuda ]]; then
  pip install --no-index --no-deps --target /tmp/site .whl/*.whl >"$L/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv >"$L/gpu.txt" 2>&1
  nvidia-smi topo -m >>"$L/gpu.txt" 2>&1
  NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  SIZES=1,2,4,8
  TP_SERVE=$(for n in 8 4 2; do ((n <= NGPU)) && { echo $n; break; }; done)
  BIG=2l
  SPEED="--batches 1,64 --prompt-len 512 --new-tokens 64"
  SERVE="--concurrency 64 --num-requests 128 --prompt-len 512 --max-tokens 128"
else  # CPU dry run of the same steps: tiny model, gloo, 2 ranks
  export PYTHONPATH=$PWD OMP_NUM_THREADS=1 SKIP_BUILD=1
  NGPU=0 SIZES=1,2 TP_SERVE=2 BIG=tiny
  SPEED="--batches 1,4 --prompt-len 16 --new-tokens 12 --dtype float32"
  SERVE="--concurrency 4 --num-requests 8 --prompt-len 16 --max-tokens 8 --dtype float32"
fi
echo "DEVICE=$DEVICE NGPU=$NGPU SIZES=$SIZES TP_SERVE=${TP_SERVE:-none} BUDGET=$BUDGET" >"$L/setup.txt"
git log --oneline -1 >"$L/commit.txt" 2>&1
export LONGCAT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null)

# SKIP_BUILD=1: use a carried longcat_service/_C*.so built by an earlier call (saves ~110 s)
if [[ -z ${SKIP_BUILD:-} ]]; then
  step build 200 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e .
  cp longcat_service/_C*.so "$OUT/" 2>/dev/null  # carry it back in a later call to skip the build
fi

B="$PY benchmarks/bench_tp.py"
step check_tiny 150 $B check --model tiny --device $DEVICE --tp-sizes $SIZES --out "$L/check_tiny.json"
# expert parallelism (issue 20): the tiny checkpoint with whole experts per rank, logits and greedy tokens vs TP=1
step check_tiny_ep 150 $B check --model tiny --device $DEVICE --tp-sizes $SIZES --expert-parallel --out "$L/check_tiny_ep.json"
step speed 240 $B speed --model $BIG --device $DEVICE --tp-sizes $SIZES $SPEED --out "$L/speed.json"
step check_2l 200 $B check --model $BIG --device $DEVICE --tp-sizes $SIZES --batches 1,64 --prompt-len 32 --no-llm \
  $([[ $DEVICE == cpu ]] && echo --dtype bfloat16) --out "$L/check_2l.json"
if [[ -n ${TP_SERVE:-} ]]; then
  step serve 150 $B serve --model $BIG --device $DEVICE --tp $TP_SERVE $SERVE --server-log "$L/serve_server.log" \
    --out "$L/serve.json"
else
  printf 'serve\tskipped (fewer than 2 GPUs)\t0\n' >>"$L/steps.tsv"
fi

# Opt-in, lowest priority: TP decode with CUDA graphs (NCCL collectives captured; LONGCAT_TP_CUDA_GRAPHS=1), first
# checked against TP=1 on the tiny model, then timed like `speed`. Never run before this session's machine.
if [[ $DEVICE != cpu ]]; then
  step check_tiny_graphs 150 LONGCAT_TP_CUDA_GRAPHS=1 $B check --model tiny --device $DEVICE --tp-sizes $SIZES \
    --out "$L/check_tiny_graphs.json"
  # MTP spec steps in CUDA graphs under TP (verify / mtp / draft replayed in lockstep on every rank): greedy tokens
  # and logprobs vs TP=1 (which takes the one-GPU device-side greedy step), k=2, tiny checkpoint with MTP weights;
  # by_tp.N.llm.spec_graphs > 0 says rank 0 captured them
  step check_tiny_mtp_graphs 150 LONGCAT_TP_CUDA_GRAPHS=1 $B check --model tiny --device $DEVICE --tp-sizes $SIZES \
    --speculative-k 2 --out "$L/check_tiny_mtp_graphs.json"
  # EP decode in CUDA graphs (fixed-capacity all-to-all captured): default capacity (never overflows: by_tp.N.llm
  # ep_capacity_overflows 0, graphs > 0), then a tiny one (overflowing steps re-run eagerly; tokens still equal)
  step check_tiny_ep_graphs 150 LONGCAT_TP_CUDA_GRAPHS=1 $B check --model tiny --device $DEVICE --tp-sizes $SIZES \
    --expert-parallel --out "$L/check_tiny_ep_graphs.json"
  step check_tiny_ep_graphs_overflow 150 LONGCAT_TP_CUDA_GRAPHS=1 $B check --model tiny --device $DEVICE \
    --tp-sizes $SIZES --expert-parallel --ep-capacity-factor 0.05 --out "$L/check_tiny_ep_graphs_overflow.json"
  step speed_graphs 240 LONGCAT_TP_CUDA_GRAPHS=1 $B speed --model $BIG --device $DEVICE --tp-sizes $SIZES $SPEED \
    --out "$L/speed_graphs.json"
fi

$PY - "$L" >"$OUT/summary.txt" 2>&1 <<'EOF'
import json, subprocess, sys
from pathlib import Path

L = Path(sys.argv[1])
print("== setup ==")
for f in ("setup.txt", "commit.txt"):
    p = L / f
    print(p.read_text().strip() if p.exists() else f"(no {f})")
print("\n== steps (name, exit code: 0 ok, 124 timeout, skipped; seconds) ==")
print((L / "steps.tsv").read_text())


def load(name):
    p = L / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def tail(name, n=15):
    p = L / f"{name}.log"
    return "\n".join(p.read_text().splitlines()[-n:]) if p.exists() else "(no log)"


for name in ("check_tiny", "check_tiny_ep", "check_2l", "check_tiny_mtp_graphs", "check_tiny_ep_graphs",
             "check_tiny_ep_graphs_overflow"):
    r = load(name)
    print(f"\n== {name}: logits vs TP=1 (rel = ||d|| / ||ref||), greedy through LLM ==")
    if r is None:
        print(f"(no result) log tail:\n{tail(name)}")
        continue
    print(f"model {r['model']} {r['dtype']} {r['device']} load_format {r['load_format']}; "
          f"pass if rel <= {r['tolerance_rel']}; skipped: {r['skipped'] or 'none'}")
    print(f"{'TP':>3} | {'rel':>9} {'max abs':>9} {'top1':>6} {'ok':>5} | {'greedy==':>8} {'agree':>6} "
          f"{'dlogprob':>9} | {'load s':>6} {'peak GiB':>8}")
    for tp, x in r["by_tp"].items():
        if "error" in x:
            print(f"{tp:>3} | ERROR {x['error'][-600:]}")
            continue
        g = lambda k, fmt="{:.2e}": fmt.format(x[k]) if x.get(k) is not None else "-"
        print(f"{tp:>3} | {g('logits_rel'):>9} {g('logits_max_abs'):>9} {g('top1_agree', '{:.3f}'):>6} "
              f"{str(x.get('logits_ok', '-')):>5} | {str(x.get('greedy_equal', '-')):>8} "
              f"{g('greedy_token_agree', '{:.3f}'):>6} {g('logprob_max_abs'):>9} | {g('load_s', '{:.1f}'):>6} "
              f"{g('peak_gib', '{:.1f}'):>8}")
        if "llm_error" in x:
            print(f"    LLM ERROR {x['llm_error'][-600:]}")
        if "graphs" in (x.get("llm") or {}):  # decode graphs captured, EP graph steps re-run for overflow
            print(f"    graphs {x['llm']['graphs']}, spec_graphs {x['llm'].get('spec_graphs')}, "
                  f"ep_capacity_overflows {x['llm'].get('ep_capacity_overflows')}")
    for tp, x in r["by_tp"].items():
        for b, c in (x.get("comm") or {}).items():
            if c.get("ms") is not None:
                print(f"    tp {tp} batch {b}: {c['calls']} collectives, {c['bytes'] / 1e6:.3f} MB, "
                      f"{c['ms']:.3f} ms ({', '.join(c['ops'])})")

for extra in ("check_tiny_graphs", "speed_graphs"):
    p = L / f"{extra}.json"
    if p.exists():
        print(f"\n== {extra} (LONGCAT_TP_CUDA_GRAPHS=1) ==\n" + p.read_text()[-3000:])
print("\n== scaling table (speed + check_2l) ==")
files = [str(L / f"{n}.json") for n in ("check_2l", "speed") if (L / f"{n}.json").exists()]
if files:
    print(subprocess.run([sys.executable, "benchmarks/bench_tp.py", "table", *files], capture_output=True,
                         text=True).stdout or "(table failed)")
sp = load("speed")
if sp is None:
    print(f"(no speed result) log tail:\n{tail('speed')}")
else:
    for tp, x in sp["by_tp"].items():
        if "error" in x:
            print(f"speed tp {tp} ERROR {x['error'][-800:]}")
        else:
            print(f"speed tp {tp}: load {x['load_s']:.1f}s, graphs {x['graphs']}")
    if sp["skipped"]:
        print("skipped:", sp["skipped"])

print("\n== serve (torchrun) ==")
s = load("serve")
if s is None:
    print(f"(no result) log tail:\n{tail('serve')}")
else:
    for k in ("skipped", "error", "cmd", "ready_s", "stream_ok", "bench_serve_rc", "server_exit"):
        if k in s:
            print(f"{k}: {s[k]}")
    if "stream" in s:
        st = s["stream"]
        print(f"stream: {st['chunks']} chunks, ttft {st['ttft_ms']:.1f} ms, total {st['total_ms']:.1f} ms, "
              f"tokens {st['token_ids'][:16]}")
    print(s.get("bench_serve", ""))
    p = L / "serve_server.log"
    if p.exists() and (s.get("error") or s.get("server_exit") not in (0, None)):
        print("server log tail:\n" + "\n".join(p.read_text().splitlines()[-25:]))
EOF
cp "$OUT/summary.txt" "$L/"
tar -czf "$OUT/tp_session_logs.tar.gz" -C "$OUT" logs
cp "$L"/*.json "$OUT/" 2>/dev/null
rm -rf "$L"
echo "total ${SECONDS}s"
cat "$OUT/summary.txt"
