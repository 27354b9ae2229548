"""Request bodies that are not valid protobuf end INVALID_ARGUMENT, not UNKNOWN with a traceback per call.

gRPC parses a request before the handler runs, and a parse error escapes as UNKNOWN ("Unexpected DecodeError")
with an ERROR traceback in the log. This interceptor wraps every method handler (ours, health, reflection): its
deserializer turns a parse error into a MalformedBody marker, and the handler answers a marker with
INVALID_ARGUMENT "request body is not a valid <message type>". Put it after the API-key interceptor: an
unauthenticated caller gets UNAUTHENTICATED whatever it sent. Malformed bodies are logged at most once per
interval (a count of the others rides on the next line), so a flood cannot flood the log."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class MalformedBody:
    """What the deserializer returns instead of raising."""

    message_type: str
    error: str


class RateLimitedLog:
    """At most one warning per interval_s; the next one says how many were left out meanwhile."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._next_at = float("-inf")
        self._suppressed = 0
        self._lock = threading.Lock()  # deserializers may run on gRPC's threads

    def warning(self, message: str, *args) -> bool:
        """Log (returns True) unless a line was logged less than interval_s ago."""
        with self._lock:
            now = self._clock()
            if now < self._next_at:
                self._suppressed += 1
                return False
            suppressed, self._suppressed = self._suppressed, 0
            self._next_at = now + self.interval_s
        suffix = f" ({suppressed} more in the last {self.interval_s:g}s not logged)" if suppressed else ""
        logger.warning(message + suffix, *args)
        return True


def _message_type(deserializer) -> str:
    message_class = getattr(deserializer, "__self__", None)  # FromString bound to the message class
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request message"


def _safe_deserializer(deserializer):
    message_type = _message_type(deserializer)

    def deserialize(body: bytes):
        try:
            return deserializer(body)
        except Exception as e:  # DecodeError, and anything else a parser raises on hostile bytes
            return MalformedBody(message_type, f"{type(e).__name__}: {e}")

    return deserialize


class MalformedBodyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, on_malformed: Callable[[str], None] | None = None, log: RateLimitedLog | None = None):
        self._on_malformed = on_malformed  # called with the method name (metrics)
        self._log = log if log is not None else RateLimitedLog()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _guarded(handler, handler_call_details.method, self._reject)

    async def _reject(self, body: MalformedBody, method: str, context) -> None:
        self._log.warning("malformed request body for %s from %s: not a valid %s (%s)",
                          method, context.peer(), body.message_type, body.error)
        if self._on_malformed is not None:
            self._on_malformed(method)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request body is not a valid {body.message_type}")


def _guarded(handler: grpc.RpcMethodHandler, method: str, reject) -> grpc.RpcMethodHandler:
    """The same handler with a deserializer that never raises and a behaviour that rejects a MalformedBody.
    Handlers that are not async (none here) are left as they are."""
    kwargs = {"request_deserializer": _safe_deserializer(handler.request_deserializer),
              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        behaviour = _check_request(handler.unary_unary, method, reject)
        return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs) if behaviour else handler
    if handler.unary_stream is not None:
        behaviour = _check_request(handler.unary_stream, method, reject)
        return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs) if behaviour else handler
    if handler.stream_unary is not None:
        behaviour = _check_requests(handler.stream_unary, method, reject)
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs) if behaviour else handler
    behaviour = _check_requests(handler.stream_stream, method, reject)
    return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs) if behaviour else handler


def _check_request(behaviour, method: str, reject):
    """Wrap a behaviour that takes one request, keeping its kind (coroutine or async generator)."""
    if inspect.isasyncgenfunction(behaviour):
        async def checked_stream(request, context):
            if isinstance(request, MalformedBody):
                await reject(request, method, context)
            async for response in behaviour(request, context):
                yield response
        return checked_stream
    if inspect.iscoroutinefunction(behaviour):
        async def checked(request, context):
            if isinstance(request, MalformedBody):
                await reject(request, method, context)
            return await behaviour(request, context)
        return checked
    return None


def _check_requests(behaviour, method: str, reject):
    """Wrap a behaviour that takes a request stream: a malformed message ends the call when it is read."""
    async def checked_iterator(requests, context):
        async for request in requests:
            if isinstance(request, MalformedBody):
                await reject(request, method, context)
            yield request

    if inspect.isasyncgenfunction(behaviour):
        async def checked_stream(requests, context):
            async for response in behaviour(checked_iterator(requests, context), context):
                yield response
        return checked_stream
    if inspect.iscoroutinefunction(behaviour):
        async def checked(requests, context):
            return await behaviour(checked_iterator(requests, context), context)
        return checked
    return None
