"""Serving benchmark: N concurrent streaming gRPC clients vs the offline engine on the same workload.

    python benchmarks/bench_serve.py                          # demo model, CPU
    python benchmarks/bench_serve.py --address host:50051     # an already running longcat-serve
    # the issue-6 target on one H200: LongCat-Flash-2L, dummy weights, 64 streams
    python benchmarks/bench_serve.py --model benchmarks/configs/longcat-flash-2l --load-format dummy \
        --device cuda --dtype bfloat16 --concurrency 64 --num-requests 128 --prompt-len 512 --max-tokens 128
    # CPU check that the gRPC path keeps up with H200 step rates: the model replaced by a 15 ms sleep
    python benchmarks/bench_serve.py --model benchmarks/configs/longcat-flash-tiny --load-format dummy \
        --device cpu --concurrency 64 --num-requests 128 --max-tokens 128 --fake-compute-ms 15
    # the same with the server's engine loop in a thread of the server process (default: its own process)
    ... --engine-mode thread

Workload: --num-requests prompts of --prompt-len random token ids (seeded), greedy, ignore_eos,
--max-tokens output tokens each, at most --concurrency streams at a time. The server (engine + gRPC) runs in
a child process, the clients in this one, so the load generator does not compete with the service for the
GIL; the offline LLM runs afterwards in another child (a fresh process: neither holds the other's device
memory). Reports output tokens/s, the service/offline ratio, and TTFT / time-per-output-token p50 and p99
(client-side for the service, engine timings for the offline run, where all requests are submitted at once).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # fake_compute, for the spawned children

from longcat_service.client import AsyncLongCatClient  # noqa: E402


@dataclasses.dataclass
class RequestTiming:
    ttft_s: float
    tpot_s: float | None
    num_tokens: int


@dataclasses.dataclass
class RunResult:
    name: str
    wall_s: float
    timings: list[RequestTiming]

    @property
    def output_tokens(self) -> int:
        return sum(t.num_tokens for t in self.timings)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def make_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab_size) for _ in range(length)] for _ in range(n)]


async def run_serve(address: str, prompts, max_tokens: int, concurrency: int, api_key: str | None) -> RunResult:
    gate = asyncio.Semaphore(concurrency)
    async with AsyncLongCatClient(address, api_key=api_key, timeout=3600) as client:
        async def one(prompt) -> RequestTiming:
            async with gate:
                start = time.perf_counter()
                first = last = None
                count = 0
                async with client.generate_stream(prompt, max_tokens=max_tokens, temperature=0.0,
                                                  ignore_eos=True) as stream:
                    async for chunk in stream:
                        if chunk.token_ids:
                            last = time.perf_counter()
                            first = first or last
                            count += len(chunk.token_ids)
                tpot = (last - first) / (count - 1) if count > 1 else None
                return RequestTiming(first - start, tpot, count)

        await one(prompts[0])  # warm-up (not timed)
        start = time.perf_counter()
        timings = await asyncio.gather(*(one(p) for p in prompts))
        return RunResult(f"gRPC serve ({concurrency} concurrent streams)", time.perf_counter() - start, timings)


def run_offline(engine_kwargs: dict, fake: tuple | None, prompts, max_tokens: int, batch: int) -> RunResult:
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams

    llm = LLM(**{**engine_kwargs, "max_num_seqs": batch})  # the same batch width as the served run
    if fake is not None:
        import fake_compute

        fake_compute.install(llm.engine, *fake)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], params)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    timings = [RequestTiming(o.metrics.time_to_first_token_s or float("nan"), o.metrics.mean_time_per_output_token_s,
                             len(o.outputs[0].token_ids)) for o in outputs]
    return RunResult(f"offline LLM.generate (all submitted, max_num_seqs={batch})", wall, timings)


def serve_in_child(engine_kwargs: dict, fake: tuple | None, max_queued_requests: int, conn) -> None:
    """Child process: start the server, send (address, vocab_size), serve until told to stop."""
    import functools

    from longcat_service.engine.async_engine import AsyncEngine
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.server.app import ServerConfig
    from longcat_service.server.background import BackgroundServer
    from longcat_service.server.servicer import ServerOptions

    config = ServerConfig(port=0, options=ServerOptions(max_queued_requests=max_queued_requests))
    if fake is not None:  # installed wherever the LLMEngine is built (in the engine-core process too)
        import fake_compute

        engine_kwargs = {**engine_kwargs, "engine_hook": functools.partial(fake_compute.install, step_ms=fake[0],
                                                                           host_ms=fake[1])}
    try:
        with BackgroundServer(lambda: AsyncEngine(EngineArgs(**engine_kwargs)), config) as server:
            conn.send((server.address, server.engine.model_config.vocab_size))
            conn.recv()  # stop
    except BaseException as e:
        conn.send(RuntimeError(f"{type(e).__name__}: {e}"))
        raise


def table(results: list[RunResult]) -> str:
    rows = ["| run | requests | output tokens | wall s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
            "| TPOT p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ttft = [t.ttft_s * 1000 for t in r.timings]
        tpot = [t.tpot_s * 1000 for t in r.timings if t.tpot_s is not None]
        rows.append(f"| {r.name} | {len(r.timings)} | {r.output_tokens} | {r.wall_s:.2f} | "
                    f"{r.output_tokens / r.wall_s:.1f} | {statistics.median(ttft):.1f} | {percentile(ttft, 99):.1f} | "
                    f"{statistics.median(tpot) if tpot else float('nan'):.2f} | {percentile(tpot, 99):.2f} |")
    return "\n".join(rows)




def trace_table(traces: dict[str, Path]) -> str:
    """Engine-side view of each run (warm-up steps included): where the step loop's time went."""
    from longcat_service.engine.step_trace import summarize

    rows = ["| engine of | steps | with prefill | mean seqs (decode) | decode step ms | collect (device wait) ms | "
            "schedule ms | launch ms | process ms | gap between steps ms | prefill steps ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, path in traces.items():
        if not path.exists():
            rows.append(f"| {name} | (no trace) |||||||||")
            continue
        s = summarize(str(path))
        if not s["steps"]:
            rows.append(f"| {name} | 0 |||||||||")
            continue
        g = lambda k, s=s: s.get(k, float("nan"))  # noqa: E731
        rows.append(f"| {name} | {s['steps']} | {s['steps_with_prefill']} | {g('mean_seqs_decode_steps'):.1f} | "
                    f"{g('decode_wall_ms'):.2f} | {g('decode_collect_ms'):.2f} | {g('decode_schedule_ms'):.2f} | "
                    f"{g('decode_launch_ms'):.2f} | {g('decode_process_ms'):.2f} | {g('mean_gap_ms'):.2f} | "
                    f"{g('prefill_wall_ms'):.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the demo model)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--hf-overrides", type=json.loads, default=None, help="config.json keys to replace (JSON)")
    p.add_argument("--num-layers", type=int, default=None, help="override the config's decoder-layer count")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch width (default: --concurrency)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--fake-compute-ms", type=float, default=None,
                   help="replace the model by a step of this many ms (fake_compute.py): measures the service path")
    p.add_argument("--fake-host-ms", type=float, default=2.0, help="GIL-holding part of each fake step")
    p.add_argument("--step-trace-dir", default=None,
                   help="write the engines' per-step traces here (LONGCAT_STEP_TRACE) and print their summary")
    p.add_argument("--engine-mode", choices=["auto", "process", "thread"], default="auto",
                   help="the served engine's step loop: own process or a thread of the server (auto: process)")
    args = p.parse_args(argv)

    if args.hf_overrides is not None and not isinstance(args.hf_overrides, dict):
        p.error("--hf-overrides: must be a JSON object")
    overrides = dict(args.hf_overrides or {})
    if args.num_layers is not None:
        overrides["num_layers"] = args.num_layers
    max_num_seqs = args.max_num_seqs or args.concurrency
    engine_kwargs = {"model": args.model, "load_format": args.load_format, "dtype": args.dtype,
                     "device": args.device, "max_num_seqs": max_num_seqs, "hf_overrides": overrides or None}
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    fake = (args.fake_compute_ms, args.fake_host_ms) if args.fake_compute_ms is not None else None
    spawn = multiprocessing.get_context("spawn")

    results = []
    traces: dict[str, Path] = {}

    def trace_to(name: str) -> None:  # inherited by the spawned server / engine core / offline processes
        if args.step_trace_dir:
            traces[name] = Path(args.step_trace_dir) / f"steps_{name}.jsonl"
            traces[name].parent.mkdir(parents=True, exist_ok=True)
            traces[name].unlink(missing_ok=True)
            os.environ["LONGCAT_STEP_TRACE"] = str(traces[name])

    if args.address is None:
        trace_to("serve")
        engine_kwargs["engine_mode"] = args.engine_mode
        parent, child = spawn.Pipe()
        server = spawn.Process(target=serve_in_child, args=(engine_kwargs, fake, max(512, args.num_requests), child))
        server.start()
        try:
            reply = parent.recv()
            if isinstance(reply, BaseException):
                raise RuntimeError("the server process failed to start") from reply
            address, vocab = reply
            prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
            results.append(asyncio.run(run_serve(address, prompts, args.max_tokens, args.concurrency, None)))
        finally:
            if server.is_alive():
                parent.send("stop")
                server.join(120)
            if server.is_alive():
                server.kill()
    else:
        from longcat_service.client import LongCatClient

        vocab = LongCatClient(args.address, api_key=args.api_key).model_info().config.vocab_size
        prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
        results.append(asyncio.run(run_serve(args.address, prompts, args.max_tokens, args.concurrency,
                                             args.api_key)))
    engine_kwargs.pop("engine_mode", None)  # the offline LLM has no engine mode
    if not args.skip_offline:
        trace_to("offline")
        batch = min(max_num_seqs, args.concurrency)
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            results.append(pool.submit(run_offline, engine_kwargs, fake, prompts, args.max_tokens, batch).result())
    extra = f", hf_overrides {overrides}" if overrides else ""
    extra += f", fake compute {args.fake_compute_ms:g} ms/step ({args.fake_host_ms:g} ms host)" if fake else ""
    extra += f", engine mode {args.engine_mode}" if args.address is None else ""
    print(f"model: {args.model or 'demo model'} ({args.load_format}{extra}); workload: {args.num_requests} requests, "
          f"prompt {args.prompt_len} tokens, {args.max_tokens} output tokens each, greedy, ignore_eos, "
          f"{args.concurrency} concurrent streams")
    print(table(results))
    if len(results) == 2:
        serve, offline = (r.output_tokens / r.wall_s for r in results)
        print(f"service / offline output tokens/s: {serve / offline:.3f}")
    if traces:
        print(trace_table(traces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
