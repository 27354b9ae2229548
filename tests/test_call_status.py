"""server/call_status.py: the gRPC status, message and metrics outcome for every way a Generate call can fail.
Bad input is the client's error (INVALID_ARGUMENT naming the field), a full server asks it to retry, the engine's own
failures are the server's. The same codes over a real server: tests/test_server_validation.py, test_server_faults.py."""

from __future__ import annotations

import logging

import grpc
import pytest

from longcat_service.engine.async_engine import EngineDeadError
from longcat_service.engine.errors import PromptError
from longcat_service.sampling_params import SamplingParamsError
from longcat_service.server import call_status
from longcat_service.server.admission import Overloaded
from longcat_service.server.call_status import CallFailed
from longcat_service.server.convert import RequestError
from longcat_service.server.generated import longcat_pb2 as pb

S = grpc.StatusCode


def status(failure: CallFailed) -> tuple:
    return failure.code, failure.message, failure.outcome, tuple(failure.trailing_metadata)


def test_call_failed_carries_its_status():
    failure = CallFailed(S.UNAVAILABLE, "gone", "error")
    assert (status(failure), str(failure)) == ((S.UNAVAILABLE, "gone", "error", ()), "gone")


def test_server_not_serving_yet_or_any_more():
    assert status(call_status.not_accepting(draining=True)) == (S.UNAVAILABLE, "server is draining", "rejected", ())
    assert status(call_status.not_accepting(draining=False)) == (S.UNAVAILABLE, "server is loading", "rejected", ())
    assert status(call_status.engine_unhealthy()) == (S.UNAVAILABLE, "engine is not healthy", "error", ())


def test_bad_requests_are_invalid_argument_naming_the_field():
    error = RequestError("sampling.top_p", "must be in (0, 1], got 0.0")
    assert status(call_status.invalid_request(error)) == (
        S.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1], got 0.0", "invalid", ())
    assert status(call_status.already_running("r1")) == (
        S.ALREADY_EXISTS, "request_id: 'r1' is already running", "invalid", ())


def test_overload_is_resource_exhausted_with_a_retry_hint():
    failure = call_status.overloaded(Overloaded("512 requests queued", retry_after_ms=250))
    assert status(failure) == (S.RESOURCE_EXHAUSTED, "server overloaded: 512 requests queued", "rejected",
                               (("retry-after-ms", "250"),))


def test_slow_reader_is_unavailable_with_the_timeout():
    assert status(call_status.slow_reader(30.0)) == (
        S.UNAVAILABLE, "client stopped reading the stream for 30s; the request was aborted", "slow_reader", ())
    assert "for 2.5s;" in call_status.slow_reader(2.5).message


@pytest.mark.parametrize("kind", ["text", "token_ids", "messages"])
def test_prompt_errors_from_the_engine_name_the_field_the_client_set(kind):
    failure = call_status.engine_failure(PromptError("prompt", "12 tokens do not fit in the context of 8"), kind)
    assert status(failure) == (S.INVALID_ARGUMENT, f"{kind}: 12 tokens do not fit in the context of 8", "invalid", ())


def test_sampling_errors_from_the_engine_are_invalid_argument():
    failure = call_status.engine_failure(SamplingParamsError("max_tokens", "too many"), "text")
    assert status(failure) == (S.INVALID_ARGUMENT, "sampling.max_tokens: too many", "invalid", ())


def test_dead_engine_is_unavailable():
    failure = call_status.engine_failure(EngineDeadError("loop thread died"), "text")
    assert status(failure) == (S.UNAVAILABLE, "engine unavailable: loop thread died", "error", ())


@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("boom"), KeyError("boom")])
def test_any_other_engine_exception_is_internal_and_logged(error, caplog):
    with caplog.at_level(logging.ERROR, logger=call_status.__name__):
        failure = call_status.engine_failure(error, "text")
    assert status(failure) == (S.INTERNAL, f"engine error: {type(error).__name__}: {error}", "error", ())
    assert [(r.getMessage(), r.exc_info[1]) for r in caplog.records] == [("engine failed", error)]


@pytest.mark.parametrize("reasons, outcome", [
    ((), "ok"),
    ((pb.FINISH_REASON_STOP,), "ok"),
    ((pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP), "ok"),
    ((pb.FINISH_REASON_STOP, pb.FINISH_REASON_ABORT), "cancelled"),
])
def test_streams_that_ended_normally(reasons, outcome):
    assert call_status.final_status(reasons, 3) == outcome


def test_deadline_ends_the_call_deadline_exceeded_after_the_partial_output():
    for reasons in ((pb.FINISH_REASON_DEADLINE,), (pb.FINISH_REASON_STOP, pb.FINISH_REASON_DEADLINE),
                    (pb.FINISH_REASON_ERROR, pb.FINISH_REASON_DEADLINE, pb.FINISH_REASON_ABORT)):
        with pytest.raises(CallFailed) as excinfo:
            call_status.final_status(reasons, 3)
        assert status(excinfo.value) == (
            S.DEADLINE_EXCEEDED, "deadline passed after 3 output token(s); partial output delivered", "deadline", ())


def test_engine_error_in_a_sample_ends_the_call_internal():
    for reasons in ((pb.FINISH_REASON_ERROR,), (pb.FINISH_REASON_ABORT, pb.FINISH_REASON_ERROR)):
        with pytest.raises(CallFailed) as excinfo:
            call_status.final_status(reasons, 0)
        assert status(excinfo.value) == (S.INTERNAL, "the engine failed while generating", "error", ())


@pytest.mark.parametrize("remaining, outcome", [
    (None, "cancelled"),  # no deadline: the client cancelled
    (5.0, "cancelled"),
    (0.26, "cancelled"),
    (0.25, "deadline"),  # within the tolerance of the client's earlier clock
    (0.0, "deadline"),
    (-1.0, "deadline"),
])
def test_a_client_that_left_is_counted_by_its_deadline(remaining, outcome):
    assert call_status.gone_outcome(remaining) == outcome
