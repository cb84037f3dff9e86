"""What every spend ledger shares: one record's validation, the ``entries()`` frame and
:class:`LedgerError`."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping

import numpy as np
import pandas as pd

#: ``model``: the model the router decided on (or the backend named by a pass-through request);
#: ``backend``: the catalog backend that served the call (None in rows written before it was kept)
COLUMNS = ["request_id", "ts", "model", "cost_usd", "session", "meta", "backend"]


class LedgerError(ValueError):
    """A ledger file that cannot be used (not SQLite, not a ledger, newer schema) or a closed ledger."""


def _check_record(
    cost_usd: float,
    model: str,
    request_id: str | None,
    ts: float | None,
    session: str | None,
    meta: Mapping | None,
    backend: str | None = None,
) -> tuple[str, float, str, float, str | None, str | None, str | None]:
    """Validate one record; returns the row ``(request_id, ts, model, cost, session, meta_json,
    backend)``."""
    try:
        cost = float(cost_usd)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cost_usd must be a number, got {cost_usd!r}") from err
    if not math.isfinite(cost) or cost < 0:
        raise ValueError(f"cost_usd must be finite and >= 0, got {cost_usd!r}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string, got {model!r}")
    rid = uuid.uuid4().hex if request_id is None else str(request_id)
    when = time.time() if ts is None else float(ts)
    if not math.isfinite(when):
        raise ValueError(f"ts must be a finite unix time, got {ts!r}")
    try:
        meta_json = None if meta is None else json.dumps(dict(meta), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be a JSON-serialisable mapping: {err}") from err
    if session is not None and not isinstance(session, str):
        raise ValueError(f"session must be a string or None, got {session!r}")
    if backend is not None and (not isinstance(backend, str) or not backend):
        raise ValueError(f"backend must be a non-empty string or None, got {backend!r}")
    return rid, when, model, cost, session, meta_json, backend


def _entries_frame(rows: list[tuple]) -> pd.DataFrame:
    """Rows ``(request_id, ts, model, cost, session, meta_json, backend)`` -> the ``entries()`` frame."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(COLUMNS)
    return pd.DataFrame(
        {
            "request_id": pd.Series(cols[0], dtype="str"),
            "ts": np.asarray(cols[1], dtype="float64"),
            "model": pd.Series(cols[2], dtype="str"),
            "cost_usd": np.asarray(cols[3], dtype="float64"),
            "session": pd.Series(cols[4], dtype="object"),  # None = no session (kept as None)
            "meta": pd.Series([None if m is None else json.loads(m) for m in cols[5]], dtype="object"),
            "backend": pd.Series(cols[6], dtype="object"),  # None: not recorded (an older row)
        }
    )


#: How long a reservation holds by default: long enough for the slowest completion, short enough
#: that a crashed replica's reservations stop blocking the budget soon after.
RESERVATION_TTL_S = 600.0


def _check_reservation(
    request_id: str, amount_usd: float, cap_usd: float, ttl_s: float, session: str | None
) -> tuple[str, float, float, float]:
    """Validate one reservation; returns ``(request_id, amount, cap, ttl_s)``."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"a reservation needs a non-empty request_id string, got {request_id!r}")
    out = []
    for name, value in (("amount_usd", amount_usd), ("cap_usd", cap_usd), ("ttl_s", ttl_s)):
        try:
            x = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a number, got {value!r}") from err
        if not math.isfinite(x) or x < 0 or (name == "ttl_s" and x == 0):
            raise ValueError(
                f"{name} must be finite and {'> 0' if name == 'ttl_s' else '>= 0'}, got {value!r}"
            )
        out.append(x)
    if session is not None and not isinstance(session, str):
        raise ValueError(f"session must be a string or None, got {session!r}")
    return request_id, out[0], out[1], out[2]
