"""LongCat tool-call and reasoning parsers on fixed model outputs, one-shot and streamed in pieces, and the tool
prompt rendering (spec §6)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_service.server.openai_api.errors import ApiError
from longcat_service.server.openai_api.prompts import render_chat, tool_description
from longcat_service.server.openai_api.protocol import ChatCompletionRequest
from longcat_service.server.openai_api.reasoning_parser import ReasoningStreamParser, split_reasoning
from longcat_service.server.openai_api.tool_parser import ToolCallStreamParser, extract_tool_calls

WEATHER = '<longcat_tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</longcat_tool_call>'
TIME = '<longcat_tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</longcat_tool_call>'
MALFORMED = '<longcat_tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}</longcat_tool_call>'


def stream(text: str, cuts: list[int]):
    """Feed text to a streaming parser in pieces cut at the given offsets; (content, calls)."""
    parser = ToolCallStreamParser()
    bounds = [0, *sorted(set(c % (len(text) + 1) for c in cuts)), len(text)]
    events = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        events += parser.feed(text[a:b])
    events += parser.finish()
    return "".join(e.text for e in events if e.call is None), [e.call for e in events if e.call is not None]


def test_a_complete_call_is_parsed_and_removed_from_the_content():
    content, calls = extract_tool_calls("Let me check. " + WEATHER)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"})]
    assert calls[0].id.startswith("call_")


def test_several_calls_keep_their_order_and_get_distinct_ids():
    content, calls = extract_tool_calls(WEATHER + "\n" + TIME)
    assert content is None
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].arguments) == {"tz": "Europe/Paris"}
    assert calls[0].id != calls[1].id


def test_malformed_json_stays_content_and_a_good_call_beside_it_still_parses():
    assert extract_tool_calls(MALFORMED) == (MALFORMED, [])
    content, calls = extract_tool_calls(MALFORMED + WEATHER)
    assert content == MALFORMED and [c.name for c in calls] == ["get_weather"]
    for body in ('"just a string"', '{"arguments": {}}', '{"name": "", "arguments": {}}', '{"name": "f", "arguments": 3}'):
        text = f"<longcat_tool_call>{body}</longcat_tool_call>"
        assert extract_tool_calls(text) == (text, []), body


def test_arguments_given_as_a_json_string_are_accepted():
    _, calls = extract_tool_calls('<longcat_tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</longcat_tool_call>')
    assert json.loads(calls[0].arguments) == {"a": 1}


def test_an_unclosed_call_and_plain_text_are_content_unchanged():
    for text in ("Hello <longcat_tool", "no tools here\n", WEATHER[:-5], "a < b and <longcat_tool_cal"):
        assert extract_tool_calls(text) == (text, []), text


def test_streamed_in_pieces_emits_content_before_the_call_arrives():
    parser = ToolCallStreamParser()
    assert [e.text for e in parser.feed("Checking the wea")] == ["Checking the wea"]
    assert [e.text for e in parser.feed("ther <longcat_to")] == ["ther"]  # the space waits: a call may follow
    assert parser.feed('ol_call>{"name": "get_weather", "arguments": ') == []
    events = parser.feed('{"city": "Paris"}}</longcat_tool_call>')
    assert [(e.call.name, json.loads(e.call.arguments)) for e in events] == [("get_weather", {"city": "Paris"})]
    assert parser.finish() == []


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["", "Sure. ", "  x < y  ", "<longcat_tool_call>"]), st.sampled_from(["", "\n", " done"]),
       st.lists(st.sampled_from([WEATHER, TIME, MALFORMED, " then ", "<longcat_tool", "\n"]), max_size=4),
       st.lists(st.integers(0, 400), max_size=12))
def test_streaming_in_any_pieces_equals_the_one_shot_parse(head, tail, middle, cuts):
    text = head + "".join(middle) + tail
    content, calls = extract_tool_calls(text)
    streamed_content, streamed_calls = stream(text, cuts)
    assert (streamed_content or None if streamed_calls else streamed_content) == content
    assert [(c.name, c.arguments) for c in streamed_calls] == [(c.name, c.arguments) for c in calls]


def test_reasoning_is_split_from_the_content():
    assert split_reasoning("<longcat_think>Paris is in France.</longcat_think>It is Paris.") == (
        "Paris is in France.", "It is Paris.")
    assert split_reasoning("\n<longcat_think>unfinished") == ("unfinished", "")
    assert split_reasoning("No thinking. <longcat_think>x</longcat_think>") == (
        None, "No thinking. <longcat_think>x</longcat_think>")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["<longcat_think>a b</longcat_think>c", "<longcat_think>x", "plain", "<longcat_th", " \n",
                        "<longcat_think></longcat_think></longcat_think>"]), st.lists(st.integers(0, 60), max_size=8))
def test_streamed_reasoning_equals_the_one_shot_split(text, cuts):
    parser = ReasoningStreamParser()
    bounds = [0, *sorted(set(c % (len(text) + 1) for c in cuts)), len(text)]
    pieces = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        pieces += parser.feed(text[a:b])
    pieces += parser.finish()
    reasoning, content = split_reasoning(text)
    assert "".join(t for k, t in pieces if k == "reasoning") == (reasoning or "")
    assert "".join(t for k, t in pieces if k == "content") == content


# ---- rendering ---------------------------------------------------------------------------------------------

class _Tok:
    """Renders LongCat's default format (no checkpoint template); encodes one id per character."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        from longcat_service.chat_template import render_longcat_chat

        return render_longcat_chat(messages, add_generation_prompt)

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time"}}]


