"""Admission control: bound the requests (and their prompt tokens) waiting for their first token.

A request is "queued" from admission until its first output arrives. Counting here, rather than
reading the engine's waiting list, makes the decision race-free under bursts: the engine thread
may not have seen the previous requests yet. Rejected requests get a retry hint: the recent
time-in-queue (an exponential moving average; 1 s before any request started), times a random factor
uniform in [RETRY_JITTER_LOW, RETRY_JITTER_HIGH], so that clients rejected in the same instant do not all
come back in the same instant; then clamped to [MIN_RETRY_AFTER_MS, MAX_RETRY_AFTER_MS]."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

MIN_RETRY_AFTER_MS = 100
MAX_RETRY_AFTER_MS = 60_000
RETRY_JITTER_LOW, RETRY_JITTER_HIGH = 0.5, 1.5


class Overloaded(Exception):
    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass
class Ticket:
    prompt_tokens: int
    admitted_at: float
    queued: bool = True


class AdmissionController:
    """Not thread-safe: used from the server's event loop only."""

    def __init__(self, max_queued_requests: int, max_queued_tokens: int, ema_weight: float = 0.2,
                 rng: random.Random | None = None):
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        if max_queued_tokens < 1:
            raise ValueError(f"max_queued_tokens must be >= 1, got {max_queued_tokens}")
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.queued_requests = 0
        self.queued_tokens = 0
        self._ema_weight = ema_weight
        self._ema_queue_ms: float | None = None
        self._rng = rng if rng is not None else random.Random()

    def admit(self, prompt_tokens: int) -> Ticket:
        """A ticket for a queued request, or Overloaded. A lone request is always admitted, so a prompt
        larger than max_queued_tokens (but valid for the model) is never refused forever."""
        if self.queued_requests >= self.max_queued_requests:
            raise Overloaded(
                f"{self.queued_requests} requests are already queued (limit {self.max_queued_requests})",
                self.retry_after_ms(),
            )
        if self.queued_requests and self.queued_tokens + prompt_tokens > self.max_queued_tokens:
            raise Overloaded(
                f"{self.queued_tokens} prompt tokens are already queued; {prompt_tokens} more would exceed "
                f"the limit of {self.max_queued_tokens}",
                self.retry_after_ms(),
            )
        self.queued_requests += 1
        self.queued_tokens += prompt_tokens
        return Ticket(prompt_tokens, time.monotonic())

    def started(self, ticket: Ticket) -> None:
        """The request produced its first output: it no longer waits in the queue."""
        if not ticket.queued:
            return
        self._dequeue(ticket)
        waited_ms = (time.monotonic() - ticket.admitted_at) * 1000.0
        if self._ema_queue_ms is None:
            self._ema_queue_ms = waited_ms
        else:
            self._ema_queue_ms += self._ema_weight * (waited_ms - self._ema_queue_ms)

    def release(self, ticket: Ticket) -> None:
        """The request ended (any outcome); idempotent."""
        if ticket.queued:
            self._dequeue(ticket)

    def retry_after_ms(self) -> int:
        estimate = self._ema_queue_ms if self._ema_queue_ms is not None else 1000.0
        jittered = estimate * self._rng.uniform(RETRY_JITTER_LOW, RETRY_JITTER_HIGH)
        return int(min(max(jittered, MIN_RETRY_AFTER_MS), MAX_RETRY_AFTER_MS))

    def _dequeue(self, ticket: Ticket) -> None:
        ticket.queued = False
        self.queued_requests -= 1
        self.queued_tokens -= ticket.prompt_tokens
