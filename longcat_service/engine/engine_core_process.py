"""The engine core in its own process: the LLMEngine step loop runs in a spawned child, so its host work (scheduler,
sampler, detokenizer, output processing) never shares a GIL with the server's event loop (vLLM's EngineCore).

Two one-way pipes. Parent -> child: ("add", key, seq, prompt, params, deadline, arrival), ("abort", key),
("shutdown",). Child -> parent: ("ready", CoreInfo) once, then ONE ("step", status, deltas, errors) per engine
step and ("heartbeat", status) while idle, and ("dead", reason) if the loop dies. A delta holds only what the
step added (StepDelta), never a request's whole history; the parent rebuilds totals (OutputRebuilder).

The child ignores SIGINT / SIGTERM (the parent drains and then sends shutdown) and exits when the parent's end
of the command pipe closes (the parent died), so it is never orphaned.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from longcat_service.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

# (index, new_token_ids, text_delta, new_logprobs as (token_id, logprob, top) tuples or None, finish_reason,
#  stop_reason) per sample
SampleDelta = tuple[int, list[int], str, list[tuple] | None, str | None, Any]


@dataclass
class StepDelta:
    key: str  # the engine-side key of the stream
    finished: bool
    num_cached_tokens: int
    metrics: tuple  # RequestMetrics fields in order
    error: str | None
    prompt_logprobs: list | None  # sent once, the first step it is complete
    samples: list[SampleDelta]


@dataclass
class CoreStatus:
    """Load and health, on every message so that load() / is_healthy() in the parent never block."""
    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    kv_cache_usage: float
    runner_healthy: bool  # e.g. False when a tensor-parallel rank was lost
    last_add_seq: int  # the last add command applied (the parent counts later ones as still waiting)
    expert_tokens: tuple[int, ...] | None = None
    ep_capacity_overflows: int | None = None


@dataclass
class CoreInfo:
    model_config: Any
    max_model_len: int
    vocab_size: int
    model_path: str
    has_tokenizer: bool
    eos_token_id: int | None = None
    description: str = ""  # LLMEngine.description, for the server's start-up log


PARENT_GONE_GRACE_S = 2.0  # after the parent died, the loop gets this long to end by itself


def heartbeat_interval(step_timeout_s: float) -> float:
    """Idle heartbeat period: well inside step_timeout_s, so silence longer than that means a hung child."""
    return min(0.5, step_timeout_s / 4)


# ---- child side ---------------------------------------------------------------------------------------------
def encode_output(out: RequestOutput, prompt_logprobs_sent: set[str]) -> StepDelta:
    """This step's additions of one RequestOutput (its full-history lists are left behind)."""
    samples = []
    for c in out.outputs:
        lps = [(lp.token_id, lp.logprob, lp.top) for lp in c.new_logprobs] if c.new_logprobs is not None else None
        samples.append((c.index, c.new_token_ids, c.text_delta, lps, c.finish_reason, c.stop_reason))
    plp = None
    if out.prompt_logprobs is not None and out.request_id not in prompt_logprobs_sent:
        prompt_logprobs_sent.add(out.request_id)
        plp = out.prompt_logprobs
    if out.finished:
        prompt_logprobs_sent.discard(out.request_id)
    metrics = dataclasses.astuple(out.metrics)  # every field (the speculative-decoding counts too)
    return StepDelta(out.request_id, out.finished, out.num_cached_tokens, metrics, out.error, plp, samples)


def _status(engine, last_add_seq: int) -> CoreStatus:
    load = engine.load()
    healthy = bool(getattr(engine.runner, "is_healthy", lambda: True)())
    return CoreStatus(load.num_running, load.num_waiting, load.num_waiting_tokens, load.kv_cache_usage, healthy,
                      last_add_seq, load.expert_tokens, load.ep_capacity_overflows)


