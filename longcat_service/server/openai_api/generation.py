"""One HTTP request's engine work: admission, one engine request per prompt, metrics, drain bookkeeping, and the
end of it all when the client goes away.

Each prompt's engine stream is pumped by a task into one bounded queue (the gRPC servicer's --stream-buffer-size).
A client that stops reading fills it; after --slow-reader-timeout-s the pumps give up and their requests are aborted.
Closing a Generation (client disconnect, end of the response, an error) cancels the pumps: leaving an engine stream
aborts its request in the engine at its next step, which frees its KV cache."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

from longcat_service.engine.async_engine import EngineDeadError
from longcat_service.engine.errors import PromptError
from longcat_service.outputs import RequestOutput
from longcat_service.sampling_params import SamplingParams, SamplingParamsError
from longcat_service.server.admission import AdmissionController, Overloaded
from longcat_service.server.health import ServingState
from longcat_service.server.metrics import ServerMetrics
from longcat_service.server.openai_api.errors import ApiError, invalid
from longcat_service.server.servicer import ServerOptions

logger = logging.getLogger(__name__)


@dataclass
class HttpContext:
    """What every endpoint shares with the gRPC servicer (same objects)."""

    engine: object
    state: ServingState
    admission: AdmissionController
    metrics: ServerMetrics
    options: ServerOptions
    reasoning_parser: str | None = None

    def check_serving(self) -> None:
        if not self.state.accepting:
            raise ApiError(503, "server is draining" if self.state.draining else "server is loading",
                           outcome="rejected")
        if not self.state.engine_healthy():
            raise ApiError(503, "engine is not healthy", outcome="error")

    def vocab_size(self) -> int:
        tok = self.engine.tokenizer
        return tok.vocab_size if tok is not None else self.engine.model_config.vocab_size


@dataclass
class _End:
    index: int


def merge_outputs(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """`second` (the later step: totals, finish) carrying the deltas of both steps."""
    earlier = {c.index: c for c in first.outputs}
    merged = []
    for c in second.outputs:
        p = earlier.pop(c.index, None)
        if p is None:
            merged.append(c)
            continue
        logprobs = None
        if p.new_logprobs is not None or c.new_logprobs is not None:
            logprobs = (p.new_logprobs or []) + (c.new_logprobs or [])
        merged.append(dataclasses.replace(c, new_token_ids=p.new_token_ids + c.new_token_ids,
                                          text_delta=p.text_delta + c.text_delta, new_logprobs=logprobs))
    merged += earlier.values()  # samples the later step did not mention keep their deltas
    merged.sort(key=lambda c: c.index)
    prompt_logprobs = second.prompt_logprobs if second.prompt_logprobs is not None else first.prompt_logprobs
    return dataclasses.replace(second, outputs=merged, prompt_logprobs=prompt_logprobs)


class SlowReader(Exception):
    pass


async def wait_for_disconnect(receive) -> None:
    """Returns when the client has gone (the request body is already read, so only http.disconnect can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Generation:
    def __init__(self, ctx: HttpContext, prompts: list[list[int]], params: SamplingParams, prompt_param: str,
                 timeout_ms: int | None, receive):
        self.ctx = ctx
        self.prompts = prompts
        self.params = params
        self.prompt_param = prompt_param  # the request field a PromptError is about
        self.deadline = time.monotonic() + timeout_ms / 1000.0 if timeout_ms else None
        self.request_id = uuid.uuid4().hex
        self._receive = receive
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=ctx.options.stream_buffer_size)
        self._pumps: list[asyncio.Task] = []
        self._tickets = []
        self._open = set(range(len(prompts)))
        self._held = None  # the first item, read by start()
        self._started_at = time.monotonic()
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self.num_tokens = 0
        self.finish_reasons: list[str] = []
        self._finished: set[tuple[int, int]] = set()
        self.outcome = "error"
        self._closed = False
        self._counted = False

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Admit, start the engine requests, and wait for their first output: a request the engine refuses
        becomes an ApiError here, before any response is sent. Closes itself on failure."""
        ctx = self.ctx
        ctx.state.request_started()
        self._counted = True
        try:
            for prompt in self.prompts:
                self._tickets.append(ctx.admission.admit(len(prompt)))
        except Overloaded as e:
            seconds = max(1, math.ceil(e.retry_after_ms / 1000))
            await self.close("rejected")
            raise self.recorded(ApiError(
                429, f"server overloaded: {e}", outcome="rejected", code="overloaded",
                headers={"Retry-After": str(seconds), "retry-after-ms": str(e.retry_after_ms)})) from e
        for i, prompt in enumerate(self.prompts):
            ctx.metrics.prompt_tokens.inc(len(prompt))
            self._pumps.append(asyncio.create_task(self._pump(i, prompt)))
        try:
            self._held = await self.until_disconnect(self._queue.get())
            if isinstance(self._held, BaseException):
                raise self._error(self._held)
        except ApiError as e:
            await self.close(e.outcome)
            raise self.recorded(e) from None
        except BaseException:
            await self.close("cancelled")
            raise

    @staticmethod
    def recorded(error: ApiError) -> ApiError:
        error.recorded = True
        return error

    async def close(self, outcome: str | None = None) -> None:
        """Idempotent. The bookkeeping is synchronous: a response cancelled by a disconnect runs this inside a
        cancelled anyio scope, where any await is interrupted at once."""
        if self._closed:
            return
        self._closed = True
        if outcome is not None:
            self.outcome = outcome
        for pump in self._pumps:
            pump.cancel()  # a cancelled pump leaves its engine stream, which aborts the request in the engine
        for ticket in self._tickets:
            self.ctx.admission.release(ticket)
        self._record()
        if self._counted:
            self.ctx.state.request_finished()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def until_disconnect(self, awaitable):
        """Await it unless the client disconnects first (then CancelledError)."""
        task = asyncio.ensure_future(awaitable)
        watch = asyncio.ensure_future(wait_for_disconnect(self._receive))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            watch.cancel()
        if task not in done:
            task.cancel()
            raise asyncio.CancelledError("client disconnected")
        return task.result()

    # ---- outputs --------------------------------------------------------------------------------------
    async def outputs(self):
        """(prompt index, RequestOutput) until every engine request finished; ApiError on an engine failure."""
        while self._open:
            item, self._held = (self._held, None) if self._held is not None else (await self._queue.get(), None)
            if isinstance(item, _End):
                self._open.discard(item.index)
                continue
            if isinstance(item, BaseException):
                raise self._error(item)
            index, out = item
            out = self._coalesce(index, out)
            new = sum(len(c.new_token_ids) for c in out.outputs)
            if new:
                now = time.monotonic()
                self._first_token_at = self._first_token_at or now
                self._last_token_at = now
                self.num_tokens += new
                self.ctx.metrics.output_tokens.inc(new)
            for c in out.outputs:
                if c.finish_reason is not None and (index, c.index) not in self._finished:
                    self._finished.add((index, c.index))
                    self.finish_reasons.append(c.finish_reason)
            yield index, out

    def _coalesce(self, index: int, out: RequestOutput) -> RequestOutput:
        """Merge the outputs of the same prompt already waiting behind `out` into one (as the gRPC servicer merges
        chunks): a client or event loop that lags behind the engine gets fewer, larger events, not a backlog."""
        while self._held is None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not (isinstance(item, tuple) and item[0] == index) or out.finished:
                self._held = item
                break
            if item[1] is not out:  # an engine that reuses its output object has nothing to add
                out = merge_outputs(out, item[1])
        return out

    def final_outcome(self) -> str:
        reasons = set(self.finish_reasons)
        if "error" in reasons:
            return "error"
        if "deadline" in reasons:
            return "deadline"
        return "cancelled" if "abort" in reasons else "ok"

    async def _pump(self, index: int, prompt: list[int]) -> None:
        ctx = self.ctx
        timeout = ctx.options.slow_reader_timeout_s
        try:
            stream = ctx.engine.generate(prompt, self.params, self._engine_id(index), deadline=self.deadline)
            async with aclosing(stream):
                async for out in stream:
                    ctx.admission.started(self._tickets[index])
                    await asyncio.wait_for(self._queue.put((index, out)), timeout)
            await self._queue.put(_End(index))
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self.outcome = "slow_reader"
            logger.warning("request %s: client stopped reading for %gs; aborted", self.request_id, timeout)
            await self._queue.put(SlowReader())
        except Exception as e:  # handed to the reader, which maps it to an error
            await self._queue.put(e)

    def _engine_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    def _error(self, error: BaseException) -> ApiError:
        if isinstance(error, ApiError):
            return error
        if isinstance(error, PromptError):
            return invalid(self.prompt_param, str(error).removeprefix(f"{error.field}: "))
        if isinstance(error, SamplingParamsError):
            return invalid(error.field, str(error).removeprefix(f"{error.field}: "))
        if isinstance(error, EngineDeadError):
            return ApiError(503, f"engine unavailable: {error}", outcome="error")
        if isinstance(error, SlowReader):
            return ApiError(408, "client stopped reading the stream; the request was aborted", outcome="slow_reader")
        logger.error("engine failed", exc_info=error)
        return ApiError(500, f"engine error: {type(error).__name__}: {error}")

    def _record(self) -> None:
        m = self.ctx.metrics
        m.requests.labels(self.outcome).inc()
        if self._first_token_at is not None:
            m.time_to_first_token.observe(self._first_token_at - self._started_at)
            if self.num_tokens > 1:
                m.time_per_output_token.observe(
                    (self._last_token_at - self._first_token_at) / (self.num_tokens - 1))
        logger.info("http request %s: %d prompt(s), %d prompt tokens, %d output tokens, %s, %.0f ms",
                    self.request_id, len(self.prompts), sum(map(len, self.prompts)), self.num_tokens, self.outcome,
                    (time.monotonic() - self._started_at) * 1000)
