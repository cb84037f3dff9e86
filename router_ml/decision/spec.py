"""The model pool: one :class:`ModelSpec` per candidate model (prices, speed, tokenizer, limits).

Prices are USD per 1M tokens. API models carry list prices. Local (vLLM-hosted) models are not
free: unless prices are given explicitly they are derived from the GPU hour and the server's
aggregate batched decode throughput::

    output $/1M = gpu_hour_usd / 3600 / decode_tokens_per_s * 1e6
    input  $/1M = output $/1M * prefill_cost_ratio     (prefill is cheaper per token; default 1/3)

An explicit price wins over the derived one, and an explicit ``0.0`` stays 0.0 (free by choice,
e.g. a GPU that is paid for anyway). ``ttft_s`` / ``tokens_per_s`` are the latency priors of
:class:`router_ml.decision.latency.LatencyModel`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router_ml.decision.latency import latency_prior, parse_params_b

KINDS = ("api", "local")
TOKENIZER_SCHEMES = ("hf:", "tiktoken:")

# Assumed aggregate batched decode throughput (tokens/s) of the simulator's local models, by size
# in billions: router_ml/data/simulate.py states them in its docstring (step 5) but keeps only the
# resulting prices as numbers; the GPU hour is derived back from those prices.
_SIMULATED_DECODE_TPS: dict[float, float] = {1.5: 3000.0, 7.0: 1000.0, 32.0: 300.0}


class PoolConfigError(ValueError):
    """A model spec or pool configuration is invalid (the message names the model and field)."""


class UnknownModelError(KeyError):
    """A model name that is not in the pool (the message lists the pool)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSpec:
    """One candidate model. See the module docstring for how local prices are derived."""

    name: str
    kind: str = "api"
    input_per_mtok: float | None = None
    output_per_mtok: float | None = None
    gpu_hour_usd: float | None = None
    decode_tokens_per_s: float | None = None
    prefill_cost_ratio: float = 1 / 3
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    tokenizer: str | None = None
    params_b: float | None = None
    context_window: int | None = None
    max_tokens: int | None = None

    def prices(self) -> tuple[float, float]:
        """Effective ($ per 1M input tokens, $ per 1M output tokens)."""
        pin, pout = self.input_per_mtok, self.output_per_mtok
        if self.kind == "local" and (pin is None or pout is None):
            if pout is None:
                if self.gpu_hour_usd is None or self.decode_tokens_per_s is None:
                    raise PoolConfigError(
                        f"model {self.name!r}: local model without 'output_per_mtok' needs both "
                        "'gpu_hour_usd' and 'decode_tokens_per_s' to derive its price"
                    )
                if not self.decode_tokens_per_s > 0:
                    raise PoolConfigError(
                        f"model {self.name!r}: field 'decode_tokens_per_s' = "
                        f"{self.decode_tokens_per_s!r} must be > 0"
                    )
                pout = self.gpu_hour_usd / 3600.0 / self.decode_tokens_per_s * 1e6
            if pin is None:
                pin = pout * self.prefill_cost_ratio
        if pin is None or pout is None:
            missing = [f for f, v in (("input_per_mtok", pin), ("output_per_mtok", pout)) if v is None]
            raise PoolConfigError(f"model {self.name!r} (kind {self.kind!r}): no price, set {missing}")
        return float(pin), float(pout)


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ModelSpec))
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ModelSpec)}


def _check_spec(spec: ModelSpec) -> None:
    """Raise :class:`PoolConfigError` naming the model and field of the first invalid value."""
    name = spec.name
    if not isinstance(name, str) or not name:
        raise PoolConfigError(f"model name {name!r}: field 'name' must be a non-empty string")

    def bad(field: str, rule: str) -> PoolConfigError:
        return PoolConfigError(f"model {name!r}: field {field!r} = {getattr(spec, field)!r} {rule}")

    if spec.kind not in KINDS:
        raise bad("kind", f"must be one of {list(KINDS)}")
    for field in ("input_per_mtok", "output_per_mtok", "gpu_hour_usd", "prefill_cost_ratio"):
        v = getattr(spec, field)
        if (v is not None or field == "prefill_cost_ratio") and not (
            isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
        ):
            raise bad(field, "must be a finite number >= 0")
    for field in ("decode_tokens_per_s", "ttft_s", "tokens_per_s", "params_b"):
        v = getattr(spec, field)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise bad(field, "must be a finite number > 0")
    for field in ("context_window", "max_tokens"):
        v = getattr(spec, field)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise bad(field, "must be a positive integer")
    tok = spec.tokenizer
    if tok is not None and tok != "approx":
        scheme = next((s for s in TOKENIZER_SCHEMES if tok.startswith(s)), None)
        if scheme is None or not tok[len(scheme) :]:
            raise bad("tokenizer", "must be 'hf:<dir or id>', 'tiktoken:<encoding>', 'approx' or null")
    spec.prices()  # raises PoolConfigError when no price can be determined


