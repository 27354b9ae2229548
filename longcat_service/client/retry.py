"""Retry policy: exponential backoff with full jitter, on UNAVAILABLE only, and (for streams) only
before the first token arrived: retrying later would repeat output the caller already consumed."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    multiplier: float = 2.0

    def should_retry(self, code: grpc.StatusCode, attempt: int, streamed_anything: bool = False) -> bool:
        return code in RETRYABLE_CODES and attempt < self.max_retries and not streamed_anything

    def backoff_s(self, attempt: int) -> float:
        """Sleep before retry number attempt+1: uniform in [0, min(max, initial * multiplier**attempt)]."""
        return random.uniform(0.0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt))


NO_RETRY = RetryPolicy(max_retries=0)
