"""The checks a request must pass before an engine queues it: one place for every front end (offline LLM, the
gRPC servicer through AsyncEngine, a future HTTP server), raising PromptError / SamplingParamsError that name
the field. They need only the limits below, not a model, so a front end can run them in its own process."""

from __future__ import annotations

from dataclasses import dataclass

from longcat_service.engine.errors import PromptError
from longcat_service.sampling_params import SamplingParams, SamplingParamsError


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int  # prompt + output tokens
    eos_token_id: int | None = None
    has_tokenizer: bool = True


def check_request(prompt_token_ids: list[int], params: SamplingParams, limits: RequestLimits) -> None:
    """Raise PromptError / SamplingParamsError for a request an engine with these limits cannot serve."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    _check_prompt(prompt_token_ids, limits)
    params.validate(limits.vocab_size)
    if not limits.has_tokenizer and params.stop:
        raise SamplingParamsError("stop", "stop strings need a tokenizer and this model has none "
                                  "(no tokenizer.json); use stop_token_ids")
    _check_max_tokens(len(prompt_token_ids), params, limits.max_model_len)
    _check_min_tokens_leaves_a_token(params, limits)


def _check_prompt(prompt_token_ids: list[int], limits: RequestLimits) -> None:
    if prompt_token_ids is None or len(prompt_token_ids) == 0:
        raise PromptError("prompt", "the prompt is empty")
    if len(prompt_token_ids) + 1 > limits.max_model_len:
        raise PromptError(
            "prompt",
            f"{len(prompt_token_ids)} prompt tokens leave no room for an output token "
            f"(max_model_len {limits.max_model_len})",
        )
    for i, tok in enumerate(prompt_token_ids):
        if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < limits.vocab_size:
            raise PromptError("token_ids", f"token {i} is {tok!r}, outside the vocabulary [0, {limits.vocab_size})")


def _check_max_tokens(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> None:
    """An explicit max_tokens must fit in the context with the prompt (as vLLM's server rules). The default
    (SamplingParams.max_tokens_is_default) is not refused: the sample then ends at the context's end
    (finish_reason "length"), as one with max_tokens=None does."""
    if params.max_tokens is None or params.max_tokens_is_default:
        return
    if num_prompt_tokens + params.max_tokens > max_model_len:
        raise SamplingParamsError(
            "max_tokens",
            f"{params.max_tokens} output tokens after a {num_prompt_tokens}-token prompt exceed the context length "
            f"of {max_model_len} tokens (max_model_len); at most {max_model_len - num_prompt_tokens} fit",
        )


def _check_min_tokens_leaves_a_token(params: SamplingParams, limits: RequestLimits) -> None:
    """Until min_tokens, stop ids and EOS are masked (sampler.py): some token must remain to be sampled."""
    if params.min_tokens == 0:
        return
    masked = set(params.stop_token_ids)
    if limits.eos_token_id is not None and not params.ignore_eos:
        masked.add(limits.eos_token_id)
    if len(masked) >= limits.vocab_size:
        raise SamplingParamsError(
            "stop_token_ids",
            f"with min_tokens {params.min_tokens} the stop ids (and EOS unless ignore_eos) are masked until then, "
            "and these cover the whole vocabulary: no token could be sampled",
        )
