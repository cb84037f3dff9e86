"""Quality-vs-cost frontier metrics of one router swept over its knob (definitions: docs/peers.md).

A router evaluated at ``k`` knob values (a willingness to pay, a threshold) gives ``k`` points:
``cost`` (k,) and ``quality`` (k,). Two families of metrics:

- RouterBench (Hu et al. 2024, "RouterBench: A Benchmark for Multi-LLM Routing System"; its
  ``calc_AIQ``): the non-decreasing convex hull (NDCH) of the points, the area under it (AIQ),
  and the Zero router = the NDCH of the single models' own points.
- RouteLLM (Ong et al. 2024, "RouteLLM: Learning to Route LLMs with Preference Data"; its
  ``routellm/evals/evaluate.py``), for a strong/weak pair on the x axis "share of strong calls":
  PGR, APGR (area under the PGR curve) and CPT(p) (strong share needed for p of the gap).

Plus :func:`cost_to_reach` (the generalised "cost to reach x% of the best single model") and
:func:`mean_ci` (mean and Student-t interval over seeds).
"""

from __future__ import annotations

import numpy as np

from router_ml.decision.hull import finite_points as _points
from router_ml.decision.hull import ndch


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid-rule area under ``y`` over ``x`` (np.trapezoid is numpy >= 2 only)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def zero_router(single_cost: np.ndarray, single_quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RouterBench's Zero router: the NDCH of the single models' own ``(cost, quality)`` points.

    It needs no learning (pick one model, or mix two at random); a router earns its keep only
    above it. Returns ``(hull_cost, hull_quality)`` as :func:`ndch`.
    """
    return ndch(single_cost, single_quality)


def hull_quality(hull_cost: np.ndarray, hull_quality: np.ndarray, at_cost: np.ndarray | float) -> np.ndarray:
    """Quality on a hull at ``at_cost`` (scalar or (n,)): linear between vertices, flat after the
    last vertex (spend more, use the best configuration), NaN before the first (unreachable)."""
    hx, hy = _points(hull_cost, hull_quality, ("hull_cost", "hull_quality"))
    if np.any(np.diff(hx) <= 0):
        raise ValueError("hull_cost must be strictly increasing (pass the output of ndch)")
    return np.interp(np.asarray(at_cost, dtype="float64"), hx, hy, left=np.nan, right=hy[-1])


def aiq(cost: np.ndarray, quality: np.ndarray, cost_range: tuple[float, float]) -> float:
    """RouterBench's AIQ: the mean quality of the NDCH over ``cost_range = (c_min, c_max)``.

    As the RouterBench paper defines it, ``AIQ = integral_{c_min}^{c_max} NDCH(c) dc / (c_max - c_min)``,
    the hull extended flat from its last vertex to ``c_max`` (the largest cost of the comparison).
    Choice where the hull starts after ``c_min``: the router cannot run that cheaply, so that part
    counts as quality 0 - as RouterBench's ``calc_AIQ`` does (it integrates from the hull's first
    point and divides by the whole x range from 0). So ``cost_range = (0, largest cost)`` gives
    exactly ``calc_AIQ``. A hull that reaches past ``c_max`` is cut there. Use one ``cost_range``
    for every router of a comparison: AIQ is only comparable within one evaluation set and range.
    """
    lo, hi = (float(c) for c in cost_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"cost_range must be two finite costs with low < high, got {cost_range!r}")
    hx, hy = ndch(cost, quality)
    start = max(lo, float(hx[0]))
    if start >= hi:
        return 0.0
    inside = hx[(hx > start) & (hx < hi)]
    xs = np.r_[start, inside, hi]
    ys = hull_quality(hx, hy, xs)
    return _trapezoid(ys, xs) / (hi - lo)


def cost_to_reach(cost: np.ndarray, quality: np.ndarray, target: float) -> float:
    """The least cost at which the router's NDCH reaches quality ``target`` (linear between
    vertices, as mixing two configurations allows); NaN when the hull never gets there."""
    hx, hy = ndch(cost, quality)
    if target <= hy[0]:
        return float(hx[0])
    if target > hy[-1]:
        return float("nan")
    return float(np.interp(target, hy, hx))  # hy is strictly increasing on the NDCH


def pgr(q_router: float, q_weak: float, q_strong: float) -> float:
    """RouteLLM's performance gap recovered: ``(q_router - q_weak) / (q_strong - q_weak)``
    (NaN when the two models score the same)."""
    gap = float(q_strong) - float(q_weak)
    return float("nan") if gap == 0 else float((float(q_router) - float(q_weak)) / gap)


def _share_curve(
    strong_share: np.ndarray, quality: np.ndarray, q_weak: float, q_strong: float
) -> tuple[np.ndarray, np.ndarray]:
    """The router's curve sorted by strong share, with (0, q_weak) and (1, q_strong) added when
    missing. RouteLLM's sweep always holds both ends (its threshold grid spans the scores' min and
    max: everything to strong, nothing to strong); adding them makes a sweep over a narrower grid
    comparable."""
    s, q = _points(strong_share, quality, ("strong_share", "quality"))
    if s.min() < 0 or s.max() > 1:
        raise ValueError(f"strong_share must lie in [0, 1], got values in [{s.min()}, {s.max()}]")
    if not (s == 0).any():
        s, q = np.r_[0.0, s], np.r_[float(q_weak), q]
    if not (s == 1).any():
        s, q = np.r_[s, 1.0], np.r_[q, float(q_strong)]
    order = np.argsort(s, kind="stable")
    return s[order], q[order]


def apgr(strong_share: np.ndarray, quality: np.ndarray, q_weak: float, q_strong: float) -> float:
    """RouteLLM's APGR: ``(AUC_router - AUC_weak) / (AUC_strong - AUC_weak)``, AUCs by trapezoid
    over the strong-call share in [0, 1] (ends added as in :func:`_share_curve`), so
    ``AUC_weak = q_weak`` and ``AUC_strong = q_strong``. Weak-only: 0, strong-only: 1, a straight
    line from weak to strong (the random router, in expectation): 0.5. NaN when q_strong == q_weak.
    """
    s, q = _share_curve(strong_share, quality, q_weak, q_strong)
    return pgr(_trapezoid(q, s), q_weak, q_strong)


def cpt(strong_share: np.ndarray, quality: np.ndarray, q_weak: float, q_strong: float, p: float) -> float:
    """RouteLLM's CPT(p): the least strong-call share at which the router's quality reaches
    ``q_weak + p * (q_strong - q_weak)``, as a share in [0, 1] (RouteLLM prints it in %).

    RouteLLM takes ``np.interp(target, quality, share)`` over the curve sorted by share, which is
    only defined while quality rises with the share. Here: the first crossing of the target along
    the curve (ends added as in :func:`_share_curve`), interpolated linearly inside its segment -
    the same number on a rising curve, and still the least share on a bumpy one. NaN if never reached.
    """
    s, q = _share_curve(strong_share, quality, q_weak, q_strong)
    target = float(q_weak) + float(p) * (float(q_strong) - float(q_weak))
    hit = np.flatnonzero(q >= target)
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    if i == 0:
        return float(s[0])
    frac = (target - q[i - 1]) / (q[i] - q[i - 1])  # q[i - 1] < target <= q[i]
    return float(s[i - 1] + frac * (s[i] - s[i - 1]))


def mean_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean over seeds with a two-sided ``1 - alpha`` Student-t interval: ``(mean, lo, hi)``.

    NaNs are dropped; one value -> ``(v, nan, nan)``; none -> all NaN.
    """
    v = np.asarray(values, dtype="float64").ravel()
    v = v[~np.isnan(v)]
    nan = float("nan")
    if v.size == 0:
        return nan, nan, nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, nan, nan
    from scipy import stats

    half = float(stats.t.ppf(1 - alpha / 2, df=v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half
