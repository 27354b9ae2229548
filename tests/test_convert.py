"""server/convert.py on its own: proto -> SamplingParams and prompt token ids (with the transport limits), the
deadline, request ids, and engine outputs -> GenerateResponses. The end-to-end view (INVALID_ARGUMENT over gRPC,
the server staying healthy) is tests/test_server_validation.py."""

from __future__ import annotations

import math

import pytest

from longcat_service.chat_template import ChatTemplateError
from longcat_service.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from longcat_service.sampling_params import SamplingParams
from longcat_service.server import convert
from longcat_service.server.convert import RequestError
from longcat_service.server.generated import longcat_pb2 as pb

MAX_MODEL_LEN = 10  # raw text limit: 10 * 16 = 160 characters


class FakeTokenizer:
    """Records what it is asked; a token per character (the flag add_special_tokens adds a leading 1)."""

    def __init__(self, template_error: ChatTemplateError | None = None):
        self.template_error = template_error
        self.calls = []

    def encode(self, text, add_special_tokens):
        self.calls.append(("encode", text, add_special_tokens))
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt):
        self.calls.append(("template", messages, add_generation_prompt))
        if self.template_error is not None:
            raise self.template_error
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


def field_of(excinfo) -> str:
    return excinfo.value.field


# ---- sampling params --------------------------------------------------------------------------------------------

def test_unset_sampling_fields_keep_the_defaults():
    params = convert.sampling_params_from_proto(pb.SamplingParams(), 512)
    assert params == SamplingParams()
    assert params.max_tokens_is_default


def test_every_sampling_field_set_is_passed_on():
    values = dict(max_tokens=7, temperature=0.5, top_p=0.75, top_k=3, min_p=0.25, repetition_penalty=1.5,
                  frequency_penalty=0.5, presence_penalty=-0.5, seed=42, min_tokens=2, ignore_eos=True, logprobs=3,
                  n=2, skip_special_tokens=False)
    msg = pb.SamplingParams(**values, stop=["x", "yz"], stop_token_ids=[5, 6])
    msg.logit_bias[9] = 2.5
    params = convert.sampling_params_from_proto(msg, 512)
    assert params == SamplingParams(**values, stop=["x", "yz"], stop_token_ids=[5, 6], logit_bias={9: 2.5})
    assert not params.max_tokens_is_default
    assert set(convert._OPTIONAL_SAMPLING_FIELDS) == set(values)  # the test covers every optional field


@pytest.mark.parametrize("msg, field, message", [
    (pb.SamplingParams(top_p=0.0), "sampling.top_p", "sampling.top_p: must be in (0, 1], got 0.0"),
    (pb.SamplingParams(n=0), "sampling.n", "sampling.n: must be in [1, 16], got 0"),
    (pb.SamplingParams(stop_token_ids=[512]), "sampling.stop_token_ids",
     "sampling.stop_token_ids: token id 512 is outside the vocabulary [0, 512)"),
])
def test_bad_sampling_field_is_named_with_its_proto_path(msg, field, message):
    with pytest.raises(RequestError) as excinfo:
        convert.sampling_params_from_proto(msg, 512)
    assert (excinfo.value.field, str(excinfo.value)) == (field, message)


def test_vocabulary_bound_is_the_given_vocab_size():
    msg = pb.SamplingParams(stop_token_ids=[511])
    assert convert.sampling_params_from_proto(msg, 512).stop_token_ids == [511]
    with pytest.raises(RequestError, match="outside the vocabulary"):
        convert.sampling_params_from_proto(msg, 511)


# ---- prompts ----------------------------------------------------------------------------------------------------

def prompt(request, tokenizer=None, max_model_len=MAX_MODEL_LEN):
    return convert.prompt_from_request(request, tokenizer if tokenizer is not None else FakeTokenizer(), max_model_len)


def test_missing_prompt_names_the_oneof():
    with pytest.raises(RequestError) as excinfo:
        prompt(pb.GenerateRequest())
    assert str(excinfo.value) == "prompt: set one of text, token_ids or messages"
    with pytest.raises(RequestError) as excinfo:
        prompt(pb.TokenizeRequest())
    assert field_of(excinfo) == "input"


def test_token_ids_pass_through_even_without_a_tokenizer():
    p = convert.prompt_from_request(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3, -1, 7])), None, MAX_MODEL_LEN)
    assert (p.token_ids, p.kind, p.text) == ([3, -1, 7], "token_ids", None)


@pytest.mark.parametrize("request_", [
    pb.GenerateRequest(text="hi"),
    pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])),
])
def test_text_and_messages_need_a_tokenizer(request_):
    kind = request_.WhichOneof("prompt")
    with pytest.raises(RequestError) as excinfo:
        convert.prompt_from_request(request_, None, MAX_MODEL_LEN)
    assert field_of(excinfo) == kind
    assert str(excinfo.value) == (f"{kind}: this model has no tokenizer (no tokenizer.json in its checkpoint); "
                                  "send token_ids instead")


