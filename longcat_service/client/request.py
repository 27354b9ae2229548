"""Build request messages from SDK arguments (shared by the sync and async clients)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from longcat_service.server.generated import longcat_pb2 as pb

# SamplingParams fields the SDK accepts as keyword arguments (see proto SamplingParams).
SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def sampling_proto(sampling: Mapping) -> pb.SamplingParams:
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    msg = pb.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop":
            msg.stop.extend([value] if isinstance(value, str) else value)
        elif name == "stop_token_ids":
            msg.stop_token_ids.extend(value)
        elif name == "logit_bias":
            for token, bias in dict(value).items():
                msg.logit_bias[int(token)] = float(bias)
        else:
            setattr(msg, name, value)
    return msg


def chat_messages(messages: Sequence[Mapping]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def generate_request(
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[Mapping] | None = None,
    request_id: str | None = None,
    timeout_ms: int | None = None,
    **sampling,
) -> pb.GenerateRequest:
    """`prompt` is text or token ids; `messages` is a chat ([{"role", "content"}]); exactly one of them."""
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt (text or token ids) or messages")
    req = pb.GenerateRequest(request_id=request_id or "", sampling=sampling_proto(sampling))
    if messages is not None:
        req.messages.CopyFrom(chat_messages(messages))
    elif isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    if timeout_ms is not None:
        req.timeout_ms = timeout_ms
    return req


def tokenize_request(text: str | None = None, messages: Sequence[Mapping] | None = None) -> pb.TokenizeRequest:
    if (text is None) == (messages is None):
        raise TypeError("give exactly one of text or messages")
    if messages is not None:
        return pb.TokenizeRequest(messages=chat_messages(messages))
    return pb.TokenizeRequest(text=text)
