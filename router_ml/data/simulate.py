"""Seeded outcome simulator: routing tables for prompts that have no real model outcomes.

**This is a simulator, not a measurement.** It lets the training pipeline run on a fresh machine
with no external data (the project's own labelled prompts plus simulated outcomes). Every quality,
cost and latency figure it produces follows from the assumptions below; real figures come only
from the real routing data sets (``router_ml.paths.data_dir()``).

Generative model, for prompts ``i`` (with task ``t_i`` and ``c_i`` characters) and models ``m``:

1. **Model pool** :data:`SIMULATED_MODELS`, after the seed article's tables: local
   qwen2.5-1.5b-instruct, qwen2.5-7b-instruct, qwen2.5-coder-7b-instruct, qwen2.5-32b-instruct;
   API gpt-4o-mini, gpt-4o, claude-sonnet-4. Each model has a skill ``skill[m, t]`` per task type
   on the logit scale, set by hand to mirror the article's capability table (not measured): the
   1.5B model is close to the best at ``classify`` and weak elsewhere; the coder model has the
   highest ``code`` skill of the pool; the 32B and API models are best at ``reason`` and
   ``creative``.
2. **Difficulty** ``d_i = DIFFICULTY_SD * z_i + LENGTH_SLOPE * log2(1 + c_i / LENGTH_SCALE_CHARS)``
   with a seeded latent ``z_i ~ N(0, 1)``: longer prompts are harder on average.
3. **Score** ``s_im ~ Bernoulli(sigmoid(skill[m, t_i] - d_i))``, so ``score`` is 0.0 or 1.0.
4. **Tokens** ``input_tokens_i = ceil(c_i / 4)``; ``output_tokens_im = max(1, round(
   OUTPUT_TOKEN_PRIOR[t_i] * exp(OUTPUT_TOKENS_SIGMA * e_im)))`` with ``e_im ~ N(0, 1)``: a
   per-task log-normal around the median output lengths measured on the real data sets
   (:data:`router_ml.data.prices.OUTPUT_TOKEN_PRIOR`).
5. **Cost** ``cost_usd_im = (input_tokens_i * input_price_m + output_tokens_im * output_price_m)
   / 1e6`` with prices in $ per 1M tokens. API models use list prices (gpt-4o $2.50/$10,
   claude-sonnet-4 $3/$15, gpt-4o-mini $0.15/$0.60). Local models are not free: the article's
   running cost per hour (~$0.05 for 7B, ~$0.10 for 32B; we take $0.03 for 1.5B) divided by an
   assumed batched decode throughput (1.5B 3,000, 7B 1,000, 32B 300 tokens/s) gives the output
   price; input (prefill) tokens are charged a third of that.
6. **Latency** ``latency_s_im = first_token_s_m + output_tokens_im / tokens_per_s_m``
   (deterministic given the tokens; first-token times from the article's latency table, decode
   speeds are round single-stream assumptions).

Randomness: prompts are sorted by ``prompt_id`` first (so the input row order does not matter),
then ``rng = numpy.random.default_rng(seed)`` draws ``z`` (n,), the Bernoulli uniforms (n, M) and
``e`` (n, M) in that order, models in pool order. Same prompts, pool and seed give the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from router_ml.data.labelled import load_labelled
from router_ml.data.prices import CHARS_PER_TOKEN, OUTPUT_TOKEN_PRIOR
from router_ml.data.schema import validate_table
from router_ml.data.taxonomy import TASK_TYPES

SOURCE_NAME = "simulated"
DIFFICULTY_SD = 1.0
LENGTH_SLOPE = 0.5
LENGTH_SCALE_CHARS = 400.0
OUTPUT_TOKENS_SIGMA = 0.5


@dataclass(frozen=True)
class SimulatedModel:
    """One model of the simulated pool: per-task skill (logit) plus price and speed."""

    skill: Mapping[str, float]
    input_price_per_m: float
    output_price_per_m: float
    first_token_s: float
    tokens_per_s: float
    local: bool = False


def _skills(
    classify: float, summarize: float, code: float, reason: float, creative: float, qa: float
) -> Mapping[str, float]:
    return MappingProxyType(
        dict(zip(TASK_TYPES, (classify, summarize, code, reason, creative, qa), strict=True))
    )


#: The default pool (skills in TASK_TYPES order: classify, summarize, code, reason, creative, qa).
SIMULATED_MODELS: dict[str, SimulatedModel] = {
    "qwen2.5-1.5b-instruct": SimulatedModel(
        _skills(2.2, 0.9, -0.6, -1.0, -1.2, -0.2), 0.001, 0.003, 0.05, 150.0, local=True
    ),
    "qwen2.5-7b-instruct": SimulatedModel(
        _skills(2.5, 1.9, 0.7, 0.2, 0.1, 0.8), 0.005, 0.014, 0.15, 60.0, local=True
    ),
    "qwen2.5-coder-7b-instruct": SimulatedModel(
        _skills(2.1, 1.2, 3.2, 0.5, -0.5, 0.4), 0.005, 0.014, 0.15, 60.0, local=True
    ),
    "qwen2.5-32b-instruct": SimulatedModel(
        _skills(2.7, 2.2, 1.8, 1.9, 1.0, 1.6), 0.031, 0.093, 0.5, 25.0, local=True
    ),
    "gpt-4o-mini": SimulatedModel(_skills(2.6, 2.2, 1.5, 1.2, 1.4, 1.5), 0.15, 0.60, 0.2, 100.0),
    "gpt-4o": SimulatedModel(_skills(2.8, 2.5, 2.1, 2.1, 2.3, 2.3), 2.50, 10.0, 0.3, 80.0),
    "claude-sonnet-4": SimulatedModel(_skills(2.8, 2.6, 2.2, 2.4, 2.7, 2.2), 3.00, 15.0, 0.3, 60.0),
}


def _as_pool(models: Mapping[str, SimulatedModel | Mapping[str, Any]] | None) -> dict[str, SimulatedModel]:
    """Normalise ``models``: name -> SimulatedModel, or a plain dict of its fields."""
    if models is None:
        return dict(SIMULATED_MODELS)
    if not models:
        raise ValueError(
            "simulate_outcomes: `models` is empty; pass at least one model or None for the default"
        )
    pool: dict[str, SimulatedModel] = {}
    for name, spec in models.items():
        if isinstance(spec, SimulatedModel):
            pool[str(name)] = spec
        elif isinstance(spec, Mapping):
            try:
                pool[str(name)] = SimulatedModel(**spec)
            except TypeError as err:
                raise ValueError(f"simulate_outcomes: bad spec for model {name!r}: {err}") from err
        else:
            raise ValueError(f"simulate_outcomes: model {name!r} spec must be a SimulatedModel or a mapping")
    return pool


def _check_prompts(prompts: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(prompts, pd.DataFrame):
        raise TypeError(f"simulate_outcomes: expected a pandas DataFrame, got {type(prompts).__name__}")
    missing = [c for c in ("prompt_id", "prompt", "task") if c not in prompts.columns]
    if missing:
        raise ValueError(f"simulate_outcomes: prompts frame lacks column(s) {missing}")
    if prompts.empty:
        raise ValueError("simulate_outcomes: prompts frame has no rows")
    out = prompts.copy()
    out["prompt_id"] = out["prompt_id"].astype(str)
    dup = out["prompt_id"].duplicated()
    if dup.any():
        raise ValueError(
            f"simulate_outcomes: duplicate prompt_id(s) {out.loc[dup, 'prompt_id'].unique()[:5].tolist()}"
        )
    unknown = sorted(set(out["task"].astype(str)) - set(TASK_TYPES))
    if unknown:
        raise ValueError(
            f"simulate_outcomes: unknown task type(s) {unknown}; expected one of {list(TASK_TYPES)}"
        )
    if "source_task" not in out.columns:
        out["source_task"] = out["task"]
    out["source_task"] = out["source_task"].fillna(out["task"])
    return out.sort_values("prompt_id", kind="stable").reset_index(drop=True)


def simulate_outcomes(
    prompts: pd.DataFrame,
    seed: int = 0,
    models: Mapping[str, SimulatedModel | Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Simulate one outcome per (prompt, model) following the module docstring's generative model.

    ``prompts`` has columns prompt_id, prompt, task (and optionally source_task, kept when given,
    else set to the task); ``models`` maps model name -> :class:`SimulatedModel` (or a dict of its
    fields), default :data:`SIMULATED_MODELS`. Returns a validated long routing table with
    n_prompts * n_models rows (sorted by prompt_id, then pool order) and ``source="simulated"``.
    """
    frame = _check_prompts(prompts)
    pool = _as_pool(models)
    names = list(pool)
    tasks = frame["task"].astype(str).to_numpy()
    for name, spec in pool.items():
        lacking = sorted(set(tasks) - set(spec.skill))
        if lacking:
            raise ValueError(f"simulate_outcomes: model {name!r} has no skill for task type(s) {lacking}")

    chars = frame["prompt"].astype(str).str.len().to_numpy(dtype="float64")  # (n,)
    skill = np.array([[pool[m].skill[t] for m in names] for t in tasks], dtype="float64")  # (n, M)

    rng = np.random.default_rng(seed)
    n, n_models = skill.shape
    z = rng.standard_normal(n)
    uniforms = rng.random((n, n_models))
    e = rng.standard_normal((n, n_models))

    difficulty = DIFFICULTY_SD * z + LENGTH_SLOPE * np.log2(1.0 + chars / LENGTH_SCALE_CHARS)  # (n,)
    p_success = 1.0 / (1.0 + np.exp(-(skill - difficulty[:, None])))  # (n, M)
    score = (uniforms < p_success).astype("float64")

    input_tokens = np.ceil(chars / CHARS_PER_TOKEN)  # (n,)
    median = np.array([OUTPUT_TOKEN_PRIOR[t] for t in tasks], dtype="float64")[:, None]
    output_tokens = np.maximum(1.0, np.round(median * np.exp(OUTPUT_TOKENS_SIGMA * e)))  # (n, M)
    in_price = np.array([pool[m].input_price_per_m for m in names])
    out_price = np.array([pool[m].output_price_per_m for m in names])
    cost = (input_tokens[:, None] * in_price + output_tokens * out_price) / 1e6
    ttft = np.array([pool[m].first_token_s for m in names])
    speed = np.array([pool[m].tokens_per_s for m in names])
    latency = ttft + output_tokens / speed

    table = pd.DataFrame(
        {
            "prompt_id": np.repeat(frame["prompt_id"].to_numpy(), n_models),
            "prompt": np.repeat(frame["prompt"].astype(str).to_numpy(), n_models),
            "task": np.repeat(tasks, n_models),
            "source_task": np.repeat(frame["source_task"].astype(str).to_numpy(), n_models),
            "model": np.tile(np.array(names, dtype=object), n),
            "score": score.ravel(),
            "input_tokens": np.repeat(input_tokens, n_models),
            "output_tokens": output_tokens.ravel(),
            "cost_usd": cost.ravel(),
            "latency_s": latency.ravel(),
            "source": SOURCE_NAME,
        }
    )
    return validate_table(table, known_models=names, name="simulated routing table")


def simulate_labelled_prompts(
    seed: int = 0,
    folder: str | Path | None = None,
    models: Mapping[str, SimulatedModel | Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Default training data: the project's labelled prompts with simulated outcomes.

    Prompts come from ``load_labelled("project", path=folder)`` (default ``data/labelled_prompts``),
    so prompt ids are ``project/<id>`` as everywhere else.
    """
    return simulate_outcomes(load_labelled("project", path=folder), seed=seed, models=models)
