"""The routing log: one JSON line per routed request, from which new training data is built.

Each line (schema ``v`` 1) holds the request id and time, the prompt (full text, its sha256 only,
or nothing, per ``log_prompts``), the decision (task and its confidence, routed model, policy, knob,
predicted quality per model, expected cost, planned fallbacks), the ``propensity`` (the probability
the policy had of choosing that model: 1.0 for deterministic policies, the mixing probability for
random ones), and what happened (the model that answered, fallbacks tried, latency, TTFT, tokens,
cost, ``outcome`` ``"ok"`` or an error type). Every string is scrubbed of anything that looks like
a credential (``sk-...``, ``Bearer ...``, ``api_key=...``, the values of ``*_API_KEY``/``*TOKEN``/
``*SECRET`` environment variables), and mapping keys such as ``Authorization`` lose their values.

Crash safety: a line is one ``write`` on an ``O_APPEND`` descriptor (optionally ``fsync``-ed), so a
crash leaves at most a torn last line, which :func:`read_routing_log` skips; reopening a log that
ends in a torn line seals it with a newline first. Files rotate by size (``routing.jsonl.1`` is
the newest backup); use one file per proxy process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from router_ml.data.schema import validate_table
from router_ml.data.taxonomy import TASK_TYPES
from router_ml.decision.base import RoutingDecision

LOG_PROMPTS = ("full", "hash", "none")
FIELDS = [
    "v", "ts", "request_id", "prompt", "prompt_sha256", "task", "task_confidence", "model",
    "served_model", "policy", "knob", "knob_value", "predicted_quality", "propensity",
    "expected_cost_usd", "fallbacks", "fallbacks_tried", "latency_s", "ttft_s", "input_tokens",
    "output_tokens", "cost_usd", "outcome", "error", "stream", "extra",
]  # fmt: skip
NUMERIC = ["ts", "task_confidence", "propensity", "expected_cost_usd", "latency_s", "ttft_s",
           "input_tokens", "output_tokens", "cost_usd"]  # fmt: skip
REDACTED = "[REDACTED]"
_KEY_PATTERNS = re.compile(
    r"\bsk-[A-Za-z0-9_\-]{16,}"  # OpenAI, Anthropic (sk-ant-), DeepSeek, OpenRouter (sk-or-)
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_\-]{35}|\bhf_[A-Za-z0-9]{30,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{20,}|\b(?:xai|gsk|pplx|nvapi)-[A-Za-z0-9_\-]{20,}"
    r"|\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
)
# a credential after "Bearer"/"Basic" has a digit ("basic principles" is kept)
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)(?=[A-Za-z._~+/=\-]*[0-9])[A-Za-z0-9._~+/=\-]{8,}")
_ASSIGN = re.compile(
    r"(?i)\b((?:x-)?api[_-]?key|authorization|access[_-]?token|secret|password|passwd)"
    r"([\"']?\s*[:=]\s*[\"']?)(?!bearer\b|basic\b)[^\s\"',;}&]{6,}"
)
_SECRET_KEYS = re.compile(
    r"(?i)^(authorization|proxy-authorization|x-api-key|api[_-]?key|\w*_api_key|secret|client_secret"
    r"|password|cookie|set-cookie|access_token|refresh_token)$"
)
_SECRET_ENV = re.compile(r"(?i)(api_?key|token|secret|password|passwd)")


class RoutingLogError(ValueError):
    """A routing log that cannot be written or turned into training data; the message says why."""


def env_secrets() -> set[str]:
    """Values (8+ characters) of environment variables whose names mark them as credentials."""
    return {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}


def scrub(value: Any, secrets: Iterable[str] = ()) -> Any:
    """``value`` with credentials removed: strings lose key-like substrings and the exact
    ``secrets``; mappings lose the values of keys such as ``Authorization``; lists recurse."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        value = _KEY_PATTERNS.sub(REDACTED, value)
        value = _BEARER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, value)
        return _ASSIGN.sub(lambda m: m.group(1) + m.group(2) + REDACTED, value)
    if isinstance(value, Mapping):
        return {
            scrub(str(k), secrets): REDACTED if _SECRET_KEYS.match(str(k)) else scrub(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        return scrub(value.item(), secrets)
    return value


def policy_propensity(
    policy: Any, model: str, models: Sequence[str], n_candidates: int | None = None
) -> float:
    """The probability that ``policy`` (fitted on the column order ``models``) picks ``model``.

    ``random`` (strong/weak pair): ``p_strong`` or ``1 - p_strong``; ``random`` uniform:
    ``1 / n_candidates``; ``zero``: the hull mixing weight at its ``position``; any other policy
    is deterministic given the prompt: 1.0.
    """
    name = getattr(policy, "name", None)
    if name == "random" and getattr(policy, "uniform", False):
        return 1.0 / max(1, int(n_candidates or len(models)))
    if name == "random" and getattr(policy, "pair_", None) is not None:
        s, w = policy.pair_
        picked = {models[s]: policy.p_strong, models[w]: 1.0 - policy.p_strong}
        return float(picked.get(model, 1.0))  # a model outside the pair replaced a disallowed pick
    if name == "zero" and len(getattr(policy, "hull_", [])) > 1:
        costs = [c for _, c, _ in policy.hull_]
        target = costs[0] + policy.position * (costs[-1] - costs[0])
        k = min(max(sum(c < target for c in costs), 1), len(costs) - 1)  # = clip(searchsorted)
        lo, hi = policy.hull_[k - 1], policy.hull_[k]
        mix = 0.0 if hi[1] == lo[1] else (target - lo[1]) / (hi[1] - lo[1])
        picked = {models[lo[0]]: 1.0 - mix, models[hi[0]]: mix}
        return float(picked.get(model, 1.0))
    return 1.0


class RoutingLog:
    """Append-only JSONL routing log.

    Parameters
    ----------
    path : the log file (its folder is created; the file is created mode 0600).
    log_prompts : ``"full"`` (scrubbed text and sha256), ``"hash"`` (sha256 only) or ``"none"``.
    fsync : ``fsync`` after every line (survives power loss, costs a disk flush per request).
    max_bytes : rotate before a line would push the file past this size (``None``: never).
    backups : rotated files kept (``path.1`` newest ... ``path.<backups>``).
    secrets : exact strings never to write (e.g. the catalog's API keys), besides :func:`env_secrets`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        log_prompts: str = "hash",
        fsync: bool = False,
        max_bytes: int | None = 64 * 2**20,
        backups: int = 5,
        secrets: Iterable[str] = (),
    ) -> None:
        if log_prompts not in LOG_PROMPTS:
            raise RoutingLogError(f"log_prompts must be one of {list(LOG_PROMPTS)}, got {log_prompts!r}")
        if max_bytes is not None and max_bytes <= 0:
            raise RoutingLogError(f"max_bytes must be positive or None, got {max_bytes!r}")
        self.path, self.log_prompts, self.fsync = Path(path).expanduser(), log_prompts, bool(fsync)
        self.max_bytes, self.backups = max_bytes, max(0, int(backups))
        self._secrets = sorted({s for s in secrets if s} | env_secrets(), key=len, reverse=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def __repr__(self) -> str:
        return f"RoutingLog({str(self.path)!r}, log_prompts={self.log_prompts!r})"

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        size = os.fstat(self._fd).st_size
        if size:  # seal a torn last line so the next record starts on its own line
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def _rotate(self) -> None:
        os.close(self._fd)  # type: ignore[arg-type]
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._open()

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Scrub ``record`` and write it as one line; returns what was written."""
        clean = scrub(dict(record), self._secrets)
        line = (json.dumps(clean, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise RoutingLogError(f"routing log {str(self.path)!r} is closed")
            try:
                if os.stat(self.path).st_ino != os.fstat(self._fd).st_ino:
                    os.close(self._fd)  # rotated or removed by someone else: follow the name
                    self._open()
            except FileNotFoundError:
                self._open()
            size = os.fstat(self._fd).st_size
            if self.max_bytes is not None and size and size + len(line) > self.max_bytes:
                self._rotate()
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fsync(self._fd)
        return clean

    def log(
        self,
        request_id: str,
        prompt: str | None,
        decision: RoutingDecision | None = None,
        *,
        model: str | None = None,
        served_model: str | None = None,
        knob: str | None = None,
        knob_value: Any = None,
        propensity: float = 1.0,
        fallbacks_tried: Sequence[str] = (),
        latency_s: float | None = None,
        ttft_s: float | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cost_usd: float | None = None,
        outcome: str = "ok",
        error: str | None = None,
        stream: bool | None = None,
        ts: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Log one request. ``model`` defaults to ``decision.model`` (the routed model; required
        without a decision, e.g. a backend named directly); ``served_model`` (the one that answered
        after fallbacks) defaults to ``model``. Returns the record as written."""
        model = model or (decision.model if decision is not None else None)
        if not model:
            raise RoutingLogError(f"request {request_id!r}: give a decision or the model that served it")
        if not 0.0 <= float(propensity) <= 1.0:
            raise RoutingLogError(f"request {request_id!r}: propensity must be in [0, 1], got {propensity!r}")
        digest = None if prompt is None else hashlib.sha256(prompt.encode()).hexdigest()
        d = decision
        return self.append(
            {
                "v": 1,
                "ts": time.time() if ts is None else float(ts),
                "request_id": str(request_id),
                "prompt": prompt if self.log_prompts == "full" else None,
                "prompt_sha256": digest if self.log_prompts != "none" else None,
                "task": d.task if d else None,
                "task_confidence": d.task_confidence if d else None,
                "model": model,
                "served_model": served_model or model,
                "policy": d.policy if d else None,
                "knob": knob,
                "knob_value": knob_value,
                "predicted_quality": dict(d.predicted_quality) if d else None,
                "propensity": float(propensity),
                "expected_cost_usd": d.expected_cost_usd if d else None,
                "fallbacks": list(d.fallbacks) if d else [],
                "fallbacks_tried": list(fallbacks_tried),
                "latency_s": latency_s,
                "ttft_s": ttft_s,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cost_usd": cost_usd,
                "outcome": outcome,
                "error": error,
                "stream": stream,
                "extra": dict(extra) if extra else None,
            }
        )

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RoutingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_files(path: str | os.PathLike) -> list[Path]:
    """``path`` and its rotated backups, oldest first."""
    path = Path(path)
    backups = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    return sorted(backups, key=lambda p: -int(p.suffix[1:])) + ([path] if path.exists() else [])


def read_routing_log(path: str | os.PathLike, include_rotated: bool = True) -> pd.DataFrame:
    """The log as a DataFrame, one row per line, oldest first (columns :data:`FIELDS`, then any
    others). A torn last line (a crash mid-write) is skipped; another bad line is skipped with a
    warning naming it."""
    files = log_files(path) if include_rotated else [Path(path)]
    if not any(f.exists() for f in files):
        raise FileNotFoundError(f"routing log {str(path)!r} not found")
    records = []
    for f in files:
        data = f.read_bytes()
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                if i < len(lines) - 1:  # a torn last line has no newline: skipped silently
                    warnings.warn(f"{f}:{i + 1}: unreadable routing-log line skipped ({err})", stacklevel=2)
                continue
            records.append(rec)
    df = pd.DataFrame.from_records(records)
    df = df.reindex(columns=FIELDS + [c for c in df.columns if c not in FIELDS])
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def to_routing_table(
    log_df: pd.DataFrame,
    scores: Mapping[str, float] | pd.Series | pd.DataFrame,
    prompts: Mapping[str, str] | None = None,
    source: str = "routing_log",
    known_models: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Logged requests plus later outcome scores -> a canonical routing table (validated).

    ``scores``: ``request_id -> score in [0, 1]`` (a mapping, a Series indexed by request id, or a
    frame with ``request_id`` and ``score``). Kept: requests with outcome ``"ok"``, a score, a task
    of the taxonomy and prompt text (logged in full, or found in ``prompts``: sha256 -> text).
    One row per (prompt, model that answered): repeated requests are averaged. ``prompt_id`` is
    ``"log-" + sha256[:16]``.
    """
    if isinstance(scores, pd.DataFrame):
        scores = scores.set_index("request_id")["score"]
    scores = pd.Series(scores, dtype="float64")
    df = log_df.drop_duplicates("request_id", keep="last")
    df = df[(df["outcome"] == "ok") & df["request_id"].isin(scores.index) & df["served_model"].notna()].copy()
    text = df["prompt"]
    if prompts is not None:
        text = text.fillna(df["prompt_sha256"].map(prompts))
    df["prompt"] = text
    usable = df["prompt"].notna() & df["prompt_sha256"].notna() & df["task"].isin(TASK_TYPES)
    if (~usable).any():
        warnings.warn(
            f"{int((~usable).sum())} scored request(s) skipped: no prompt text or no known task", stacklevel=2
        )
    df = df[usable]
    if df.empty:
        raise RoutingLogError("no logged request has outcome 'ok', a score, prompt text and a known task")
    df["score"] = scores.reindex(df["request_id"]).to_numpy()
    df["prompt_id"] = "log-" + df["prompt_sha256"].str[:16]
    first = df.groupby("prompt_id")[["prompt", "task"]].agg(lambda s: s.mode().iloc[0])
    num = ["score", "input_tokens", "output_tokens", "cost_usd", "latency_s"]
    out = df.groupby(["prompt_id", "served_model"], as_index=False)[num].mean()
    out = out.rename(columns={"served_model": "model"}).join(first, on="prompt_id")
    out["source_task"], out["source"] = out["task"], source
    return validate_table(out, known_models=known_models, name=f"routing table from {source}")
