"""Add a model to a trained router from a small probe set, and choose that probe set.

    router-ml probe-set --ckpt CKPT --k 100 --from prompts.jsonl --out probes.jsonl
    # ... run the new model on probes.jsonl, score its answers -> scores.jsonl (prompt, score)
    router-ml add-model --ckpt CKPT --probes scores.jsonl --model NAME --out NEW_CKPT \
        --input-price 0.15 --output-price 0.60

:func:`add_model` wraps the router's quality head in a
:class:`~router_ml.predictors.probed.ProbedQualityPredictor` (the new column is a logistic
regression of the probe scores on the existing models' predicted log-odds, shrunk towards their
mean, plus the probes' residuals smoothed by similarity), gives the
calibrator an identity column for it, and records the model's price and latency; nothing else is
refitted, so the old columns predict exactly what they did. :func:`choose_probes` picks the probe
prompts (:func:`~router_ml.predictors.probe_set.select_probes`).

Probe table (``--probes``): JSONL, parquet or CSV with columns ``prompt`` and ``score`` (in [0, 1];
NaN or empty = no outcome), optionally ``model`` (rows of other models are ignored), and for the
price/latency ``input_tokens``, ``output_tokens``, ``cost_usd``, ``latency_s`` (a scored
collection exported with those columns plugs in as is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from router_ml.router import LearnedRouter

PROBE_COLUMNS = ("prompt", "score")


def read_table(path: str | Path) -> pd.DataFrame:
    """A JSONL (``.jsonl``/``.json``), parquet or CSV file as a frame; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl")
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path)
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: cannot read it as {suffix[1:]}: {e}") from e
    raise ValueError(f"{str(path)!r}: unknown table format {suffix!r}; use .jsonl, .parquet or .csv")


