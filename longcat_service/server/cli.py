"""`longcat-serve`: the gRPC server. SIGTERM/SIGINT drain: health NOT_SERVING, new calls UNAVAILABLE,
in-flight calls finish within --drain-grace-s, then exit 0.

Before anything is bound or loaded, the model directory, its config.json and the ports are checked
(server/preflight.py): a problem is one line on stderr and a non-zero exit. Exit codes: see EXIT_CODES."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import signal
import sys

# Only the standard library at module level: `longcat-serve` installs its quiet signal handlers (main) before
# torch and grpc are imported, so a signal during those seconds of imports exits 0 without a traceback.

logger = logging.getLogger("longcat_service.server")

EXIT_CODES = """exit codes:
  0  stopped by SIGTERM/SIGINT (after draining; or before serving, also while still importing)
  1  the engine failed while starting or serving
  2  bad command line: a flag's value, the --model directory or its config.json
  3  a tensor-parallel rank was lost
  4  --port, --metrics-port or --http-port is already in use"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; a flag whose default the engine decides (None here) says it in its help."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from longcat_service.server.servicer import ServerOptions  # imports torch: called after main() set its handlers

    p = argparse.ArgumentParser(prog="longcat-serve", description="LongCat-Flash gRPC inference server",
                                epilog=EXIT_CODES, formatter_class=_HelpFormatter)
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=port_number, default=50051, help="gRPC port; 0 picks a free port (printed at startup)")
    g.add_argument("--metrics-port", type=port_number, default=None,
                   help="Prometheus /metrics HTTP port (default: no metrics endpoint)")
    g = p.add_argument_group("OpenAI-compatible HTTP API (same process, loop and engine as gRPC)")
    g.add_argument("--http-host", default=None, help="default: --host")
    g.add_argument("--http-port", type=port_number, default=None,
                   help="default 8000 (0 with --port 0); 0 picks a free port (printed at startup)")
    g.add_argument("--no-http", action="store_true", help="serve gRPC only")
    g.add_argument("--reasoning-parser", choices=["longcat"], default=None,
                   help="longcat: <longcat_think>...</longcat_think> output -> reasoning_content (default: none)")
    g.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="checkpoint directory: config.json, model.safetensors[.index.json], "
                                                 "tokenizer.json (default: the embedded demo model)")
    g.add_argument("--load-format", default="auto", help="auto | dummy (random weights of the config's shape)")
    g.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: quantize an unquantized checkpoint to block FP8 as it loads (an FP8 checkpoint needs "
                        "no flag: its config.json says so; default: none)")
    g.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: the checkpoint's dtype on "
                                                 "CUDA, bfloat16 if it names none; float32 on CPU)")
    g.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available, else cpu)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences in one step (default: 256)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length, prompt + output (default: the model's max_position_embeddings, "
                        "capped to the KV cache)")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks (default: from --kv-cache-memory-bytes or --gpu-memory-utilization)")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV-cache size in bytes (default: --gpu-memory-utilization on CUDA, 128 MiB on CPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of the free GPU memory for the KV cache when no size is given (default: 0.9)")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV-cache block (default: 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step; longer prompts are prefilled in chunks (default: 8192 on CUDA, "
                        "2048 on CPU)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                   help="do not reuse the KV cache of shared prompt prefixes (default: reuse)")
    g.add_argument("--seed", type=int, default=None, help="seed for requests without their own (default: 0)")
    g.add_argument("--step-timeout-s", type=float, default=None,
                   help="a step longer than this turns health NOT_SERVING (default: 120)")
    g.add_argument("--no-overlap", dest="overlap_steps", action="store_false", default=None,
                   help="run each step's host work before launching the next (debugging; default: overlap)")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false", default=None,
                   help="read each decode step's tokens back before launching the next one (default: async)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model over")
    g.add_argument("--enable-expert-parallel", action="store_true", default=None,
                   help="split the routed experts as whole experts over the tensor-parallel ranks (default: off)")
    g.add_argument("--collect-expert-load", action="store_true", default=None,
                   help="export longcat_expert_routed_tokens_total per expert, the input of "
                        "`python -m longcat_service.distributed.eplb` (default: off)")
    g.add_argument("--ep-capacity-factor", type=float, default=None, metavar="F",
                   help="--enable-expert-parallel with CUDA graphs: all-to-all rows per peer in a decode step, as F x "
                        "a uniform routing's share (a step that overflows runs again eagerly; default: buffers "
                        "that never overflow)")
    g.add_argument("--expert-placement", default=None, metavar="JSON_FILE",
                   help="static expert -> rank map for --enable-expert-parallel (default: contiguous groups)")
    g.add_argument("--engine-mode", choices=["auto", "process", "thread"], default="auto",
                   help="engine step loop in its own process (the event loop keeps its GIL) or a thread; "
                        "auto: process, thread under torchrun")
    g.add_argument("--hf-overrides", type=hf_overrides_json, default=None, metavar="JSON",
                   help='config.json keys to replace, e.g. \'{"num_layers": 2}\' (default: none)')
    g.add_argument("--speculative-config", type=speculative_config_json, default=None, metavar="JSON",
                   help='speculative decoding with the checkpoint\'s MTP layer, e.g. '
                        '\'{"method": "mtp", "num_speculative_tokens": 1}\' (alias method: longcat_flash_mtp; 1..3; '
                        'default: off)')
    g = p.add_argument_group("security")
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain; enables TLS with --tls-key "
                                                    "(default: plaintext)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (default: none)")
    g.add_argument("--tls-client-ca", default=None,
                   help="require client certificates signed by this CA, mutual TLS (default: no client certificates)")
    g.add_argument("--api-key", action="append", default=[],
                   help="accepted key, sent as 'authorization: Bearer KEY'; repeatable (default: no keys, open)")
    g.add_argument("--api-key-file", default=None, help="file with one accepted key per line (default: none)")
    g = p.add_argument_group("limits")
    d = ServerOptions()
    g.add_argument("--max-queued-requests", type=at_least_one, default=d.max_queued_requests,
                   help="requests admitted but not yet running; more are RESOURCE_EXHAUSTED with retry-after-ms")
    g.add_argument("--max-queued-tokens", type=at_least_one, default=d.max_queued_tokens,
                   help="prompt tokens admitted but not yet running; more are RESOURCE_EXHAUSTED")
    g.add_argument("--stream-buffer-size", type=at_least_one, default=d.stream_buffer_size,
                   help="responses buffered per stream for a slow reader")
    g.add_argument("--slow-reader-timeout-s", type=positive_seconds, default=d.slow_reader_timeout_s,
                   help="a client that reads nothing for this long is dropped (UNAVAILABLE) and its request aborted")
    g.add_argument("--drain-grace-s", type=non_negative_seconds, default=30.0,
                   help="on SIGTERM/SIGINT: health NOT_SERVING, new calls UNAVAILABLE, and in-flight requests get "
                        "this many seconds to finish; streams still running then end with UNAVAILABLE ('server "
                        "shut down', output sent so far stays delivered) and the server stops within about 1 s "
                        "more (then the Python process exits) (default: %(default)s)")
    g = p.add_argument_group("logging")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    g.add_argument("--log-prompts", action="store_true", help="log prompt and output text (off: counts only)")
    return p


