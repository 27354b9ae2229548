"""Tensor-parallel correctness, decode scaling and served TP (issue 8). Driven by benchmarks/tp_session.sh.

    python benchmarks/bench_tp.py check --model tiny --tp-sizes 1,2,4,8 --out tp_tiny.json   # logits + greedy
    python benchmarks/bench_tp.py check --model 2l --tp-sizes 1,2,4,8 --batches 1,64 --out tp_2l.json
    python benchmarks/bench_tp.py speed --tp-sizes 1,2,4,8 --batches 1,64 --out tp_speed.json
    python benchmarks/bench_tp.py serve --tp 8 --out tp_serve.json      # torchrun server, stream, bench_serve
    python benchmarks/bench_tp.py table tp_2l.json tp_speed.json        # the scaling table (markdown)
    ... --device cpu --dtype float32   (gloo; the CPU dry run of the same code)

Identical weights at every TP size: load_format="dummy" (longcat_service/model/dummy_weights.py) generates every
checkpoint key's FULL tensor from a generator seeded by (seed, key) and hands it to the parameter's own
weight_loader, which keeps this rank's slice, exactly as from a safetensors file. Importing this module sets the
router correction bias to 0 in that init (spawned TP ranks import this script as __mp_main__, so they get it too). The
tiny model is additionally written as a real safetensors checkpoint and loaded through load_format="auto"
(`check` on CPU cross-checks both paths).

All-reduce time per decode step = a timed loop (CUDA events, median of reps) that replays, back to back on the
TP group, the collectives (op, shape, dtype) one forward of B tokens issued, recorded by wrapping
torch.distributed.all_reduce/all_gather during that forward. It is the communication cost without compute
overlap or rank skew; not a torch.profiler measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from longcat_service.config import ModelConfig  # noqa: E402
from longcat_service.distributed.local_ranks import free_port, run_on_local_ranks  # noqa: E402
from longcat_service.model import loader  # noqa: E402
from longcat_service.model.dummy_weights import dummy_tensor, init_dummy  # noqa: E402

MODELS = {"tiny": ROOT / "benchmarks/configs/longcat-flash-tiny", "2l": ROOT / "benchmarks/configs/longcat-flash-2l"}
# The tiny config has 4 heads: 8 heads so that it splits over TP=8 too (every size compares the same model).
OVERRIDES = {"tiny": {"num_attention_heads": 8, "num_key_value_heads": 8}, "2l": {}}
DEFAULT_DTYPE = {"tiny": "float32", "2l": "bfloat16"}
# pass thresholds: fp32 tiny (reduction order only) and bf16 2L (bf16 rounding of partial sums)
LOGIT_REL_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}


# ---- dummy weights: the library's TP-invariant init (model/dummy_weights.py), router bias 0 ----------------
# Zero correction bias spreads tokens over the experts as the real, trained bias does (bench_decode does the same).
def virtual_tensor(key: str, c: ModelConfig, seed: int, device) -> torch.Tensor:
    return dummy_tensor(key, c, seed, device, bias_std=0.0)


loader._init_dummy = functools.partial(init_dummy, bias_std=0.0)


def write_checkpoint(model: str, out: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """config.json (with the overrides) + model.safetensors holding the virtual tensors (small configs only)."""
    from safetensors.torch import save_file

    raw = {**json.loads((MODELS[model] / "config.json").read_text()), **OVERRIDES[model]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    c = ModelConfig.from_pretrained(out / "config.json")
    with torch.device("meta"):
        keys = list(loader.LongcatFlashForCausalLM(c, torch.float32).checkpoint_targets())
    save_file(
        {k: virtual_tensor(k, c, seed, "cpu").to(loader.DTYPES[dtype]).contiguous() for k in keys},
        str(out / "model.safetensors"),
    )
    return out


# ---- ranks ------------------------------------------------------------------------------------------------
def run_ranks(world: int, device_type: str, fn, *args, timeout_s: float = 900.0):
    """fn(*args) on `world` spawned ranks (NCCL on cuda:rank, else gloo); rank 0's result. World 1 also runs in a
    child, so the caller never holds device memory."""
    return run_on_local_ranks(world, fn, *args, device_type=device_type, timeout_s=timeout_s)


class CollectiveRecorder:
    """Records (op, shape, dtype) of every torch.distributed.all_reduce / all_gather while active."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls = dist, []

    def __enter__(self):
        d = self.dist
        self._ar, self._ag = d.all_reduce, d.all_gather

        def all_reduce(tensor, *a, **k):
            self.calls.append(("all_reduce", tuple(tensor.shape), str(tensor.dtype)))
            return self._ar(tensor, *a, **k)

        def all_gather(parts, tensor, *a, **k):
            self.calls.append(("all_gather", tuple(tensor.shape), str(tensor.dtype)))
            return self._ag(parts, tensor, *a, **k)

        d.all_reduce, d.all_gather = all_reduce, all_gather
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce, self.dist.all_gather = self._ar, self._ag


