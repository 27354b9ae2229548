"""AsyncEngine: the LLMEngine step loop, streamed to asyncio consumers.

Two modes (EngineArgs.engine_mode). "process" (default on a single node): the step loop runs in a spawned
engine-core process (engine_core_process.py) that sends one message of deltas per step; a reader thread here hands
each step to the event loop in one callback, and the consumer rebuilds RequestOutputs, so the server's event loop
never shares a GIL with the engine's host work. "thread": the loop runs in a thread of this process and owns the
LLMEngine (self.engine); the event loop only enqueues commands (add / abort).

Outputs reach per-request asyncio queues through loop.call_soon_threadsafe. Requests added while a step runs join
at the next step. A consumer that stops early (aclose, cancellation) aborts its request.

The engine knows each stream by a key unique to it, not by the caller's request id: a caller may reuse an id as
soon as its previous stream ended, while the engine still finishes (aborts) the old request under that id.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.engine_core_process import (
    CoreStatus,
    EngineCoreClient,
    EngineStartCancelled,
    OutputRebuilder,
    StepDelta,
    check_engine_hook_picklable,
    heartbeat_interval,
    rebuild_error,
    resolve_engine_mode,
)
from longcat_service.engine.llm_engine import EngineLoad, LLMEngine
from longcat_service.engine.request_checks import RequestLimits, check_request
from longcat_service.outputs import CompletionOutput, RequestMetrics, RequestOutput
from longcat_service.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineLoad", "EngineDeadError", "EngineStartCancelled"]

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # the idle loop also wakes this often to notice shutdown


class EngineDeadError(RuntimeError):
    """The engine is not running (not started, shut down, or its loop thread died)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list[int]
    n: int
    request_id: str  # the caller's id (outputs carry it); the engine and _streams know the stream by its key


@dataclass
class _EngineEnded:
    """Queued by _fail_all: the engine ended every stream (shutdown, death). The consumer turns it into the final
    output, as it alone knows what it delivered (the usage a server reports)."""
    reason: str  # finish_reason of the samples still open
    error: str | None


class AsyncEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs):
        self.args = args if args is not None else EngineArgs(**kwargs)
        self.mode = resolve_engine_mode(self.args)
        if self.mode == "process":
            check_engine_hook_picklable(self.args)
        self.engine: LLMEngine | None = None  # thread mode only: the process mode's engine lives in the child
        self._core: EngineCoreClient | None = None  # process mode
        self._info = None  # process mode: CoreInfo from the child
        self._tokenizer = None
        self._limits: RequestLimits | None = None  # process mode: what the request checks need, without a model
        self._core_status: CoreStatus | None = None
        self._add_seq = itertools.count(1)
        self._pending_adds: collections.deque = collections.deque()  # (seq, prompt tokens) not yet in a status
        self._started = False
        self._lock = threading.Lock()
        self._commands: list[tuple] = []
        self._streams: dict[str, _Stream] = {}  # engine key -> stream
        self._keys: dict[str, str] = {}  # caller's request id -> engine key of its open stream
        self._key_counter = itertools.count()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None
        self._dead_reason: str | None = None
        self._load = EngineLoad(0, 0, 0, 0.0)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (off the event loop) and start the step loop (thread or engine-core process).
        shutdown() during the load ends it with EngineStartCancelled: at once in process mode (the child is
        killed), once the load returns in thread mode (a load cannot be interrupted within its thread)."""
        if self._started:
            return
        self._started = True
        if self._stopping:
            raise EngineStartCancelled("the engine was shut down before it started")
        loop = asyncio.get_running_loop()
        if self.mode == "process":
            # created here, not in the executor, so that a shutdown() during the load always finds the child
            self._core = EngineCoreClient(self.args, self._on_core_message, self._on_core_exit)
            await loop.run_in_executor(None, self._start_core)
            if self._stopping:  # the child got ready just as shutdown() ran
                raise EngineStartCancelled("the engine was shut down while loading the model")
            return
        self.engine = await loop.run_in_executor(None, LLMEngine, self.args)
        if self._stopping:
            raise EngineStartCancelled("the engine was shut down while loading the model")
        if self.args.engine_hook is not None:
            self.args.engine_hook(self.engine)
        self._thread = threading.Thread(target=self._run, name="longcat-engine-loop", daemon=True)
        self._thread.start()

    def _start_core(self) -> None:
        from longcat_service.tokenizer import load_tokenizer

        info = self._core.start()
        self._info = info
        self._tokenizer = load_tokenizer(info.model_path) if info.has_tokenizer else None
        self._limits = RequestLimits(info.vocab_size, info.max_model_len, info.eos_token_id, info.has_tokenizer)

    async def shutdown(self) -> None:
        """Stop the loop thread; unfinished requests end with finish_reason "abort". A step that hangs (a stuck
        device or collective) is waited for only until it is step_timeout_s old, so that shutdown always ends."""
        self._stopping = True
        self._wake.set()
        if self._core is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._core.shutdown, self.args.step_timeout_s)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._join_loop_thread)
        self._fail_all("abort", None)

    def _join_loop_thread(self) -> None:
        while self._thread.is_alive():
            self._thread.join(IDLE_POLL_S)
            started = self._step_started
            if started is not None and time.monotonic() - started > self.args.step_timeout_s:
                logger.error("shutdown: the engine step has run for %.0fs; not waiting for it",
                             time.monotonic() - started)
                return

    @property
    def model_config(self):
        return self._core_info().model_config if self.mode == "process" else self._engine().model_config

    @property
    def tokenizer(self):
        if self.mode == "process":
            self._core_info()
            return self._tokenizer
        return self._engine().tokenizer

    @property
    def description(self) -> str:
        """LLMEngine.description: model, device, dtype, ops backend, limits (for the start-up log)."""
        return self._core_info().description if self.mode == "process" else self._engine().description

    @property
    def max_model_len(self) -> int:
        return self._core_info().max_model_len if self.mode == "process" else self._engine().max_model_len

    def is_healthy(self) -> bool:
        if self.mode == "process":
            return self._core_healthy()
        if self._thread is None or not self._thread.is_alive() or self._dead_reason is not None:
            return False
        if not getattr(self.engine.runner, "is_healthy", lambda: True)():  # e.g. a tensor-parallel rank was lost
            return False
        started = self._step_started
        return started is None or time.monotonic() - started <= self.args.step_timeout_s

    def load(self) -> EngineLoad:
        if self.mode == "process":
            return self._core_load()
        with self._lock:
            pending = [c for c in self._commands if c[0] == "add"]
        snap = self._load
        return EngineLoad(
            num_running=snap.num_running,
            num_waiting=snap.num_waiting + len(pending),
            num_waiting_tokens=snap.num_waiting_tokens + sum(len(c[2]) for c in pending),
            kv_cache_usage=snap.kv_cache_usage,
            expert_tokens=snap.expert_tokens,
            ep_capacity_overflows=snap.ep_capacity_overflows,
        )

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise EngineDeadError("the engine is not started; await engine.start() first")
        return self.engine

    # ---- requests ------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs (this step's deltas plus totals) until the request finishes."""
        # PromptError / SamplingParamsError before anything is queued (process mode: the engine's checks, run here)
        if self.mode == "process":
            self._core_info()
            validate = functools.partial(check_request, limits=self._limits)
        else:
            validate = self._engine().validate_request
        if self._stopping or not self.is_alive():
            raise EngineDeadError(self._dead_reason or "the engine is shutting down")
        params = sampling_params if sampling_params is not None else SamplingParams()
        prompt = list(prompt_token_ids)
        validate(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), prompt, params.n, request_id)
        with self._lock:
            if self._dead_reason is not None or self._stopping:  # since the check above: no _fail_all would see us
                raise EngineDeadError(self._dead_reason or "the engine is shutting down")
            if request_id in self._keys:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            key = f"{request_id}#{next(self._key_counter)}"
            self._keys[request_id] = key
            self._streams[key] = stream
            if self._core is None:
                self._commands.append(("add", key, prompt, params, deadline, time.monotonic()))
        if self._core is not None:
            self._send_add(key, prompt, params, deadline)
        self._wake.set()
        rebuilder = OutputRebuilder(request_id, prompt, params.n) if self._core is not None else None
        finished = False
        last: RequestOutput | None = None  # thread mode: its totals are what was delivered so far
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _EngineEnded):
                    item = (rebuilder.end(item.reason, item.error) if rebuilder is not None
                            else _ended_output(stream, last, item.reason, item.error))
                elif isinstance(item, StepDelta):
                    item = rebuilder.rebuild(item)
                last = item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(key, None)
                self._keys.pop(request_id, None)
                if not finished and self._core is None:
                    self._commands.append(("abort", key))
            if not finished and self._core is not None:
                self._send_abort(key)
            self._wake.set()

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; its stream ends with finish_reason "abort". False if unknown."""
        with self._lock:
            key = self._keys.get(request_id)
            if key is not None and self._core is None:
                self._commands.append(("abort", key))
        if key is not None and self._core is not None:
            self._send_abort(key)
        self._wake.set()
        return key is not None

    def is_alive(self) -> bool:
        if self.mode == "process":
            return self._core is not None and self._core.is_alive() and self._dead_reason is None
        return self._thread is not None and self._thread.is_alive() and self._dead_reason is None

    # ---- process mode: the engine-core child -----------------------------------------------------
    def _core_info(self):
        if self._info is None:
            raise EngineDeadError("the engine is not started; await engine.start() first")
        return self._info

    def _send_add(self, key: str, prompt: list[int], params: SamplingParams, deadline: float | None) -> None:
        seq = next(self._add_seq)
        with self._lock:
            self._pending_adds.append((seq, len(prompt)))
        try:
            self._core.send(("add", key, seq, prompt, params, deadline, time.monotonic()))
        except (OSError, ValueError) as e:  # the child is gone; its reader thread fails the streams
            logger.warning("engine core unreachable: %s", e)

    def _send_abort(self, key: str) -> None:
        try:
            self._core.send(("abort", key))
        except (OSError, ValueError):
            pass  # the child is gone: nothing to abort

    def _core_healthy(self) -> bool:
        if not self.is_alive():
            return False
        status = self._core_status
        if status is not None and not status.runner_healthy:
            return False
        # the child speaks after every step and every heartbeat_interval when idle: longer silence is a hung step
        silence = time.monotonic() - self._core.last_message_at
        return silence <= self.args.step_timeout_s + heartbeat_interval(self.args.step_timeout_s)

    def _core_load(self) -> EngineLoad:
        snap = self._core_status
        with self._lock:
            pending = list(self._pending_adds)
        if snap is None:
            return EngineLoad(0, len(pending), sum(n for _, n in pending), 0.0)
        return EngineLoad(num_running=snap.num_running, num_waiting=snap.num_waiting + len(pending),
                          num_waiting_tokens=snap.num_waiting_tokens + sum(n for _, n in pending),
                          kv_cache_usage=snap.kv_cache_usage, expert_tokens=snap.expert_tokens,
                          ep_capacity_overflows=snap.ep_capacity_overflows)

    def _on_core_message(self, msg: tuple) -> None:
        """Reader thread: one child message; a step's deltas reach each event loop in one callback."""
        status = msg[1]
        with self._lock:
            while self._pending_adds and self._pending_adds[0][0] <= status.last_add_seq:
                self._pending_adds.popleft()
        self._core_status = status
        if msg[0] != "step":
            return
        _, _, deltas, errors = msg
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for key, error in errors:
                stream = self._streams.get(key)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, rebuild_error(error)))
            for d in deltas:
                stream = self._streams.get(d.key)
                if stream is not None:  # else the consumer is gone (its abort is sent)
                    by_loop.setdefault(stream.loop, []).append((stream.queue, d))
        _post(by_loop)

    def _on_core_exit(self, reason: str | None) -> None:
        """Reader thread: the child's pipe closed. reason None: after shutdown() (which ends the streams)."""
        if reason is None:
            return
        logger.error("engine core died: %s", reason)
        with self._lock:  # generate() registers under this lock: a stream is refused or failed below
            self._dead_reason = reason
        self._fail_all("error", reason)

    # ---- the loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._apply_commands(engine)
                if not engine.has_unfinished_requests():
                    self._wake.wait(IDLE_POLL_S)
                    self._wake.clear()
                    continue
                self._step_started = time.monotonic()
                try:
                    outputs = engine.step()
                finally:
                    self._step_started = None
                self._load = engine.load()
                self._deliver_step(outputs)
        except BaseException as e:  # the loop is gone: say so and end every stream
            logger.exception("engine loop died")
            with self._lock:  # generate() registers under this lock: a stream is refused or failed below
                self._dead_reason = f"engine loop died: {type(e).__name__}: {e}"
            self._fail_all("error", self._dead_reason)

    def _apply_commands(self, engine: LLMEngine) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for cmd in commands:
            if cmd[0] == "add":
                _, key, prompt, params, deadline, arrival = cmd
                try:
                    engine.add_request(key, prompt, params, deadline=deadline, arrival_time=arrival)
                except Exception as e:
                    self._deliver(key, e)
            else:
                engine.abort_request(cmd[1])
        if commands:
            self._load = engine.load()

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs in one callback per event loop: one wake-up and one lock per step, not per request,
        so that the loop thread takes the GIL from this one less often (64 streams at ~15 ms steps)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:  # else the consumer is gone (its abort is queued)
                    out.request_id = stream.request_id
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        _post(by_loop)

    def _deliver(self, key: str, item) -> None:
        with self._lock:
            stream = self._streams.get(key)
        if stream is None:
            return  # the consumer is gone (its abort is queued)
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed
            pass

    def _fail_all(self, reason: str, error: str | None) -> None:
        with self._lock:
            streams = list(self._streams.items())
        for key, _ in streams:
            self._deliver(key, _EngineEnded(reason, error))


