"""The OpenAI-compatible HTTP API through the official `openai` SDK (sync and async) on the real engine and the
demo model (CPU): results equal the offline LLM's, streaming, n, logprobs, stop, seeds, abort on close, errors, and
HTTP and gRPC sharing one engine. Written against whatever demo model is embedded: expectations come from LLM."""

from __future__ import annotations

import asyncio
import math
import re
import time

import httpx
import openai
import pytest

from longcat_service.client import AsyncLongCatClient
from longcat_service.engine.async_engine import AsyncEngine
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.llm import LLM
from longcat_service.sampling_params import SamplingParams
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from longcat_service.server.servicer import ServerOptions

ENGINE_KWARGS = dict(device="cpu", dtype="float32", max_num_seqs=32)  # float32: greedy tokens batch-independent
HELLO = [{"role": "user", "content": "Tell me about cats."}]


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(port=0, http_port=0, options=ServerOptions(max_queued_requests=128))
    with BackgroundServer(lambda: AsyncEngine(EngineArgs(**ENGINE_KWARGS)), config) as srv:
        yield srv


@pytest.fixture(scope="module")
def base_url(server):
    return f"http://127.0.0.1:{server.server.http.port}"


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def llm():
    return LLM(**ENGINE_KWARGS)


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **kwargs)


def wait_engine_idle(server, timeout_s: float = 15.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        load = server.engine.load()
        if load.num_running == 0 and load.num_waiting == 0:
            return load
        time.sleep(0.02)
    return server.engine.load()


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_models_list_names_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.config.options.model_name]
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_chat_equals_the_offline_llm_and_streaming_delivers_the_same_text(client, model, llm):
    expected = llm.chat(HELLO, greedy(max_tokens=12))[0]
    reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    chunks = list(client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1, "one chunk per step, not one"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_from_text_strings_and_token_ids_equal_the_offline_llm(client, model, llm):
    prompts = ["The number 7 is", "Once upon a time"]
    expected = [o.outputs[0].text for o in llm.generate(prompts, greedy(max_tokens=8))]
    one = client.completions.create(model=model, prompt=prompts[0], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert one.choices[0].text == expected[0] and one.usage.completion_tokens == 8
    many = client.completions.create(model=model, prompt=prompts, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == expected
    ids = llm.tokenizer.encode(prompts[1], add_special_tokens=True)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == expected[1]
    echoed = client.completions.create(model=model, prompt=prompts[0], max_tokens=8, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == prompts[0] + expected[0]
    streamed = client.completions.create(model=model, prompt=prompts[1], max_tokens=8, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected[1]


def test_logprobs_match_the_offline_llm(client, model, llm):
    expected = llm.chat(HELLO, greedy(max_tokens=6, logprobs=3))[0].outputs[0]
    reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for entry, want in zip(content, expected.logprobs, strict=True):
        assert math.isclose(entry.logprob, want.logprob, abs_tol=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy picks the top one
    prompt = "The number 7 is"
    want = llm.generate(prompt, greedy(max_tokens=5, logprobs=2))[0].outputs[0]
    legacy = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(legacy.tokens) == 5 and legacy.text_offset[0] == 0
    assert legacy.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)


def test_n_choices_and_seed_reproducibility(client, model):
    def sample(seed):
        reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=10, temperature=1.0, n=2,
                                               seed=seed, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in reply.choices) == [0, 1]
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99) != first


def test_stop_string_ends_the_output_before_it(client, model, llm):
    full = llm.chat(HELLO, greedy(max_tokens=16))[0].outputs[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and full.find(full[i:i + 2]) == i)
    reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=16, temperature=0, stop=[stop],
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_closing_the_stream_aborts_the_request_in_the_engine(client, model, server, base_url):
    cancelled = metric(base_url, 'longcat_requests_total{outcome="cancelled"}')
    stream = client.chat.completions.create(model=model, messages=HELLO, max_tokens=3000, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert server.engine.load().num_running == 1
    stream.close()
    load = wait_engine_idle(server)
    assert load.num_running == 0 and load.num_waiting == 0, "the engine still runs the abandoned request"
    deadline = time.monotonic() + 5
    while metric(base_url, 'longcat_requests_total{outcome="cancelled"}') <= cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(base_url, 'longcat_requests_total{outcome="cancelled"}') == cancelled + 1


def test_bad_parameters_raise_bad_request_naming_them(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=HELLO, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    assert "temperature" in e.value.message
    for kwargs, param in [(dict(top_p=0), "top_p"), (dict(n=0), "n"), (dict(max_completion_tokens=0),
                          "max_completion_tokens"), (dict(logprobs=True, top_logprobs=99), "top_logprobs"),
                          (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
                          (dict(logit_bias={"10000000": 1}), "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": model, "messages": HELLO, **kwargs})
        assert e.value.body["param"] == param, (kwargs, e.value.body)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)


def test_the_service_stays_healthy_after_bad_requests(client, model, base_url):
    bad = [b"{not json", b"[]", b'{"model": 1}', b'{"model": "m", "messages": "hi"}']
    for body in bad:
        r = httpx.post(base_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 404) and "error" in r.json(), body
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}
    assert client.chat.completions.create(model=model, messages=HELLO, max_tokens=2).choices[0].message.content


LONE_SURROGATE_BODIES = [  # raw JSON: a lone surrogate escape decodes to a str that no UTF-8 encoder takes
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "\\udc00"}]}]}', "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
     "stop[0]"),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
                             '"function", "function": {"name": "f", "parameters": {"properties": {"\\ud800": {}}}}}]}',
     "tools[0].function.parameters"),
    ("/v1/completions", '{"model": "M", "prompt": "x\\ud800"}', "prompt"),
    ("/v1/completions", '{"model": "M", "prompt": ["ok", "x\\udfff"]}', "prompt[1]"),
    ("/tokenize", '{"model": "M", "prompt": "\\ud800"}', "prompt"),
]


