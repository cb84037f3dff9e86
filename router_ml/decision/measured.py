"""Measured figures of a model pool: prices, output lengths and latency learned from a routing
table of one's own calls (a collection store), carried by the checkpoint trained on it.

:meth:`MeasuredFigures.fit` reads the long table's measured columns (``input_tokens``,
``output_tokens``, ``cost_usd``, ``latency_s`` and ``ttft_s``) per model:

- **prices** ($ per 1M input / output tokens): the non-negative least-squares fit of
  ``cost_usd = (input_tokens * in + output_tokens * out) / 1e6`` over the model's calls. A store's
  costs are the catalog prices applied to each call's usage, so the fit gives them back exactly
  when the calls' input/output mixes differ (a pool where every call had the same mix still gets a
  pair that prices such calls right);
- **output lengths**: an :class:`~router_ml.decision.costs.OutputLengthModel` fitted on the
  measured ``output_tokens`` per (model, task type);
- **latency**: ``ttft_s`` = median measured time to first token, ``tokens_per_s`` = median decode
  speed ``output_tokens / (latency_s - ttft_s)`` over calls with a first token before the end (as
  the llmperf priors are measured); without streamed calls (no ``ttft_s``) the TTFT stays unknown
  and the decode speed is ``output_tokens / latency_s``.

``to_config()`` / ``from_config()`` are plain JSON (``router.json`` key ``measured``). A checkpoint
that carries them gives :meth:`pool` (a :class:`~router_ml.decision.spec.ModelPool` priced and
timed by the measurements) and :meth:`decision_layer`; a proxy whose catalog sets no latency for a
backend takes the measured one (:meth:`fill_latency`) and its output lengths (:meth:`output_model`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from router_ml.decision.costs import CostModel, OutputLengthModel
from router_ml.decision.latency import LatencyModel, parse_params_b
from router_ml.decision.spec import ModelPool, ModelSpec, PoolConfigError

CONFIG_KEY = "measured"
FIGURES = ("input_per_mtok", "output_per_mtok", "ttft_s", "tokens_per_s")


def _finite(x: pd.Series) -> pd.Series:
    return pd.to_numeric(x, errors="coerce").astype("float64")


def _prices(df: pd.DataFrame) -> tuple[float | None, float | None]:
    """($/1M in, $/1M out) by non-negative least squares, or (None, None) without priced calls."""
    from scipy.optimize import nnls

    tok_in, tok_out, cost = _finite(df["input_tokens"]), _finite(df["output_tokens"]), _finite(df["cost_usd"])
    ok = np.isfinite(tok_in) & np.isfinite(tok_out) & np.isfinite(cost)
    if not ok.any():
        return None, None
    A = np.stack([tok_in[ok], tok_out[ok]], axis=1) / 1e6
    b = cost[ok].to_numpy()
    if not b.any():
        return 0.0, 0.0
    scale = A.max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = nnls(A / scale, b)
    x = x / scale
    return float(x[0]), float(x[1])


def _latency(df: pd.DataFrame) -> tuple[float | None, float | None]:
    """(median ttft_s, median decode tokens/s) of the calls that measured them."""
    ttft = _finite(df["ttft_s"]) if "ttft_s" in df.columns else pd.Series(np.nan, index=df.index)
    total, out = _finite(df["latency_s"]), _finite(df["output_tokens"])
    ttft_ok = np.isfinite(ttft) & (ttft > 0)
    ttft_s = float(ttft[ttft_ok].median()) if ttft_ok.any() else None
    streamed = ttft_ok & np.isfinite(total) & (total > ttft) & (out > 0)
    if streamed.any():
        speed = out[streamed] / (total[streamed] - ttft[streamed])
    else:
        whole = np.isfinite(total) & (total > 0) & (out > 0)
        speed = out[whole] / total[whole]
    return ttft_s, (float(speed.median()) if len(speed) else None)


class MeasuredFigures:
    """Per-model measured prices and latency (``models``: name -> :data:`FIGURES` and ``n_calls``)
    plus the measured output lengths; ``source`` says where they were measured."""

    def __init__(
        self, models: Mapping[str, Mapping[str, Any]], output_model: OutputLengthModel, source: str = ""
    ) -> None:
        self.models = {str(m): dict(v) for m, v in models.items()}
        self.output_model_ = output_model
        self.source = source

    def __repr__(self) -> str:
        return f"MeasuredFigures({sorted(self.models)}, source={self.source!r})"

    @classmethod
    def fit(cls, table: pd.DataFrame, min_count: int = 5, source: str = "") -> MeasuredFigures:
        """From a long routing table with measured columns (see the module docstring)."""
        missing = [c for c in ("model", "task", "input_tokens", "output_tokens", "cost_usd", "latency_s")
                   if c not in table.columns]  # fmt: skip
        if missing:
            raise ValueError(f"MeasuredFigures.fit: the table lacks column(s) {missing}")
        models = {}
        for name, df in table.groupby("model", sort=True):
            pin, pout = _prices(df)
            ttft, tps = _latency(df)
            models[str(name)] = {"input_per_mtok": pin, "output_per_mtok": pout, "ttft_s": ttft,
                                 "tokens_per_s": tps, "n_calls": len(df)}  # fmt: skip
        return cls(models, OutputLengthModel(min_count=int(min_count)).fit(table), source=source)

    # ---- checkpoint ----------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        return {"source": self.source, "models": self.models, "output_lengths": self.output_model_.to_dict()}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MeasuredFigures:
        return cls(
            cfg["models"], OutputLengthModel.from_dict(dict(cfg["output_lengths"])), cfg.get("source", "")
        )

    @classmethod
    def of_router(cls, router: Any) -> MeasuredFigures | None:
        """The figures a router's checkpoint carries (``router.json`` key ``measured``), or None."""
        cfg = (getattr(router, "metadata", None) or {}).get(CONFIG_KEY)
        return None if cfg is None else cls.from_config(cfg)

    # ---- use -----------------------------------------------------------------------------
    def output_model(self) -> OutputLengthModel:
        return self.output_model_

    def spec(self, name: str, **fields: Any) -> ModelSpec:
        """An API-kind :class:`ModelSpec` priced and timed by the measurements (``fields`` override)."""
        if name not in self.models:
            raise PoolConfigError(f"model {name!r} has no measured figures; measured: {sorted(self.models)}")
        got = self.models[name]
        if got["input_per_mtok"] is None or got["output_per_mtok"] is None:
            raise PoolConfigError(f"model {name!r}: no measured cost_usd to price it ({self.source})")
        base = {k: got[k] for k in FIGURES} | {"name": name, "params_b": parse_params_b(name)}
        return ModelSpec(**(base | fields))

    def pool(self, models: Sequence[str]) -> ModelPool:
        """The pool of ``models``, each priced and timed by the measurements (TTFT / speed left
        unmeasured fall back to the llmperf prior of :class:`~router_ml.decision.latency.LatencyModel`)."""
        return ModelPool([self.spec(m) for m in models])

    def fill_latency(self, pool: ModelPool) -> ModelPool:
        """``pool`` with each model's unset ``ttft_s`` / ``tokens_per_s`` taken from the measurements
        (a value the pool's config sets wins; prices stay the pool's)."""
        specs = []
        for spec in pool:
            got = self.models.get(spec.name, {})
            fill = {k: got[k] for k in ("ttft_s", "tokens_per_s") if getattr(spec, k) is None and got.get(k)}
            specs.append(dataclasses.replace(spec, **fill))
        return ModelPool(specs)

    def decision_layer(self, policy: Any, models: Sequence[str], **kwargs: Any) -> Any:
        """A :class:`~router_ml.decision.layer.DecisionLayer` over the measured pool of ``models``."""
        from router_ml.decision.layer import DecisionLayer

        pool = self.pool(models)
        return DecisionLayer(policy, pool, CostModel(pool, self.output_model_), LatencyModel(pool), **kwargs)