def time_collectives(calls, device, reps: int = 30, warmup: int = 5) -> float:
    """Median ms of replaying `calls` back to back on the TP group (CUDA events on cuda, wall clock on cpu)."""
    import torch.distributed as dist

    from longcat_service.distributed import parallel_state

    group, world = parallel_state.get_tp_group(), parallel_state.get_tp_size()
    bufs = []
    for op, shape, dtype in calls:
        t = torch.ones(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
        bufs.append((op, t, [torch.empty_like(t) for _ in range(world)] if op == "all_gather" else None))

    def once():
        for op, t, parts in bufs:
            if op == "all_reduce":
                dist.all_reduce(t, group=group)
            else:
                dist.all_gather(parts, t, group=group)

    for _ in range(warmup):
        once()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            dist.barrier(group=parallel_state.get_cpu_group())
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            once()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            dist.barrier(group=parallel_state.get_cpu_group())
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rank_check(
    model_dir: str,
    load_format: str,
    overrides: dict,
    dtype: str,
    device_type: str,
    tokens: list,
    comm_batches: list,
    vocab: int,
) -> dict:
    """On every rank: load (this rank's shards), logits of one prefill of `tokens`; per batch B the collectives of
    a B-token forward and their timed replay. Rank 0's dict comes back."""
    from longcat_service.distributed import parallel_state
    from tests.engine_utils import full_forward_logits

    rank, world = parallel_state.get_tp_rank(), parallel_state.get_tp_size()
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    t0 = time.perf_counter()
    model = loader.load_model(
        model_dir, dtype=dtype, device=device, load_format=load_format, hf_overrides=overrides or None
    )
    load_s = time.perf_counter() - t0
    logits = full_forward_logits(model, tokens)
    out = {"load_s": load_s, "logits": logits.cpu().numpy(), "comm": {}}
    gen = torch.Generator().manual_seed(1)
    for b in comm_batches:
        toks = torch.randint(3, vocab, (b,), generator=gen).tolist()
        with CollectiveRecorder() as rec:
            full_forward_logits(model, toks)
        entry = {
            "calls": len(rec.calls),
            "bytes": sum(
                math.prod(s) * torch.tensor([], dtype=getattr(torch, d.removeprefix("torch."))).element_size()
                for _, s, d in rec.calls
            ),
            "ops": sorted({f"{op}{list(s)}:{d.removeprefix('torch.')}" for op, s, d in rec.calls}),
        }
        if world > 1:
            entry["ms"] = time_collectives(rec.calls, device)
        out["comm"][b] = entry
    if device_type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# ---- greedy generation through LLM (one child process per TP size) ----------------------------------------
def prompts_for(vocab: int, n: int = 4, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = [5, 19, 2, 40][:n]
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lens]


def llm_child(a) -> dict:
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams

    c = ModelConfig.from_pretrained(Path(a.model_dir) / "config.json")
    prompts = prompts_for(c.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, logprobs=1)
    kw = dict(
        dtype=a.dtype,
        device=a.device,
        load_format=a.load_format,
        max_model_len=128,
        num_kv_blocks=64,
        block_size=16,
        enable_prefix_caching=False,
        hf_overrides=json.loads(a.overrides) or None,
    )
    t0 = time.perf_counter()
    llm = LLM(model=a.model_dir, tensor_parallel_size=a.tp, **kw)
    load_s = time.perf_counter() - t0
    try:
        outs = llm.generate(prompts, params)
    finally:
        close = getattr(llm.engine.runner, "close", None)
        if a.tp > 1 and close:
            close()
    return {
        "load_s": load_s,
        "tokens": [o.outputs[0].token_ids for o in outs],
        "logprobs": [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs],
    }


def run_child(argv: list[str], timeout_s: float) -> dict:
    """python bench_tp.py <argv> in a fresh process; its last 'RESULT ' line."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child {argv[:3]} rc {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fitting(sizes: list[int], device: str, skipped: list) -> list[int]:
    n = gpu_count() if device == "cuda" else 1 << 30
    ok = [s for s in sizes if s <= n]
    skipped += [{"tp": s, "why": f"needs {s} GPUs, {n} visible"} for s in sizes if s > n]
    return ok


# ---- check -------------------------------------------------------------------------------------------------
def cmd_check(a) -> dict:
    dtype = a.dtype or DEFAULT_DTYPE[a.model]
    skipped: list = []
    sizes = fitting(_ints(a.tp_sizes), a.device, skipped)
    if 1 not in sizes:
        sizes = [1] + sizes
    tmp = Path(tempfile.mkdtemp(prefix="bench_tp_"))
    if a.model == "tiny":  # a real checkpoint on disk, loaded with the stock loader at every size
        model_dir, load_format, overrides = str(write_checkpoint("tiny", tmp / "tiny", dtype=dtype)), "auto", {}
    else:
        model_dir, load_format, overrides = str(MODELS[a.model]), "dummy", OVERRIDES[a.model]
    c = ModelConfig.from_dict({**json.loads((Path(model_dir) / "config.json").read_text()), **overrides})
    tokens = prompts_for(c.vocab_size, 1, seed=7)[0][:5] + list(range(3, 3 + a.prompt_len - 5))
    tokens = [t % c.vocab_size for t in tokens]
    res: dict = {
        "model": a.model,
        "dtype": dtype,
        "device": a.device,
        "load_format": load_format,
        "tp_sizes": sizes,
        "skipped": skipped,
        "by_tp": {},
        "tolerance_rel": LOGIT_REL_TOL[dtype],
    }
    ref = None
    for tp in sizes:
        r = {}
        t0 = time.perf_counter()
        try:
            out = run_ranks(
                tp,
                a.device,
                rank_check,
                model_dir,
                load_format,
                overrides,
                dtype,
                a.device,
                tokens,
                _ints(a.batches),
                c.vocab_size,
                timeout_s=a.rank_timeout,
            )
            logits = torch.from_numpy(out.pop("logits"))
            if tp == 1:
                ref = logits
            r.update(out)
            if ref is not None:
                diff = (logits - ref).float()
                r["logits_max_abs"] = diff.abs().max().item()
                r["logits_rel"] = (diff.norm() / ref.norm()).item()
                r["top1_agree"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
                r["logits_ok"] = r["logits_rel"] <= LOGIT_REL_TOL[dtype]
        except Exception as e:  # one size failing must not hide the others
            r["error"] = f"{type(e).__name__}: {e}"[-3000:]
        if a.llm:
            try:
                r["llm"] = run_child(
                    [
                        "_llm",
                        "--model-dir",
                        model_dir,
                        "--load-format",
                        load_format,
                        "--tp",
                        str(tp),
                        "--device",
                        a.device,
                        "--dtype",
                        dtype,
                        "--max-tokens",
                        str(a.max_tokens),
                        "--overrides",
                        json.dumps(overrides),
                    ],
                    a.rank_timeout,
                )
            except Exception as e:
                r["llm_error"] = f"{type(e).__name__}: {e}"[-3000:]
        r["wall_s"] = time.perf_counter() - t0
        res["by_tp"][tp] = r
        print(f"tp {tp}: " + json.dumps({k: v for k, v in r.items() if k != "llm"}), flush=True)
    base = res["by_tp"].get(1, {}).get("llm")
    for r in res["by_tp"].values():
        if base and "llm" in r:
            g = r["llm"]
            r["greedy_equal"] = g["tokens"] == base["tokens"]
            r["greedy_token_agree"] = statistics.mean(
                float(x == y)
                for gt, bt in zip(g["tokens"], base["tokens"], strict=True)
                for x, y in zip(gt, bt, strict=True)
            )
            r["logprob_max_abs"] = max(
                abs(x - y)
                for gl, bl in zip(g["logprobs"], base["logprobs"], strict=True)
                for x, y in zip(gl, bl, strict=True)
            )
    if a.crosscheck_dummy and a.model == "tiny":  # the virtual init == loading its safetensors file
        out = run_ranks(
            1,
            a.device,
            rank_check,
            str(MODELS["tiny"]),
            "dummy",
            OVERRIDES["tiny"],
            dtype,
            a.device,
            tokens,
            [],
            c.vocab_size,
        )
        res["dummy_vs_checkpoint_max_abs"] = (torch.from_numpy(out["logits"]) - ref).abs().max().item()
    return res


# ---- speed -------------------------------------------------------------------------------------------------
def engine_child(a) -> dict:
    from bench_decode import engine_decode_ms

    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.engine.llm_engine import LLMEngine

    batches = _ints(a.batches)
    blocks = max(batches) * -(-(a.prompt_len + a.new_tokens + 8) // 16) + 16
    eargs = EngineArgs(
        model=a.model_dir,
        dtype=a.dtype,
        device=a.device,
        load_format="dummy",
        block_size=16,
        num_kv_blocks=blocks,
        max_num_seqs=max(batches),
        max_num_batched_tokens=16384,
        enable_prefix_caching=False,
        max_model_len=a.prompt_len + a.new_tokens + 32,
        tensor_parallel_size=a.tp,
        hf_overrides=json.loads(a.overrides) or None,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(eargs)
    out = {
        "tp": a.tp,
        "load_s": time.perf_counter() - t0,
        "graphs": engine.runner.graph_runner is not None,
        "decode_ms": {},
        "eager_ms": {},
    }
    c = engine.runner.model.config
    gen = torch.Generator().manual_seed(0)
    try:
        for b in batches:
            prompts = torch.randint(3, c.vocab_size, (b, a.prompt_len), generator=gen).tolist()
            out["decode_ms"][b] = engine_decode_ms(engine, prompts, a.new_tokens)
            print(f"tp {a.tp} batch {b}: {out['decode_ms'][b]:.2f} ms/step", flush=True)
        if a.tp == 1 and out["graphs"] or a.tp == 1 and a.device == "cpu":
            # TP ranks run eager steps without chained decode: TP=1 the same way, for the like-for-like column
            engine.runner.graph_runner, engine.runner.supports_chained_decode = None, False
            for b in batches:
                prompts = torch.randint(3, c.vocab_size, (b, a.prompt_len), generator=gen).tolist()
                out["eager_ms"][b] = engine_decode_ms(engine, prompts, a.new_tokens)
                print(f"tp 1 eager batch {b}: {out['eager_ms'][b]:.2f} ms/step", flush=True)
    finally:
        close = getattr(engine.runner, "close", None)
        if a.tp > 1 and close:
            close()
    return out


def cmd_speed(a) -> dict:
    skipped: list = []
    dtype = a.dtype or DEFAULT_DTYPE[a.model]
    res = {
        "model": a.model,
        "dtype": dtype,
        "device": a.device,
        "skipped": skipped,
        "by_tp": {},
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
    }
    for tp in fitting(_ints(a.tp_sizes), a.device, skipped):
        try:
            res["by_tp"][tp] = run_child(
                [
                    "_engine",
                    "--model-dir",
                    str(MODELS[a.model]),
                    "--tp",
                    str(tp),
                    "--device",
                    a.device,
                    "--dtype",
                    dtype,
                    "--batches",
                    a.batches,
                    "--prompt-len",
                    str(a.prompt_len),
                    "--new-tokens",
                    str(a.new_tokens),
                    "--overrides",
                    json.dumps(OVERRIDES[a.model]),
                ],
                a.rank_timeout,
            )
        except Exception as e:
            res["by_tp"][tp] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        print(f"tp {tp}: {json.dumps(res['by_tp'][tp])}", flush=True)
    return res


# ---- serve (torchrun) --------------------------------------------------------------------------------------
def cmd_serve(a) -> dict:
    dtype = a.dtype or DEFAULT_DTYPE[a.model]
    res: dict = {"tp": a.tp, "model": a.model, "dtype": dtype, "device": a.device}
    if a.device == "cuda" and gpu_count() < a.tp:
        res["skipped"] = f"needs {a.tp} GPUs, {gpu_count()} visible"
        return res
    model_dir = str(MODELS[a.model])
    port = free_port()
    serve_args = [
        "--model",
        model_dir,
        "--load-format",
        "dummy",
        "--dtype",
        dtype,
        "--device",
        a.device,
        "--tensor-parallel-size",
        str(a.tp),
        "--port",
        str(port),
        "--num-kv-blocks",
        str(a.num_kv_blocks),
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        str(a.concurrency),
        "--log-level",
        "INFO",
    ]
    if OVERRIDES[a.model]:
        serve_args += ["--hf-overrides", json.dumps(OVERRIDES[a.model])]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(a.tp),
        "-m",
        "longcat_service.server.cli",
        *serve_args,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(a.server_log, "w") if a.server_log else subprocess.DEVNULL
    t0 = time.perf_counter()
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    res["cmd"] = " ".join(cmd)
    from longcat_service.client import LongCatClient

    address = f"127.0.0.1:{port}"
    try:
        client = None
        deadline = time.monotonic() + a.start_timeout
        while time.monotonic() < deadline and srv.poll() is None:
            try:
                client = LongCatClient(address)
                if client.health(timeout=2.0) == "SERVING":
                    break
            except Exception:
                pass
            client = None
            time.sleep(1.0)
        if client is None:
            res["error"] = f"server not SERVING within {a.start_timeout}s (exit {srv.poll()})"
            return res
        res["ready_s"] = time.perf_counter() - t0
        vocab = client.model_info().config.vocab_size
        prompt = prompts_for(vocab, 1, seed=3)[0]
        t1, chunks, ttft = time.perf_counter(), [], None
        with client.generate_stream(prompt, max_tokens=32, temperature=0.0) as stream:
            for chunk in stream:
                ttft = ttft if ttft is not None else time.perf_counter() - t1
                chunks.append(chunk)
        final = getattr(stream, "result", None) or getattr(stream, "final", None)
        ids = [t for ch in chunks for t in (getattr(ch, "token_ids", None) or [])]
        res["stream"] = {
            "chunks": len(chunks),
            "token_ids": ids,
            "ttft_ms": (ttft or 0) * 1e3,
            "total_ms": (time.perf_counter() - t1) * 1e3,
            "final": repr(final)[-200:],
        }
        res["stream_ok"] = len(chunks) > 0
        print(f"stream: {json.dumps(res['stream'])}", flush=True)
        bench = [
            sys.executable,
            str(ROOT / "benchmarks/bench_serve.py"),
            "--address",
            address,
            "--concurrency",
            str(a.concurrency),
            "--num-requests",
            str(a.num_requests),
            "--prompt-len",
            str(a.prompt_len),
            "--max-tokens",
            str(a.max_tokens),
            "--skip-offline",
        ]
        p = subprocess.run(bench, capture_output=True, text=True, timeout=a.bench_timeout, env=env, cwd=ROOT)
        res["bench_serve_rc"], res["bench_serve"] = p.returncode, (p.stdout + p.stderr)[-3000:]
        print(p.stdout[-3000:], p.stderr[-2000:], flush=True)
    finally:
        if srv.poll() is None:
            # SIGTERM to rank 0 only: it drains, tells the workers, all exit 0 (torchrun's agent would exit 1 on it)
            rank0 = _rank0_pid(srv.pid)
            res["stopped_via"] = "SIGTERM to rank 0" if rank0 else "SIGTERM to the process group"
            if rank0:
                os.kill(rank0, signal.SIGTERM)
            else:
                os.killpg(srv.pid, signal.SIGTERM)
            try:
                srv.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(srv.pid, signal.SIGKILL)
                srv.wait()
        res["server_exit"] = srv.returncode
    return res


def _rank0_pid(agent_pid: int) -> int | None:
    """The torchrun child with RANK=0 running longcat_service.server.cli (as tests/test_tp_server.py finds it)."""
    try:
        kids = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    except OSError:
        return None
    for pid in kids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"RANK=0" in env and b"longcat_service.server.cli" in cmdline:
            return int(pid)
    return None


# ---- table -------------------------------------------------------------------------------------------------
def cmd_table(paths: list[str]) -> str:
    docs = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    speed = next((d for d in docs if "new_tokens" in d), None)
    check = next((d for d in docs if "tp_sizes" in d and d.get("model") == (speed or {}).get("model")), None)
    if not speed:
        return "(no speed results)"
    by = speed["by_tp"]
    batches = sorted({int(b) for r in by.values() for b in r.get("decode_ms", {})})
    name = {"2l": "LongCat-Flash-2L", "tiny": "tiny model"}.get(speed["model"], speed["model"])
    comm = "NCCL, CUDA events" if speed.get("device") == "cuda" else "gloo, wall clock"
    lines = [
        f"Decode ms/step, {name} ({speed['dtype']}, {speed['device']}, dummy TP-invariant weights, prompt "
        f"{speed['prompt_len']}, LLMEngine.step median); TP>1 runs eager (no CUDA graphs, no chained decode); "
        f"all-reduce ms = timed replay of the step's collectives on the TP group ({comm}).",
        "",
        "| TP | batch | engine ms/step | vs TP=1 eager | collectives/step | MB/step | all-reduce ms/step | "
        "all-reduce share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    eager1 = {int(b): v for b, v in by.get("1", {}).get("eager_ms", {}).items()}
    for tp in sorted(by, key=int):
        r = by[tp]
        if "error" in r:
            lines.append(f"| {tp} | - | error: {r['error'][:80]} | | | | | |")
            continue
        for b in batches:
            ms = r["decode_ms"].get(str(b))
            comm = ((check or {}).get("by_tp", {}).get(str(tp), {}).get("comm", {}) or {}).get(str(b), {})
            ar = comm.get("ms")
            e1 = eager1.get(b)
            lines.append(
                f"| {tp} | {b} | {_f(ms)}{' (graphs)' if tp == '1' and r.get('graphs') else ''} | "
                f"{_f(e1 / ms if e1 and ms else None, '{:.2f}x')} | {comm.get('calls', '-')} | "
                f"{_f(comm['bytes'] / 1e6 if 'bytes' in comm else None, '{:.3f}')} | {_f(ar, '{:.3f}')} | "
                f"{_f(100 * ar / ms if ar and ms else None, '{:.0f}%')} |"
            )
        if tp == "1" and eager1:
            for b in batches:
                lines.append(f"| 1 eager | {b} | {_f(eager1.get(b))} | 1.00x | 0 | 0 | - | - |")
    return "\n".join(lines)


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("check", "speed", "serve"):
        s = sub.add_parser(name)
        s.add_argument("--model", choices=sorted(MODELS), default="tiny" if name == "check" else "2l")
        s.add_argument("--device", default="cuda")
        s.add_argument("--dtype", default=None)
        s.add_argument("--out", default=None, help="write the JSON result here")
        s.add_argument("--rank-timeout", type=float, default=900.0)
        if name != "serve":
            s.add_argument("--tp-sizes", default="1,2,4,8")
            s.add_argument("--batches", default="1,64")
    c = sub.choices["check"]
    c.add_argument("--prompt-len", type=int, default=24)
    c.add_argument("--max-tokens", type=int, default=16)
    c.add_argument("--no-llm", dest="llm", action="store_false", help="skip greedy generation through LLM")
    c.add_argument("--crosscheck-dummy", action="store_true", help="tiny: virtual dummy init == its checkpoint")
    s = sub.choices["speed"]
    s.add_argument("--prompt-len", type=int, default=512)
    s.add_argument("--new-tokens", type=int, default=64)
    v = sub.choices["serve"]
    v.add_argument("--tp", type=int, default=2)
    v.add_argument("--concurrency", type=int, default=64)
    v.add_argument("--num-requests", type=int, default=128)
    v.add_argument("--prompt-len", type=int, default=512)
    v.add_argument("--max-tokens", type=int, default=128)
    v.add_argument("--num-kv-blocks", type=int, default=8192)
    v.add_argument("--start-timeout", type=float, default=300.0)
    v.add_argument("--bench-timeout", type=float, default=300.0)
    v.add_argument("--server-log", default=None)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    for name in ("_llm", "_engine"):  # child modes
        h = sub.add_parser(name)
        h.add_argument("--model-dir", required=True)
        h.add_argument("--load-format", default="dummy")
        h.add_argument("--tp", type=int, default=1)
        h.add_argument("--device", default="cuda")
        h.add_argument("--dtype", default="bfloat16")
        h.add_argument("--overrides", default="{}")
        h.add_argument("--max-tokens", type=int, default=16)
        h.add_argument("--batches", default="1,64")
        h.add_argument("--prompt-len", type=int, default=512)
        h.add_argument("--new-tokens", type=int, default=64)
    a = p.parse_args(argv)
    if a.cmd == "table":
        print(cmd_table(a.files))
        return 0
    if a.cmd in ("_llm", "_engine"):
        print("RESULT " + json.dumps((llm_child if a.cmd == "_llm" else engine_child)(a)), flush=True)
        return 0
    res = {"check": cmd_check, "speed": cmd_speed, "serve": cmd_serve}[a.cmd](a)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"{a.cmd} done" + (f": {a.out}" if a.out else ": " + json.dumps(res, default=str)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
