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


def test_retry_in_counts_down_to_the_trial():
    clock = Clock()
    breaker = CircuitBreaker(fail_threshold=2, cooldown_s=5.0, clock=clock)
    assert breaker.retry_in("b") is None
    breaker.record("b", False)
    assert breaker.retry_in("b") is None  # one failure: still closed
    breaker.record("b", False)
    assert breaker.retry_in("b") == 5.0
    clock.t += 3.5
    assert breaker.retry_in("b") == 1.5
    clock.t += 1.5
    assert breaker.retry_in("b") is None and breaker.allow("b")  # the trial goes
    assert breaker.retry_in("b") == 5.0  # while it is in flight nothing else does


def test_repeated_warnings_are_counted_not_repeated(caplog):
    import logging

    from router_ml.log_repeats import RepeatFilter

    clock = Clock()
    log = logging.getLogger("router_ml.test_repeats")
    log.addFilter(RepeatFilter(window_s=10.0, clock=clock))
    caplog.set_level(logging.INFO, logger=log.name)
    for i in range(58):
        log.warning("falling back from %r: %s", "b0", f"HTTP 500 #{i}")
        log.warning("falling back from %r: %s", "b1", "HTTP 503")  # another backend: its own count
        log.info("retrying %d", i)  # below WARNING: never held back
        clock.t += 0.1
    clock.t += 10.0
    log.warning("falling back from %r: %s", "b0", "HTTP 500 again")
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert msgs == [
        "falling back from 'b0': HTTP 500 #0",
        "falling back from 'b1': HTTP 503",
        "falling back from 'b0': HTTP 500 again (repeated 57 times in the last 10 s)",
    ]
    assert sum(r.levelno == logging.INFO for r in caplog.records) == 58