def port_number(text: str) -> int:
    port = _number(int, text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {port}")
    return port


def at_least_one(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    value = _number(float, text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_seconds(text: str) -> float:
    value = _number(float, text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _number(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def hf_overrides_json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of config.json keys, got {text!r}")
    return value


def speculative_config_json(text: str):
    from longcat_service.engine.errors import EngineArgsError
    from longcat_service.engine.spec_config import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(text)
    except EngineArgsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def engine_args_from(args: argparse.Namespace):
    from longcat_service.engine.engine_args import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    wanted = {
        "model": args.model, "dtype": args.dtype, "quantization": args.quantization, "device": args.device, "load_format": args.load_format,
        "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
        "num_kv_blocks": args.num_kv_blocks, "tensor_parallel_size": args.tensor_parallel_size,
        "hf_overrides": args.hf_overrides, "engine_mode": args.engine_mode,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes, "gpu_memory_utilization": args.gpu_memory_utilization,
        "block_size": args.block_size, "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": args.enable_prefix_caching, "seed": args.seed,
        "step_timeout_s": args.step_timeout_s, "overlap_steps": args.overlap_steps,
        "async_scheduling": args.async_scheduling, "speculative_config": args.speculative_config,
        "collect_expert_load": args.collect_expert_load, "enable_expert_parallel": args.enable_expert_parallel,
        "expert_placement": args.expert_placement, "ep_capacity_factor": args.ep_capacity_factor,
    }
    if args.tensor_parallel_size != 1 and "tensor_parallel_size" not in known:
        raise SystemExit("--tensor-parallel-size: this engine build has no tensor parallelism")
    return EngineArgs(**{k: v for k, v in wanted.items() if k in known and v is not None})


def server_config_from(args: argparse.Namespace):
    """ServerConfig from the flags; StartupError (one line, exit 2) for TLS / key flags that do not fit or files
    that cannot be read."""
    from longcat_service.server.app import ServerConfig, TlsConfig
    from longcat_service.server.preflight import StartupError
    from longcat_service.server.servicer import ServerOptions

    if bool(args.tls_cert) != bool(args.tls_key):
        raise StartupError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise StartupError("--tls-client-ca needs --tls-cert and --tls-key")
    keys = list(args.api_key)
    if args.api_key_file:
        try:
            with open(args.api_key_file) as f:
                keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise StartupError(f"--api-key-file {args.api_key_file}: {e.strerror}") from None
    options = ServerOptions(
        max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
        stream_buffer_size=args.stream_buffer_size, slow_reader_timeout_s=args.slow_reader_timeout_s,
        log_prompts=args.log_prompts, model_name=args.served_model_name or str(args.model or "longcat-demo"),
        tensor_parallel_size=args.tensor_parallel_size,
    )
    try:
        tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    except OSError as e:
        raise StartupError(f"--tls-*: {e.filename}: {e.strerror}") from None
    return ServerConfig(host=args.host, port=args.port, options=options, api_keys=keys, tls=tls,
                        metrics_port=args.metrics_port, http_port=http_port_from(args), http_host=args.http_host,
                        reasoning_parser=args.reasoning_parser)


def http_port_from(args: argparse.Namespace) -> int | None:
    """None: no HTTP. An ephemeral gRPC port (--port 0: tests, scripts) makes the default HTTP port ephemeral too."""
    if args.no_http:
        return None
    if args.http_port is not None:
        return args.http_port
    return 0 if args.port == 0 else 8000


async def serve(args: argparse.Namespace, config=None) -> int:
    from longcat_service.engine.async_engine import AsyncEngine
    from longcat_service.server.app import LongCatServer

    config = config if config is not None else server_config_from(args)
    if args.model is None:
        from longcat_service.demo import DEMO_NOTICE

        logger.info(DEMO_NOTICE)
    server = LongCatServer(AsyncEngine(engine_args_from(args)), config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Loading a large checkpoint takes minutes, and Kubernetes stops pods that are still starting: a signal
    # during start() abandons the load and exits 0 instead of waiting for it.
    starting = asyncio.create_task(server.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        logger.info("signal received while loading the model: stopping")
        await server.stop_while_starting(starting)
        logger.info("stopped before serving")
        return 0
    stopped.cancel()
    try:
        port = starting.result()
    except Exception as e:  # one line (the engine's own log holds the details); nothing left running
        print(f"longcat-serve: could not start: {_one_line(e)}", file=sys.stderr, flush=True)
        await server.stop()
        return 4 if _address_in_use(e) else 1
    logger.info("serving %s", server.engine.description)
    print(f"longcat-serve listening on {config.host}:{port}", flush=True)  # scripts wait for this line
    if server.metrics_port is not None:
        print(f"metrics on http://{config.host}:{server.metrics_port}/metrics", flush=True)
    if server.http is not None:
        print(f"OpenAI-compatible HTTP API and playground on http://{server.http.host}:{server.http.port}/", flush=True)
    await stop.wait()
    logger.info("signal received: draining (grace %.1fs)", args.drain_grace_s)
    finished = await server.drain_and_stop(args.drain_grace_s)
    logger.info("stopped (%s)", "all requests finished" if finished else "grace period expired")
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _address_in_use(error: BaseException) -> bool:
    import errno

    return (getattr(error, "errno", None) == errno.EADDRINUSE
            or (isinstance(error, RuntimeError) and "Failed to bind" in str(error)))


def _exit_quietly(signum, frame):
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    # Until serve() installs its handlers (torch and the engine are still being imported), a stop signal
    # ends the process quietly with 0: nothing has started that would need stopping.
    previous = {sig: signal.signal(sig, _exit_quietly) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv)
    finally:  # main() may run inside another program (tests): leave its handlers as they were
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from longcat_service.distributed.launch import torchrun_job

    try:  # under torchrun every rank runs this CLI: global rank 0 serves, the others follow it
        job = torchrun_job(args.tensor_parallel_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    where = f" [rank {job.rank}]" if job else ""
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")
    if job is not None:
        args.tensor_parallel_size = job.world_size
    from longcat_service.engine.errors import EngineArgsError
    from longcat_service.server import preflight

    try:  # bad flags, model directory, config or ports: one line naming the problem, before any bind or load
        preflight.check_model_dir(args.model, args.load_format, args.hf_overrides)
        try:
            engine_args_from(args)
        except EngineArgsError as e:
            reason = str(e).removeprefix(f"{e.field}: ")
            raise preflight.StartupError(f"--{e.field.replace('_', '-')}: {reason}") from None
        if job is None or job.rank == 0:
            config = server_config_from(args)
            preflight.check_port_free(args.host, args.port, "--port")
            preflight.check_port_free(args.host, args.metrics_port, "--metrics-port")
            preflight.check_port_free(args.http_host or args.host, http_port_from(args), "--http-port")
    except preflight.StartupError as e:
        print(f"longcat-serve: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if job is not None and job.rank != 0:
        from longcat_service.engine.tp_worker import run_worker

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a follower rank keeps Python's defaults: it dies with the job
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_worker(engine_args_from(args), args.model, job)
    return asyncio.run(serve(args, config))


if __name__ == "__main__":
    sys.exit(main())
