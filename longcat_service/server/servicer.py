"""The LongCat gRPC servicer: validates, admits, and streams engine output to the client.

Each Generate call runs two tasks joined by a bounded queue (--stream-buffer-size responses):
a pump that consumes the engine's output stream, and the handler itself, which writes to the
client. A client that stops reading stalls the handler's write; after --slow-reader-timeout-s the
request is aborted and the call ends UNAVAILABLE, so a stalled client holds at most the queue plus
what the engine produced meanwhile. Leaving the engine's stream (aclosing) aborts the request in the
engine, which is how client cancellation, disconnects and slow readers free the KV cache."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from longcat_service import __version__
from longcat_service.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS
from longcat_service.server import call_status, convert
from longcat_service.server.admission import AdmissionController, Overloaded
from longcat_service.server.call_status import CallFailed, ClientGone
from longcat_service.server.generated import longcat_pb2 as pb
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc
from longcat_service.server.health import ServingState
from longcat_service.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

MAX_ABORT_IDS = 1024
# Bounds of one coalesced chunk message (text in characters: <= 1 MiB of UTF-8, well under gRPC's 4 MiB default).
MAX_COALESCED_TOKENS = 256
MAX_COALESCED_TEXT_CHARS = 256 * 1024
_END = object()  # end of the engine's output stream
SHUTDOWN_MESSAGE = ("server shut down: the request was still running when the drain grace period ended "
                    "(--drain-grace-s); output streamed before this is complete as far as it goes")


@dataclass
class ServerOptions:
    max_queued_requests: int = 512
    max_queued_tokens: int = 262_144
    stream_buffer_size: int = 64
    slow_reader_timeout_s: float = 30.0
    log_prompts: bool = False
    model_name: str = "longcat-flash"
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if self.stream_buffer_size < 1:
            raise ValueError(f"stream_buffer_size must be >= 1, got {self.stream_buffer_size}")
        if not self.slow_reader_timeout_s > 0:
            raise ValueError(f"slow_reader_timeout_s must be > 0, got {self.slow_reader_timeout_s}")


@dataclass
class _Stats:
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_tokens: int = 0
    finish_reasons: tuple = ()
    output_text: str = ""


def _coalesce(response: pb.GenerateResponse, queue: asyncio.Queue):
    """Merge the chunks of the same sample already waiting behind `response` into it: a client (or transport)
    that lags behind the engine gets fewer, larger messages instead of a growing backlog of one-token writes.
    Returns the first waiting item that cannot be merged (to be written next), or None."""
    chunk = response.chunk
    while not queue.empty():
        item = queue.get_nowait()
        mergeable = (isinstance(item, pb.GenerateResponse) and item.WhichOneof("response") == "chunk"
                     and item.index == response.index
                     and len(chunk.token_ids) + len(item.chunk.token_ids) <= MAX_COALESCED_TOKENS
                     and len(chunk.text) + len(item.chunk.text) <= MAX_COALESCED_TEXT_CHARS)
        if not mergeable:
            return item
        chunk.token_ids.extend(item.chunk.token_ids)
        chunk.text += item.chunk.text
        chunk.logprobs.extend(item.chunk.logprobs)
    return None


class LongCatServicer(pb_grpc.LongCatServicer):
    def __init__(self, engine, state: ServingState, admission: AdmissionController, metrics: ServerMetrics,
                 options: ServerOptions):
        self.engine = engine
        self.state = state
        self.admission = admission
        self.metrics = metrics
        self.options = options
        self._running: set[str] = set()
        self._handlers: set[asyncio.Task] = set()  # running Generate calls
        self._shutting_down = False

    # ---- Generate --------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        started_at = time.monotonic()
        outcome = "error"
        self.state.request_started()
        handler = asyncio.current_task()
        self._handlers.add(handler)
        try:
            outcome = await self._generate(request, context, started_at)
        except CallFailed as failure:
            outcome = failure.outcome
            await context.abort(failure.code, failure.message, trailing_metadata=failure.trailing_metadata)
        except ClientGone:
            outcome = call_status.gone_outcome(context.time_remaining())  # nobody is left to tell: end quietly
        except asyncio.CancelledError:  # gRPC cancels the handler when the client cancels or the deadline passes
            if not self._shutting_down:
                outcome = call_status.gone_outcome(context.time_remaining())
                raise
            outcome = "shutdown"  # end_running_calls: tell the client why its stream ends
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_MESSAGE)
        finally:
            self._handlers.discard(handler)
            self.metrics.requests.labels(outcome).inc()
            self.state.request_finished()

    def end_running_calls(self) -> int:
        """The drain grace is over: every Generate still running ends UNAVAILABLE (its request is aborted in the
        engine; what was streamed stays delivered). Returns how many."""
        self._shutting_down = True
        for handler in self._handlers:
            handler.cancel()
        return len(self._handlers)

    async def wait_running_calls(self, timeout_s: float) -> None:
        """Wait up to timeout_s for the Generate handlers that end_running_calls cancelled to end."""
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=timeout_s)

    async def _generate(self, request, context, started_at: float) -> str:
        if not self.state.accepting:
            raise call_status.not_accepting(self.state.draining)
        if not self.state.engine_healthy():
            raise call_status.engine_unhealthy()
        try:
            prompt = convert.prompt_from_request(request, self.engine.tokenizer, self.engine.max_model_len)
            params = convert.sampling_params_from_proto(request.sampling, self._vocab_size())
            convert.validate_request_id(request.request_id)
            convert.validate_timeout(request)
        except convert.RequestError as e:
            raise call_status.invalid_request(e) from e
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._running:
            raise call_status.already_running(request_id)
        try:
            ticket = self.admission.admit(len(prompt.token_ids))
        except Overloaded as e:
            raise call_status.overloaded(e) from e
        deadline = convert.engine_deadline(request, context.time_remaining())
        self._running.add(request_id)
        self.metrics.prompt_tokens.inc(len(prompt.token_ids))
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.options.stream_buffer_size)
        pump = asyncio.create_task(self._pump(prompt, params, request_id, deadline, queue, ticket))
        stats = _Stats()
        try:
            await self._write_responses(queue, context, stats, prompt)
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            self.admission.release(ticket)
            self._running.discard(request_id)
            self._record(request_id, prompt, stats, started_at)
        return call_status.final_status(stats.finish_reasons, stats.num_tokens)

    async def _pump(self, prompt, params, request_id, deadline, queue: asyncio.Queue, ticket) -> None:
        """Engine outputs -> proto responses on the queue, then _END (or the exception)."""
        completed: set[int] = set()
        try:
            stream = self.engine.generate(prompt.token_ids, params, request_id, deadline=deadline)
            async with aclosing(stream):
                async for out in stream:
                    self.admission.started(ticket)
                    for seq in out.outputs:
                        chunk = convert.chunk_response(request_id, seq)
                        if chunk is not None:
                            await queue.put(chunk)
                        if seq.finished and seq.index not in completed:
                            completed.add(seq.index)
                            await queue.put(convert.complete_response(request_id, out, seq))
                    if out.finished:
                        self.metrics.record_speculation(out.metrics)
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the writer, which maps it to a status
            await queue.put(e)

    async def _write_responses(self, queue: asyncio.Queue, context, stats: _Stats, prompt) -> None:
        timeout = self.options.slow_reader_timeout_s
        held = None  # an item taken from the queue while coalescing, written next
        while True:
            item, held = (held, None) if held is not None else (await queue.get(), None)
            if item is _END:
                return
            if isinstance(item, Exception):
                raise call_status.engine_failure(item, prompt.kind)
            kind = item.WhichOneof("response")
            if kind == "chunk":
                held = _coalesce(item, queue)
            if kind == "chunk" and item.chunk.token_ids:
                now = time.monotonic()
                stats.first_token_at = stats.first_token_at or now
                stats.last_token_at = now
                stats.num_tokens += len(item.chunk.token_ids)
                self.metrics.output_tokens.inc(len(item.chunk.token_ids))
                if self.options.log_prompts:
                    stats.output_text += item.chunk.text
            elif kind == "complete":
                stats.finish_reasons += (item.complete.finish_reason,)
            try:
                await asyncio.wait_for(context.write(item), timeout)
            except TimeoutError as e:
                raise call_status.slow_reader(timeout) from e
            except Exception as e:  # the call is over on the client's side: a cancel, a disconnect, a deadline
                raise ClientGone() from e

    def _record(self, request_id: str, prompt, stats: _Stats, started_at: float) -> None:
        if stats.first_token_at is not None:
            self.metrics.time_to_first_token.observe(stats.first_token_at - started_at)
            if stats.num_tokens > 1:
                self.metrics.time_per_output_token.observe(
                    (stats.last_token_at - stats.first_token_at) / (stats.num_tokens - 1))
        reasons = ",".join(convert.finish_reason_name(r) for r in stats.finish_reasons) or "none"
        elapsed_ms = (time.monotonic() - started_at) * 1000
        if self.options.log_prompts:
            logger.info("request %s: %d prompt tokens, %d output tokens, finish=%s, %.0f ms, prompt=%r, output=%r",
                        request_id, len(prompt.token_ids), stats.num_tokens, reasons, elapsed_ms,
                        prompt.text if prompt.text is not None else prompt.token_ids, stats.output_text)
        else:
            logger.info("request %s: %d prompt tokens, %d output tokens, finish=%s, %.0f ms",
                        request_id, len(prompt.token_ids), stats.num_tokens, reasons, elapsed_ms)

    def _vocab_size(self) -> int:
        tok = self.engine.tokenizer
        return tok.vocab_size if tok is not None else self.engine.model_config.vocab_size

    # ---- unary RPCs --------------------------------------------------------------------------------
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        if len(request.request_ids) > MAX_ABORT_IDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_ids: at most {MAX_ABORT_IDS} ids")
        aborted = [rid for rid in request.request_ids if rid in self._running and await self.engine.abort(rid)]
        return pb.AbortResponse(aborted_request_ids=aborted)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        if not self.state.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is loading")
        cfg, tok = self.engine.model_config, self.engine.tokenizer
        return pb.ModelInfo(
            model_name=self.options.model_name,
            config=pb.ModelConfigSummary(
                vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                num_attention_heads=cfg.num_attention_heads, num_experts=cfg.n_routed_experts,
                num_zero_experts=cfg.zero_expert_num, experts_per_token=cfg.moe_topk,
                dtype=str(getattr(self.engine, "dtype", "") or cfg.torch_dtype or "").removeprefix("torch."),
            ),
            max_context_length=self.engine.max_model_len,
            special_tokens=tok.special_tokens if tok is not None else {},
            eos_token_id=_id_or_minus_one(tok.eos_token_id if tok is not None else cfg.eos_token_id),
            bos_token_id=_id_or_minus_one(tok.bos_token_id if tok is not None else cfg.bos_token_id),
            token_ids_only=tok is None,
            tensor_parallel_size=self.options.tensor_parallel_size,
            max_n=MAX_N, max_stop_strings=MAX_STOP_STRINGS, max_logprobs=MAX_LOGPROBS,
            server_version=__version__,
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        if not self.state.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is loading")
        try:
            prompt = convert.prompt_from_request(request, self.engine.tokenizer, self.engine.max_model_len)
        except convert.RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=prompt.token_ids, prompt_text=prompt.text or "")


def _id_or_minus_one(token_id: int | None) -> int:
    return token_id if token_id is not None else -1
