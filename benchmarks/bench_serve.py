"""Serving benchmark: N concurrent streaming gRPC clients vs the offline engine on the same workload.

    python benchmarks/bench_serve.py                          # demo model, server started in-process
    python benchmarks/bench_serve.py --address host:50051     # an already running longcat-serve
    python benchmarks/bench_serve.py --model /ckpt --load-format dummy --num-layers 2 --device cuda

Workload: --num-requests prompts of --prompt-len random token ids (seeded), greedy, ignore_eos,
--max-tokens output tokens each, at most --concurrency streams at a time. Reports output tokens/s
and TTFT / time-per-output-token p50 and p99 for the server (client-side timings) and for the
offline LLM (engine timings, all requests submitted at once).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def run_offline(engine_kwargs: dict, prompts, max_tokens: int, batch: int) -> RunResult:
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams

    llm = LLM(**{**engine_kwargs, "max_num_seqs": batch})  # the same batch width as the served run
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], params)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    timings = [RequestTiming(o.metrics.time_to_first_token_s or float("nan"), o.metrics.mean_time_per_output_token_s,
                             len(o.outputs[0].token_ids)) for o in outputs]
    return RunResult(f"offline LLM.generate (all submitted, max_num_seqs={batch})", wall, timings)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the demo model)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--num-layers", type=int, default=None, help="override the config's decoder-layer count")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-offline", action="store_true")
    args = p.parse_args(argv)

    from longcat_service.engine.engine_args import EngineArgs

    engine_kwargs = {"model": args.model, "load_format": args.load_format, "dtype": args.dtype,
                     "device": args.device, "max_num_seqs": args.max_num_seqs}
    if args.num_layers is not None:
        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        if "num_layers" in fields:
            engine_kwargs["num_layers"] = args.num_layers
        elif "hf_overrides" in fields:
            engine_kwargs["hf_overrides"] = {"num_layers": args.num_layers}
        else:
            p.error("--num-layers: this engine build has no layer-count override yet")
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}

    results = []
    if args.address is None:
        from longcat_service.engine.async_engine import AsyncEngine
        from longcat_service.server.app import ServerConfig
        from longcat_service.server.background import BackgroundServer
        from longcat_service.server.servicer import ServerOptions

        config = ServerConfig(port=0, options=ServerOptions(max_queued_requests=max(512, args.num_requests)))
        with BackgroundServer(lambda: AsyncEngine(EngineArgs(**engine_kwargs)), config) as server:
            vocab = server.engine.tokenizer.vocab_size
            prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
            results.append(asyncio.run(run_serve(server.address, prompts, args.max_tokens, args.concurrency, None)))
    else:
        from longcat_service.client import LongCatClient

        vocab = LongCatClient(args.address, api_key=args.api_key).model_info().config.vocab_size
        prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
        results.append(asyncio.run(run_serve(args.address, prompts, args.max_tokens, args.concurrency,
                                             args.api_key)))
    if not args.skip_offline:
        # A fresh process, so that neither engine's memory or threads slow the other down.
        batch = min(args.max_num_seqs, args.concurrency)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(run_offline, engine_kwargs, prompts, args.max_tokens, batch).result())
    print(f"workload: {args.num_requests} requests, prompt {args.prompt_len} tokens, {args.max_tokens} output "
          f"tokens each, greedy, ignore_eos")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
