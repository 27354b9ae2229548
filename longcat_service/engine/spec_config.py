"""speculative_config (vLLM's names): which draft method and how many draft tokens per step."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from longcat_service.engine.errors import EngineArgsError

# "longcat_flash_mtp" is vLLM's name for the same method; both run the checkpoint's own MTP layer
MTP_METHODS = ("mtp", "longcat_flash_mtp")
MAX_SPECULATIVE_TOKENS = 3
_KNOWN_KEYS = {"method", "num_speculative_tokens"}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # normalised: "mtp"
    num_speculative_tokens: int  # k drafts per step; k > 1 runs the MTP layer recursively on its own output

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig | None:
        """A dict, a JSON object string, a SpeculativeConfig or None (no speculative decoding)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise EngineArgsError("speculative_config", f"not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise EngineArgsError("speculative_config", f"must be a JSON object / dict, got {type(value).__name__}")
        unknown = sorted(set(value) - _KNOWN_KEYS)
        if unknown:
            raise EngineArgsError(f"speculative_config.{unknown[0]}", f"unknown key; supported: {sorted(_KNOWN_KEYS)}")
        method = value.get("method")
        if method not in MTP_METHODS:
            raise EngineArgsError("speculative_config.method", f"must be one of {list(MTP_METHODS)}, got {method!r}")
        k = value.get("num_speculative_tokens", 1)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise EngineArgsError("speculative_config.num_speculative_tokens",
                                  f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        return cls("mtp", k)
