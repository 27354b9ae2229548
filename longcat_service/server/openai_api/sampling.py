"""OpenAI request fields -> SamplingParams. The ranges are SamplingParams.validate's, the same rules the gRPC
servicer applies; an error names the parameter as the client sent it."""

from __future__ import annotations

from longcat_service.sampling_params import SamplingParams, SamplingParamsError
from longcat_service.server.openai_api.errors import invalid
from longcat_service.server.openai_api.protocol import ChatCompletionRequest, CompletionRequest

_DIRECT = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
           "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens")


def sampling_params(request: ChatCompletionRequest | CompletionRequest, vocab_size: int) -> SamplingParams:
    kwargs = {name: getattr(request, name) for name in _DIRECT if getattr(request, name) is not None}
    names = {}  # SamplingParams field -> the request parameter it came from
    kwargs["n"] = request.n
    if isinstance(request, ChatCompletionRequest):
        if request.max_completion_tokens is not None:
            kwargs["max_tokens"], names["max_tokens"] = request.max_completion_tokens, "max_completion_tokens"
        else:
            kwargs["max_tokens"] = request.max_tokens  # None: until the context is full
        if request.logprobs:
            kwargs["logprobs"] = request.top_logprobs or 0
            names["logprobs"] = "top_logprobs"
        elif request.top_logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
    else:
        kwargs["max_tokens"] = request.max_tokens
        if request.logprobs is not None:
            kwargs["logprobs"] = request.logprobs
            if request.echo:
                kwargs["prompt_logprobs"] = request.logprobs
                names["prompt_logprobs"] = "logprobs"
    if request.stop is not None:
        kwargs["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    if request.stop_token_ids:
        kwargs["stop_token_ids"] = list(request.stop_token_ids)
    if request.logit_bias:
        bias = {}
        for key, value in request.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise invalid("logit_bias", f"keys must be token ids, got {key!r}") from None
        kwargs["logit_bias"] = bias
    try:
        params = SamplingParams(**kwargs)
        params.validate(vocab_size)
    except SamplingParamsError as e:
        raise invalid(names.get(e.field, e.field), str(e).removeprefix(f"{e.field}: ")) from e
    return params
