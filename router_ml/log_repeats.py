"""Rate-limited warnings: the same warning repeated within a window is logged once, and the next
one after the window says how many were held back::

    log = limit_repeats(logging.getLogger(__name__))
    log.warning("falling back from %r: %s", name, err)
    # -> falling back from 'b0': HTTP 500 (repeated 57 times in the last 10 s)

Two records are "the same" when they come from the same logger with the same message template and
the same first argument (typically the backend's name), at WARNING or above; other records pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RepeatFilter(logging.Filter):
    """A :class:`logging.Filter` that lets one of each repeated warning through per ``window_s``."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s, self.clock = float(window_s), clock
        self._seen: dict[tuple, list] = {}  # key -> [window start, records held back]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        key = (record.name, record.levelno, str(record.msg), repr(args[0]) if args else None)
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                return False
            held = seen[1] if seen is not None else 0
            self._seen[key] = [now, 0]
            if len(self._seen) > 10_000:  # many distinct keys: forget the stale ones
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
        if held and isinstance(record.args, tuple):
            record.msg = f"{record.msg} (repeated %d times in the last %.0f s)"
            record.args = (*args, held, self.window_s)
        return True


def limit_repeats(logger: logging.Logger, window_s: float = 10.0) -> logging.Logger:
    """``logger`` with a :class:`RepeatFilter` (added once); returns it."""
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter(window_s))
    return logger
