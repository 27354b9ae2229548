"""The HTTP API on the scripted fake engine: tool calls and reasoning end to end through the template with stub model
outputs, auth (401), unknown model (404), body limit (413), admission (429 + Retry-After), drain (503), and a client
that leaves while its request is queued."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from longcat_service.server.servicer import ServerOptions
from tests.fake_engine import FakeEngine, Script

KEY = "s3cret-key"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def start(script: Script | None = None, **config) -> BackgroundServer:
    options = config.pop("options", ServerOptions())
    engine = FakeEngine(script or Script(), max_model_len=4096)
    return BackgroundServer(lambda: engine, ServerConfig(port=0, http_port=0, options=options, **config)).start()


@pytest.fixture
def serve():
    servers = []

    def make(script=None, **config):
        srv = start(script, **config)
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server.http.port}"

    yield make
    for srv in servers:
        srv.stop(grace_s=1.0)


def sdk(base_url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=30)


def prompt_text(srv) -> str:
    (ids,) = srv.engine.prompts.values()
    return bytes(ids).decode()


TOOL_OUTPUT = ("Let me check.", " ", "<longcat_tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Par',
               'is"}}</longcat_tool_call>', "\n", '<longcat_tool_call>{"name": "get_weather", "arguments": {"city": '
               '"Lyon"}}</longcat_tool_call>')


def test_tool_calls_end_to_end_through_the_template(serve):
    srv, base = serve(Script(outputs=TOOL_OUTPUT))
    model = srv.config.options.model_name
    reply = sdk(base).chat.completions.create(model=model, messages=ASK, tools=TOOLS)
    assert "## Tools" in prompt_text(srv) and "#### Tool name: get_weather" in prompt_text(srv)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})]
    chunks = list(sdk(base).chat.completions.create(model=model, messages=ASK, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me check."
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_weather", {"city": "Lyon"})]
    assert all(tc.id and tc.type == "function" for tc in calls)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the SDK's own accumulator reads the stream as one message
    with sdk(base).chat.completions.stream(model=model, messages=ASK, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    assert [tc.function.name for tc in final.choices[0].message.tool_calls] == ["get_weather", "get_weather"]


def test_malformed_tool_output_is_content_and_tool_choice_none_parses_nothing(serve):
    bad = ('<longcat_tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}</longcat_tool_call>',)
    srv, base = serve(Script(outputs=bad))
    model = srv.config.options.model_name
    reply = sdk(base).chat.completions.create(model=model, messages=ASK, tools=TOOLS)
    assert reply.choices[0].message.content == bad[0] and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "stop"
    streamed = sdk(base).chat.completions.create(model=model, messages=ASK, tools=TOOLS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == bad[0]


def test_named_tool_choice_forces_the_call_and_the_parser_reads_the_forced_prefix(serve):
    srv, base = serve(Script(outputs=('{"city": "Rome"}', "}</longcat_tool_call>")))
    model = srv.config.options.model_name
    reply = sdk(base).chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert prompt_text(srv).endswith('<longcat_tool_call>{"name": "get_weather", "arguments": ')
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
    assert reply.choices[0].message.content is None


def test_reasoning_parser_splits_thinking_from_the_answer(serve):
    outputs = ("<longcat_", "think>Paris is ", "in France.</longcat_th", "ink>It is ", "sunny.")
    srv, base = serve(Script(outputs=outputs), reasoning_parser="longcat")
    model = srv.config.options.model_name
    message = sdk(base).chat.completions.create(model=model, messages=ASK).choices[0].message
    assert (message.reasoning_content, message.content) == ("Paris is in France.", "It is sunny.")
    chunks = list(sdk(base).chat.completions.create(model=model, messages=ASK, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Paris is in France."
    assert "".join(d.content or "" for d in deltas) == "It is sunny."


def test_without_the_reasoning_parser_thinking_stays_in_the_content(serve):
    srv, base = serve(Script(outputs=("<longcat_think>a</longcat_think>", "b")))
    message = sdk(base).chat.completions.create(model=srv.config.options.model_name, messages=ASK).choices[0].message
    assert message.content == "<longcat_think>a</longcat_think>b"


def test_api_key_is_required_with_a_case_insensitive_bearer_scheme(serve):
    srv, base = serve(api_keys=[KEY])
    model = srv.config.options.model_name
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(base, "wrong-key").models.list()
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    assert sdk(base, KEY).models.list().data[0].id == model
    for header in (f"bearer {KEY}", f"BEARER  {KEY}", f"Bearer {KEY}"):
        r = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                       headers={"Authorization": header})
        assert r.status_code == 200, (header, r.text)
    for header in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "hi"}, headers=header)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base + "/health").status_code == 200  # probes need no key
    assert httpx.get(base + "/").status_code == 200


def test_unknown_model_404_and_oversized_body_413(serve):
    srv, base = serve()
    r = httpx.post(base + "/v1/chat/completions", json={"model": "gpt-4o", "messages": ASK})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    big = {"model": srv.config.options.model_name, "prompt": "x" * (17 * 1024 * 1024)}
    r = httpx.post(base + "/v1/completions", json=big)
    assert r.status_code == 413 and "error" in r.json()

    def chunked():
        yield b'{"model": "m", "prompt": "'
        for _ in range(17):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(base + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(base + "/health").status_code == 200


def _hold_one_request(base: str, model: str, results: list) -> threading.Thread:
    def run():
        r = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "first", "max_tokens": 3},
                       timeout=30)
        results.append(r)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait(predicate, timeout_s=10.0):
    end = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    assert predicate()


def test_admission_rejects_with_429_and_retry_after(serve):
    hold = asyncio.Event()
    srv, base = serve(Script(hold=hold), options=ServerOptions(max_queued_requests=1))
    model = srv.config.options.model_name
    results = []
    thread = _hold_one_request(base, model, results)
    _wait(lambda: srv.server.admission.queued_requests == 1)
    with pytest.raises(openai.RateLimitError) as e:
        sdk(base).completions.create(model=model, prompt="second", max_tokens=2)
    assert e.value.status_code == 429
    assert int(e.value.response.headers["retry-after"]) >= 1 and int(e.value.response.headers["retry-after-ms"]) >= 100
    srv._loop.call_soon_threadsafe(hold.set)
    thread.join(30)
    assert results[0].status_code == 200 and results[0].json()["choices"][0]["finish_reason"] == "length"
    assert srv.server.admission.queued_requests == 0


def test_draining_refuses_new_requests_with_503_and_finishes_the_running_one(serve):
    hold = asyncio.Event()
    srv, base = serve(Script(hold=hold))
    model = srv.config.options.model_name
    results = []
    thread = _hold_one_request(base, model, results)
    _wait(lambda: srv.server.state.in_flight == 1)
    drained = srv.submit(srv.server.state.drain(30.0))
    _wait(lambda: srv.server.state.draining)
    r = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "late"})
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
    assert httpx.get(base + "/health").json() == {"status": "draining"}
    srv._loop.call_soon_threadsafe(hold.set)
    thread.join(30)
    assert results[0].status_code == 200 and drained.result(30) is True


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_before_the_first_token_frees_the_engine(serve, stream):
    hold = asyncio.Event()
    srv, base = serve(Script(hold=hold))
    model = srv.config.options.model_name
    body = {"model": model, "messages": ASK, "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    _wait(lambda: srv.server.state.in_flight == 0)
    _wait(lambda: len(srv.engine.aborted) == 1 and not srv.engine.running)
    assert srv.server.admission.queued_requests == 0


def test_http_serves_with_the_grpc_tls_and_mtls_settings(tmp_path):
    import ssl

    from longcat_service.server.app import TlsConfig
    from tests.test_server_security import make_cert

    ca_pem, _, ca_cert, ca_key = make_cert("ca", is_ca=True)
    server_pem, server_key, _, _ = make_cert("localhost", issuer=(ca_cert, ca_key))
    client_pem, client_key, _, _ = make_cert("client", issuer=(ca_cert, ca_key))
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "client.pem").write_bytes(client_pem)
    (tmp_path / "client.key").write_bytes(client_key)
    tls = TlsConfig(cert_chain=server_pem, private_key=server_key, client_ca=ca_pem)
    srv = start(tls=tls)
    try:
        url = f"https://localhost:{srv.server.http.port}/health"
        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            httpx.get(url, verify=trusted, timeout=5)
        trusted.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        assert httpx.get(url, verify=trusted, timeout=5).json() == {"status": "ok"}
        with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
            httpx.get(f"http://127.0.0.1:{srv.server.http.port}/health", timeout=5)
    finally:
        srv.stop(grace_s=1.0)


def test_timeout_ms_ends_the_request_with_504_or_an_error_event(serve):
    srv, base = serve(Script(step_delay_s=0.05))
    model = srv.config.options.model_name
    r = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "slow", "max_tokens": 1000,
                                                   "timeout_ms": 300}, timeout=30)
    assert r.status_code == 504 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["type"] == "timeout_error"
    with pytest.raises(openai.APIError, match="deadline"):
        for _ in sdk(base).chat.completions.create(model=model, messages=ASK, max_tokens=1000, stream=True,
                                                   extra_body={"timeout_ms": 300}):
            pass
    _wait(lambda: not srv.engine.running and srv.server.state.in_flight == 0)