def render(**kwargs):
    request = ChatCompletionRequest(model="m", **kwargs)
    return render_chat(request, _Tok(), 4096)


def test_tools_are_described_before_the_messages_as_spec_section_6_shows():
    prompt = render(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    head, _, messages = prompt.text.partition("\n\n## Messages\n")
    assert messages == "[Round 0] USER:Weather in Paris? ASSISTANT:"
    assert head.startswith("## Tools\nYou have access to the following tools: \n\n### Tool namespace: function\n\n"
                           "#### Tool name: get_weather\n\nDescription: Weather of a city\n\nInputSchema: \n")
    assert json.dumps(TOOLS[0]["function"]["parameters"], indent=2) in head
    assert "#### Tool name: get_time" in head and "<longcat_tool_call>" in head
    assert prompt.tools_enabled and prompt.output_prefix == ""


def test_tool_choice_none_renders_no_tools_and_required_or_named_open_the_call():
    plain = render(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="none")
    assert plain.text == "[Round 0] USER:hi ASSISTANT:" and not plain.tools_enabled
    required = render(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="required")
    assert required.text.endswith(" ASSISTANT:<longcat_tool_call>") and required.output_prefix == "<longcat_tool_call>"
    named = render(messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.text.endswith(' ASSISTANT:<longcat_tool_call>{"name": "get_time", "arguments": ')
    assert "#### Tool name: get_weather" not in named.text  # only the named tool is offered


def test_assistant_tool_calls_and_tool_results_are_written_back_into_the_conversation():
    prompt = render(tools=TOOLS, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}])
    messages = prompt.text.partition("\n\n## Messages\n")[2]
    assert messages == ('[Round 0] USER:Weather? ASSISTANT:<longcat_tool_call>{"name": "get_weather", "arguments": '
                        '{"city": "Paris"}}</longcat_tool_call></longcat_s> [Round 1] USER:<longcat_tool_response>21 C'
                        '</longcat_tool_response>\n<longcat_tool_response>sunny</longcat_tool_response> ASSISTANT:')


@pytest.mark.parametrize("kwargs, param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": "x"}], tool_choice="required"), "tool_choice"),
    (dict(messages=[{"role": "user", "content": "x"}], tools=TOOLS,
          tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice.function.name"),
    (dict(messages=[{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]), "messages[1].role"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]),
     "messages[0].tool_calls[0].function.arguments"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content[0]"),
])
def test_bad_chat_input_is_a_400_naming_the_parameter(kwargs, param):
    with pytest.raises(ApiError) as e:
        render(**kwargs)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_tool_description_lists_every_tool_once():
    from longcat_service.server.openai_api.protocol import Tool

    text = tool_description([Tool.model_validate(t) for t in TOOLS])
    assert text.count("#### Tool name: ") == 2


def test_merging_two_steps_keeps_both_deltas_and_the_later_totals():
    from longcat_service.outputs import CompletionOutput, Logprob, RequestOutput
    from longcat_service.server.openai_api.generation import merge_outputs

    a = RequestOutput("r", [1], [CompletionOutput(0, [5], "a", new_token_ids=[5], text_delta="a",
                                                  new_logprobs=[Logprob(5, -1.0)]),
                                 CompletionOutput(1, [6], "b", new_token_ids=[6], text_delta="b")])
    b = RequestOutput("r", [1], [CompletionOutput(0, [5, 7], "ac", new_token_ids=[7], text_delta="c",
                                                  new_logprobs=[Logprob(7, -2.0)], finish_reason="length")],
                      finished=True)
    merged = merge_outputs(a, b)
    first, second = merged.outputs
    assert (first.new_token_ids, first.text_delta, first.token_ids, first.finish_reason) == ([5, 7], "ac", [5, 7],
                                                                                           "length")
    assert [lp.token_id for lp in first.new_logprobs] == [5, 7]
    assert (second.index, second.text_delta) == (1, "b") and merged.finished
    assert a.outputs[0].new_token_ids == [5]  # the inputs are left alone
