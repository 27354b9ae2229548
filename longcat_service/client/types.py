"""What the SDK returns: streamed chunks and whole results (plain dataclasses, no protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field

from longcat_service.server.generated import longcat_pb2 as pb


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # MTP speculative decoding, for the whole request (0 without it)
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0


@dataclass
class Timings:
    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    mean_time_per_output_token_ms: float = 0.0


@dataclass
class GenerationChunk:
    """One streamed event for output `index`: new tokens/text, or (finished=True) the completion."""

    request_id: str
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | abort | deadline | error (on the final chunk)
    stop: str | int | None = None  # the matched stop string or stop token id
    usage: Usage | None = None
    timings: Timings | None = None
    error_message: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop: str | int | None = None
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass
class GenerationResult:
    request_id: str = ""
    outputs: list[Completion] = field(default_factory=list)

    # Shortcuts to the first output (n = 1).
    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else None

    @property
    def usage(self) -> Usage | None:
        return self.outputs[0].usage if self.outputs else None


def chunk_from_proto(msg: pb.GenerateResponse) -> GenerationChunk:
    chunk = GenerationChunk(request_id=msg.request_id, index=msg.index)
    if msg.WhichOneof("response") == "chunk":
        c = msg.chunk
        chunk.token_ids = list(c.token_ids)
        chunk.text = c.text
        if c.logprobs:
            chunk.logprobs = [TokenLogprob(lp.token_id, lp.logprob, {t.token_id: t.logprob for t in lp.top})
                              for lp in c.logprobs]
        return chunk
    done = msg.complete
    chunk.finish_reason = pb.FinishReason.Name(done.finish_reason).removeprefix("FINISH_REASON_").lower()
    which = done.WhichOneof("matched_stop")
    chunk.stop = getattr(done, which) if which else None
    u = done.usage
    chunk.usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.draft_tokens,
                        u.accepted_draft_tokens, u.acceptance_rate, u.mean_accepted_length)
    chunk.timings = Timings(done.timings.queue_ms, done.timings.time_to_first_token_ms,
                            done.timings.mean_time_per_output_token_ms)
    chunk.error_message = done.error_message
    return chunk


class ResultBuilder:
    """Folds streamed chunks into a GenerationResult (also the partial output of a failed call)."""

    def __init__(self):
        self.result = GenerationResult()
        self.num_chunks = 0

    def add(self, chunk: GenerationChunk) -> None:
        self.num_chunks += 1
        self.result.request_id = chunk.request_id
        outputs = self.result.outputs
        while len(outputs) <= chunk.index:
            outputs.append(Completion(index=len(outputs)))
        out = outputs[chunk.index]
        out.text += chunk.text
        out.token_ids.extend(chunk.token_ids)
        if chunk.logprobs is not None:
            out.logprobs = (out.logprobs or []) + chunk.logprobs
        if chunk.finished:
            out.finish_reason, out.stop, out.usage, out.timings = (
                chunk.finish_reason, chunk.stop, chunk.usage, chunk.timings)
