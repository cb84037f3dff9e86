"""EnsembleQualityPredictor: the weighted mean of its members, state round trip, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from router_ml.predictors import EnsembleQualityPredictor, build_quality_predictor


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(240, 16)).astype(np.float32)
    Y = rng.binomial(1, 0.5, (240, 3)).astype(float)
    return X, Y, rng.integers(0, 4, 240)


def test_ensemble_is_the_weighted_mean_of_its_members():
    X, Y, t = _data()
    members = [{"name": "linear", "params": {"alpha": 10.0}}, {"name": "knn", "params": {"k": 10}}]
    ens = build_quality_predictor("ensemble", members=members, weights=[3.0, 1.0]).fit(X, Y, t)
    lin = build_quality_predictor("linear", alpha=10.0).fit(X, Y, t).predict(X[:7])
    knn = build_quality_predictor("knn", k=10).fit(X, Y, t).predict(X[:7])
    np.testing.assert_allclose(ens.predict(X[:7]), 0.75 * lin + 0.25 * knn)
    back = EnsembleQualityPredictor(**ens.get_params()).load_state_dict(ens.state_dict())
    np.testing.assert_allclose(back.predict(X[:7]), ens.predict(X[:7]))


def test_default_ensemble_fits_taskmix_and_knn():
    X, Y, t = _data()
    ens = EnsembleQualityPredictor().fit(X, Y, t)
    assert [h.name for h in ens.heads_] == ["taskmix", "knn"]
    assert ens.predict(X[:3]).shape == (3, 3)


def test_ensemble_rejects_bad_members_and_weights():
    X, Y, t = _data()
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        EnsembleQualityPredictor(members=[{"name": "nope"}]).fit(X, Y, t)
    with pytest.raises(ValueError, match="weights"):
        EnsembleQualityPredictor(weights=[1.0]).fit(X, Y, t)
    with pytest.raises(ValueError, match="reads the prompt text"):
        EnsembleQualityPredictor(members=[{"name": "taskmix", "params": {"text_features": 64}}]).fit(X, Y, t)
    with pytest.raises(ValueError, match=r"member 0 \(taskmix\)"):
        EnsembleQualityPredictor().load_state_dict({"shape": np.array([3, 16]), "0.x": np.zeros(1)})
    state = EnsembleQualityPredictor().fit(X, Y, t).state_dict()
    with pytest.raises(ValueError, match="no arrays for member 1"):
        EnsembleQualityPredictor().load_state_dict({k: v for k, v in state.items() if not k.startswith("1.")})
