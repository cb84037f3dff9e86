"""Small parts of the routing engine: policy configs, ``model`` knobs, decision headers, latency aliases."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from router_ml.decision.base import RoutingDecision
from router_ml.decision.latency import LatencyModel
from router_ml.paths import POLICY_CONFIG_DIR

OFFLINE_ONLY = ("oracle",)


def load_policy_configs(conf_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Every ``<name>.yaml`` of ``conf_dir`` (default: the package's, ``router_ml/conf/policy/``) as
    a plain dict; the evaluation-only keys are dropped, and so are the offline-only policies."""
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir) if conf_dir is not None else POLICY_CONFIG_DIR
    paths = sorted(conf_dir.glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"no policy configs (*.yaml) in {str(conf_dir)!r}")
    out = {}
    for path in paths:
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