def read_prompts(path: str | Path) -> list[str]:
    """Distinct prompts, in file order: a table with a ``prompt`` column, or a ``.txt`` (one a line)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist")
        prompts = [line.rstrip("\n") for line in path.read_text().splitlines()]
    else:
        table = read_table(path)
        if "prompt" not in table.columns:
            raise ValueError(f"{str(path)!r}: no 'prompt' column (columns: {list(table.columns)})")
        prompts = table["prompt"].astype(str).tolist()
    prompts = list(dict.fromkeys(p for p in prompts if p.strip()))
    if not prompts:
        raise ValueError(f"{str(path)!r}: no non-empty prompt")
    return prompts


def read_probe_scores(path: str | Path, model: str) -> pd.DataFrame:
    """The probe rows of ``model`` from a probe table (see the module docstring), one row per prompt
    (repeated prompts averaged); columns ``prompt``, ``score`` and whichever optional ones exist."""
    table = read_table(path)
    missing = [c for c in PROBE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"{str(path)!r}: probe table lacks column(s) {missing} (has {list(table.columns)}); "
            "expected prompt, score and optionally model, input_tokens, output_tokens, cost_usd, latency_s"
        )
    if "model" in table.columns:
        table = table[table["model"].astype(str) == model]
        if table.empty:
            raise ValueError(f"{str(path)!r}: no row for model {model!r} in its 'model' column")
    table = table.assign(score=pd.to_numeric(table["score"], errors="coerce"))
    bad = table["score"].notna() & ((table["score"] < 0) | (table["score"] > 1))
    if bad.any():
        raise ValueError(
            f"{str(path)!r}: {int(bad.sum())} score(s) outside [0, 1] (first: row {bad.idxmax()})"
        )
    if table["prompt"].isna().any() or not table["prompt"].astype(str).str.strip().all():
        raise ValueError(f"{str(path)!r}: empty or missing prompt text in the probe table")
    numeric = [c for c in ("input_tokens", "output_tokens", "cost_usd", "latency_s") if c in table.columns]
    out = table[["prompt", "score", *numeric]].groupby("prompt", sort=False, as_index=False).mean()
    if out["score"].notna().sum() == 0:
        raise ValueError(f"{str(path)!r}: no scored probe for model {model!r}")
    return out


def model_spec(
    name: str,
    probes: pd.DataFrame | None = None,
    input_price: float | None = None,
    output_price: float | None = None,
    ttft_s: float | None = None,
    tokens_per_s: float | None = None,
) -> dict[str, Any]:
    """The new model's pool entry (:class:`router_ml.decision.spec.ModelSpec` fields).

    Prices ($ per 1M tokens): the flags, else fitted by non-negative least squares on the probes'
    ``cost_usd ~ input_tokens, output_tokens``, else the data sets' price table; no price at all
    raises ``ValueError``. Latency: the flags, else ``latency_s ~ ttft + output_tokens / tps`` on
    the probes, else left to the decision layer's size prior.
    """
    from router_ml.decision.spec import ModelPool, ModelSpec

    spec: dict[str, Any] = {"name": name}
    cols = set(probes.columns) if probes is not None else set()
    if (input_price is None or output_price is None) and {
        "input_tokens",
        "output_tokens",
        "cost_usd",
    } <= cols:
        from scipy.optimize import nnls

        rows = probes[["input_tokens", "output_tokens", "cost_usd"]].dropna()
        if len(rows) >= 2:
            (pin, pout), _ = nnls(
                rows[["input_tokens", "output_tokens"]].to_numpy(float) / 1e6,
                rows["cost_usd"].to_numpy(float),
            )
            input_price = pin if input_price is None else input_price
            output_price = pout if output_price is None else output_price
    if input_price is None or output_price is None:
        import warnings

        from router_ml.data.prices import model_prices

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = model_prices([name]).iloc[0]
        input_price = float(row["input_per_mtok"]) if input_price is None else input_price
        output_price = float(row["output_per_mtok"]) if output_price is None else output_price
    if input_price is None or output_price is None or math.isnan(input_price) or math.isnan(output_price):
        raise ValueError(
            f"no price for model {name!r}: give --input-price/--output-price ($ per 1M tokens) or probe "
            "columns input_tokens, output_tokens, cost_usd"
        )
    spec.update(input_per_mtok=float(input_price), output_per_mtok=float(output_price))
    if (ttft_s is None or tokens_per_s is None) and {"output_tokens", "latency_s"} <= cols:
        rows = probes[["output_tokens", "latency_s"]].dropna()
        if len(rows) >= 3 and rows["output_tokens"].nunique() > 1:
            slope, intercept = np.polyfit(
                rows["output_tokens"].to_numpy(float), rows["latency_s"].to_numpy(float), 1
            )
            if slope > 0 and intercept > 0:
                ttft_s = float(intercept) if ttft_s is None else ttft_s
                tokens_per_s = float(1.0 / slope) if tokens_per_s is None else tokens_per_s
    if ttft_s is not None:
        spec["ttft_s"] = float(ttft_s)
    if tokens_per_s is not None:
        spec["tokens_per_s"] = float(tokens_per_s)
    ModelPool([ModelSpec(**spec)])  # checks every field, naming the bad one
    return spec


def add_model(
    router: LearnedRouter,
    name: str,
    prompts: Sequence[str],
    scores: np.ndarray,
    spec: dict[str, Any] | None = None,
    source: str | None = None,
) -> LearnedRouter:
    """A new router whose pool, quality head and calibrator include model ``name``, fitted from its
    ``scores (p,)`` on the probe ``prompts``; ``router`` itself is left as it was."""
    from router_ml.predictors.probed import ProbedQualityPredictor, calibrator_with_identity

    if name in router.models:
        raise ValueError(f"model {name!r} is already in this router's pool {router.models}")
    prompts = list(prompts)
    scores = np.asarray(scores, dtype=np.float64)
    if len(prompts) != len(scores):
        raise ValueError(f"add_model: {len(prompts)} probe prompts but {len(scores)} scores")
    head = ProbedQualityPredictor.from_head(router.quality_head)
    X = router.quality_features(prompts)
    head.add_model(X, scores, texts=prompts)
    calibrator = None if router.calibrator is None else calibrator_with_identity(router.calibrator, 1)
    n = int((~np.isnan(scores)).sum())
    meta = dict(router.metadata)
    record = {
        "name": name,
        "n_probes": n,
        "probes": source,
        "method": "logistic regression on the existing models' predicted log-odds, coefficients "
        f"shrunk to their mean (prior precision {float(head.alpha_[-1]):g}), plus the probes' "
        f"residuals smoothed over the {head.bank_k} most similar probes (shrunk to 0 by "
        f"{float(head.bank_tau):g}); calibrator column: identity",
        "note": "metrics above were measured before this model was added",
    }
    guard = None
    if router.guard is not None:
        # the guard's pool prior needs the new model's mean quality: the probe mean (its only
        # observed outcomes); its interval is the widest of the trained models' (see
        # NoveltyGuard.with_added_models)
        prior = float(np.nanmean(scores))
        guard = router.guard.with_added_models([prior])
        record["guard"] = (
            f"carried: the new model's prior mean = its probe mean ({prior:.4f}), its conformal "
            "half-width = the widest of the trained models'"
        )
    meta["added_models"] = [*meta.get("added_models", []), record]
    if spec is not None:
        meta["model_specs"] = {**meta.get("model_specs", {}), name: spec}
    new = LearnedRouter(
        router.encoder,
        router.task_head,
        head,
        [*router.models, name],
        calibrator=calibrator,
        metadata=meta,
        guard=guard,
    )
    if router.policy_fit is not None:  # the same prompts, predicted again with the new column
        from router_ml.decision.fit_set import PolicyFitSet

        fit = router.policy_fit
        new.policy_fit = PolicyFitSet.of_router(new, fit.prompts, source=f"{fit.source}; {name} added")
    return new


def add_model_checkpoint(
    ckpt: str | Path,
    probes: str | Path,
    name: str,
    out: str | Path,
    **spec_flags: float | None,
) -> dict[str, Any]:
    """``router-ml add-model``: read ``ckpt`` and the probe table, write the new checkpoint to ``out``."""
    if Path(out).resolve() == Path(ckpt).resolve():
        raise ValueError("add-model: --out must differ from --ckpt (the original checkpoint stays as it is)")
    router = LearnedRouter.from_pretrained(ckpt)
    table = read_probe_scores(probes, name)
    spec = model_spec(name, table, **spec_flags)
    new = add_model(
        router, name, table["prompt"].tolist(), table["score"].to_numpy(), spec, Path(probes).name
    )
    new.save_pretrained(out)
    return {"out": str(out), "models": new.models, "added": new.metadata["added_models"][-1], "spec": spec}


def choose_probes(router: LearnedRouter, prompts: Sequence[str], k: int) -> pd.DataFrame:
    """``k`` informative probe prompts among ``prompts`` for ``router`` (see
    :mod:`router_ml.predictors.probe_set`): columns ``prompt``, ``task``, ``disagreement``."""
    from router_ml.predictors.probe_set import disagreement, select_probes

    prompts = list(dict.fromkeys(prompts))
    q = router.predict_quality(prompts).to_numpy()
    task_p = router.predict_task_proba(prompts).to_numpy()
    tasks = task_p.argmax(axis=1)
    X = router.embed(prompts)
    idx = select_probes(X, q, tasks, k)
    labels = router.task_labels
    d = disagreement(q)
    return pd.DataFrame(
        {"prompt": [prompts[i] for i in idx], "task": [labels[tasks[i]] for i in idx], "disagreement": d[idx]}
    )


def candidate_prompts(router: LearnedRouter, path: str | Path | None) -> list[str]:
    """The probe candidates: the prompts of ``path``, else those of the data set the router was trained on."""
    if path is not None:
        return read_prompts(path)
    data_cfg = router.metadata.get("training", {}).get("data_config")
    if not data_cfg:
        raise ValueError("probe-set: this checkpoint records no training data set; give --from PROMPTS_FILE")
    from router_ml.data.loading import load_routing_data

    return list(dict.fromkeys(load_routing_data(data_cfg)["prompt"]))
