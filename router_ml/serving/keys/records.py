"""What a virtual API key and a team are, how a key's secret is made and hashed, and the checks
every key store shares.

A key's secret (``rml-`` + 32 random bytes from :mod:`secrets`, URL-safe base64) is shown once, when
it is created; stores keep only its SHA-256. A salt or a slow hash buys nothing here: the secret has
256 bits of entropy, so its hash cannot be searched, and a fast hash keeps the per-request lookup
cheap (one indexed read by hash).
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from router_ml.decision.ledger.periods import PERIODS

SECRET_PREFIX = "rml-"
#: the periods a key's or team's budget may cover ("session" has no end, so it is no period)
KEY_PERIODS = tuple(p for p in PERIODS if p != "session")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def new_secret() -> str:
    """A fresh key secret, ``rml-`` + 43 URL-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """The SHA-256 (hex) a store keeps of ``secret``."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_name(name: Any, what: str = "key") -> str:
    """``name`` if it is a usable key or team name (letters, digits, ``_.@-``; up to 64)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{what} name {name!r} is not allowed: use 1-64 letters, digits or _.@- (starting with a letter or digit)"
        )
    return name


def _check_limit(value: Any, what: str, integer: bool) -> float | int | None:
    if value is None:
        return None
    try:
        x = int(value) if integer else float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number, got {value!r}") from err
    if (integer and (x < 1 or x != float(value))) or (not integer and not (math.isfinite(x) and x >= 0)):
        raise ValueError(
            f"{what} must be {'an integer >= 1' if integer else 'a finite number >= 0'}, got {value!r}"
        )
    return x


def check_period(period: Any) -> str:
    if period not in KEY_PERIODS:
        raise ValueError(f"budget period {period!r} is not one of {list(KEY_PERIODS)}")
    return period


@dataclass(frozen=True)
class Team:
    """A team: a budget per period shared by its keys, on top of each key's own."""

    name: str
    budget_usd: float | None = None
    period: str = "month"

    def __post_init__(self) -> None:
        check_name(self.name, "team")
        object.__setattr__(self, "budget_usd", _check_limit(self.budget_usd, "team budget_usd", False))
        check_period(self.period)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ApiKey:
    """One virtual API key: what a request carrying its secret may do.

    ``budget_usd`` per ``period`` (None: no key budget); ``rpm``/``tpm``: requests and tokens per
    rolling minute (None: unlimited); ``models``: the backends (or router model names) it may reach,
    empty = all; ``team``: whose budget it also draws on. ``secret_hash`` is the SHA-256 of the
    secret; the secret itself is never stored.
    """

    id: str
    name: str
    secret_hash: str
    budget_usd: float | None = None
    period: str = "day"
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] = field(default_factory=tuple)
    team: str | None = None
    created: float = 0.0
    revoked: float | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        object.__setattr__(self, "budget_usd", _check_limit(self.budget_usd, "key budget_usd", False))
        object.__setattr__(self, "rpm", _check_limit(self.rpm, "rpm", True))
        object.__setattr__(self, "tpm", _check_limit(self.tpm, "tpm", True))
        check_period(self.period)
        models = tuple(self.models or ())
        if any(not isinstance(m, str) or not m for m in models):
            raise ValueError(f"models must be non-empty strings, got {list(models)!r}")
        object.__setattr__(self, "models", models)
        if self.team is not None:
            check_name(self.team, "team")

    @property
    def active(self) -> bool:
        return self.revoked is None

    def allows(self, names: Iterable[str]) -> bool:
        """True when the key may reach any of ``names`` (a backend and the router names aliased to it)."""
        return not self.models or any(n in self.models for n in names)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the secret's hash (what ``keys list`` prints)."""
        out = asdict(self)
        out.pop("secret_hash")
        out["models"] = list(self.models)
        return out

    def to_record(self) -> dict[str, Any]:
        """Every field, for a store."""
        out = asdict(self)
        out["models"] = list(self.models)
        return out

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ApiKey:
        rec = dict(rec)
        rec["models"] = tuple(rec.get("models") or ())
        return cls(**rec)


def new_key_id() -> str:
    """A short public id for a key (what logs and metrics name besides its name)."""
    return "key_" + secrets.token_hex(6)
