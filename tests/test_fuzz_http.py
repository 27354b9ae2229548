"""Property-based fuzz of the OpenAI-compatible HTTP API (hypothesis), as tests/test_fuzz_requests.py does for gRPC:
random chat and text-completion bodies over the fields the server reads (NaN, inf, huge and negative numbers, wrong
types, any unicode including lone UTF-16 surrogate escapes, empty and oversized lists). Every call ends 200 or a 4xx
whose JSON error names a parameter, never a 500; a stream ends with [DONE] or an error event; the server stays
healthy. Fixed budget, derandomized: CI time is bounded and a failure reproduces."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat_service.engine.async_engine import AsyncEngine
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer

MAX_MODEL_LEN = 48  # bounds every generation, whatever max_tokens and n say
BUDGET = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
# any unicode; and a lone surrogate between such text (a drawn run of surrogates often pairs up into one character)
TEXT = st.one_of(st.text(max_size=30), st.builds("{}{}{}".format, st.text(max_size=5), SURROGATES, st.text(max_size=5)))
INT = st.one_of(st.integers(-3, 20), st.integers(-(2**70), 2**70))
REAL = st.one_of(st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.5, 1e-39, 1e308, float("inf"), float("nan")]),
                 st.floats(allow_nan=True, allow_infinity=True))
ANY = st.one_of(st.none(), st.booleans(), INT, REAL, TEXT, st.lists(st.integers(-2, 600), max_size=3))


def maybe_wrong(value):
    """The field's own kind of value most of the time, any JSON value sometimes (rarely enough that whole bodies are
    often valid: the checks past the schema, tokenization and generation, run too)."""
    return st.one_of(*[value] * 7, ANY)


TOKEN_IDS = st.lists(st.one_of(st.integers(0, 600), INT, st.booleans()), max_size=20)
CONTENT = st.one_of(TEXT, st.none(), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "x"])}, optional={"text": maybe_wrong(TEXT)}), max_size=2))
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool",
                                                                    "developer"]), TEXT)},
                                optional={"content": CONTENT, "name": maybe_wrong(TEXT)})
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": maybe_wrong(TEXT)}, optional={"description": TEXT, "parameters": st.dictionaries(TEXT, ANY, max_size=2)})})
SAMPLING = {
    "max_tokens": maybe_wrong(st.integers(1, 8)), "temperature": maybe_wrong(REAL), "top_p": maybe_wrong(REAL),
    "n": maybe_wrong(st.integers(-1, 17)), "stop": maybe_wrong(st.one_of(TEXT, st.lists(TEXT, max_size=18))),
    "seed": maybe_wrong(INT), "presence_penalty": maybe_wrong(REAL), "frequency_penalty": maybe_wrong(REAL),
    "logit_bias": maybe_wrong(st.dictionaries(st.one_of(st.integers(-5, 600).map(str), TEXT), REAL, max_size=3)),
    "top_k": maybe_wrong(INT), "min_p": maybe_wrong(REAL), "repetition_penalty": maybe_wrong(REAL),
    "min_tokens": maybe_wrong(INT), "ignore_eos": maybe_wrong(st.booleans()), "stop_token_ids": TOKEN_IDS,
    "stream": st.booleans(), "stream_options": maybe_wrong(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "timeout_ms": maybe_wrong(INT),
}
chat_body = st.fixed_dictionaries({"messages": maybe_wrong(st.lists(MESSAGE, max_size=4))}, optional={
    **SAMPLING, "max_completion_tokens": maybe_wrong(st.integers(1, 8)), "logprobs": maybe_wrong(st.booleans()),
    "top_logprobs": maybe_wrong(INT), "tools": maybe_wrong(st.lists(TOOL, max_size=2)),
    "tool_choice": maybe_wrong(st.sampled_from(["none", "auto", "required"])),
    "response_format": maybe_wrong(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
})
completion_body = st.fixed_dictionaries({"prompt": st.one_of(
    TEXT, st.lists(TEXT, max_size=3), TOKEN_IDS, st.lists(TOKEN_IDS, max_size=3), ANY)}, optional={
    **SAMPLING, "echo": maybe_wrong(st.booleans()), "logprobs": maybe_wrong(INT), "best_of": maybe_wrong(INT),
    "suffix": maybe_wrong(TEXT),
})


# bodies the schema takes (small valid numbers), so that the text reaches the template, the tokenizer and the
# engine: any unicode there, lone surrogates included
PLAIN_SAMPLING = {"max_tokens": st.integers(1, 4), "temperature": st.sampled_from([0.0, 0.7]),
                  "n": st.integers(1, 2), "stop": st.lists(TEXT, max_size=2), "seed": st.integers(0, 9),
                  "logprobs": st.booleans(), "stream": st.booleans()}
plain_chat_body = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}), min_size=1, max_size=3)},
    optional={**PLAIN_SAMPLING, "tools": st.lists(TOOL, max_size=1)})
plain_completion_body = st.fixed_dictionaries({"prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=2))},
                                              optional={**PLAIN_SAMPLING, "logprobs": st.integers(0, 2),
                                                        "echo": st.booleans()})


@pytest.fixture(scope="module")
def base_url():
    args = EngineArgs(device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    with BackgroundServer(lambda: AsyncEngine(args), ServerConfig(port=0, http_port=0)) as srv:
        yield f"http://127.0.0.1:{srv.server.http.port}"


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        client.model = client.get("/v1/models").json()["data"][0]["id"]
        yield client


def post_and_check(http: httpx.Client, path: str, body: dict) -> None:
    body = {"model": http.model, **body}
    content = json.dumps(body, allow_nan=True)  # NaN / Infinity literals are not JSON: the parser must refuse them
    with http.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        raw = r.read().decode()
    assert r.status_code in (200, 400, 413), (r.status_code, raw, content)
    if r.status_code != 200:
        error = json.loads(raw)["error"]
        assert error["message"] and error["param"], raw
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), raw[-500:]
    else:
        assert json.loads(raw)["choices"], raw


@BUDGET
@given(body=st.one_of(chat_body, plain_chat_body))
def test_random_chat_bodies_are_answered_or_refused_naming_a_parameter(http, body):
    post_and_check(http, "/v1/chat/completions", body)


@BUDGET
@given(body=st.one_of(completion_body, plain_completion_body))
def test_random_completion_bodies_are_answered_or_refused_naming_a_parameter(http, body):
    post_and_check(http, "/v1/completions", body)


def test_the_server_is_still_healthy_after_the_fuzz(http):
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/completions", json={"model": http.model, "prompt": "The cat", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
