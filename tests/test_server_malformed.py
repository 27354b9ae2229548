"""Request bodies that are not valid protobuf: authentication first, then INVALID_ARGUMENT naming the message
type, one rate-limited log line and no traceback; the server keeps serving."""

from __future__ import annotations

import logging

import grpc
import pytest
from fake_engine import FakeEngine

from longcat_service.client import LongCatClient
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from longcat_service.server.malformed import RateLimitedLog

GARBAGE = b"\xff\xff\xff"
# (method, request message type, RPC shape: u = one message, s = a stream)
METHODS = [
    ("/longcat.v1.LongCat/Generate", "longcat.v1.GenerateRequest", "us"),
    ("/longcat.v1.LongCat/Tokenize", "longcat.v1.TokenizeRequest", "uu"),
    ("/longcat.v1.LongCat/Abort", "longcat.v1.AbortRequest", "uu"),
    ("/longcat.v1.LongCat/GetModelInfo", "longcat.v1.GetModelInfoRequest", "uu"),
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", "uu"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
     "grpc.reflection.v1alpha.ServerReflectionRequest", "ss"),
]


def send_raw(channel: grpc.Channel, method: str, shape: str, body: bytes = GARBAGE, metadata=()):
    """Send `body` as it is (no serializer); returns the status code and details."""
    try:
        if shape == "uu":
            channel.unary_unary(method)(body, timeout=10, metadata=metadata)
        elif shape == "us":
            list(channel.unary_stream(method)(body, timeout=10, metadata=metadata))
        else:
            list(channel.stream_stream(method)(iter([body]), timeout=10, metadata=metadata))
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(FakeEngine, ServerConfig(port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server():
    with BackgroundServer(FakeEngine, ServerConfig(port=0, api_keys=["the-key"])) as srv:
        yield srv


@pytest.mark.parametrize("method,message,shape", METHODS)
def test_garbage_body_is_invalid_argument_naming_the_message_type(server, method, message, shape):
    with grpc.insecure_channel(server.address) as channel:
        code, details = send_raw(channel, method, shape)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details == f"request body is not a valid {message}"
    client = LongCatClient(server.address)
    assert client.health() == "SERVING"
    assert client.generate("still fine", max_tokens=2).finish_reason == "length"


def test_a_flood_of_garbage_logs_one_line_and_no_traceback(caplog):
    caplog.set_level(logging.DEBUG)
    with BackgroundServer(FakeEngine, ServerConfig(port=0)) as srv, grpc.insecure_channel(srv.address) as channel:
        for _ in range(30):
            assert send_raw(channel, *METHODS[0][::2])[0] == grpc.StatusCode.INVALID_ARGUMENT
        invalid = srv.server.metrics.requests.labels("invalid")._value.get()
    about_it = [r.getMessage() for r in caplog.records if "not a valid" in r.getMessage()]
    assert len(about_it) == 1 and "/longcat.v1.LongCat/Generate" in about_it[0], about_it
    assert invalid == 30
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_rate_limited_log_counts_what_it_left_out(caplog):
    now = [0.0]
    log = RateLimitedLog(interval_s=10.0, clock=lambda: now[0])
    assert log.warning("bad body %d", 1)
    now[0] = 5.0
    assert not log.warning("bad body %d", 2) and not log.warning("bad body %d", 3)
    now[0] = 10.0
    assert log.warning("bad body %d", 4)
    assert [r.getMessage() for r in caplog.records] == [
        "bad body 1", "bad body 4 (2 more in the last 10s not logged)"]


def test_valid_bodies_still_work_through_a_generic_channel(server):
    from longcat_service.server.generated import longcat_pb2 as pb

    with grpc.insecure_channel(server.address) as channel:
        body = pb.TokenizeRequest(text="ab").SerializeToString()
        reply = channel.unary_unary("/longcat.v1.LongCat/Tokenize")(body, timeout=10)
    assert list(pb.TokenizeResponse.FromString(reply).token_ids) == [97, 98]


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)])
@pytest.mark.parametrize("method,message,shape", METHODS[:4])
def test_authentication_comes_before_parsing_the_body(keyed_server, method, message, shape, metadata):
    with grpc.insecure_channel(keyed_server.address) as channel:
        assert send_raw(channel, method, shape, metadata=metadata)[0] == grpc.StatusCode.UNAUTHENTICATED
        code, details = send_raw(channel, method, shape, metadata=(("authorization", "Bearer the-key"),))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
