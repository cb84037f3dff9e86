"""Choosing the probe prompts a new model is run on: informative and spread over task families.

A probe is worth most where the existing models' predicted qualities disagree (a prompt every
model gets right, or every model gets wrong, says little about where a new one fits) and where
it covers a part of the prompt space the other probes do not. :func:`select_probes`:

1. stratifies the candidates by predicted task type and gives each task its share of ``k``
   (largest remainder, at least one probe per task present when ``k`` allows);
2. inside a task, picks greedily: first the prompt of highest disagreement, then each time the
   one maximising ``weight * min cosine distance to the probes picked so far`` (a weighted
   k-center), with ``weight = floor + (1 - floor) * disagreement / max disagreement``.

Disagreement is the standard deviation of the predicted qualities across models.
"""

from __future__ import annotations

import numpy as np


def disagreement(P: np.ndarray) -> np.ndarray:
    """``(n, m) -> (n,)`` standard deviation across models of the predicted qualities."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"disagreement: expected (n, m) predictions, got shape {P.shape}")
    return P.std(axis=1)


def allocate(counts: np.ndarray, k: int) -> np.ndarray:
    """Split ``k`` over strata of sizes ``counts`` in proportion (largest remainder), each stratum
    getting at least one when ``k`` >= the number of non-empty strata, never more than its size."""
    counts = np.asarray(counts, dtype=np.int64)
    k = int(min(k, counts.sum()))
    out = np.zeros_like(counts)
    nonempty = counts > 0
    if k >= nonempty.sum():
        out[nonempty] = 1
    target = counts / counts.sum() * k
    for _ in range(k - int(out.sum())):  # one at a time to the stratum furthest below its share
        out[np.argmax(np.where(out < counts, target - out, -np.inf))] += 1
    return out


def _weighted_k_center(Xn: np.ndarray, weight: np.ndarray, k: int) -> list[int]:
    chosen = [int(np.argmax(weight))]
    min_dist = 1.0 - Xn @ Xn[chosen[0]]
    for _ in range(k - 1):
        score = weight * np.maximum(min_dist, 0.0)
        score[chosen] = -np.inf
        nxt = int(np.argmax(score))
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, 1.0 - Xn @ Xn[nxt])
    return chosen


def select_probes(
    X: np.ndarray,
    P: np.ndarray,
    task_ids: np.ndarray,
    k: int,
    floor: float = 0.1,
) -> np.ndarray:
    """Indices (``k``, or all when fewer) of informative, well-spread probe candidates.

    ``X (n, d)`` candidate embeddings, ``P (n, m)`` the existing models' predicted qualities on
    them, ``task_ids (n,)`` their predicted task ids. Deterministic (ties go to the earlier row).
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    task_ids = np.asarray(task_ids)
    if P.shape[0] != n or task_ids.shape != (n,):
        raise ValueError(f"select_probes: X has {n} rows, P {P.shape}, task_ids {task_ids.shape}")
    if int(k) < 1:
        raise ValueError(f"select_probes: k must be >= 1, got {k}")
    if not 0 <= floor <= 1:
        raise ValueError(f"select_probes: floor must lie in [0, 1], got {floor}")
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    d = disagreement(P)
    weight = floor + (1.0 - floor) * d / max(float(d.max()), 1e-12)
    tasks = np.unique(task_ids)
    members = [np.where(task_ids == t)[0] for t in tasks]
    quota = allocate(np.array([len(r) for r in members]), int(k))
    out: list[int] = []
    for rows, q in zip(members, quota, strict=True):
        if q:
            out += rows[_weighted_k_center(Xn[rows], weight[rows], int(q))].tolist()
    return np.array(sorted(out), dtype=np.int64)
