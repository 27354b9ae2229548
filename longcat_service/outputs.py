"""What the engine hands back for a request: one RequestOutput per step while it streams."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    # top-n alternatives at this position (token_id -> logprob), the chosen token included
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)  # all output tokens so far
    text: str = ""  # all output text so far
    logprobs: list[Logprob] | None = None  # one per output token when asked
    finish_reason: str | None = None  # stop | length | abort | deadline | error
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    # only what this step added (for streaming)
    new_token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    new_logprobs: list[Logprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float = 0.0
    queue_time_s: float | None = None  # arrival -> first scheduled
    time_to_first_token_s: float | None = None  # arrival -> first output token
    mean_time_per_output_token_s: float | None = None  # after the first token
    finished_time: float | None = None
    # speculative decoding (MTP), summed over the request's samples: None / 0 without it
    num_spec_steps: int = 0  # steps that verified drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    spec_acceptance_rate: float | None = None  # accepted / draft tokens
    spec_mean_accepted_length: float | None = None  # tokens emitted per spec step (accepted drafts + 1)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprob | None] | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    error: str | None = None
