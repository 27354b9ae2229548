"""POST /v1/completions: prompt as a string, strings, token ids or lists of token ids; echo; logprobs; stream.
Choice index = prompt index * n + sample index, as OpenAI numbers them."""

from __future__ import annotations

import time
import uuid

from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.background import BackgroundTask

from longcat_service.server.openai_api.errors import invalid
from longcat_service.server.openai_api.generation import Generation, HttpContext
from longcat_service.server.openai_api.prompts import completion_prompts
from longcat_service.server.openai_api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
    speculative_usage,
)
from longcat_service.server.openai_api.request_end import collect_non_streaming, stream_events
from longcat_service.server.openai_api.sampling import sampling_params
from longcat_service.server.openai_api.tokens import TokenText


class _LogprobsBuilder:
    """The legacy completions logprobs object, accumulated piece by piece (text_offset continues across pieces)."""

    def __init__(self, tokens: TokenText, top_n: int, offset: int = 0):
        self.tokens, self.top_n, self.offset = tokens, top_n, offset

    def build(self, token_ids: list[int], logprobs) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for i, token_id in enumerate(token_ids):
            lp = logprobs[i] if logprobs is not None and i < len(logprobs) else None
            text = self.tokens(token_id)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if lp is None:  # the first prompt token has no logprob
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(lp.logprob)
            top = sorted(lp.top.items(), key=lambda kv: -kv[1])[:self.top_n]
            out.top_logprobs.append({self.tokens(t): v for t, v in top})
        return out


def _echo_text(ctx: HttpContext, prompt_ids: list[int], original: str | None) -> str:
    if original is not None:
        return original
    tok = ctx.engine.tokenizer
    return tok.decode(prompt_ids, skip_special_tokens=False) if tok is not None else ""


async def create_completion(ctx: HttpContext, request: CompletionRequest, receive):
    if request.suffix:
        raise invalid("suffix", "not supported")
    if request.best_of is not None and request.best_of != request.n:
        raise invalid("best_of", f"only best_of = n is supported (no server-side ranking), got best_of "
                                 f"{request.best_of} and n {request.n}")
    prompts = completion_prompts(request.prompt, ctx.engine.tokenizer, ctx.engine.max_model_len)
    if isinstance(request.prompt, str):
        texts = [request.prompt]
    elif all(isinstance(t, int) for t in request.prompt):
        texts = [None]
    else:
        texts = [p if isinstance(p, str) else None for p in request.prompt]
    params = sampling_params(request, ctx.vocab_size())
    gen = Generation(ctx, prompts, params, "prompt", request.timeout_ms, receive)
    await gen.start()
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    if request.stream:
        return EventSourceResponse(_stream(ctx, gen, request, prompts, texts, completion_id),
                                   background=BackgroundTask(gen.close, "cancelled"))
    finals = await collect_non_streaming(gen, _final_outputs(gen))
    tokens = TokenText(ctx.engine.tokenizer)
    choices = []
    for p, out in sorted(finals.items()):
        for c in out.outputs:
            text, logprobs = c.text, None
            builder = _LogprobsBuilder(tokens, request.logprobs or 0)
            if request.echo:
                text = _echo_text(ctx, prompts[p], texts[p]) + text
            if request.logprobs is not None:
                logprobs = (builder.build(prompts[p], out.prompt_logprobs) if request.echo else CompletionLogprobs())
                rest = builder.build(c.token_ids, c.logprobs)
                for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                    getattr(logprobs, name).extend(getattr(rest, name))
            choices.append(CompletionChoice(index=p * request.n + c.index, text=text, logprobs=logprobs,
                                            finish_reason=c.finish_reason))
    return CompletionResponse(id=completion_id, model=request.model, choices=choices, usage=_usage(finals))


def _usage(finals: dict) -> Usage:
    prompt = sum(len(out.prompt_token_ids) for out in finals.values())
    completion = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in finals.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                 speculative=speculative_usage(list(finals.values())))


async def _final_outputs(gen: Generation) -> dict:
    finals = {}
    async for p, out in gen.outputs():
        finals[p] = out
    return finals


def _stream(ctx: HttpContext, gen: Generation, request: CompletionRequest, prompts, texts, completion_id: str):
    created = int(time.time())
    tokens = TokenText(ctx.engine.tokenizer)
    builders: dict[int, _LogprobsBuilder] = {}
    finals: dict = {}
    done: set[int] = set()

    def event(choices, usage=None) -> bytes:
        chunk = CompletionResponse(id=completion_id, created=created, model=request.model, choices=choices,
                                   usage=usage)
        return format_sse_event(data_str=chunk.model_dump_json(exclude_none=True))

    async def chunks():
        async for p, out in gen.outputs():
            finals[p] = out
            for c in out.outputs:
                index = p * request.n + c.index
                if index in done:  # n > 1: a finished sample is repeated in the later steps' outputs
                    continue
                if c.finished:
                    done.add(index)
                text, logprobs = c.text_delta, None
                first = index not in builders
                if first:
                    builders[index] = _LogprobsBuilder(tokens, request.logprobs or 0)
                if request.logprobs is not None:
                    logprobs = CompletionLogprobs()
                    if first and request.echo:
                        logprobs = builders[index].build(prompts[p], out.prompt_logprobs)
                    rest = builders[index].build(c.new_token_ids, c.new_logprobs)
                    for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                        getattr(logprobs, name).extend(getattr(rest, name))
                if first and request.echo:
                    text = _echo_text(ctx, prompts[p], texts[p]) + text
                if text or c.new_token_ids or c.finished:
                    yield event([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                  finish_reason=c.finish_reason)])

    def usage():
        if request.stream_options is not None and request.stream_options.include_usage:
            return event([], _usage(finals))
        return None

    return stream_events(gen, chunks(), usage)
