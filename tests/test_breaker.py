"""The circuit breaker's rest: opened by repeated failures, not extended by stragglers, re-opened by a failed trial."""

from __future__ import annotations

from router_ml.backends.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_late_failures_of_requests_sent_before_opening_do_not_extend_the_rest():
    clock = Clock()
    br = CircuitBreaker(fail_threshold=3, cooldown_s=5.0, clock=clock)
    for _ in range(3):
        br.record("a", ok=False)
    assert br.state("a") == "open"
    clock.t = 4.0  # requests already in flight when it opened keep failing
    for _ in range(5):
        br.record("a", ok=False)
    clock.t = 5.01
    assert br.state("a") == "half_open"
    assert br.allow("a")  # the one trial
    assert not br.allow("a")


def test_a_failed_trial_reopens_for_a_full_cooldown():
    clock = Clock()
    br = CircuitBreaker(fail_threshold=2, cooldown_s=1.0, clock=clock)
    br.record("a", ok=False)
    assert br.state("a") == "closed"
    br.record("a", ok=False)
    clock.t = 1.5
    assert br.allow("a")
    br.record("a", ok=False)
    clock.t = 2.4
    assert br.state("a") == "open"
    clock.t = 2.6
    assert br.state("a") == "half_open"
    br.record("a", ok=True)
    assert br.state("a") == "closed" and br.allow("a")


def test_a_retry_after_sets_the_rest_instead_of_the_cooldown():
    clock = Clock()
    br = CircuitBreaker(fail_threshold=1, cooldown_s=5.0, clock=clock)
    br.record("a", ok=False, rest_s=1.0)  # a 429 with Retry-After: 1
    clock.t = 0.9
    assert br.state("a") == "open"
    clock.t = 1.01
    assert br.allow("a")  # the trial goes after 1 s, not 5
    br.record("a", ok=False, rest_s=1.0)  # still limited: rest another second
    clock.t = 2.05
    assert br.state("a") == "half_open"
    br.record("a", ok=False)  # a plain failure of the next trial rests the full cooldown
    clock.t = 6.0
    assert br.state("a") == "open"
