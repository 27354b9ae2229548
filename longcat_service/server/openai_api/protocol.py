"""Request and response schemas of the OpenAI wire format (the fields this server reads or writes).

Requests ignore unknown fields, as OpenAI-compatible servers do (clients such as LangChain send extras);
vLLM's sampling extensions (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, ...) are accepted in the body.
Text that reaches the tokenizer, the chat template or the logs is `Text`: JSON can escape a lone UTF-16 surrogate
(`"\\ud800"`), which decodes to a Python str that no tokenizer or UTF-8 encoder takes; it is refused here, as a 400
naming the field, instead of failing deep in the request."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


def _unicode_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("unpaired_surrogate", "contains an unpaired UTF-16 surrogate at character {pos} "
                                  "(not valid Unicode text)", {"pos": e.start}) from None
    return value


def _unicode_json(value: Any) -> Any:
    """_unicode_text on every key and string of a JSON value (a tool's parameter schema)."""
    if isinstance(value, str):
        _unicode_text(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _unicode_text(k)
            _unicode_json(v)
    elif isinstance(value, list):
        for v in value:
            _unicode_json(v)
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # lax mode would read true as token 1
        raise PydanticCustomError("token_id", "must be an integer token id, got {value}", {"value": value})
    return value


TokenId = Annotated[int, BeforeValidator(_not_a_bool)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    # this server's extension: the gRPC request's timeout_ms (the request ends at this deadline)
    timeout_ms: int | None = Field(default=None, gt=0)


class FunctionCall(_Request):
    name: Text
    arguments: Text = "{}"


class ToolCall(_Request):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Request):
    type: str
    text: Text | None = None


class ChatMessage(_Request):
    role: str
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None
    reasoning_content: Text | None = None


class FunctionDefinition(_Request):
    name: Text = Field(min_length=1, max_length=256)
    description: Text | None = None
    parameters: Annotated[dict[str, Any], AfterValidator(_unicode_json)] | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Request):
    type: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    response_format: ResponseFormat | None = None  # read so that a JSON mode it cannot honour is refused
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions
    echo: bool = False
    logprobs: int | None = None
    suffix: Text | None = None
    best_of: int | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


# ---- responses ---------------------------------------------------------------------------------------------

class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprobEntry] | None = None


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class SpeculativeUsage(_Response):
    """MTP speculative decoding (a vLLM-style extra; absent without it): drafts proposed and accepted."""

    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    speculative: SpeculativeUsage | None = None


def speculative_usage(outputs) -> SpeculativeUsage | None:
    """Summed over the outputs' requests; None when none of them ran speculative steps."""
    steps = sum(out.metrics.num_spec_steps for out in outputs)
    drafts = sum(out.metrics.num_draft_tokens for out in outputs)
    if not steps:
        return None
    accepted = sum(out.metrics.num_accepted_tokens for out in outputs)
    return SpeculativeUsage(draft_tokens=drafts, accepted_draft_tokens=accepted,
                            acceptance_rate=accepted / drafts if drafts else None,
                            mean_accepted_length=(accepted + steps) / steps)


class ResponseFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class DeltaToolCall(_Response):
    index: int
    id: Text | None = None
    type: Literal["function"] | None = None
    function: ResponseFunctionCall | None = None


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] = Field(default_factory=list)


class ChatChoice(_Response):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "longcat-service"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorBody
