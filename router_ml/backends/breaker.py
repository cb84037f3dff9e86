"""Per-backend circuit breaker: rest a backend after repeated failures (LiteLLM calls it cooldown)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from router_ml.log_repeats import limit_repeats

log = limit_repeats(logging.getLogger(__name__))


class CircuitBreaker:
    """Per-backend circuit: ``fail_threshold`` consecutive failures open it for ``cooldown_s``.

    After the cooldown it is half-open: :meth:`allow` lets one trial through (a trial that never
    reports is replaced after another ``cooldown_s``); its success closes the circuit, its failure
    opens it again. Thread- and task-safe; ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(
        self, fail_threshold: int = 3, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (isinstance(fail_threshold, int) and fail_threshold >= 1):
            raise ValueError(f"CircuitBreaker: fail_threshold = {fail_threshold!r} must be an integer >= 1")
        if not cooldown_s >= 0:
            raise ValueError(f"CircuitBreaker: cooldown_s = {cooldown_s!r} must be >= 0")
        self.fail_threshold, self.cooldown_s, self.clock = fail_threshold, float(cooldown_s), clock
        self._state: dict[str, list[Any]] = {}  # name -> [consecutive failures, open until, trial since]
        self._lock = threading.Lock()

    def _get(self, name: str) -> list[Any]:
        return self._state.setdefault(name, [0, None, None])

    def state(self, name: str) -> str:
        """ "closed", "open" (cooling down) or "half_open" (cooled down; a trial may go)."""
        with self._lock:
            _, until, _ = self._get(name)
            if until is None:
                return "closed"
            return "open" if self.clock() < until else "half_open"

    def is_open(self, name: str) -> bool:
        """True while ``name`` takes no requests: cooling down, or half-open with a trial in flight."""
        with self._lock:
            _, until, trial = self._get(name)
            if until is None:
                return False
            now = self.clock()
            return now < until or (trial is not None and now - trial < self.cooldown_s)

    def retry_in(self, name: str) -> float | None:
        """Seconds until ``name`` takes a request again (its trial); None when it takes one now."""
        with self._lock:
            _, until, trial = self._get(name)
            if until is None:
                return None
            now = self.clock()
            wait = max(until - now, (trial + self.cooldown_s - now) if trial is not None else 0.0)
            return wait if wait > 0 else None

    def allow(self, name: str) -> bool:
        """Whether a request may go to ``name`` now; in the half-open state this claims the one trial."""
        with self._lock:
            st = self._get(name)
            if st[1] is None:
                return True
            now = self.clock()
            if now < st[1] or (st[2] is not None and now - st[2] < self.cooldown_s):
                return False
            st[2] = now
            return True

    def record(self, name: str, ok: bool, rest_s: float | None = None) -> None:
        """Report a finished request: success closes the circuit, a failure counts toward opening it.

        ``rest_s``: how long the backend asked to be left alone (its Retry-After); when this failure
        opens the circuit, it rests that long instead of ``cooldown_s``."""
        with self._lock:
            st = self._get(name)
            if ok:
                st[:] = [0, None, None]
                return
            st[0] += 1
            now = self.clock()
            if st[1] is not None and now < st[1]:
                return  # a straggler sent before the circuit opened: it must not extend the rest
            if st[1] is not None or st[0] >= self.fail_threshold:  # a failed trial re-opens at once
                rest = self.cooldown_s if rest_s is None else max(0.0, float(rest_s))
                log.warning("circuit for backend %r open for %.1f s after %d failure(s)", name, rest, st[0])
                st[1], st[2] = now + rest, None

    def trip(self, name: str, seconds: float) -> None:
        """Open ``name`` for ``seconds`` (a Retry-After), whatever the failure count."""
        with self._lock:
            st = self._get(name)
            until = self.clock() + max(0.0, seconds)
            st[1], st[2] = max(until, st[1] or 0.0), None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per backend seen: state and consecutive failures (for /metrics)."""
        with self._lock:
            failures = {n: st[0] for n, st in self._state.items()}
        return {n: {"state": self.state(n), "failures": f} for n, f in failures.items()}
