"""Retry policy: exponential backoff with full jitter, on UNAVAILABLE, and on RESOURCE_EXHAUSTED when the server
sent a `retry-after-ms` hint (admission control: it is overloaded and says when to come back). Streams are retried
only before the first token arrived: retrying later would repeat output the caller already consumed."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from longcat_service.client.errors import retry_after_s as _retry_after_s

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    multiplier: float = 2.0
    retry_overloaded: bool = True  # retry RESOURCE_EXHAUSTED that carries the server's retry-after-ms hint
    # Called with the pause in seconds instead of time.sleep (sync client) / asyncio.sleep (async client: it must
    # return an awaitable). Tests inject a recorder; None: the real sleep.
    sleep: Callable[[float], Any] | None = field(default=None, compare=False, repr=False)

    def should_retry(self, code: grpc.StatusCode, attempt: int, streamed_anything: bool = False,
                     retry_after_s: float | None = None) -> bool:
        if attempt >= self.max_retries or streamed_anything:
            return False
        overloaded = code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s is not None
        return code in RETRYABLE_CODES or (self.retry_overloaded and overloaded)

    def backoff_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Sleep before retry number attempt+1: uniform in [0, min(max, initial * multiplier**attempt)], on top of
        the server's hint when it gave one (the server jitters its hint; the backoff grows with every retry)."""
        jitter = random.uniform(0.0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt))
        return jitter if retry_after_s is None else retry_after_s + jitter


def retry_pause(policy: RetryPolicy, error: grpc.RpcError, attempt: int, streamed_anything: bool,
                time_left_s: float | None) -> float | None:
    """Seconds to wait before retrying a failed call, or None to give up (not retryable, out of retries, or the
    pause would outlast the call's deadline)."""
    hint = _retry_after_s(error.trailing_metadata())
    if not policy.should_retry(error.code(), attempt, streamed_anything, hint):
        return None
    pause = policy.backoff_s(attempt, hint)
    return pause if time_left_s is None or pause < time_left_s else None


NO_RETRY = RetryPolicy(max_retries=0)
