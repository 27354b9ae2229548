"""How a Generate call ends: the gRPC status code and message for each failure (bad request, overload, engine
errors, deadlines), and the outcome label the request metrics count it under."""

from __future__ import annotations

import logging

import grpc

from longcat_service.engine.async_engine import EngineDeadError
from longcat_service.engine.errors import PromptError
from longcat_service.sampling_params import SamplingParamsError
from longcat_service.server.admission import Overloaded
from longcat_service.server.convert import RequestError
from longcat_service.server.generated import longcat_pb2 as pb

logger = logging.getLogger(__name__)

# The client's deadline passes a little before the server's (its clock started before the request arrived): a
# call that ends this close to the server's deadline ended because of the deadline.
DEADLINE_TOLERANCE_S = 0.25


class CallFailed(Exception):
    """Ends a Generate call with a non-OK status; `outcome` labels it in the metrics."""

    def __init__(self, code: grpc.StatusCode, message: str, outcome: str, trailing_metadata=()):
        super().__init__(message)
        self.code, self.message, self.outcome, self.trailing_metadata = code, message, outcome, trailing_metadata


class ClientGone(Exception):
    """Writing to the client failed: it cancelled the call, disconnected, or its deadline passed."""


def not_accepting(draining: bool) -> CallFailed:
    return CallFailed(grpc.StatusCode.UNAVAILABLE, "server is draining" if draining else "server is loading",
                      "rejected")


def engine_unhealthy() -> CallFailed:
    return CallFailed(grpc.StatusCode.UNAVAILABLE, "engine is not healthy", "error")


def invalid_request(error: RequestError) -> CallFailed:
    return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error), "invalid")


def already_running(request_id: str) -> CallFailed:
    return CallFailed(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already running", "invalid")


def overloaded(error: Overloaded) -> CallFailed:
    return CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {error}", "rejected",
                      (("retry-after-ms", str(error.retry_after_ms)),))


def slow_reader(timeout_s: float) -> CallFailed:
    return CallFailed(grpc.StatusCode.UNAVAILABLE,
                      f"client stopped reading the stream for {timeout_s:g}s; the request was aborted", "slow_reader")


def engine_failure(error: Exception, prompt_kind: str) -> CallFailed:
    """An exception out of the engine's output stream. Bad input the engine found is the client's error
    (INVALID_ARGUMENT naming the field the client set); anything else is the server's."""
    if isinstance(error, PromptError):
        # The engine names its own argument ("prompt" / "token_ids"); report the field the client set.
        message = str(error).removeprefix(f"{error.field}: ")
        return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{prompt_kind}: {message}", "invalid")
    if isinstance(error, SamplingParamsError):
        return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{error}", "invalid")
    if isinstance(error, EngineDeadError):
        return CallFailed(grpc.StatusCode.UNAVAILABLE, f"engine unavailable: {error}", "error")
    logger.error("engine failed", exc_info=error)
    return CallFailed(grpc.StatusCode.INTERNAL, f"engine error: {type(error).__name__}: {error}", "error")


def final_status(finish_reasons: tuple, num_tokens: int) -> str:
    """The outcome of a stream that ended normally, from its samples' finish reasons; a deadline or an engine
    error ends the call with a non-OK status after the partial output."""
    if pb.FINISH_REASON_DEADLINE in finish_reasons:
        raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"deadline passed after {num_tokens} output token(s); partial output delivered", "deadline")
    if pb.FINISH_REASON_ERROR in finish_reasons:
        raise CallFailed(grpc.StatusCode.INTERNAL, "the engine failed while generating", "error")
    return "cancelled" if pb.FINISH_REASON_ABORT in finish_reasons else "ok"


def gone_outcome(time_remaining: float | None) -> str:
    """The outcome of a call the client left: its deadline passed, or it cancelled."""
    return "deadline" if time_remaining is not None and time_remaining <= DEADLINE_TOLERANCE_S else "cancelled"