def test_text_is_encoded_with_the_special_tokens():
    tok = FakeTokenizer()
    p = prompt(pb.GenerateRequest(text="ab"), tok)
    assert (p.token_ids, p.kind, p.text) == ([1, ord("a"), ord("b")], "text", "ab")
    assert tok.calls == [("encode", "ab", True)]
    p = prompt(pb.TokenizeRequest(text="ab"), tok)
    assert p.token_ids == [1, ord("a"), ord("b")]


def test_empty_text_is_refused():
    for request_ in (pb.GenerateRequest(text=""), pb.TokenizeRequest(text="")):  # a oneof set to "" is set
        with pytest.raises(RequestError) as excinfo:
            prompt(request_)
        assert (field_of(excinfo), str(excinfo.value)) == ("text", "text: the prompt is empty")


def test_text_length_limit_is_16_characters_per_context_token():
    assert len(prompt(pb.GenerateRequest(text="x" * 160)).token_ids) == 161
    with pytest.raises(RequestError) as excinfo:
        prompt(pb.GenerateRequest(text="x" * 161))
    assert field_of(excinfo) == "text" and str(excinfo.value) == "text: 161 characters is more than the limit of 160"


def chat(*contents, role="user"):
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role=role, content=c)
                                                                  for c in contents]))