@pytest.mark.parametrize("path,body,param", LONE_SURROGATE_BODIES, ids=[p for _, _, p in LONE_SURROGATE_BODIES])
def test_text_with_a_lone_surrogate_is_a_400_naming_the_field(base_url, model, path, body, param):
    r = httpx.post(base_url + path, content=body.replace('"M"', f'"{model}"'),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"], error
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}


def test_a_surrogate_pair_is_text(base_url, model):
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "\\ud83d\\ude00 hi"}}], "max_tokens": 2}}'
    r = httpx.post(base_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_what_the_server_cannot_honour_is_refused_not_ignored(client, model):
    for kind in ("json_object", "json_schema"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=HELLO, max_tokens=2, response_format={"type": kind})
        assert e.value.body["param"] == "response_format" and kind in e.value.message
    text = client.chat.completions.create(model=model, messages=HELLO, max_tokens=2, response_format={"type": "text"})
    assert text.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, n=1, best_of=3)
    assert e.value.body["param"] == "best_of"
    assert len(client.completions.create(model=model, prompt="Hi", max_tokens=2, n=2, best_of=2).choices) == 2


def test_content_is_required_but_for_an_assistant_turn(base_url, model):
    for role in ("user", "system", "tool"):
        r = httpx.post(base_url + "/v1/chat/completions", json={"model": model, "messages": [{"role": role}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
    r = httpx.post(base_url + "/v1/chat/completions", json={
        "model": model, "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                     {"role": "user", "content": "again"}]})
    assert r.status_code == 200, r.text


def test_a_union_field_names_the_real_reason_not_a_member_type(base_url, model):
    """prompt: str | list[str] | list[int] | list[list[int]]: a list of numbers fails as token ids, not as a string"""
    r = httpx.post(base_url + "/v1/completions", json={"model": model, "prompt": [1.5]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[0]", r.text
    assert "integer" in r.json()["error"]["message"]
    for bad in ([True], [[5, False]]):  # lax mode took true as token 1
        r = httpx.post(base_url + "/v1/completions", json={"model": model, "prompt": bad})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt[0]"), r.text
    r = httpx.post(base_url + "/detokenize", json={"model": model, "tokens": [1, True]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[1]", r.text
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": 1})  # not a union: the first error stays first
    assert r.json()["error"]["param"] == "model", r.text


def test_tokenize_and_detokenize_round_trip(base_url, model, llm):
    ids = httpx.post(base_url + "/tokenize", json={"model": model, "prompt": "Hello cats"}).json()["tokens"]
    assert ids == llm.tokenizer.encode("Hello cats", add_special_tokens=True)
    text = httpx.post(base_url + "/detokenize", json={"model": model, "tokens": ids}).json()["prompt"]
    assert text == llm.tokenizer.decode(ids, skip_special_tokens=False)
    chat = httpx.post(base_url + "/tokenize", json={"model": model, "messages": HELLO}).json()["tokens"]
    assert chat == llm.tokenizer.encode(llm.tokenizer.apply_chat_template(HELLO), add_special_tokens=False)
    r = httpx.post(base_url + "/detokenize", json={"model": model, "tokens": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[0]"


def test_async_sdk_streams_and_aborts(base_url, model, server, llm):
    expected = llm.chat(HELLO, greedy(max_tokens=8))[0].outputs[0].text

    async def run():
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0) as aclient:
            reply = await aclient.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0,
                                                          extra_body={"ignore_eos": True})
            pieces = []
            async with await aclient.chat.completions.create(
                    model=model, messages=HELLO, max_tokens=8, temperature=0, stream=True,
                    extra_body={"ignore_eos": True}) as stream:
                async for chunk in stream:
                    pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            async with await aclient.chat.completions.create(
                    model=model, messages=HELLO, max_tokens=3000, stream=True,
                    extra_body={"ignore_eos": True}) as stream:
                async for _ in stream:
                    break  # leaving the block closes the response
            return reply.choices[0].message.content, "".join(pieces)

    reply, streamed = asyncio.run(run())
    assert reply == streamed == expected
    assert wait_engine_idle(server).num_running == 0


def test_http_and_grpc_under_load_share_one_engine(server, base_url, model, llm):
    prompts = [f"The number {i} is" for i in range(12)]
    expected = [o.outputs[0].text for o in llm.generate(prompts, greedy(max_tokens=8))]

    async def run():
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0) as aclient, \
                AsyncLongCatClient(server.address) as grpc_client:
            async def http_one(p):
                r = await aclient.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                                     extra_body={"ignore_eos": True})
                return r.choices[0].text

            async def grpc_one(p):
                return (await grpc_client.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True)).text

            return await asyncio.gather(*(f(p) for p in prompts for f in (http_one, grpc_one)))

    results = asyncio.run(run())
    assert results[0::2] == expected, "HTTP"
    assert results[1::2] == expected, "gRPC"


def test_streamed_n_choices_equal_the_non_streamed_ones_and_finish_once_each(client, model):
    kwargs = dict(model=model, messages=HELLO, max_tokens=6, temperature=1.0, n=2, seed=7,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == next(c.message.content for c in whole.choices if c.index == i)
        assert [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].index == i and c.choices[0].finish_reason] == ["length"]
