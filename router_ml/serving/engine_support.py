"""Small parts of the routing engine: policy configs, ``model`` knobs, decision headers, latency aliases."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from router_ml.decision.base import RoutingDecision
from router_ml.decision.latency import LatencyModel

OFFLINE_ONLY = ("oracle",)


def load_policy_configs(conf_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``conf/policy/*.yaml`` as a plain dict (the evaluation-only keys are dropped)."""
    from omegaconf import OmegaConf

    out = {}
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if isinstance(cfg, dict) and cfg.get("name") not in OFFLINE_ONLY:
            out[path.stem] = {k: v for k, v in cfg.items() if k not in ("sweep", "heads")}
    return out


def knob_value(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def decision_headers(d: RoutingDecision | None, decision_s: float) -> dict[str, str]:
    """The ``x-router-*`` headers of a decision (``x-router-route: passthrough`` without one)."""
    if d is None:
        return {"x-router-route": "passthrough"}

    def ascii(text: str) -> str:
        return text.encode("ascii", "replace").decode()[:512]

    extra = {} if d.novelty is None else {"x-router-novelty": f"{d.novelty:.3f}"}
    return {
        **extra,
        "x-router-route": "router",
        "x-router-model": d.model,
        "x-router-task": d.task,
        "x-router-task-confidence": f"{d.task_confidence:.3f}",
        "x-router-predicted-quality": f"{d.predicted_quality.get(d.model, float('nan')):.3f}",
        "x-router-expected-cost-usd": f"{d.expected_cost_usd or 0.0:.8f}",
        "x-router-policy": d.policy or "",
        "x-router-fallbacks": ",".join(d.fallbacks),
        "x-router-reason": ascii(d.reason),
        "x-router-decision-ms": f"{decision_s * 1000:.2f}",
    }


class AliasedLatency:
    """Latency observations made under backend names, booked under the router's model names."""

    def __init__(self, model: LatencyModel, aliases: Mapping[str, str]):
        self.model = model
        self.by_backend: dict[str, list[str]] = {}
        for m, b in aliases.items():
            self.by_backend.setdefault(b, []).append(m)

    def observe(self, backend: str, ttft_s: float | None = None, tokens_per_s: float | None = None) -> None:
        for m in self.by_backend.get(backend, []):
            if m in self.model.pool:
                self.model.observe(m, ttft_s=ttft_s, tokens_per_s=tokens_per_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def chunk_sse(chunk: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying a chat.completion.chunk."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