def _ended_output(stream: _Stream, last: RequestOutput | None, reason: str, error: str | None) -> RequestOutput:
    """Thread mode: the final output of a stream the engine ended, from the totals of the last output delivered
    (the thread engine fills them on every output): tokens streamed, cached prompt tokens and metrics are kept."""
    prior = {c.index: c for c in last.outputs} if last is not None else {}
    outputs = []
    for i in range(stream.n):
        c = prior.get(i)
        if c is None:
            outputs.append(CompletionOutput(index=i, finish_reason=reason))
            continue
        done = c.finish_reason is not None  # finished earlier (n > 1): keep its own reason
        outputs.append(CompletionOutput(
            index=i, token_ids=list(c.token_ids), text=c.text,
            logprobs=list(c.logprobs) if c.logprobs is not None else None,
            finish_reason=c.finish_reason if done else reason, stop_reason=c.stop_reason if done else None,
            new_logprobs=[] if c.logprobs is not None else None))
    return RequestOutput(stream.request_id, stream.prompt_token_ids, outputs, finished=True,
                         num_cached_tokens=last.num_cached_tokens if last is not None else 0,
                         prompt_logprobs=last.prompt_logprobs if last is not None else None,
                         metrics=last.metrics if last is not None else RequestMetrics(), error=error)


def _post(by_loop: dict[asyncio.AbstractEventLoop, list]) -> None:
    for loop, puts in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, puts)
        except RuntimeError:  # its event loop is closed
            pass


def _put_all(puts: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, item in puts:
        queue.put_nowait(item)
