"""The loopback server's faults: how it misbehaves, for how long, and the log of what it received.

:class:`Fault` is one way to misbehave (``POST /fault`` bodies validate into it);
:class:`FaultState` holds the current fault with its window (``count`` requests or ``duration_s``
seconds) and every change of it; :class:`ArrivalLog` records each chat request the server received
(arrival time, the fault it met, how it ended). Times are Unix epoch seconds from an injectable
``clock`` (default :func:`time.time`), so that another process on the same machine, a benchmark,
can line them up with its own clock: this is the backend's own view of a fault, whatever proxy
sits in front of it.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

FAULT_MODES = ("ok", "error500", "error503", "error429", "hang", "slow", "cut_stream", "bad_json")
#: How a logged chat request ended (``pending`` while it is in flight).
OUTCOMES = ("pending", "ok", "error", "cut", "bad_json", "abandoned")


@dataclass
class Fault:
    """How the server misbehaves.

    ``count`` None = until changed, N = the next N chat requests; ``duration_s`` None = until
    changed, T = for T seconds from when it is set (then the server is healthy again).
    """

    mode: str = "ok"
    count: int | None = None
    after: int = 3
    retry_after: float | None = 1.0
    delay_s: float = 0.05
    duration_s: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fault:
        """Validated; a ValueError names the bad field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"fault: expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"fault: unknown field(s) {unknown}; allowed: {names}")
        fault = cls(**d)
        if fault.mode not in FAULT_MODES:
            raise ValueError(f"fault: field 'mode' = {fault.mode!r} must be one of {list(FAULT_MODES)}")
        for name, lo in (("count", 1), ("after", 0)):
            v = getattr(fault, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise ValueError(f"fault: field {name!r} = {v!r} must be an integer >= {lo}")
        for name in ("retry_after", "delay_s", "duration_s"):
            v = getattr(fault, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"fault: field {name!r} = {v!r} must be a number >= 0")
        return fault


class FaultState:
    """The current :class:`Fault`, its window, and the log of changes ``[{"t", "mode"}, ...]``.

    A fault with ``duration_s`` ends at ``set time + duration_s`` (logged at that instant, not at
    the first request after it); one with ``count`` ends when its last request takes it.
    """

    def __init__(self, fault: Fault | None = None, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.changes: list[dict[str, Any]] = []
        self._fault = Fault()
        self._until: float | None = None
        self.set(fault or Fault())

    def set(self, fault: Fault) -> Fault:
        """Switch to ``fault`` now (its ``duration_s`` window starts now)."""
        now = self.clock()
        self._fault = fault
        self._until = now + fault.duration_s if fault.duration_s is not None else None
        self.changes.append({"t": now, "mode": fault.mode})
        return fault

    def current(self) -> Fault:
        """The fault in force now (a window that has ended reverts to ``ok``)."""
        if self._until is not None and self.clock() >= self._until:
            self.changes.append({"t": self._until, "mode": "ok"})
            self._fault, self._until = Fault(), None
        return self._fault

    def take(self) -> Fault:
        """The fault for the chat request arriving now; a ``count`` fault uses up one request."""
        fault = self.current()
        if fault.mode != "ok" and fault.count is not None:
            fault.count -= 1
            if fault.count <= 0:
                self._fault, self._until = Fault(), None
                self.changes.append({"t": self.clock(), "mode": "ok"})
        return fault


class ArrivalLog:
    """Every chat request received: ``{"t": arrival, "mode": fault met, "status": HTTP, "outcome"}``.

    ``mode`` is None and ``status`` None until known; ``outcome`` is one of :data:`OUTCOMES`.
    Holds the last ``maxlen`` requests.
    """

    def __init__(self, clock: Callable[[], float] = time.time, maxlen: int = 10_000) -> None:
        self.clock = clock
        self.started_at = clock()  # reset when the server starts listening
        self.entries: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def arrive(self) -> dict[str, Any]:
        """A new entry for a request arriving now; the caller fills in mode, status and outcome."""
        entry: dict[str, Any] = {"t": self.clock(), "mode": None, "status": None, "outcome": "pending"}
        self.entries.append(entry)
        return entry

    def clear(self) -> None:
        self.entries.clear()

    def snapshot(self, faults: FaultState | None = None) -> dict[str, Any]:
        """JSON-ready: ``started_at``, ``now``, ``arrivals`` (oldest first) and ``faults`` (changes)."""
        out: dict[str, Any] = {
            "started_at": self.started_at,
            "now": self.clock(),
            "arrivals": [dict(e) for e in self.entries],
        }
        if faults is not None:
            faults.current()  # log a window that ended since the last request
            out["faults"] = [dict(c) for c in faults.changes]
        return out


def fault_window_figures(
    attempts: Sequence[float],
    served: Sequence[float],
    onset: float,
    end: float,
    quiet_s: float = 1.0,
    horizon: float | None = None,
) -> dict[str, Any]:
    """When a failing backend was dropped and when it came back, from the backend's own log.

    Parameters
    ----------
    attempts : (n,) seconds
        Arrival time of every request the backend received (any order; any clock, with ``onset``
        and ``end`` on the same one).
    served : (m,) seconds
        Arrival time of each request it answered in full with no fault.
    onset, end : seconds
        The fault window ``[onset, end)``.
    quiet_s : seconds
        How long the backend must receive nothing for it to count as dropped.
    horizon : seconds or None
        End of the observation (the load stopped): a quiet time that runs into it counts only if it
        lasts ``quiet_s`` before it. None: no end.

    Returns
    -------
    dict
        ``attempts_during_fault``: attempts in ``[onset, end)``. ``dropped_after_s``: ``a - onset``
        for the first attempt ``a`` in the window that is followed by at least ``quiet_s`` with no
        attempt (that quiet time may run past ``end``); 0.0 when nothing came during the fault;
        None when attempts never paused that long (the backend was never dropped).
        ``back_after_s``: the first ``served`` time at or after ``end``, minus ``end``; None if none.
        ``back_for_good_s``: the same, counting only requests served after the last quiet time of
        ``quiet_s`` or more that starts at or after ``end`` (a proxy may rest a backend that is
        healthy again, for failures it saw late); None if A is quiet at the horizon.
    """
    ts = sorted(attempts)
    stop = float("inf") if horizon is None else horizon
    during = [i for i, t in enumerate(ts) if onset <= t < end]
    dropped: float | None = None if during else 0.0
    for i in during:
        if (ts[i + 1] if i + 1 < len(ts) else stop) - ts[i] >= quiet_s:
            dropped = ts[i] - onset
            break
    served = sorted(served)
    back = next((t for t in served if t >= end), None)
    after = [t for t in ts if t >= end] + ([] if horizon is None else [horizon])
    since = max((b for a, b in pairwise(after) if b - a >= quiet_s), default=end)
    good = next((t for t in served if t >= since), None)
    return {
        "attempts_during_fault": len(during),
        "dropped_after_s": dropped,
        "back_after_s": None if back is None else back - end,
        "back_for_good_s": None if good is None else good - end,
    }
