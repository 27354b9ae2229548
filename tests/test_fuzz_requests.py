"""Property-based fuzz of the gRPC surface (hypothesis): random GenerateRequest / TokenizeRequest messages over the
proto fields (NaN, inf, negative and huge sampling values, token ids out of range, empty prompts, any unicode, ...)
and raw bytes. Every call ends OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED (DEADLINE_EXCEEDED only when the request
set timeout_ms), never UNKNOWN or INTERNAL, and the server stays SERVING. Fixed budget, derandomized: CI time is
bounded and a failure reproduces."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat_service.client import LongCatClient
from longcat_service.engine.async_engine import AsyncEngine
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from longcat_service.server.generated import longcat_pb2 as pb
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc

MAX_MODEL_LEN = 48  # bounds every generation, whatever max_tokens and n say
VOCAB = 512  # the demo model's
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
BUDGET = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

INT32 = st.integers(-(2**31), 2**31 - 1)
SMALL_OR_ANY_INT = st.one_of(st.integers(-3, 20), INT32)
REAL = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 2.0, -1.0, 1e-39, 5e-324, 1e-7, 1e30, 1e308, float("inf"), float("-inf"),
                     float("nan")]),
    st.floats(allow_nan=True, allow_infinity=True),
)
FLOAT32 = st.one_of(  # logit_bias values are proto floats
    st.sampled_from([0.0, -100.0, 100.0, 1e-39, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan")]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
TOKEN_ID = st.one_of(st.integers(0, VOCAB - 1), INT32)
TEXT = st.text(max_size=40)  # any unicode, including surrogate-free control characters and the empty string

sampling = st.fixed_dictionaries({}, optional={
    "max_tokens": st.one_of(st.integers(1, 8), INT32), "temperature": REAL, "top_p": REAL, "top_k": SMALL_OR_ANY_INT,
    "min_p": REAL, "repetition_penalty": REAL, "frequency_penalty": REAL, "presence_penalty": REAL,
    "seed": st.integers(-(2**63), 2**63 - 1), "min_tokens": SMALL_OR_ANY_INT, "ignore_eos": st.booleans(),
    "stop": st.lists(TEXT, max_size=18), "stop_token_ids": st.lists(TOKEN_ID, max_size=6),
    "logit_bias": st.dictionaries(TOKEN_ID, FLOAT32, max_size=4),
    "logprobs": SMALL_OR_ANY_INT, "n": st.one_of(st.integers(-1, 17), INT32), "skip_special_tokens": st.booleans(),
})
prompt = st.one_of(
    st.none(),
    st.builds(lambda t: {"text": t}, TEXT),
    st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(TOKEN_ID, max_size=60)),
    st.builds(lambda msgs: {"messages": pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in msgs])},
              st.lists(st.tuples(st.one_of(st.sampled_from(["system", "user", "assistant"]), TEXT), TEXT),
                       max_size=4)),
)
request_id = st.one_of(st.just(""), TEXT, st.text(min_size=200, max_size=300))
timeout_ms = st.one_of(st.none(), st.integers(0, 2**32 - 1))


def generate_request(prompt_fields, sampling_fields, rid, timeout) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=rid, **(prompt_fields or {}))
    for name, value in sampling_fields.items():
        if name in ("stop", "stop_token_ids"):
            getattr(req.sampling, name).extend(value)
        elif name == "logit_bias":
            req.sampling.logit_bias.update(value)
        else:
            setattr(req.sampling, name, value)
    if timeout is not None:
        req.timeout_ms = timeout
    return req


@pytest.fixture(scope="module")
def server():
    args = EngineArgs(device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    with BackgroundServer(lambda: AsyncEngine(args), ServerConfig(port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (e.code(), e.details())
        return e.code()
    return grpc.StatusCode.OK


@BUDGET
@given(prompt_fields=prompt, sampling_fields=sampling, rid=request_id, timeout=timeout_ms)
def test_random_generate_requests_are_ok_or_rejected_cleanly(server, channel, prompt_fields, sampling_fields, rid,
                                                              timeout):
    request = generate_request(prompt_fields, sampling_fields, rid, timeout)
    stub = pb_grpc.LongCatStub(channel)
    code = status_of(lambda: list(stub.Generate(request, timeout=60)))
    allowed = ALLOWED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if timeout is not None else set())
    assert code in allowed, (code, request)
    tokenize = pb.TokenizeRequest(**{k: v for k, v in (prompt_fields or {}).items() if k != "token_ids"})
    assert status_of(lambda: stub.Tokenize(tokenize, timeout=60)) in ALLOWED


@BUDGET
@given(body=st.one_of(st.binary(max_size=120),
                      st.sampled_from([b"\xff\xff\xff", b"\x0a\xff", b"\x12\x05\x0a\x03\xff\xff\xff", b"\x08" * 9])))
def test_random_bytes_are_ok_or_invalid_argument(server, channel, body):
    generate = channel.unary_stream("/longcat.v1.LongCat/Generate")
    assert status_of(lambda: list(generate(body, timeout=60))) in ALLOWED | {grpc.StatusCode.DEADLINE_EXCEEDED}
    tokenize = channel.unary_unary("/longcat.v1.LongCat/Tokenize")
    assert status_of(lambda: tokenize(body, timeout=60)) in ALLOWED


def test_the_server_is_still_serving_after_the_fuzz(server):
    client = LongCatClient(server.address)
    assert client.health() == "SERVING"
    before = client.generate("The cat", max_tokens=6, temperature=0, ignore_eos=True)
    assert len(before.token_ids) == 6
    assert server.engine.load().num_running == 0
