"""AdmissionController on its own, with a fake clock and a fake jitter: the queue limits (requests and prompt tokens
waiting for their first output), the ticket life cycle, and the retry hint (moving average of the time in queue,
jittered, clamped). Over a real server: tests/test_server_faults.py."""

from __future__ import annotations

import pytest

from longcat_service.server import admission
from longcat_service.server.admission import AdmissionController, Overloaded


class Jitter:
    """A random.Random stand-in: uniform(a, b) returns `factor` and records its bounds."""

    def __init__(self, factor: float = 1.0):
        self.factor = factor
        self.bounds = []

    def uniform(self, a, b):
        self.bounds.append((a, b))
        return self.factor


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(admission.time, "monotonic", c)
    return c


def controller(requests=3, tokens=100, factor=1.0, **kw):
    return AdmissionController(requests, tokens, rng=Jitter(factor), **kw)


@pytest.mark.parametrize("requests, tokens, name", [(0, 10, "max_queued_requests"), (1, 0, "max_queued_tokens")])
def test_limits_must_be_positive(requests, tokens, name):
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
        AdmissionController(requests, tokens)
    AdmissionController(1, 1)


def test_request_limit(clock):
    ac = controller(requests=2)
    ac.admit(1)
    ac.admit(1)
    with pytest.raises(Overloaded, match=r"^2 requests are already queued \(limit 2\)$") as excinfo:
        ac.admit(1)
    assert excinfo.value.retry_after_ms == 1000  # no request has started yet: 1 s, times the jitter (1.0 here)
    assert (ac.queued_requests, ac.queued_tokens) == (2, 2)


def test_token_limit_counts_the_new_prompt_and_allows_exactly_the_limit(clock):
    ac = controller(tokens=100)
    ac.admit(60)
    ac.admit(40)  # 100: at the limit
    ac.release(ac.admit(0))  # an empty addition still fits
    ac2 = controller(tokens=100)
    ac2.admit(60)
    with pytest.raises(Overloaded) as excinfo:
        ac2.admit(41)
    assert str(excinfo.value) == ("60 prompt tokens are already queued; 41 more would exceed the limit of 100")
    assert excinfo.value.retry_after_ms == 1000
    assert (ac2.queued_requests, ac2.queued_tokens) == (1, 60)


def test_a_lone_request_is_always_admitted(clock):
    ac = controller(requests=1, tokens=10)
    ticket = ac.admit(10_000)
    assert (ac.queued_requests, ac.queued_tokens, ticket.prompt_tokens, ticket.queued) == (1, 10_000, 10_000, True)
    with pytest.raises(Overloaded):
        ac.admit(1)


def test_first_output_and_end_each_dequeue_once(clock):
    ac = controller()
    a, b = ac.admit(30), ac.admit(20)
    assert (ac.queued_requests, ac.queued_tokens) == (2, 50)
    ac.started(a)
    assert (ac.queued_requests, ac.queued_tokens, a.queued) == (1, 20, False)
    ac.started(a)  # later outputs of the same request
    ac.release(a)  # and its end
    assert (ac.queued_requests, ac.queued_tokens) == (1, 20)
    ac.release(b)  # ended before its first output (error, abort)
    ac.release(b)
    assert (ac.queued_requests, ac.queued_tokens, b.queued) == (0, 0, False)


def test_retry_hint_follows_the_moving_average_of_the_time_in_queue(clock):
    ac = controller(requests=1)
    t = ac.admit(1)
    clock.now += 2.0
    ac.started(t)  # waited 2000 ms: the first sample is the average
    t = ac.admit(1)
    with pytest.raises(Overloaded) as excinfo:
        ac.admit(1)
    assert excinfo.value.retry_after_ms == 2000
    clock.now += 0.5
    ac.started(t)  # waited 500 ms: 2000 + 0.2 * (500 - 2000) = 1700
    ac.admit(1)
    assert ac.retry_after_ms() == 1700


def test_moving_average_weight_is_configurable(clock):
    ac = controller(ema_weight=0.5)
    for waited in (1.0, 3.0):
        t = ac.admit(1)
        clock.now += waited
        ac.started(t)
    assert ac.retry_after_ms() == 2000  # 1000 + 0.5 * (3000 - 1000)


def test_release_after_a_first_output_does_not_move_the_average(clock):
    ac = controller()
    t = ac.admit(1)
    clock.now += 1.0
    ac.started(t)
    clock.now += 10.0
    ac.release(t)
    ac.started(t)
    assert ac.retry_after_ms() == 1000


@pytest.mark.parametrize("factor, hint", [(0.5, 500), (1.5, 1500), (1.2345, 1234)])
def test_retry_hint_is_jittered_between_half_and_one_and_a_half(factor, hint):
    ac = controller(factor=factor)
    assert ac.retry_after_ms() == hint
    assert isinstance(ac.retry_after_ms(), int)
    assert ac._rng.bounds[0] == (0.5, 1.5)


@pytest.mark.parametrize("waited_s, factor, hint", [
    (0.01, 1.0, 100),  # 10 ms: raised to the 100 ms floor
    (0.1, 1.0, 100),
    (0.15, 0.5, 100),  # 75 ms after the jitter: the floor
    (0.2, 1.0, 200),
    (50.0, 1.5, 60_000),  # 75 s: capped at 60 s
    (60.0, 1.0, 60_000),
    (59.0, 1.0, 59_000),
])
def test_retry_hint_is_clamped_to_100_ms_and_60_s(clock, waited_s, factor, hint):
    ac = controller(factor=factor)
    t = ac.admit(1)
    clock.now += waited_s
    ac.started(t)
    assert ac.retry_after_ms() == hint


def test_default_jitter_stays_in_its_bounds():
    ac = AdmissionController(1, 1)
    hints = {ac.retry_after_ms() for _ in range(200)}
    assert min(hints) >= 500 and max(hints) <= 1500 and len(hints) > 50
