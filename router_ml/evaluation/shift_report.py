"""Pooled and per-family figures of a shift run, from the per-prompt rows of its folds.

For each rendering (``original`` only, outside format shift) the rows of every fold are pooled
(each prompt once per rendering) and summarised:

- per head (and the ``prior`` reference row: no head, the training part's per-model means):
  routed quality (argmax of predicted quality), the best single model's quality (per
  prompt, the model chosen on THAT prompt's fold training part), their difference with a paired
  bootstrap 95% CI over prompts (:func:`router_ml.metrics.paired_bootstrap`) and the
  share of the best-single-to-oracle gap closed;
- the same per family (for leave-one-family-out a family is one fold: its best single model was
  chosen on the other families), and the worst family per head;
- the utility policy's frontier: for each knob index of its sweep, the pooled mean score and mean
  $ per request of its picks (a knob index is the same relative willingness to pay in every fold:
  lam = x / the training part's best-single cost), its AIQ and the Zero router's AIQ (the single
  models' hull; RouterBench's definitions in :mod:`router_ml.evaluation.frontier`) over one cost
  range, that of the utility sweeps and the single models; the AIQ difference with a bootstrap 95%
  CI over prompts (the whole frontier recomputed per resample). Where every single model costs the
  same on a set (no cost range), AIQ is undefined and reported as NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from router_ml.evaluation import frontier as fr
from router_ml.metrics import gap_closed, paired_bootstrap

__all__ = ["check_targets", "frontier_aiq", "markdown", "prompt_frame", "summarise"]

DEFAULT_TARGETS = {"pooled_ci_lo_pts": -0.5, "worst_family_pts": -2.0, "aiq_minus_zero": 0.0}


def frontier_aiq(
    S: Mapping[str, np.ndarray],
    C: Mapping[str, np.ndarray],
    Y: np.ndarray,
    cost: np.ndarray,
    w: np.ndarray | None = None,
) -> dict[str, float]:
    """AIQ of each head's utility sweep (``S``/``C``: head -> (n, L) score and $ of its picks) and
    the Zero router's (``Y``/``cost``: (n, m) of the single models), one cost range for all;
    ``w`` (n,) prompt weights (a bootstrap resample's counts), default all 1."""
    w = np.ones(len(Y)) if w is None else np.asarray(w, dtype="float64")
    sw = float(w.sum())
    pts = {h: (w @ C[h] / sw, w @ S[h] / sw) for h in S}
    pts["zero"] = (w @ cost / sw, w @ Y / sw)
    lo = min(float(c.min()) for c, _ in pts.values())
    hi = max(float(c.max()) for c, _ in pts.values())
    if not hi > lo:
        return {h: float("nan") for h in pts}
    return {h: fr.aiq(c, q, (lo, hi)) for h, (c, q) in pts.items()}


def _aiq_ci(
    S: Mapping[str, np.ndarray],
    C: Mapping[str, np.ndarray],
    Y: np.ndarray,
    cost: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Per head: AIQ, Zero router's AIQ, their difference and its bootstrap 95% CI over prompts."""
    point = frontier_aiq(S, C, Y, cost)
    rng = np.random.default_rng(seed)
    n = len(Y)
    diffs: dict[str, list[float]] = {h: [] for h in S}
    for start in range(0, n_boot, 100):
        W = rng.multinomial(n, np.full(n, 1.0 / n), size=min(100, n_boot - start)).astype("float64")
        for w in W:
            a = frontier_aiq(S, C, Y, cost, w)
            for h in S:
                diffs[h].append(a[h] - a["zero"])
    out = {}
    for h in S:
        d = np.asarray(diffs[h], dtype="float64")
        d = d[np.isfinite(d)]  # a resample whose models all cost the same has no cost range: no AIQ
        lo, hi = np.quantile(d, [0.025, 0.975]) if d.size else (np.nan, np.nan)
        out[h] = {
            "aiq": point[h],
            "zero_aiq": point["zero"],
            "delta": point[h] - point["zero"],
            "ci_lo": float(lo),
            "ci_hi": float(hi),
        }
    return out


def _head_row(a: np.ndarray, b: np.ndarray, oracle: float, n_boot: int, seed: int) -> dict[str, float]:
    d, lo, hi = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    q = float(a.mean())
    return {
        "quality": q,
        "delta": d,
        "ci_lo": lo,
        "ci_hi": hi,
        "gap_closed": gap_closed(q, float(b.mean()), oracle),
    }


def _summarise_group(parts: Sequence[Any], models: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    cat = np.concatenate
    heads = list(parts[0].routed)
    fam = cat([p.family for p in parts])
    Y, cost = cat([p.Y for p in parts]), cat([p.cost for p in parts])
    best = cat([p.Y[:, p.best] for p in parts])
    chosen = cat([np.full(len(p.Y), models[p.best], dtype=object) for p in parts])
    routed = {h: cat([p.routed[h] for p in parts]) for h in heads}
    S = {h: cat([p.util_score[h] for p in parts]) for h in heads}
    C = {h: cat([p.util_cost[h] for p in parts]) for h in heads}
    oracle = float(np.max(Y, axis=1).mean())
    pooled = {
        "n": len(Y),
        "oracle": oracle,
        "random": float(Y.mean(axis=1).mean()),
        "best_single": float(best.mean()),
        "best_single_models": {p.fold: models[p.best] for p in parts},
        "heads": {h: _head_row(routed[h], best, oracle, n_boot, seed) for h in heads},
        "utility_aiq": _aiq_ci(S, C, Y, cost, max(n_boot // 2, 0), seed),
    }
    families = {}
    for f in sorted(set(fam)):
        m = fam == f
        o = float(np.max(Y[m], axis=1).mean())
        aiq = frontier_aiq({h: S[h][m] for h in heads}, {h: C[h][m] for h in heads}, Y[m], cost[m])
        families[f] = {
            "n": int(m.sum()),
            "best_single_models": sorted(set(chosen[m])),
            "best_single": float(best[m].mean()),
            "oracle": o,
            "heads": {h: _head_row(routed[h][m], best[m], o, n_boot, seed) for h in heads},
            "utility_aiq": {h: {"aiq": aiq[h], "zero_aiq": aiq["zero"]} for h in heads},
        }
    worst = {}
    for h in heads:
        f = min(families, key=lambda k: families[k]["heads"][h]["delta"])
        worst[h] = {"family": f, "delta": families[f]["heads"][h]["delta"]}
    return {"pooled": pooled, "families": families, "worst_family": worst}


def summarise(parts: Sequence[Any], models: list[str], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``{"renderings": {rendering: {"pooled", "families", "worst_family"}}}`` from the folds' rows."""
    order = list(dict.fromkeys(p.rendering for p in parts))
    return {
        "renderings": {
            r: _summarise_group([p for p in parts if p.rendering == r], models, n_boot, seed) for r in order
        }
    }


def check_targets(summary: dict[str, Any]) -> None:
    """Add ``targets_met[head]`` to every rendering: pooled CI lower bound, worst family and AIQ
    against the issue's targets (``summary["targets"]``, in score points where named ``_pts``)."""
    t = {**DEFAULT_TARGETS, **(summary.get("targets") or {})}
    summary["targets"] = t
    for g in summary["renderings"].values():
        met = {}
        for h, row in g["pooled"]["heads"].items():
            aiq = g["pooled"]["utility_aiq"][h]
            met[h] = {
                "pooled_ci_lo": bool(100 * row["ci_lo"] >= t["pooled_ci_lo_pts"]),
                "worst_family": bool(100 * g["worst_family"][h]["delta"] >= t["worst_family_pts"]),
                "aiq_vs_zero": bool(aiq["delta"] >= t["aiq_minus_zero"]),
            }
        g["targets_met"] = met


def _ci(row: Mapping[str, float], scale: float = 100.0, fmt: str = "{:+.2f}") -> str:
    d, lo, hi = (scale * row[k] for k in ("delta", "ci_lo", "ci_hi"))
    return f"{fmt.format(d)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown(summary: Mapping[str, Any]) -> str:
    """The run's figures as markdown tables (points = 100 x mean score)."""
    lines = [
        f"# Shift evaluation: {summary['mode']} on {summary['data']}",
        "",
        f"{summary['n_prompts']} prompts x {len(summary['models'])} models; families by "
        f"`{summary['family_by']}`; folds: {len(summary['folds'])}; seed {summary['seed']}. "
        f"Dropped models (coverage or price): {', '.join(summary['dropped_models']) or 'none'}.",
        "Best single = the model with the best mean score on each fold's TRAINING part; "
        "Δ in points, paired bootstrap 95% CI over held-out prompts.",
        "",
    ]
    for r, g in summary["renderings"].items():
        p = g["pooled"]
        lines += [
            f"## Rendering `{r}`: pooled over {p['n']} held-out prompts",
            "",
            f"best single {p['best_single']:.4f} ({', '.join(sorted(set(p['best_single_models'].values())))}), "
            f"oracle {p['oracle']:.4f}, random {p['random']:.4f}",
            "",
            "| head | routed q | Δ vs best single, pts [95% CI] | gap closed | worst family (Δ pts) "
            "| utility AIQ | Zero AIQ | AIQ − Zero [95% CI] | targets met (pooled / worst / AIQ) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for h, row in p["heads"].items():
            a, w, m = p["utility_aiq"][h], g["worst_family"][h], g.get("targets_met", {}).get(h, {})
            flags = " / ".join(
                "yes" if m.get(k) else "no" for k in ("pooled_ci_lo", "worst_family", "aiq_vs_zero")
            )
            lines.append(
                f"| {h} | {row['quality']:.4f} | {_ci(row)} | {row['gap_closed']:.1%} | "
                f"{w['family']} ({100 * w['delta']:+.2f}) | {a['aiq']:.4f} | {a['zero_aiq']:.4f} | "
                f"{_ci(a, 1.0, '{:+.4f}')} | {flags} |"
            )
        heads = list(p["heads"])
        lines += [
            "",
            "| family | n | best single (chosen on training) | best single q | oracle q | "
            + " | ".join(f"Δ {h} pts [95% CI]" for h in heads)
            + " | utility AIQ / Zero AIQ |",
            "|---|---|---|---|---|" + "---|" * len(heads) + "---|",
        ]
        for f, fr_ in g["families"].items():
            a = fr_["utility_aiq"][heads[0]]
            lines.append(
                f"| {f} | {fr_['n']} | {', '.join(fr_['best_single_models'])} | {fr_['best_single']:.4f} | "
                f"{fr_['oracle']:.4f} | "
                + " | ".join(_ci(fr_["heads"][h]) for h in heads)
                + f" | {a['aiq']:.4f} / {a['zero_aiq']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def prompt_frame(parts: Sequence[Any], models: list[str]) -> pd.DataFrame:
    """One row per held-out prompt and rendering: fold, family, the best single model and its
    score, the oracle's score and each head's routed score."""
    frames = []
    for p in parts:
        d = {
            "fold": p.fold,
            "rendering": p.rendering,
            "prompt_id": p.prompt_id,
            "family": p.family,
            "best_single_model": models[p.best],
            "best_single": p.Y[:, p.best],
            "oracle": p.Y.max(axis=1),
        }
        d.update({f"routed_{h}": v for h, v in p.routed.items()})
        frames.append(pd.DataFrame(d))
    return pd.concat(frames, ignore_index=True)
