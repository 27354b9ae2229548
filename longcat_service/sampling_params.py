"""Per-request sampling options (the vLLM names) and their validation."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by a smaller positive
# temperature overflows float32 (1e-39 is a denormal) and would turn the probabilities into NaN.
GREEDY_TEMPERATURE_EPS = 1e-5


class _DefaultMaxTokens(int):
    """The default max_tokens: 16, marked as not chosen by the caller. An explicit max_tokens that does not fit in
    the context with the prompt is refused (engine/request_checks.py); the default is not, and such a sample ends
    at the context's end (finish_reason "length")."""

    def __repr__(self) -> str:
        return int.__repr__(self)


DEFAULT_MAX_TOKENS = _DefaultMaxTokens(16)


_OPTIONAL_INTS = ("max_tokens", "seed", "logprobs", "prompt_logprobs")  # None means unset / unlimited


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class SamplingParamsError(ValueError):
    """A sampling option is out of range; `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: until EOS, a stop or the context's end
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; 0: chosen token only; n: plus top-n alternatives
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
        self.validate()

    def _check_types(self) -> None:
        """Python callers can pass anything: a wrong type is a SamplingParamsError naming the field, not a
        TypeError from deep inside (or, for a float n or a string of stop token ids, a silent misreading)."""
        for name in ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if not (_is_int(value) or (value is None and name in _OPTIONAL_INTS)):
                raise SamplingParamsError(name, f"must be an integer, got {value!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"must be True or False, got {getattr(self, name)!r}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise SamplingParamsError("stop", f"must be a string or a list of strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_int(t) for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")
        if not isinstance(self.logit_bias, Mapping):
            raise SamplingParamsError("logit_bias", f"must be a mapping of token id to bias, got {self.logit_bias!r}")
        for tok, bias in self.logit_bias.items():
            if not _is_int(tok):
                raise SamplingParamsError("logit_bias", f"keys must be token ids, got {tok!r}")
            if isinstance(bias, bool) or not isinstance(bias, numbers.Real):
                raise SamplingParamsError("logit_bias", f"must be a finite number, got {bias!r}")

    @property
    def max_tokens_is_default(self) -> bool:
        return type(self.max_tokens) is _DefaultMaxTokens

    @property
    def greedy(self) -> bool:
        """Temperature 0, or any temperature below GREEDY_TEMPERATURE_EPS: argmax (top_k/top_p/min_p and the seed
        do not change an argmax)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def validate(self, vocab_size: int | None = None) -> None:
        def finite(name: str, value: float) -> None:
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
                    or math.isinf(value)):
                raise SamplingParamsError(name, f"must be a finite number, got {value!r}")

        for name in (
            "temperature", "top_p", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty",
        ):
            finite(name, getattr(self, name))
        if not 1 <= self.n <= MAX_N:
            raise SamplingParamsError("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", f"{self.min_tokens} exceeds max_tokens {self.max_tokens}")
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise SamplingParamsError("top_k", f"must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise SamplingParamsError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise SamplingParamsError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise SamplingParamsError("seed", "must fit in 64 bits")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise SamplingParamsError("stop", "stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise SamplingParamsError("stop", f"a stop string is longer than {MAX_STOP_STRING_CHARS} characters")
        for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise SamplingParamsError(name, f"must be in [0, {MAX_LOGPROBS}], got {value}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise SamplingParamsError("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
        for tok, bias in self.logit_bias.items():
            finite("logit_bias", bias)
            if not -100.0 <= bias <= 100.0:
                raise SamplingParamsError("logit_bias", f"bias for token {tok} must be in [-100, 100]")
        if vocab_size is not None:
            for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))):
                for tok in ids:
                    if not 0 <= tok < vocab_size:
                        raise SamplingParamsError(name, f"token id {tok} is outside the vocabulary [0, {vocab_size})")
