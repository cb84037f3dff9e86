"""The routing-log writer: :class:`RoutingLog` appends one scrubbed JSON line per routed request
(``O_APPEND``, optional ``fsync``, size rotation); :func:`policy_propensity` gives the line's
``propensity``."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from router_ml.decision.base import RoutingDecision
from router_ml.serving.routing_log.redact import env_secrets, scrub

LOG_PROMPTS = ("full", "hash", "none")
FIELDS = [
    "v", "ts", "request_id", "prompt", "prompt_sha256", "task", "task_confidence", "model",
    "served_model", "policy", "knob", "knob_value", "predicted_quality", "propensity",
    "expected_cost_usd", "fallbacks", "fallbacks_tried", "latency_s", "ttft_s", "input_tokens",
    "output_tokens", "cost_usd", "outcome", "error", "stream", "extra",
]  # fmt: skip
NUMERIC = ["ts", "task_confidence", "propensity", "expected_cost_usd", "latency_s", "ttft_s",
           "input_tokens", "output_tokens", "cost_usd"]  # fmt: skip


class RoutingLogError(ValueError):
    """A routing log that cannot be written or turned into training data; the message says why."""


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
