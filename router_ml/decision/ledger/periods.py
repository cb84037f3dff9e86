"""Budget periods: the UTC start of the current hour, day, week or month window."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

PERIODS = ("session", "hour", "day", "week", "month")


def period_start(period: str | None, now: float | None = None) -> float | None:
    """UTC unix time at which the current budget ``period`` began (``None``: no time window).

    ``"session"``/``None`` -> ``None``; ``"hour"``, ``"day"``, ``"week"`` (Monday 00:00) and
    ``"month"`` (the 1st, 00:00) -> the start of the period that contains ``now`` (default: now).
    """
    if period is None or period == "session":
        return None
    if period not in PERIODS:
        raise ValueError(f"unknown budget period {period!r}; allowed: {list(PERIODS)} or None")
    t = datetime.fromtimestamp(time.time() if now is None else float(now), tz=UTC)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "week":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=t.weekday())
    else:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp()
