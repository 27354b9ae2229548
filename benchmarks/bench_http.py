"""HTTP (OpenAI-compatible SSE) vs gRPC streaming on one server in the same run: the same workload is sent through
both protocols to the same engine, one phase after the other (each phase repeated --rounds times, alternating, the
best round kept), and the ratio of output tokens/s is printed (issue 18's target: HTTP >= 0.9 x gRPC).

    python benchmarks/bench_http.py                               # demo model, CPU
    # on one H200 (LongCat-Flash-2L, dummy weights, 64 concurrent streams per protocol)
    python benchmarks/bench_http.py --model benchmarks/configs/longcat-flash-2l --load-format dummy \
        --device cuda --dtype bfloat16 --concurrency 64 --num-requests 256 --prompt-len 512 --max-tokens 128 \
        --client-processes 4
    # CPU check that both service paths keep up with H200 step rates: the model replaced by a 15 ms sleep
    python benchmarks/bench_http.py --model benchmarks/configs/longcat-flash-tiny --load-format dummy \
        --device cpu --concurrency 64 --num-requests 128 --max-tokens 128 --fake-compute-ms 15

Workload as in bench_serve.py: --num-requests prompts of --prompt-len random token ids (seeded), greedy, ignore_eos,
--max-tokens output tokens each, at most --concurrency streams at a time. The server (engine, gRPC and HTTP) runs in
a child process; the clients run here: gRPC through AsyncLongCatClient, HTTP through httpx reading
/v1/completions SSE events (token-id prompts, stream_options.include_usage for the token count). TTFT and TPOT are
client-side; HTTP counts one token per content event until the final usage gives the exact total."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from bench_serve import RequestTiming, RunResult, make_prompts, run_serve, table  # noqa: E402


async def run_http(base_url: str, model: str, prompts, max_tokens: int, concurrency: int,
                   api_key: str | None) -> RunResult:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=3600, limits=limits) as client:
        async def one(prompt) -> RequestTiming:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with gate:
                start = time.perf_counter()
                first = last = None
                events = 0
                total = None
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            total = chunk["usage"]["completion_tokens"]
                        if chunk.get("choices"):
                            last = time.perf_counter()
                            first = first or last
                            events += 1
                count = total if total is not None else events
                tpot = (last - first) / (count - 1) if count > 1 and first is not None else None
                return RequestTiming((first or time.perf_counter()) - start, tpot, count)

        await one(prompts[0])  # warm-up (not timed)
        start = time.perf_counter()
        timings = await asyncio.gather(*(one(p) for p in prompts))
        return RunResult(f"HTTP SSE /v1/completions ({concurrency} concurrent streams)", time.perf_counter() - start,
                         timings)


def run_phase(kind: str, address: str, http_url: str, model: str, prompts, max_tokens: int, concurrency: int,
              api_key: str | None) -> RunResult:
    if kind == "grpc":
        return asyncio.run(run_serve(address, prompts, max_tokens, concurrency, api_key))
    return asyncio.run(run_http(http_url, model, prompts, max_tokens, concurrency, api_key))


def run_split(pool, procs: int, kind: str, *args) -> RunResult:
    """The phase with its prompts and concurrency split over `procs` client processes (a Python client process
    saturates before a fast server does); wall time is the slowest process's."""
    address, http_url, model, prompts, max_tokens, concurrency, api_key = args
    if procs <= 1:
        return run_phase(kind, *args)
    futures = [pool.submit(run_phase, kind, address, http_url, model, prompts[i::procs], max_tokens,
                           max(1, concurrency // procs), api_key) for i in range(procs)]
    parts = [f.result() for f in futures]
    name = parts[0].name.replace(f"({max(1, concurrency // procs)} ", f"({concurrency} ") + f" x{procs} procs"
    return RunResult(name, max(r.wall_s for r in parts), [t for r in parts for t in r.timings])


def serve_in_child(engine_kwargs: dict, fake: tuple | None, max_queued_requests: int, conn) -> None:
    """Child process: gRPC and HTTP on one engine; sends (grpc address, http base url, vocab size)."""
    import functools

    from longcat_service.engine.async_engine import AsyncEngine
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.server.app import ServerConfig
    from longcat_service.server.background import BackgroundServer
    from longcat_service.server.servicer import ServerOptions

    config = ServerConfig(port=0, http_port=0, options=ServerOptions(max_queued_requests=max_queued_requests))
    if fake is not None:  # installed wherever the LLMEngine is built (in the engine-core process too)
        import fake_compute

        engine_kwargs = {**engine_kwargs, "engine_hook": functools.partial(fake_compute.install, step_ms=fake[0],
                                                                           host_ms=fake[1])}
    try:
        with BackgroundServer(lambda: AsyncEngine(EngineArgs(**engine_kwargs)), config) as server:
            conn.send((server.address, f"http://127.0.0.1:{server.server.http.port}",
                       server.engine.model_config.vocab_size))
            conn.recv()  # stop
    except BaseException as e:
        conn.send(RuntimeError(f"{type(e).__name__}: {e}"))
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="gRPC address of a running longcat-serve (with --http-url)")
    p.add_argument("--http-url", default=None, help="its HTTP base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the demo model)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--hf-overrides", type=json.loads, default=None, help="config.json keys to replace (JSON)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch width (default: --concurrency)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="alternating gRPC/HTTP rounds; the best of each is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client-processes", type=int, default=1,
                   help="split each phase's streams over this many client processes (both protocols alike)")
    p.add_argument("--fake-compute-ms", type=float, default=None,
                   help="replace the model by a step of this many ms (fake_compute.py): measures the service paths")
    p.add_argument("--fake-host-ms", type=float, default=2.0, help="GIL-holding part of each fake step")
    args = p.parse_args(argv)
    if (args.address is None) != (args.http_url is None):
        p.error("--address and --http-url go together")

    engine_kwargs = {"model": args.model, "load_format": args.load_format, "dtype": args.dtype, "device": args.device,
                     "max_num_seqs": args.max_num_seqs or args.concurrency, "hf_overrides": args.hf_overrides}
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    server = parent = None
    if args.address is None:
        spawn = multiprocessing.get_context("spawn")
        parent, child = spawn.Pipe()
        fake = (args.fake_compute_ms, args.fake_host_ms) if args.fake_compute_ms is not None else None
        server = spawn.Process(target=serve_in_child,
                               args=(engine_kwargs, fake, max(512, args.num_requests), child))
        server.start()
        reply = parent.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError("the server process failed to start") from reply
        address, http_url, vocab = reply
    else:
        from longcat_service.client import LongCatClient

        address, http_url = args.address, args.http_url
        vocab = LongCatClient(address, api_key=args.api_key).model_info().config.vocab_size
    try:
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(http_url + "/v1/models", headers=headers, timeout=60).json()["data"][0]["id"]
        prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
        best: dict[str, RunResult] = {}
        pool = ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(args.rounds):
            for kind in ("grpc", "http"):
                r = run_split(pool, args.client_processes, kind, address, http_url, model, prompts, args.max_tokens,
                              args.concurrency, args.api_key)
                if kind not in best or r.output_tokens / r.wall_s > best[kind].output_tokens / best[kind].wall_s:
                    best[kind] = r
        pool.shutdown()
    finally:
        if server is not None:
            if server.is_alive():
                parent.send("stop")
                server.join(120)
            if server.is_alive():
                server.kill()
    print(f"model: {args.model or 'demo model'} ({args.load_format}); workload: {args.num_requests} requests, "
          f"prompt {args.prompt_len} tokens, {args.max_tokens} output tokens each, greedy, ignore_eos, "
          f"{args.concurrency} concurrent streams per protocol ({args.client_processes} client process(es)), "
          f"best of {args.rounds} alternating rounds")
    print(table([best["grpc"], best["http"]]))
    grpc_rate, http_rate = (best[k].output_tokens / best[k].wall_s for k in ("grpc", "http"))
    print(f"HTTP / gRPC output tokens/s: {http_rate / grpc_rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