def test_messages_are_rendered_with_the_generation_prompt_and_encoded_as_is():
    tok = FakeTokenizer()
    p = prompt(chat("hi", "yo"), tok)
    rendered = "<user>hi<user>yo<assistant>"
    assert (p.kind, p.text, p.token_ids) == ("messages", rendered, [ord(c) for c in rendered])
    assert tok.calls == [("template", [{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"}], True),
                         ("encode", rendered, False)]


def test_message_count_limit():
    assert prompt(chat(*["a"] * 512), max_model_len=1000).kind == "messages"
    with pytest.raises(RequestError) as excinfo:
        prompt(chat(*["a"] * 513), max_model_len=1000)
    assert field_of(excinfo) == "messages" and str(excinfo.value) == (
        "messages: 513 messages is more than the limit of 512")


def test_message_characters_limit_names_the_first_message_over_it():
    assert prompt(chat("x" * 100, "y" * 60)).kind == "messages"  # 160 characters in all
    with pytest.raises(RequestError) as excinfo:
        prompt(chat("x" * 100, "y" * 61, "z"))
    assert field_of(excinfo) == "messages[1].content"
    assert str(excinfo.value) == "messages[1].content: the messages exceed the limit of 160 characters"


def test_chat_template_error_keeps_its_field():
    tok = FakeTokenizer(ChatTemplateError("messages[0].role", "unknown role 'robot'"))
    with pytest.raises(RequestError) as excinfo:
        prompt(chat("hi", role="robot"), tok)
    assert (field_of(excinfo), str(excinfo.value)) == ("messages[0].role", "messages[0].role: unknown role 'robot'")


# ---- deadline and request id ------------------------------------------------------------------------------------

@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(convert.time, "monotonic", lambda: 1000.0)


@pytest.mark.parametrize("timeout_ms, grpc_remaining, deadline", [
    (None, None, None),
    (None, math.inf, None),
    (2500, None, 1002.5),
    (None, 4.0, 1004.0),
    (2500, 4.0, 1002.5),
    (5000, 4.0, 1004.0),
    (2500, math.inf, 1002.5),
])
def test_deadline_is_the_earlier_of_timeout_ms_and_the_grpc_deadline(clock, timeout_ms, grpc_remaining, deadline):
    request = pb.GenerateRequest(text="hi") if timeout_ms is None else pb.GenerateRequest(text="hi",
                                                                                         timeout_ms=timeout_ms)
    assert convert.engine_deadline(request, grpc_remaining) == deadline


def test_request_id_limits():
    convert.validate_request_id("")
    convert.validate_request_id("r" * 256)
    for bad, message in (("r" * 257, "request_id: longer than 256 characters"),
                         ("a\nb", "request_id: must be printable characters")):
        with pytest.raises(RequestError) as excinfo:
            convert.validate_request_id(bad)
        assert (field_of(excinfo), str(excinfo.value)) == ("request_id", message)


def test_timeout_ms_zero_is_refused_and_unset_or_positive_pass():
    convert.validate_timeout(pb.GenerateRequest(text="hi"))
    convert.validate_timeout(pb.GenerateRequest(text="hi", timeout_ms=1))
    with pytest.raises(RequestError) as excinfo:
        convert.validate_timeout(pb.GenerateRequest(text="hi", timeout_ms=0))
    assert field_of(excinfo) == "timeout_ms" and "must be > 0" in str(excinfo.value)


# ---- responses --------------------------------------------------------------------------------------------------

def test_chunk_is_none_when_the_step_added_nothing():
    assert convert.chunk_response("r", CompletionOutput(index=0, token_ids=[1], text="a")) is None


def test_chunk_carries_the_new_tokens_text_and_logprobs():
    out = CompletionOutput(index=2, new_token_ids=[5, 6], text_delta="hi",
                           new_logprobs=[Logprob(5, -0.5, {5: -0.5, 9: -1.5}), Logprob(6, -0.25)])
    r = convert.chunk_response("req", out)
    assert (r.request_id, r.index, list(r.chunk.token_ids), r.chunk.text) == ("req", 2, [5, 6], "hi")
    assert [(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in r.chunk.logprobs] == [
        (5, -0.5, [(5, -0.5), (9, -1.5)]), (6, -0.25, [])]


def test_chunk_with_text_only_or_tokens_only():
    r = convert.chunk_response("r", CompletionOutput(index=0, text_delta="tail"))  # a flushed tail, no new token
    assert (list(r.chunk.token_ids), r.chunk.text) == ([], "tail")
    r = convert.chunk_response("r", CompletionOutput(index=0, new_token_ids=[3]))  # a token held back as text
    assert (list(r.chunk.token_ids), r.chunk.text, len(r.chunk.logprobs)) == ([3], "", 0)


def request_output(**kw):
    metrics = kw.pop("metrics", RequestMetrics())
    return RequestOutput(request_id="r", prompt_token_ids=[1, 2, 3], outputs=[], num_cached_tokens=kw.pop("cached", 0),
                         metrics=metrics, error=kw.pop("error", None))


@pytest.mark.parametrize("reason, value", [
    ("stop", pb.FINISH_REASON_STOP), ("length", pb.FINISH_REASON_LENGTH), ("abort", pb.FINISH_REASON_ABORT),
    ("deadline", pb.FINISH_REASON_DEADLINE), ("error", pb.FINISH_REASON_ERROR), ("other", pb.FINISH_REASON_UNSPECIFIED),
])
def test_finish_reasons_map_both_ways(reason, value):
    r = convert.complete_response("r", request_output(), CompletionOutput(index=0, finish_reason=reason))
    assert r.complete.finish_reason == value
    if value != pb.FINISH_REASON_UNSPECIFIED:
        assert convert.finish_reason_name(value) == reason


def test_complete_carries_usage_and_timings():
    metrics = RequestMetrics(queue_time_s=0.5, time_to_first_token_s=1.25, mean_time_per_output_token_s=0.125,
                             num_draft_tokens=10, num_accepted_tokens=4, spec_acceptance_rate=0.4,
                             spec_mean_accepted_length=1.8)
    out = CompletionOutput(index=1, token_ids=[7, 8], finish_reason="length")
    r = convert.complete_response("req", request_output(cached=2, metrics=metrics), out)
    assert (r.request_id, r.index, r.WhichOneof("response")) == ("req", 1, "complete")
    u, t = r.complete.usage, r.complete.timings
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.draft_tokens, u.accepted_draft_tokens) == (
        3, 2, 2, 10, 4)
    assert (u.acceptance_rate, u.mean_accepted_length) == pytest.approx((0.4, 1.8))
    assert (t.queue_ms, t.time_to_first_token_ms, t.mean_time_per_output_token_ms) == (500.0, 1250.0, 125.0)
    assert r.complete.WhichOneof("matched_stop") is None and r.complete.error_message == ""


def test_complete_without_metrics_reports_zeros():
    r = convert.complete_response("r", request_output(), CompletionOutput(index=0, finish_reason="stop"))
    u, t = r.complete.usage, r.complete.timings
    assert (u.acceptance_rate, u.mean_accepted_length, t.queue_ms, t.time_to_first_token_ms,
            t.mean_time_per_output_token_ms) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_complete_names_the_matched_stop():
    r = convert.complete_response("r", request_output(), CompletionOutput(0, finish_reason="stop", stop_reason="##"))
    assert (r.complete.WhichOneof("matched_stop"), r.complete.stop_string) == ("stop_string", "##")
    r = convert.complete_response("r", request_output(), CompletionOutput(0, finish_reason="stop", stop_reason=0))
    assert (r.complete.WhichOneof("matched_stop"), r.complete.stop_token_id) == ("stop_token_id", 0)


def test_complete_error_message_only_for_errors():
    r = convert.complete_response("r", request_output(error="NaN logits"), CompletionOutput(0, finish_reason="error"))
    assert r.complete.error_message == "NaN logits"
    r = convert.complete_response("r", request_output(), CompletionOutput(0, finish_reason="error"))
    assert r.complete.error_message == "engine error"
    r = convert.complete_response("r", request_output(error="late"), CompletionOutput(0, finish_reason="abort"))
    assert r.complete.error_message == ""