def run_engine_core(args, cmd_conn, out_conn) -> None:
    """Child process entry: build the LLMEngine, then step while requests are open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains on these, then tells us to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from longcat_service.engine.llm_engine import LLMEngine

        engine = LLMEngine(args)
        if args.engine_hook is not None:
            args.engine_hook(engine)
        info = CoreInfo(engine.model_config, engine.max_model_len, engine.vocab_size, str(engine.model_path),
                        engine.tokenizer is not None, engine.eos_token_id, engine.description)
    except BaseException as e:
        logger.exception("engine core failed to start")
        out_conn.send(("failed", portable_error(e)))
        return
    out_conn.send(("ready", info))
    try:
        _CoreLoop(engine, cmd_conn, out_conn, heartbeat_interval(args.step_timeout_s)).run()
    finally:  # a multiprocessing child skips atexit: stop tensor-parallel ranks here, or exit would wait for them
        engine.close()
    # Nothing else is left to tear down: skip the interpreter's teardown, which takes ~2 s with torch loaded and
    # would make the server's exit overrun --drain-grace-s. Buffered files are flushed first.
    engine.trace.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    out_conn.close()
    os._exit(0)


class _CoreLoop:
    def __init__(self, engine, cmd_conn, out_conn, heartbeat_s: float):
        self.engine, self.out_conn, self.heartbeat_s = engine, out_conn, heartbeat_s
        self.commands: collections.deque = collections.deque()
        self.wake = threading.Event()
        self.last_add_seq = 0
        self.prompt_logprobs_sent: set[str] = set()
        # A reader thread keeps the command pipe drained while a step runs, so the parent's send never blocks.
        threading.Thread(target=self._read_commands, args=(cmd_conn,), name="longcat-core-commands",
                         daemon=True).start()

    def _read_commands(self, conn) -> None:
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):  # the parent is gone: stop, even if a step hangs (no orphan)
                self.commands.append(("shutdown",))
                self.wake.set()
                time.sleep(PARENT_GONE_GRACE_S)
                os._exit(1)
            self.commands.append(cmd)
            self.wake.set()
            if cmd[0] == "shutdown":
                return

    def run(self) -> None:
        engine = self.engine
        last_sent = time.monotonic()
        try:
            while True:
                errors = self._apply_commands()
                if errors is None:
                    return  # shutdown
                if not engine.has_unfinished_requests():
                    if errors or time.monotonic() - last_sent >= self.heartbeat_s:
                        kind = ("step", _status(engine, self.last_add_seq), [], errors) if errors else \
                            ("heartbeat", _status(engine, self.last_add_seq))
                        self.out_conn.send(kind)
                        last_sent = time.monotonic()
                    self.wake.wait(self.heartbeat_s)
                    self.wake.clear()
                    continue
                outputs = engine.step()
                deltas = [encode_output(o, self.prompt_logprobs_sent) for o in outputs]
                self.out_conn.send(("step", _status(engine, self.last_add_seq), deltas, errors))
                last_sent = time.monotonic()
        except BaseException as e:  # the loop is gone: tell the parent, which ends every stream
            logger.exception("engine core loop died")
            try:
                self.out_conn.send(("dead", f"engine loop died: {type(e).__name__}: {e}"))
            except (OSError, ValueError):
                pass

    def _apply_commands(self) -> list[tuple[str, tuple]] | None:
        """Apply queued commands; None on shutdown, else the adds that failed as (key, portable_error)."""
        errors = []
        while self.commands:
            cmd = self.commands.popleft()
            if cmd[0] == "add":
                _, key, seq, prompt, params, deadline, arrival = cmd
                self.last_add_seq = seq
                try:
                    self.engine.add_request(key, prompt, params, deadline=deadline, arrival_time=arrival)
                except Exception as e:
                    errors.append((key, portable_error(e)))
            elif cmd[0] == "abort":
                self.engine.abort_request(cmd[1])
            elif cmd[0] == "shutdown":
                return None
        return errors


def portable_error(e: BaseException) -> tuple:
    """An exception as (class, field, text): the field errors (PromptError, EngineArgsError, ...) take
    (field, message) and do not survive a plain pickle."""
    return type(e), getattr(e, "field", None), str(e)


def rebuild_error(portable: tuple) -> BaseException:
    cls, field, text = portable
    try:
        if field is not None:
            return cls(field, text.removeprefix(f"{field}: "))
        return cls(text)
    except Exception:
        return RuntimeError(f"{cls.__name__}: {text}")


# ---- parent side --------------------------------------------------------------------------------------------
class EngineStartCancelled(RuntimeError):
    """start() gave up because shutdown() was called while the engine was loading."""


class EngineCoreClient:
    """Spawns the child and talks to it; `on_message(msg)` runs in a reader thread for every child message
    after "ready", and `on_exit(reason)` once when the child's pipe closes (reason None after shutdown())."""

    def __init__(self, args, on_message, on_exit):
        self.args = args
        self._on_message, self._on_exit = on_message, on_exit
        self._send_lock = threading.Lock()
        self.process = None
        self._cmd_conn = self._out_conn = None
        self._reader: threading.Thread | None = None
        self.last_message_at = time.monotonic()
        self.stopping = False
        self._start_lock = threading.Lock()  # shutdown() during start(): the child is spawned and seen, or never

    def start(self) -> CoreInfo:
        """Blocking: spawn the child and wait until its engine is built."""
        ctx = multiprocessing.get_context("spawn")
        cmd_recv, self._cmd_conn = ctx.Pipe(duplex=False)
        self._out_conn, out_send = ctx.Pipe(duplex=False)
        # A daemonic process may not spawn children: tensor-parallel ranks need a non-daemonic one (atexit below).
        self.process = ctx.Process(target=run_engine_core, args=(self.args, cmd_recv, out_send),
                                   name="longcat-engine-core", daemon=self.args.tensor_parallel_size == 1)
        with self._start_lock:
            if self.stopping:
                raise EngineStartCancelled("the engine core was shut down before it started")
            self.process.start()
        cmd_recv.close()  # our copies: the pipes close (EOF) when the other side's process ends
        out_send.close()
        atexit.register(self._kill_at_exit)
        try:
            msg = self._out_conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            if self.stopping:
                raise EngineStartCancelled("the engine core was shut down while loading the model") from None
            raise RuntimeError(f"the engine core process exited while starting (exit code {self.process.exitcode})"
                               ) from None
        if msg[0] != "ready":  # the same error the thread engine raises (e.g. EngineArgsError naming the field)
            self.process.join(30)
            raise rebuild_error(msg[1])
        self.last_message_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="longcat-engine-core-reader", daemon=True)
        self._reader.start()
        return msg[1]

    def send(self, cmd: tuple) -> None:
        with self._send_lock:
            self._cmd_conn.send(cmd)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def _read(self) -> None:
        reason = None
        while True:
            try:
                msg = self._out_conn.recv()  # blocks with the GIL released
            except (EOFError, OSError):
                self.process.join(5)
                reason = f"engine core process exited (exit code {self.process.exitcode})"
                break
            except Exception as e:  # an unreadable message (unpickling): its outputs are lost
                reason = self._reader_failed("could not read a message from the engine core", e)
                break
            self.last_message_at = time.monotonic()
            if msg[0] == "dead":
                reason = msg[1]
                break
            try:
                self._on_message(msg)
            except Exception as e:
                reason = self._reader_failed("the engine core reader failed", e)
                break
        self._on_exit(None if self.stopping else reason)

    def _reader_failed(self, what: str, e: Exception) -> str:
        """Without this thread nothing delivers the child's outputs (streams would wait forever) and the child
        blocks once the pipe fills: stop the child, so the engine is dead and every stream ends with the reason."""
        logger.exception(what)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        return f"{what}: {type(e).__name__}: {e}"

    def shutdown(self, step_timeout_s: float) -> None:
        """Blocking: ask the child to stop; kill it once it has been silent (a hung step) past step_timeout_s."""
        with self._start_lock:
            self.stopping = True
        if self.process is None or self.process.pid is None:  # never spawned (start() now refuses to)
            return
        if self._reader is None and self.process.is_alive():
            # still loading (a large checkpoint takes minutes): no requests to drain, and the child ignores
            # SIGTERM / SIGINT, so stop it now
            logger.info("shutdown while the engine core loads the model: stopping it")
            self.process.kill()
            self.process.join(5)
        try:
            self.send(("shutdown",))
        except (OSError, ValueError):
            pass  # already gone
        while self.process.is_alive():
            self.process.join(0.05)
            if time.monotonic() - self.last_message_at > step_timeout_s and self.process.is_alive():
                logger.error("shutdown: the engine core has been silent for %.0fs; killing it",
                             time.monotonic() - self.last_message_at)
                self.process.kill()
                self.process.join(5)
        if self._reader is not None:
            self._reader.join(5)
        self._cmd_conn.close()
        atexit.unregister(self._kill_at_exit)

    def _kill_at_exit(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class OutputRebuilder:
    """Parent side of one stream: StepDeltas -> RequestOutputs. Each output carries the step's deltas; a sample's
    totals (token_ids, text, logprobs) are filled on its final output only, so a long stream costs O(1) per token
    (the thread engine fills them on every output)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], n: int):
        self.request_id, self.prompt_token_ids = request_id, prompt_token_ids
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.text: list[list[str]] = [[] for _ in range(n)]
        self.logprobs: list[list[Logprob] | None] = [None] * n
        self.final: dict[int, CompletionOutput] = {}
        self.prompt_logprobs = None
        self.num_cached_tokens = 0
        self.metrics: tuple = dataclasses.astuple(RequestMetrics())

    def end(self, reason: str, error: str | None) -> RequestOutput:
        """The final output when the engine ended the stream itself (shutdown, death): the samples still open
        finish with `reason` and the totals delivered so far (the usage a server reports)."""
        samples = [(i, [], "", [] if self.logprobs[i] is not None else None, reason, None)
                   for i in range(len(self.token_ids))]
        return self.rebuild(StepDelta("", True, self.num_cached_tokens, self.metrics, error, None, samples))

    def rebuild(self, d: StepDelta) -> RequestOutput:
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        self.num_cached_tokens, self.metrics = d.num_cached_tokens, d.metrics
        outputs = []
        for index, new_ids, text_delta, new_lps, finish_reason, stop_reason in d.samples:
            done = self.final.get(index)
            if done is not None:  # finished in an earlier step (n > 1): repeat its totals, no new deltas
                outputs.append(CompletionOutput(index, done.token_ids, done.text, done.logprobs, done.finish_reason,
                                                done.stop_reason, [], "", [] if done.logprobs is not None else None))
                continue
            self.token_ids[index].extend(new_ids)
            if text_delta:
                self.text[index].append(text_delta)
            lps = None
            if new_lps is not None:
                lps = [Logprob(t, lp, top) for t, lp, top in new_lps]
                if self.logprobs[index] is None:
                    self.logprobs[index] = []
                self.logprobs[index].extend(lps)
            out = CompletionOutput(index=index, finish_reason=finish_reason, stop_reason=stop_reason,
                                   new_token_ids=new_ids, text_delta=text_delta, new_logprobs=lps)
            if finish_reason is not None:
                out.token_ids, out.text = self.token_ids[index], "".join(self.text[index])
                out.logprobs = self.logprobs[index] if new_lps is not None else None
                self.final[index] = out
            outputs.append(out)
        return RequestOutput(self.request_id, self.prompt_token_ids, outputs, finished=d.finished,
                             num_cached_tokens=d.num_cached_tokens, prompt_logprobs=self.prompt_logprobs,
                             metrics=RequestMetrics(*d.metrics), error=d.error)


def resolve_engine_mode(args) -> str:
    """"auto": the engine core in its own process for one local GPU. It keeps the thread under torchrun
    (WORLD_SIZE > 1), where the serving rank's LLMEngine joins the torchrun process group in this process, and at
    tensor_parallel_size > 1, where a lost rank must end the server process (exit code 3), not only the child."""
    if args.engine_mode == "process" and _under_torchrun():
        from longcat_service.engine.errors import EngineArgsError

        raise EngineArgsError("engine_mode", "'process' is not supported under torchrun; use 'thread' or 'auto'")
    if args.engine_mode != "auto":
        return args.engine_mode
    return "thread" if _under_torchrun() or args.tensor_parallel_size > 1 else "process"


def check_engine_hook_picklable(args) -> None:
    """The spawned child receives EngineArgs by pickle, so a lambda or a local function as engine_hook would fail
    inside Process.start with an error that names no field: refuse it up front instead."""
    if args.engine_hook is None:
        return
    from multiprocessing.reduction import ForkingPickler

    from longcat_service.engine.errors import EngineArgsError

    try:
        ForkingPickler.dumps(args.engine_hook)
    except Exception as e:
        raise EngineArgsError("engine_hook", f"must be picklable in engine_mode 'process' (a module-level function "
                              f"or a functools.partial of one), got {args.engine_hook!r}: {e}") from None


def _under_torchrun() -> bool:
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False