def _spec_from_mapping(name: str | None, raw: Mapping[str, Any]) -> ModelSpec:
    fields = dict(raw)
    if name is not None and fields.setdefault("name", name) != name:
        raise PoolConfigError(f"model {name!r}: field 'name' = {fields['name']!r} differs from its key")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise PoolConfigError(
            f"model {fields.get('name')!r}: unknown field(s) {unknown}; allowed fields: {list(FIELDS)}"
        )
    if "name" not in fields:
        raise PoolConfigError(f"model entry {dict(raw)!r}: field 'name' is missing")
    return ModelSpec(**fields)


class ModelPool:
    """An ordered, validated set of :class:`ModelSpec`; column ``j`` of every (n, m) array is ``names[j]``."""

    def __init__(self, specs: Sequence[ModelSpec]) -> None:
        specs = list(specs)
        if not specs:
            raise PoolConfigError("model pool is empty: give at least one model")
        seen: set[str] = set()
        for spec in specs:
            if not isinstance(spec, ModelSpec):
                raise PoolConfigError(f"model pool entry {spec!r} is not a ModelSpec")
            _check_spec(spec)
            if spec.name in seen:
                raise PoolConfigError(f"model {spec.name!r}: duplicate name in the pool")
            seen.add(spec.name)
        self.specs: tuple[ModelSpec, ...] = tuple(specs)
        self.names: list[str] = [s.name for s in specs]
        self._index = {n: i for i, n in enumerate(self.names)}
        prices = np.array([s.prices() for s in specs], dtype="float64")  # (m, 2)
        self.input_price: np.ndarray = prices[:, 0]  # (m,) effective $ per 1M input tokens
        self.output_price: np.ndarray = prices[:, 1]  # (m,) effective $ per 1M output tokens
        self.is_local: np.ndarray = np.array([s.kind == "local" for s in specs], dtype=bool)  # (m,)
        for arr in (self.input_price, self.output_price, self.is_local):
            arr.flags.writeable = False

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"ModelPool({self.names})"

    def index(self, name: str) -> int:
        """Column of ``name`` in the pool's (n, m) arrays."""
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise UnknownModelError(f"model {name!r} is not in the pool {self.names}") from None

    def get(self, name: str) -> ModelSpec:
        return self.specs[self.index(name)]

    def subset(self, names: Sequence[str]) -> ModelPool:
        """A pool of ``names`` only, in the given order."""
        return ModelPool([self.get(n) for n in names])

    # ----------------------------------------------------------------- construction / export

    @classmethod
    def from_config(cls, cfg: Any) -> ModelPool:
        """From a list of field dicts, or a mapping ``name -> fields`` (OmegaConf containers accepted)."""
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, Mapping):
            specs = []
            for name, raw in cfg.items():
                if not isinstance(raw, Mapping):
                    raise PoolConfigError(f"model {name!r}: expected a mapping of fields, got {raw!r}")
                specs.append(_spec_from_mapping(str(name), raw))
        elif isinstance(cfg, Sequence) and not isinstance(cfg, str):
            specs = []
            for raw in cfg:
                if not isinstance(raw, Mapping):
                    raise PoolConfigError(f"model pool entry {raw!r}: expected a mapping of fields")
                specs.append(_spec_from_mapping(None, raw))
        else:
            raise PoolConfigError(
                f"model pool config must be a list of dicts or a mapping name -> dict, got {type(cfg).__name__}"
            )
        return cls(specs)

    def to_config(self) -> list[dict[str, Any]]:
        """One dict per model: ``name`` plus every field that differs from its default."""
        return [
            {"name": s.name}
            | {f: getattr(s, f) for f in FIELDS if f != "name" and getattr(s, f) != _DEFAULTS[f]}
            for s in self.specs
        ]

    @classmethod
    def from_data(
        cls,
        models: Sequence[str],
        data_dir: str | os.PathLike | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> ModelPool:
        """API specs for models of the routing data, priced by :func:`router_ml.data.prices.model_prices`.

        ``params_b`` is parsed from the name (:func:`parse_params_b`); ``ttft_s`` / ``tokens_per_s``
        come from :func:`latency_prior` (llmperf medians) for that size. ``overrides`` map a model
        name to fields that replace the derived ones, field by field. A model without a list
        price and without override prices raises :class:`PoolConfigError`.
        """
        from router_ml.data.prices import model_prices

        models = list(models)
        overrides = dict(overrides or {})
        stray = sorted(set(overrides) - set(models))
        if stray:
            raise UnknownModelError(f"overrides for model(s) {stray} that are not in the pool {models}")
        with warnings.catch_warnings():  # unpriced models are reported below, with the fix
            warnings.simplefilter("ignore")
            table = model_prices(models, data_dir).set_index("model")
        specs = []
        for name in models:
            row = table.loc[name]
            ctx = row["context_window"]
            fields: dict[str, Any] = {
                "name": name,
                "input_per_mtok": float(row["input_per_mtok"]),
                "output_per_mtok": float(row["output_per_mtok"]),
                "context_window": int(ctx) if math.isfinite(ctx) else None,
                "params_b": parse_params_b(name),
            }
            ov = dict(overrides.get(name, {}))
            unknown = sorted(set(ov) - set(FIELDS))
            if unknown:
                raise PoolConfigError(
                    f"model {name!r}: unknown override field(s) {unknown}; allowed fields: {list(FIELDS)}"
                )
            fields.update(ov)
            for field in ("input_per_mtok", "output_per_mtok"):
                v = fields[field]
                if v is not None and isinstance(v, float) and math.isnan(v):
                    raise PoolConfigError(
                        f"model {name!r}: no list price ({field}); add it to "
                        "router_ml.data.prices.MODEL_PRICE_KEYS or give input_per_mtok/output_per_mtok "
                        "in the overrides"
                    )
            if fields.get("ttft_s") is None or fields.get("tokens_per_s") is None:
                ttft, tps = latency_prior(fields["params_b"], data_dir)
                fields["ttft_s"] = ttft if fields.get("ttft_s") is None else fields["ttft_s"]
                fields["tokens_per_s"] = tps if fields.get("tokens_per_s") is None else fields["tokens_per_s"]
            specs.append(ModelSpec(**fields))
        return cls(specs)

    @classmethod
    def simulated(cls) -> ModelPool:
        """The simulator's pool (:data:`router_ml.data.simulate.SIMULATED_MODELS`) with the same prices.

        Local models get ``decode_tokens_per_s`` from the simulator's assumed throughput and the
        ``gpu_hour_usd`` / ``prefill_cost_ratio`` that reproduce its prices exactly.
        """
        from router_ml.data.simulate import SIMULATED_MODELS

        specs = []
        for name, sim in SIMULATED_MODELS.items():
            size = parse_params_b(name)
            fields: dict[str, Any] = {
                "name": name,
                "ttft_s": sim.first_token_s,
                "tokens_per_s": sim.tokens_per_s,
                "params_b": size,
            }
            tps = _SIMULATED_DECODE_TPS.get(size) if size is not None else None
            if sim.local and tps is not None and sim.output_price_per_m > 0:
                fields |= {
                    "kind": "local",
                    "decode_tokens_per_s": tps,
                    "gpu_hour_usd": sim.output_price_per_m * tps * 3600.0 / 1e6,
                    "prefill_cost_ratio": sim.input_price_per_m / sim.output_price_per_m,
                }
            else:  # API model, or a local one without a throughput assumption: explicit prices
                fields |= {
                    "kind": "local" if sim.local else "api",
                    "input_per_mtok": sim.input_price_per_m,
                    "output_per_mtok": sim.output_price_per_m,
                }
            specs.append(ModelSpec(**fields))
        return cls(specs)
