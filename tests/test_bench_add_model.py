"""The add-model benchmark's column fits (experiments/bench_add_model.py): synthetic data, fast tier."""

from __future__ import annotations

import numpy as np

from experiments.bench_add_model import add_column


def _families(seed: int = 0, n: int = 600, d: int = 16, m: int = 4):
    """Three well separated families; the new model is the pool mean plus +0.3 on family 0 only."""
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:3] * 5.0
    fam = rng.integers(0, 3, n)
    X = (centres[fam] + rng.normal(size=(n, d))).astype(np.float32)
    P = np.clip(0.5 + 0.2 * rng.normal(size=(n, m)), 0, 1)
    q = np.clip(P.mean(axis=1) + 0.3 * (fam == 0), 0, 1)
    return X, P, q, fam, np.eye(d, dtype=np.float32)[:3]


def test_family_intercepts_learn_a_skill_the_pool_does_not_show():
    X, P, q, fam, centroids = _families()
    rng = np.random.default_rng(1)
    tr, te = np.arange(100), np.arange(100, 600)
    y = rng.binomial(1, q[tr]).astype(float)
    err = {
        method: np.abs(add_column(method, P[tr], y, X[tr], X[te], P[te], centroids) - q[te]).mean()
        for method in ("ridge", "ridge+family", "ridge+family+bank", "ridge+bank")
    }
    assert err["ridge+family"] < 0.75 * err["ridge"]
    assert err["ridge+family+bank"] < 0.75 * err["ridge"]
    new = add_column("ridge+family", P[tr], y, X[tr], X[te], P[te], centroids)
    assert new[fam[te] == 0].mean() - new[fam[te] != 0].mean() > 0.15  # the family's offset is found


def test_the_tau10_variants_are_add_models_fit_with_the_earlier_residual_shrinkage():
    """``logit+bank`` is the head's own column (tau = BANK_TAU); ``-tau10`` the same fit shrunk by 10."""
    from router_ml.predictors import KnnQualityPredictor, ProbedQualityPredictor

    X, P, q, _, _ = _families()
    rng = np.random.default_rng(3)
    Y = rng.binomial(1, P).astype(float)
    y = rng.binomial(1, q).astype(float)
    base = KnnQualityPredictor(k=20).fit(X[200:], Y[200:])
    P_probe, P_test = base.predict(X[:100]), base.predict(X[100:200])
    for tau, method in ((None, "logit+bank"), (10.0, "logit+bank-tau10")):
        head = ProbedQualityPredictor.from_head(base, **({} if tau is None else {"bank_tau": tau}))
        head.add_model(X[:100], y[:100])
        ours = add_column(method, P_probe, y[:100], X[:100], X[100:200], P_test)
        np.testing.assert_allclose(ours, head.predict(X[100:200])[:, -1], atol=1e-6)
    old = add_column("logit+bank-tau10", P_probe, y[:100], X[:100], X[100:200], P_test)
    assert not np.allclose(old, add_column("logit+bank", P_probe, y[:100], X[:100], X[100:200], P_test))
