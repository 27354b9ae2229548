"""Every bad input is INVALID_ARGUMENT naming its field; the server stays healthy and keeps serving."""

from __future__ import annotations

import grpc
import pytest

from longcat_service.client import InvalidArgumentError, LongCatClient
from longcat_service.engine.async_engine import AsyncEngine
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from longcat_service.server.generated import longcat_pb2 as pb
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc

MAX_MODEL_LEN = 256
VOCAB = 512  # the demo model's vocabulary
NAN = float("nan")


@pytest.fixture(scope="module")
def server():
    args = EngineArgs(device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    with BackgroundServer(lambda: AsyncEngine(args), ServerConfig(port=0)) as srv:
        assert srv.engine.tokenizer.vocab_size == VOCAB
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with LongCatClient(server.address, timeout=60) as c:
        yield c


def ids(*values):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=values))


def sampled(**fields):
    """A valid prompt with bad sampling fields (fields that are lists or maps are set afterwards)."""
    req = pb.GenerateRequest(text="hello")
    for name, value in fields.items():
        target = getattr(req.sampling, name)
        if isinstance(value, dict):
            target.update(value)
        elif isinstance(value, list):
            target.extend(value)
        else:
            setattr(req.sampling, name, value)
    return req


def chat(*pairs):
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs]))


BAD_REQUESTS = {
    "no prompt": (pb.GenerateRequest(), "prompt"),
    "empty text": (pb.GenerateRequest(text=""), "text"),
    "empty token ids": (ids(), "token_ids"),
    "token id past the vocab": (ids(5, VOCAB), "token_ids"),
    "negative token id": (ids(5, -1), "token_ids"),
    "prompt longer than the context": (ids(*[5] * MAX_MODEL_LEN), "token_ids"),
    "text too large to tokenize": (pb.GenerateRequest(text="a" * (MAX_MODEL_LEN * 16 + 1)), "text"),
    "negative temperature": (sampled(temperature=-0.5), "sampling.temperature"),
    "NaN temperature": (sampled(temperature=NAN), "sampling.temperature"),
    "top_p zero": (sampled(top_p=0.0), "sampling.top_p"),
    "top_p above one": (sampled(top_p=1.5), "sampling.top_p"),
    "top_k below -1": (sampled(top_k=-2), "sampling.top_k"),
    "min_p above one": (sampled(min_p=2.0), "sampling.min_p"),
    "zero repetition penalty": (sampled(repetition_penalty=0.0), "sampling.repetition_penalty"),
    "frequency penalty out of range": (sampled(frequency_penalty=3.0), "sampling.frequency_penalty"),
    "NaN presence penalty": (sampled(presence_penalty=NAN), "sampling.presence_penalty"),
    "zero max_tokens": (sampled(max_tokens=0), "sampling.max_tokens"),
    "negative max_tokens": (sampled(max_tokens=-5), "sampling.max_tokens"),
    "negative min_tokens": (sampled(min_tokens=-1), "sampling.min_tokens"),
    "min_tokens above max_tokens": (sampled(min_tokens=10, max_tokens=5), "sampling.min_tokens"),
    "max_tokens beyond the context": (sampled(max_tokens=10**9), "sampling.max_tokens"),
    "prompt + max_tokens beyond the context": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 200),
                                                                  sampling=pb.SamplingParams(max_tokens=57)),
                                               "sampling.max_tokens"),
    "min_tokens with stop ids covering the vocab": (sampled(min_tokens=2, stop_token_ids=list(range(VOCAB))),
                                                    "sampling.stop_token_ids"),
    "n too large": (sampled(n=17), "sampling.n"),
    "n zero": (sampled(n=0), "sampling.n"),
    "too many stop strings": (sampled(stop=[f"s{i}" for i in range(17)]), "sampling.stop"),
    "empty stop string": (sampled(stop=[""]), "sampling.stop"),
    "stop token id outside the vocab": (sampled(stop_token_ids=[VOCAB + 3]), "sampling.stop_token_ids"),
    "logit bias token outside the vocab": (sampled(logit_bias={VOCAB: 1.0}), "sampling.logit_bias"),
    "logit bias value too large": (sampled(logit_bias={5: 500.0}), "sampling.logit_bias"),
    "too many logprobs": (sampled(logprobs=21), "sampling.logprobs"),
    "negative logprobs": (sampled(logprobs=-1), "sampling.logprobs"),
    "unknown chat role": (chat(("wizard", "hi")), "messages[0].role"),
    "system message not first": (chat(("user", "hi"), ("system", "late")), "messages[1].role"),
    "empty chat": (chat(), "messages"),
    "too many chat messages": (chat(*[("user", "x")] * 513), "messages"),
    "oversized chat message": (chat(("user", "y" * (MAX_MODEL_LEN * 16 + 1))), "messages[0].content"),
    "request id too long": (pb.GenerateRequest(text="hi", request_id="r" * 300), "request_id"),
    "request id not printable": (pb.GenerateRequest(text="hi", request_id="bad\nid"), "request_id"),
}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.LongCatStub(channel)


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_generate_request_is_invalid_argument_naming_the_field(stub, case):
    request, field = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}: "), err.value.details()


def test_max_tokens_beyond_the_context_names_the_limit_and_a_fitting_one_runs(stub, client):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(sampled(max_tokens=10**9), timeout=30))
    assert f"context length of {MAX_MODEL_LEN} tokens" in err.value.details(), err.value.details()
    prompt = [5] * 200
    fits = client.generate(prompt, max_tokens=MAX_MODEL_LEN - 200, temperature=0.0, ignore_eos=True)
    assert fits.finish_reason == "length" and len(fits.token_ids) == MAX_MODEL_LEN - 200
    # unset max_tokens keeps its default (16), which is not refused: the sample ends at the context's end
    near_the_end = [5] * (MAX_MODEL_LEN - 4)
    default = client.generate(near_the_end, temperature=0.0, ignore_eos=True)
    assert default.finish_reason == "length" and len(default.token_ids) == 4


def test_sdk_exposes_the_field(client):
    with pytest.raises(InvalidArgumentError) as err:
        client.generate("hello", top_p=1.5)
    assert err.value.field == "sampling.top_p"
    with pytest.raises(InvalidArgumentError) as err:
        client.tokenize(messages=[{"role": "wizard", "content": "x"}])
    assert err.value.field == "messages[0].role"


def test_server_healthy_and_serving_after_bad_inputs(server, client, stub):
    for request, _ in BAD_REQUESTS.values():  # all of them again, back to back
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.health() == "SERVING" and client.health("longcat.v1.LongCat") == "SERVING"
    result = client.generate("hello", max_tokens=4, ignore_eos=True)
    assert result.finish_reason == "length" and len(result.token_ids) == 4
    load = server.engine.load()
    assert (load.num_running, load.num_waiting) == (0, 0)
