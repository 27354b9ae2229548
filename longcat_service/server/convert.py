"""Protobuf <-> engine types. Protobuf stops here: the servicer hands the engine token ids and
SamplingParams, and turns RequestOutputs back into GenerateResponses.

Range rules live with their owners (SamplingParams.validate, PromptError from the engine,
ChatTemplateError from the chat template); this module only adds the transport limits that protect
the server before any of them runs (sizes of strings and lists a client can send)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from longcat_service.chat_template import ChatTemplateError
from longcat_service.outputs import CompletionOutput, RequestOutput
from longcat_service.sampling_params import SamplingParams, SamplingParamsError
from longcat_service.server.generated import longcat_pb2 as pb

MAX_REQUEST_ID_CHARS = 256
MAX_CHAT_MESSAGES = 512
# Characters per context token allowed in raw text before tokenizing (rejects absurd inputs cheaply).
MAX_CHARS_PER_TOKEN = 16

_OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
    "presence_penalty", "seed", "min_tokens", "ignore_eos", "logprobs", "n", "skip_special_tokens",
)
_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "deadline": pb.FINISH_REASON_DEADLINE,
    "error": pb.FINISH_REASON_ERROR,
}


class RequestError(ValueError):
    """A request field is invalid (-> INVALID_ARGUMENT); `field` is its proto path, e.g. `sampling.top_p`."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class Prompt:
    token_ids: list[int]
    kind: str  # which oneof was set: text | token_ids | messages
    text: str | None = None  # the text sent to the tokenizer (for --log-prompts only)


def sampling_params_from_proto(msg: pb.SamplingParams, vocab_size: int) -> SamplingParams:
    """The one proto -> SamplingParams mapping; unset fields keep the SamplingParams defaults."""
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING_FIELDS if msg.HasField(name)}
    kwargs["stop"] = list(msg.stop)
    kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    kwargs["logit_bias"] = dict(msg.logit_bias)
    try:
        params = SamplingParams(**kwargs)
        params.validate(vocab_size)
    except SamplingParamsError as e:
        raise RequestError(f"sampling.{e.field}", str(e).removeprefix(f"{e.field}: ")) from e
    return params


def prompt_from_request(request: pb.GenerateRequest | pb.TokenizeRequest, tokenizer, max_model_len: int) -> Prompt:
    """Token ids for the request's prompt oneof (text, token_ids or chat messages).

    Emptiness, context length and vocabulary range are the engine's rules (PromptError); here only
    sizes that would be expensive to even tokenize are refused."""
    oneof = "prompt" if isinstance(request, pb.GenerateRequest) else "input"
    kind = request.WhichOneof(oneof)
    max_chars = max_model_len * MAX_CHARS_PER_TOKEN
    if kind is None:
        raise RequestError(oneof, "set one of text, token_ids or messages")
    if kind == "token_ids":
        return Prompt(list(request.token_ids.ids), kind)
    if tokenizer is None:
        raise RequestError(kind, "this model has no tokenizer (no tokenizer.json in its checkpoint); "
                                 "send token_ids instead")
    if kind == "text":
        text = request.text
        if not text:
            raise RequestError("text", "the prompt is empty")
        if len(text) > max_chars:
            raise RequestError("text", f"{len(text)} characters is more than the limit of {max_chars}")
        # As the offline LLM does for text: special tokens (BOS) as the tokenizer config asks.
        return Prompt(tokenizer.encode(text, add_special_tokens=True), kind, text)
    messages = request.messages.messages
    if len(messages) > MAX_CHAT_MESSAGES:
        raise RequestError("messages", f"{len(messages)} messages is more than the limit of {MAX_CHAT_MESSAGES}")
    total = 0
    for i, message in enumerate(messages):
        total += len(message.content)
        if total > max_chars:
            raise RequestError(f"messages[{i}].content", f"the messages exceed the limit of {max_chars} characters")
    try:
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             add_generation_prompt=True)
    except ChatTemplateError as e:
        raise RequestError(e.field, e.message) from e
    # The rendered template already holds its special tokens (as in the offline LLM.chat).
    return Prompt(tokenizer.encode(text, add_special_tokens=False), kind, text)


def engine_deadline(request: pb.GenerateRequest, grpc_time_remaining: float | None) -> float | None:
    """Absolute time.monotonic() deadline: the earlier of timeout_ms and the gRPC deadline."""
    budgets = [request.timeout_ms / 1000.0] if request.HasField("timeout_ms") else []
    if grpc_time_remaining is not None and math.isfinite(grpc_time_remaining):
        budgets.append(grpc_time_remaining)
    return time.monotonic() + min(budgets) if budgets else None


def validate_timeout(request: pb.GenerateRequest) -> None:
    # 0 would end the request before its first token; the HTTP API's timeout_ms refuses it likewise
    if request.HasField("timeout_ms") and request.timeout_ms == 0:
        raise RequestError("timeout_ms", "must be > 0 (leave it unset for no timeout)")


def validate_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    if not request_id.isprintable():
        raise RequestError("request_id", "must be printable characters")


def chunk_response(request_id: str, out: CompletionOutput) -> pb.GenerateResponse | None:
    """The delta of one step, or None when this step added nothing to this sequence."""
    if not out.new_token_ids and not out.text_delta:
        return None
    chunk = pb.Chunk(token_ids=out.new_token_ids, text=out.text_delta)
    for lp in out.new_logprobs or ():
        chunk.logprobs.append(pb.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top.items()],
        ))
    return pb.GenerateResponse(request_id=request_id, index=out.index, chunk=chunk)


def complete_response(request_id: str, request_output: RequestOutput, out: CompletionOutput) -> pb.GenerateResponse:
    complete = pb.Complete(
        finish_reason=_FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(
            prompt_tokens=len(request_output.prompt_token_ids),
            completion_tokens=len(out.token_ids),
            cached_tokens=request_output.num_cached_tokens,
            draft_tokens=request_output.metrics.num_draft_tokens,
            accepted_draft_tokens=request_output.metrics.num_accepted_tokens,
            acceptance_rate=request_output.metrics.spec_acceptance_rate or 0.0,
            mean_accepted_length=request_output.metrics.spec_mean_accepted_length or 0.0,
        ),
        timings=_timings(request_output),
    )
    if isinstance(out.stop_reason, str):
        complete.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        complete.stop_token_id = out.stop_reason
    if out.finish_reason == "error":
        complete.error_message = request_output.error or "engine error"
    return pb.GenerateResponse(request_id=request_id, index=out.index, complete=complete)


def _timings(request_output: RequestOutput) -> pb.Timings:
    m = request_output.metrics

    def ms(seconds: float | None) -> float:
        return seconds * 1000.0 if seconds is not None else 0.0

    return pb.Timings(
        queue_ms=ms(m.queue_time_s),
        time_to_first_token_ms=ms(m.time_to_first_token_s),
        mean_time_per_output_token_ms=ms(m.mean_time_per_output_token_s),
    )


def finish_reason_name(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
