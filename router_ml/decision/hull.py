"""RouterBench's non-decreasing convex hull (NDCH) of a router's (cost, quality) points: what the
Zero router policy routes along and what :mod:`router_ml.evaluation.frontier` integrates (AIQ)."""

from __future__ import annotations

import numpy as np


def finite_points(
    cost: np.ndarray, quality: np.ndarray, names: tuple[str, str] = ("cost", "quality")
) -> tuple[np.ndarray, np.ndarray]:
    """Two finite 1-d float arrays of the same, non-zero length."""
    x = np.asarray(cost, dtype="float64").ravel()
    y = np.asarray(quality, dtype="float64").ravel()
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} need the same length, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError(f"no points: {names[0]} and {names[1]} are empty")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{names[0]} and {names[1]} must be finite (no NaN/inf); drop missing points first")
    return x, y


def ndch(cost: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RouterBench's non-decreasing convex hull of a router's points.

    The upper convex hull of ``(cost, quality)`` (mixing two configurations at random reaches any
    point on the segment between them, so the hull is achievable), cut after its first highest
    point (a configuration that costs more but is no better is dominated). At equal cost only the
    best point counts; collinear middle points are dropped.

    Returns ``(hull_cost, hull_quality)``, each (m,), m <= k, sorted by cost; ``hull_quality`` is
    strictly increasing. It traces the same curve as RouterBench's
    ``get_non_descreasing_convex_hull_of``, with a monotone chain instead of its O(k^3) loop.
    """
    x, y = finite_points(cost, quality)
    order = np.lexsort((-y, x))  # by cost, best first within a cost
    x, y = x[order], y[order]
    keep = np.r_[True, x[1:] != x[:-1]]
    x, y = x[keep], y[keep]
    hull: list[int] = []
    for i in range(len(x)):
        # pop the last vertex while it lies on or under the chord from the one before it to point i
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross < 0:
                break
            hull.pop()
        hull.append(i)
    hx, hy = x[hull], y[hull]
    top = int(np.argmax(hy))  # first (cheapest) highest vertex; the concave hull falls after it
    return hx[: top + 1], hy[: top + 1]
