"""POST /v1/chat/completions: one ChatCompletion, or SSE chunks (role first, content / reasoning / tool-call deltas,
one finish_reason chunk per choice, the usage chunk when stream_options.include_usage, then `[DONE]`)."""

from __future__ import annotations

import time
import uuid

from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.background import BackgroundTask

from longcat_service.server.openai_api.errors import invalid
from longcat_service.server.openai_api.generation import Generation, HttpContext
from longcat_service.server.openai_api.prompts import ChatPrompt, render_chat
from longcat_service.server.openai_api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    Delta,
    DeltaToolCall,
    PromptTokensDetails,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    Usage,
    speculative_usage,
)
from longcat_service.server.openai_api.reasoning_parser import ReasoningStreamParser, split_reasoning
from longcat_service.server.openai_api.request_end import collect_non_streaming, stream_events
from longcat_service.server.openai_api.sampling import sampling_params
from longcat_service.server.openai_api.tokens import TokenText
from longcat_service.server.openai_api.tool_parser import ToolCallStreamParser, extract_tool_calls


def openai_finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    if reason == "stop" and has_tool_calls:
        return "tool_calls"
    return reason


def usage_of(outputs, num_cached: int) -> Usage:
    prompt = len(outputs[0].prompt_token_ids) if outputs else 0
    completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached),
                 speculative=speculative_usage(outputs))


async def create_chat_completion(ctx: HttpContext, request: ChatCompletionRequest, receive):
    if request.response_format is not None and request.response_format.type != "text":
        # answering JSON mode with free text would break the client's parser later, far from the cause
        raise invalid("response_format", f"type {request.response_format.type!r} is not supported (this server has "
                                         "no constrained decoding; only 'text')")
    prompt = render_chat(request, ctx.engine.tokenizer, ctx.engine.max_model_len)
    params = sampling_params(request, ctx.vocab_size())
    gen = Generation(ctx, [prompt.token_ids], params, "messages", request.timeout_ms, receive)
    await gen.start()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if request.stream:
        return EventSourceResponse(_stream(ctx, gen, request, prompt, completion_id),
                                   background=BackgroundTask(gen.close, "cancelled"))
    final = await collect_non_streaming(gen, _last_output(gen))
    tokens = TokenText(ctx.engine.tokenizer)
    choices = []
    for c in final.outputs:
        text = c.text
        reasoning = None
        if ctx.reasoning_parser and not prompt.output_prefix:
            reasoning, text = split_reasoning(text)
        calls = []
        if prompt.tools_enabled:
            content, calls = extract_tool_calls(prompt.output_prefix + text)
        else:
            content = text
        logprobs = None
        if request.logprobs:
            logprobs = ChoiceLogprobs(content=tokens.chat_entries(c.logprobs or [], request.top_logprobs or 0))
        choices.append(ChatChoice(
            index=c.index, logprobs=logprobs, finish_reason=openai_finish_reason(c.finish_reason, bool(calls)),
            message=ResponseMessage(content=content, reasoning_content=reasoning, tool_calls=[
                ResponseToolCall(id=call.id, function=ResponseFunctionCall(name=call.name, arguments=call.arguments))
                for call in calls])))
    return ChatCompletionResponse(id=completion_id, model=request.model, choices=choices,
                                  usage=usage_of([final], final.num_cached_tokens))


async def _last_output(gen: Generation):
    last = None
    async for _, out in gen.outputs():
        last = out
    return last


class _ChoiceStream:
    """One choice's parsers: reasoning first (when enabled), then tool calls on the content."""

    def __init__(self, index: int, prompt: ChatPrompt, reasoning: bool):
        self.index = index
        self.reasoning = ReasoningStreamParser() if reasoning and not prompt.output_prefix else None
        self.tools = ToolCallStreamParser() if prompt.tools_enabled else None
        self.prefix = prompt.output_prefix
        self.num_calls = 0
        self.done = False

    def feed(self, text: str, final: bool) -> Delta | None:
        text, self.prefix = self.prefix + text, ""
        pieces = self.reasoning.feed(text) if self.reasoning else [("content", text)]
        if final and self.reasoning:
            pieces += self.reasoning.finish()
        reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
        content = "".join(t for kind, t in pieces if kind == "content")
        calls = []
        if self.tools is not None:
            events = self.tools.feed(content) + (self.tools.finish() if final else [])
            content = "".join(e.text for e in events if e.call is None)
            for e in events:
                if e.call is not None:
                    calls.append(DeltaToolCall(index=self.num_calls, id=e.call.id, type="function",
                                               function=ResponseFunctionCall(name=e.call.name,
                                                                             arguments=e.call.arguments)))
                    self.num_calls += 1
        if not (reasoning or content or calls):
            return None
        return Delta(content=content or None, reasoning_content=reasoning or None, tool_calls=calls or None)


def _stream(ctx: HttpContext, gen: Generation, request: ChatCompletionRequest, prompt: ChatPrompt,
            completion_id: str):
    created = int(time.time())
    tokens = TokenText(ctx.engine.tokenizer)
    top_n = request.top_logprobs or 0
    choices = {i: _ChoiceStream(i, prompt, bool(ctx.reasoning_parser)) for i in range(request.n)}
    final = None

    def event(choice_list, usage=None) -> bytes:
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=request.model, choices=choice_list,
                                    usage=usage)
        return format_sse_event(data_str=chunk.model_dump_json(exclude_none=True))

    async def chunks():
        nonlocal final
        yield event([ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in choices])
        async for _, out in gen.outputs():
            final = out
            for c in out.outputs:
                state = choices[c.index]
                if state.done:  # n > 1: a finished sample is repeated in the later steps' outputs
                    continue
                state.done = c.finished
                delta = state.feed(c.text_delta, c.finished)
                logprobs = None
                if request.logprobs and c.new_logprobs:
                    logprobs = ChoiceLogprobs(content=tokens.chat_entries(c.new_logprobs, top_n))
                if delta is not None or logprobs is not None:
                    yield event([ChatChunkChoice(index=c.index, delta=delta or Delta(), logprobs=logprobs)])
                if c.finished:
                    reason = openai_finish_reason(c.finish_reason, state.num_calls > 0)
                    yield event([ChatChunkChoice(index=c.index, delta=Delta(), finish_reason=reason)])

    def usage():
        if request.stream_options is not None and request.stream_options.include_usage and final is not None:
            return event([], usage_of([final], final.num_cached_tokens))
        return None

    return stream_events(gen, chunks(), usage)
