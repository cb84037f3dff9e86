"""NoveltyGuard (novelty, a novelty-dependent margin before leaving the pool prior's model, or shrinkage
toward the pool prior, conformal intervals) and what carries it:
the decision, the risk-averse utility policy, the proxy header. Synthetic data: fast tier."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from router_ml.decision import DecisionLayer, ModelPool, build_policy
from router_ml.decision.base import Estimates, RoutingDecision, Uncertainty
from router_ml.predictors.guard import (
    FEATURES,
    LEGACY_FEATURES,
    NoveltyGuard,
    UtilityGain,
    conformal_halfwidth,
    family_spread,
    prompt_uniform,
    routed_gain,
    shrink_weight,
    smoothed_halfwidths,
)
from router_ml.predictors.ngram_bank import NgramBank
from router_ml.serving.engine_support import decision_headers


def test_conformal_halfwidth_is_the_finite_sample_quantile():
    r = np.arange(1.0, 11.0)  # 10 residuals: coverage 0.8 -> the ceil(11 * 0.8) = 9th smallest
    assert conformal_halfwidth(r, 0.8) == 9.0
    assert conformal_halfwidth(-r, 0.5) == 6.0  # absolute values; ceil(5.5) = 6th
    assert conformal_halfwidth(np.r_[r, np.nan], 0.8) == 9.0  # NaN outcomes are ignored
    assert conformal_halfwidth(r, 0.95) == np.inf  # ceil(10.45) = 11 > 10 residuals: unbounded


def test_smoothed_conformal_covers_tied_binary_residuals_at_the_nominal_rate():
    # an estimate shrunk to a constant 0.9 and {0, 1} outcomes, 85% ones: residuals 0.1 or 0.9
    rng = np.random.default_rng(0)
    r = np.where(rng.random(2000) < 0.85, 0.1, 0.9)
    lo, hi, p = smoothed_halfwidths(r, 0.9)
    assert (lo, hi) == (0.1, 0.9) and hi == conformal_halfwidth(r, 0.9)  # deterministic: covers 100%
    new = np.where(rng.random(20000) < 0.85, 0.1, 0.9)
    coin = rng.random(len(new)) < p
    covered = new <= np.where(coin, hi, lo)
    assert abs(covered.mean() - 0.9) < 0.01
    # continuous residuals: the coin changes nothing that matters
    lo, hi, p = smoothed_halfwidths(rng.random(999), 0.9)
    assert hi - lo < 0.01 and 0.0 <= p <= 1.0
    assert smoothed_halfwidths(np.arange(5.0), 0.95) == (np.inf, np.inf, 1.0)
    u = prompt_uniform(rng.normal(size=(2000, 8)))
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.03
    np.testing.assert_array_equal(prompt_uniform(np.ones((2, 8))), prompt_uniform(np.ones((2, 8))))


def test_weighted_smoothed_quantile_gives_each_family_its_weight():
    # 900 residuals of 0.1 from a large family, 100 of 0.9 from a small one
    r = np.r_[np.full(900, 0.1), np.full(100, 0.9)]
    assert smoothed_halfwidths(r, 0.9, np.ones(len(r))) == smoothed_halfwidths(r, 0.9)
    lo, hi, p = smoothed_halfwidths(r, 0.9)  # by rows the small family barely counts
    assert (lo, hi) == (0.1, 0.9) and p < 0.02
    w = np.r_[np.full(900, 1 / 900), np.full(100, 1 / 100)]  # each family half the mass
    lo, hi, p = smoothed_halfwidths(r, 0.9, w)
    assert (lo, hi) == (0.1, 0.9) and p == pytest.approx((1001 * 0.9 - 500) / 500)
    # a new family drawn from the two: half its rows are the small family's, covered with prob p
    assert 0.5 + 0.5 * p == pytest.approx(0.9, abs=0.01)
    assert smoothed_halfwidths(np.r_[r, np.nan], 0.9, np.r_[w, 5.0]) == (lo, hi, p)  # NaN rows drop out


def _interval_table(intervals: str, R: np.ndarray, kind: np.ndarray, fam: np.ndarray, nu=None):
    g = NoveltyGuard(coverage=0.9, n_bins=1, intervals=intervals)
    g._fit_intervals(R, np.zeros(len(R)) if nu is None else nu, kind, fam)
    return g


def test_interval_rules_read_the_out_of_family_residuals():
    # in distribution the head is close (residuals up to 0.2); on a held-out family it is not (up to 1)
    rng = np.random.default_rng(0)
    n = 4000
    R = np.r_[rng.uniform(0, 0.2, n), rng.uniform(0, 1.0, n)][:, None]
    kind = np.r_[np.zeros(n, int), np.ones(n, int)]
    fam = np.array([f"fam{i % 4}" for i in range(2 * n)])
    new_family = rng.uniform(0, 1.0, 20000)
    in_dist = rng.uniform(0, 0.2, 20000)
    pooled, family, wider = (_interval_table(x, R, kind, fam) for x in ("pooled", "family", "wider"))
    assert (new_family <= pooled.halfwidth_[0, 0]).mean() < 0.85  # pooled under-covers a new family
    assert abs((new_family <= family.halfwidth_[0, 0]).mean() - 0.9) < 0.01
    assert wider.halfwidth_[0, 0] == family.halfwidth_[0, 0]  # out of family is the wider here
    assert (in_dist <= wider.halfwidth_[0, 0]).all()  # ... and over-covers in distribution
    # where the in-distribution residuals are the wider, "wider" keeps theirs
    flipped = _interval_table("wider", np.r_[R[n:], R[:n]], kind, fam)
    assert flipped.halfwidth_[0, 0] == pytest.approx(family.halfwidth_[0, 0])


def test_family_equal_intervals_cover_a_new_family_not_its_rows():
    # three families: one large with small residuals, two small with large ones
    rng = np.random.default_rng(1)
    sizes, scales = (3000, 300, 300), (0.1, 1.0, 1.0)
    R = np.concatenate([rng.uniform(0, s, k) for k, s in zip(sizes, scales, strict=True)])[:, None]
    fam = np.repeat(["big", "a", "b"], sizes)
    kind = np.ones(len(R), int)
    by_rows = _interval_table("family", R, kind, fam)
    equal = _interval_table("family_equal", R, kind, fam)
    assert equal.halfwidth_[0, 0] > by_rows.halfwidth_[0, 0]
    # a new family is one of the three kinds with probability 1/3 each: mean coverage over families
    h = equal.halfwidth_[0, 0]
    per_family = [min(h / s, 1.0) for s in scales]
    assert np.mean(per_family) == pytest.approx(0.9, abs=0.02)
    with pytest.raises(ValueError, match="intervals"):
        NoveltyGuard(intervals="quantile")


def _cover(g: NoveltyGuard, q: np.ndarray, y: np.ndarray, coin: np.ndarray) -> float:
    c, cols = g._cells(np.zeros(len(q)), q), np.arange(q.shape[1])[None, :]
    h = np.where(coin[:, None] < g.halfwidth_p_[c, cols], g.halfwidth_[c, cols], g.halfwidth_low_[c, cols])
    return float(((y >= q - h - 1e-9) & (y <= q + h + 1e-9)).mean())


def test_estimate_bins_cover_at_nominal_whatever_the_mix_of_estimates():
    # {0, 1} outcomes around two estimates: 0.8 (right 80% of the time) and 0.5 (always off by 0.5)
    rng = np.random.default_rng(2)
    n = 6000
    G = np.where(np.arange(n) % 2 == 0, 0.8, 0.5)[:, None]
    Y = np.where(G == 0.8, rng.random((n, 1)) < 0.8, rng.random((n, 1)) < 0.5).astype(float)
    R, kind, fam = np.abs(Y - G), np.zeros(n, int), np.array(["a"] * n)
    one = NoveltyGuard(coverage=0.9, n_bins=1, q_bins=1)
    one._fit_intervals(R, np.zeros(n), kind, fam, G)
    two = NoveltyGuard(coverage=0.9, n_bins=1, q_bins=2)
    two._fit_intervals(R, np.zeros(n), kind, fam, G)
    assert two.qbin_edges_.shape == (1, 1) and two.halfwidth_.shape == (2, 1)
    # new prompts: all with the confident estimate (the served mix differs from the calibration mix)
    q = np.full((20000, 1), 0.8)
    y = (rng.random((20000, 1)) < 0.8).astype(float)
    coin = rng.random(20000)
    assert _cover(one, q, y, coin) < 0.82  # one cell: the 0.5 rows set the width, 0.8's misses stay
    assert abs(_cover(two, q, y, coin) - 0.9) < 0.01
    with pytest.raises(ValueError, match="q_bins"):
        NoveltyGuard(q_bins=0)


def test_a_guard_with_estimate_bins_round_trips_and_old_states_load():
    X, Y, fam = _families(n_fam=5)
    g = NoveltyGuard(folds=3, family_folds=-1, n_bins=2, q_bins=4, features=EMB_FEATURES)
    g.fit(X, Y, fam, _fit_predict_for(X, Y))
    assert g.qbin_edges_.shape == (2, 3) and g.halfwidth_.shape == (8, 2)
    back = NoveltyGuard(**g.get_params()).load_state_dict(g.state_dict())
    q = np.random.default_rng(0).random((len(X), 2))
    np.testing.assert_allclose(back.transform(X, q).lower, g.transform(X, q).lower)
    added = g.with_added_models([0.4])  # the new column: per novelty bin the widest cell of any model
    assert added.halfwidth_.shape == (8, 3) and added.qbin_edges_.shape == (3, 3)
    np.testing.assert_allclose(added.halfwidth_[:, 2], np.repeat(g.halfwidth_.reshape(2, -1).max(axis=1), 4))
    np.testing.assert_allclose(added.transform(X, np.c_[q, q[:, :1]]).lower[:, :2], g.transform(X, q).lower)
    bad = g.state_dict()
    bad["qbin_edges"] = bad["qbin_edges"][:1]
    with pytest.raises(ValueError, match="qbin_edges"):
        NoveltyGuard(**g.get_params()).load_state_dict(bad)
    # a guard saved before the estimate bins: no qbin_edges, one cell per novelty bin
    plain = NoveltyGuard(folds=3, family_folds=-1, n_bins=2, features=EMB_FEATURES)
    plain.fit(X, Y, fam, _fit_predict_for(X, Y))
    # the estimate bins change the intervals only: the same estimates and novelty, so the same routing
    np.testing.assert_allclose(plain.transform(X, q).quality, g.transform(X, q).quality)
    np.testing.assert_allclose(plain.transform(X, q).novelty, g.transform(X, q).novelty)
    state = {k: v for k, v in plain.state_dict().items() if k != "qbin_edges"}
    params = {k: v for k, v in plain.get_params().items() if k != "q_bins"}  # router.json without it
    old = NoveltyGuard(**params).load_state_dict(state)
    np.testing.assert_allclose(old.transform(X, q).upper, plain.transform(X, q).upper)
    old = NoveltyGuard(**params, q_bins=10).load_state_dict(state)  # whatever a later default says
    assert old.q_bins == 1
    np.testing.assert_allclose(old.transform(X, q).upper, plain.transform(X, q).upper)


def test_a_guard_with_out_of_family_intervals_round_trips_and_takes_an_added_model():
    X, Y, fam = _families(n_fam=5)
    g = NoveltyGuard(folds=3, family_folds=-1, n_bins=2, features=EMB_FEATURES, intervals="wider_equal")
    g.fit(X, Y, fam, _fit_predict_for(X, Y))
    assert g.get_params()["intervals"] == "wider_equal"
    back = NoveltyGuard(**g.get_params()).load_state_dict(g.state_dict())
    q = np.full((len(X), 2), 0.5)
    np.testing.assert_allclose(back.transform(X, q).upper, g.transform(X, q).upper)
    added = g.with_added_models([0.4])
    assert added.halfwidth_.shape == (2, 3)
    np.testing.assert_allclose(added.halfwidth_[:, 2], g.halfwidth_.max(axis=1))


def test_routed_gain_scores_the_argmax_against_the_best_single_column():
    q = np.array([[0.9, 0.1], [0.2, 0.8]])
    Y = np.array([[0.0, 1.0], [1.0, np.nan]])
    np.testing.assert_allclose(routed_gain(q, Y, np.array([1, 0])), [-1.0, -1.0])


def test_utility_gain_scores_the_frontier_not_only_the_top():
    # model 0 the best and dear, model 1 as good here and a hundredth of the price
    Y, cost = np.array([[1.0, 1.0]]), np.array([[1.0, 0.01]])
    prior, best, ref = np.array([0.9, 0.8]), np.array([0]), np.array([1.0])
    top_only = UtilityGain(Y, best, prior)
    frontier = UtilityGain(Y, best, prior, cost, ref)
    dear = np.array([[0.9, 0.1]])  # the same top pick, but the cheap model looks hopeless
    assert top_only(dear)[0][0] == 0.0 == top_only(prior[None, :])[0][0] and top_only(dear)[1] is None
    np.testing.assert_array_equal(frontier(dear)[0], top_only(dear)[0])
    assert frontier.frontier(prior[None, :])[0] == pytest.approx(0.0)  # the prior earns nothing over itself
    # x = 0.3 is the one willingness to pay where the prior already takes the cheap model and this
    # head still pays for the dear one: (1 - 0.3 * 1.0) against (1 - 0.3 * 0.01), over 1 + x, one
    # of the grid's nine points
    assert frontier.frontier(dear)[0] == pytest.approx((0.7 - 0.997) / 1.3 / 9)
    assert frontier.frontier(np.array([[0.8, 0.85]]))[0] > 0.0  # takes the cheap model sooner: saves $
    with pytest.raises(ValueError, match="cost"):
        top_only.frontier(dear)
    with pytest.raises(ValueError, match="cost"):
        UtilityGain(Y, best, prior, np.ones((1, 3)), ref)


def _cheap_families(seed: int = 0, n_fam: int = 6, per: int = 60, d: int = 16):
    """Model 0 is the best and dear everywhere (0.95, $1); model 1 is cheap, good on half the
    families and failing the others (0.6 / 0.05, $0.05); model 2 is cheap and steady (0.45, $0.05).
    A head never leaves model 0 at the top, but at a budget it sends an unseen family to model 1
    on the strength of its neighbours, where the prior (model 1's mean 0.33) would take model 2."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_fam, d)) * 3.0
    X, Y, fam = [], [], []
    for f in range(n_fam):
        X.append(centres[f] + rng.normal(size=(per, d)))
        p = (0.95, 0.6 if f % 2 == 0 else 0.05, 0.45)
        Y.append(np.column_stack([rng.binomial(1, q, per) for q in p]).astype(float))
        fam += [f"fam{f}"] * per
    cost = np.tile([1.0, 0.05, 0.05], (n_fam * per, 1))
    return np.vstack(X).astype(np.float32), np.vstack(Y), np.array(fam), cost


def test_with_costs_the_guard_shrinks_where_the_head_only_errs_at_a_budget():
    X, Y, fam, cost = _cheap_families()
    kw = dict(folds=3, coverage=0.8, n_bins=2, mode="shrink", features=EMB_FEATURES, family_folds=-1)
    top = NoveltyGuard(**kw).fit(X, Y, fam, _fit_predict_for(X, Y))
    frontier = NoveltyGuard(**kw).fit(X, Y, fam, _fit_predict_for(X, Y), cost=cost)
    # at the top the head ties the prior (both pick model 0): nothing to fit, no shrinkage; over
    # the frontier its out-of-family picks at a budget lose: a novel prompt's estimates are pulled
    # toward the prior
    assert top.shrink_[1] == 0.0 and frontier.shrink_[1] >= 0.5
    # the same at the top, by construction: the costs only break its ties
    assert frontier.cv_objective_["shrink"] == pytest.approx(top.cv_objective_["shrink"])
    # a margin keeps the prior's top model, the dear one, at every budget: it ties the shrinkage at
    # the top (auto then keeps the shrinkage) and loses to it over the frontier
    auto = NoveltyGuard(**{**kw, "mode": "auto"}).fit(X, Y, fam, _fit_predict_for(X, Y), cost=cost)
    assert auto.cv_objective_["margin"] == pytest.approx(auto.cv_objective_["shrink"])
    assert auto.cv_frontier_["margin"] < auto.cv_frontier_["shrink"] and auto.fitted_mode == "shrink"
    far = X[:5] + 40.0
    assert (frontier.transform(far, np.tile([0.95, 0.6, 0.45], (5, 1))).shrink >= 0.5).all()
    with pytest.raises(ValueError, match="cost"):
        NoveltyGuard(**kw).fit(X, Y, fam, _fit_predict_for(X, Y), cost=cost[:, :2])


#: the novelty features read from the embedding alone (the clusters below differ in nothing else)
EMB_FEATURES = [f for f in FEATURES if not f.startswith(("char_", "word_"))]


def _families(
    seed: int = 0, n_fam: int = 6, per: int = 60, d: int = 16, win_every: int = 2, spread: float = 3.0
):
    """Families as clusters in embedding space. Model 0 is the best single model everywhere except
    that model 1 wins on every ``win_every``-th family... but the others are where model 1 is poor,
    so a head that extrapolates 'model 1 is strong' to an unseen family loses."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_fam, d)) * spread
    X, Y, fam = [], [], []
    for f in range(n_fam):
        X.append(centres[f] + rng.normal(size=(per, d)))
        q1 = 0.9 if f % win_every == 0 else 0.1
        Y.append(np.column_stack([rng.binomial(1, 0.6, per), rng.binomial(1, q1, per)]).astype(float))
        fam += [f"fam{f}"] * per
    return np.vstack(X).astype(np.float32), np.vstack(Y), np.array(fam)


def _fit_predict_for(X: np.ndarray, Y: np.ndarray):
    """A head that predicts the mean of the 10 nearest training prompts (kNN): it extrapolates."""

    def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        D = ((X[te, None, :] - X[None, tr, :]) ** 2).sum(-1)
        nn = np.argsort(D, axis=1)[:, :10]
        return np.nanmean(Y[tr][nn], axis=1)

    return fit_predict


@pytest.fixture(scope="module")
def fitted():
    X, Y, fam = _families()
    g = NoveltyGuard(folds=3, coverage=0.8, n_bins=2, mode="margin", features=EMB_FEATURES)
    return g.fit(X, Y, fam, _fit_predict_for(X, Y)), X, Y


def test_guard_learns_novelty_and_a_margin_that_grows_with_it(fitted):
    g, X, Y = fitted
    np.testing.assert_allclose(g.prior_, np.nanmean(Y, axis=0))
    assert g.cv_auroc_ > 0.8  # clusters: out-of-family prompts are far from every training cluster
    np.testing.assert_array_equal(g.shrink_, [0.0, 0.0, 0.0])  # margin mode: the head's estimates are kept
    a, b, t = g.margin_
    assert a >= 0.0 and b >= 0.0 and 0.0 <= t <= 1.0
    far = X[:5] + 40.0  # nowhere near any training family
    near = X[:5]
    assert (g.novelty(far) > g.novelty(near)).all()
    assert (g.margin(g.novelty(far)) >= g.margin(g.novelty(near))).all()
    q = np.tile([0.1, 0.95], (5, 1))  # a head confident about model 1, the prior's loser
    out = g.transform(far, q)
    overrode = np.argmax(out.quality, axis=1) != np.argmax(q, axis=1)
    assert (np.argmax(out.quality, axis=1)[overrode] == g.prior_model).all()
    np.testing.assert_array_equal(out.shrink, overrode.astype(float))
    assert g.cv_gain_.shape == (2,) and np.isfinite(g.cv_gain_).all()
    # the interval holds its estimate and sits in [0, 1]
    assert (out.lower <= out.quality + 1e-12).all() and (out.quality <= out.upper + 1e-12).all()
    assert out.lower.min() >= 0.0


def test_margin_keeps_the_head_or_the_prior_never_a_third_model(fitted):
    g = copy.deepcopy(fitted[0])
    g.prior_ = np.array([0.6, 0.5, 0.4])  # model 0 is the prior's pick
    g.shrink_, g.margin_ = np.zeros(2), np.array([0.05, 0.5, 0.2])  # m(nu) = 0.05 + 0.5 max(nu - 0.2, 0)
    q = np.array([[0.5, 0.9, 0.6], [0.58, 0.60, 0.62], [0.5, 0.6, 0.9], [0.9, 0.1, 0.1]])
    nu = np.array([0.1, 0.1, 0.9, 0.9])  # margins 0.05, 0.05, 0.40, 0.40
    out, w = g._apply(q, nu)
    # row 0: advantage 0.4 > 0.05, the head's pick; row 1: 0.04 < 0.05, back to the prior's model
    # (not model 1, which is neither the head's nor the prior's pick); row 2: 0.4 is not > 0.4 at
    # this novelty; row 3: the head already picks the prior's model
    assert np.argmax(out, axis=1).tolist() == [1, 0, 0, 0]
    assert w.tolist() == [0.0, 1.0, 1.0, 0.0]
    np.testing.assert_allclose(out[:, 0], q[:, 0])  # the prior's model keeps the head's estimate


def test_shrink_mode_shrinks_unseen_prompts_to_the_prior():
    # model 1 wins on a third of the families: whichever families a CV fold holds out, its training
    # part's prior still names model 0 (with half, a fold's prior can name model 1, and shrinking
    # toward it would not help: the fit measures the shrinkage against each fold's own prior)
    X, Y, fam = _families(win_every=3)
    g = NoveltyGuard(folds=3, coverage=0.8, n_bins=2, mode="shrink", features=EMB_FEATURES).fit(
        X, Y, fam, _fit_predict_for(X, Y)
    )
    w0, w1, t = g.shrink_
    assert 0.0 <= w0 <= w1 <= 1.0 and not np.any(g.margin_) and t == 0.0  # no floor unless asked
    far = X[:5] + 40.0
    out = g.transform(far, np.tile([0.1, 0.95], (5, 1)))
    assert (out.shrink > 0.5).all()
    with pytest.raises(ValueError, match="mode"):
        NoveltyGuard(mode="blend")


def test_shrink_weight_is_flat_below_the_novelty_floor_then_linear():
    nu = np.array([0.0, 0.3, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(shrink_weight(nu, (0.1, 0.9)), 0.1 + 0.8 * nu)  # no floor: linear
    np.testing.assert_allclose(shrink_weight(nu, (0.1, 0.9, 0.6)), [0.1, 0.1, 0.1, 0.5, 0.9])
    np.testing.assert_allclose(shrink_weight(nu, (0.5, 3.0, 0.0)), [0.5, 1.0, 1.0, 1.0, 1.0])  # clipped


def test_shrink_floor_is_fitted_among_in_distribution_novelty_quantiles():
    X, Y, fam = _families(win_every=3)
    g = NoveltyGuard(
        folds=3, coverage=0.8, n_bins=2, mode="shrink", features=EMB_FEATURES, shrink_floor=True
    ).fit(X, Y, fam, _fit_predict_for(X, Y))
    w0, w1, t = g.shrink_
    assert 0.0 <= w0 <= w1 <= 1.0 and 0.0 <= t < 1.0
    near, far = X[:5], X[:5] + 40.0
    q = np.tile([0.1, 0.95], (5, 1))
    for Z in (near, far):  # what serving applies is the fitted weight at the prompt's novelty
        out = g.transform(Z, q)
        np.testing.assert_allclose(
            out.quality, (1 - out.shrink[:, None]) * q + out.shrink[:, None] * g.prior_
        )
        np.testing.assert_allclose(out.shrink, shrink_weight(out.novelty, g.shrink_))
    # saved and loaded, the floor is the guard's
    again = NoveltyGuard(**g.get_params()).load_state_dict(g.state_dict())
    np.testing.assert_array_equal(again.shrink_, g.shrink_)


def test_family_spread_is_the_spread_of_each_models_lead_over_the_best_across_families():
    fam = np.array(["a", "a", "b", "b", "c", "c"])
    Y = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [1, 0, 0], [1, 0, np.nan]], float)
    # per-family means: a (1, .5, 0), b (.5, 1, 1), c (1, 0, 0); leads over model 0: (-.5, .5, -1), (-1, .5, -1)
    np.testing.assert_allclose(
        family_spread(Y, fam, 0), [0.0, np.std([-0.5, 0.5, -1], ddof=1), np.std([-1, 0.5, -1], ddof=1)]
    )
    assert not family_spread(Y[:2], fam[:2], 0).any()  # one family: no spread to measure


def test_spread_mode_asks_a_swinging_model_for_a_larger_lead():
    # model 1 wins on a third of the families and fails the others: its lead swings by family, so
    # on a far prompt the guard's estimate of it is lowered by its spread, the prior's model keeps its own
    X, Y, fam = _families(win_every=3)
    g = NoveltyGuard(folds=3, coverage=0.8, n_bins=2, mode="spread", features=EMB_FEATURES).fit(
        X, Y, fam, _fit_predict_for(X, Y)
    )
    k0, k1 = g.spread_risk_
    assert 0.0 <= k0 <= k1 and k1 > 0.0  # the CV chose to use it on this data
    assert g.spread_[g.prior_model] == 0.0 and g.spread_[1] > 0.3
    q = np.tile([0.55, 0.6], (5, 1))  # a small lead for the swinging model
    out = g.transform(X[:5] + 40.0, q)
    assert (np.argmax(out.quality, axis=1) == g.prior_model).all()
    assert (out.shrink == 1.0).all()  # reported as a fallback to the prior
    back = NoveltyGuard(**g.get_params()).load_state_dict(g.state_dict())
    np.testing.assert_allclose(back.transform(X[:5] + 40.0, q).quality, out.quality)
    added = g.with_added_models([0.5])
    assert added.spread_.shape == (3,) and added.spread_[2] == g.spread_.max()


def test_family_folds_minus_one_holds_out_each_family_alone():
    X, Y, fam = _families(n_fam=5)
    inner = _fit_predict_for(X, Y)
    held: list[set[str]] = []

    def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        held.append(set(fam[te]))
        return inner(tr, te)

    NoveltyGuard(folds=3, family_folds=-1, n_bins=2, features=EMB_FEATURES).fit(X, Y, fam, fit_predict)
    single = [h for h in held if len(h) == 1]  # the family folds (a random fold mixes families)
    assert sorted(next(iter(h)) for h in single) == sorted(set(fam)) and len(held) == 5 + 3
    held.clear()
    NoveltyGuard(folds=3, n_bins=2, features=EMB_FEATURES).fit(X, Y, fam, fit_predict)  # three groups
    assert len(held) == 3 + 3


def test_guard_state_round_trip_predicts_the_same(fitted):
    g, X, _ = fitted
    back = NoveltyGuard(**g.get_params()).load_state_dict(g.state_dict())
    q = np.full((len(X), 2), 0.5)
    a, b = g.transform(X, q), back.transform(X, q)
    np.testing.assert_allclose(a.novelty, b.novelty, atol=1e-6)
    np.testing.assert_allclose(a.quality, b.quality, atol=1e-6)
    np.testing.assert_allclose(a.lower, b.lower, atol=1e-6)
    state = g.state_dict()
    state["halfwidth"] = state["halfwidth"][:1]
    with pytest.raises(ValueError, match="halfwidth"):
        NoveltyGuard(**g.get_params()).load_state_dict(state)


def test_guard_saved_before_the_margin_loads_and_only_shrinks(fitted):
    g, X, _ = fitted
    state = g.state_dict()
    del state["margin"]  # what a checkpoint written before the margin holds
    del state["halfwidth_low"], state["halfwidth_p"]  # ... and before the smoothed intervals
    state["shrink"] = np.array([0.2, 0.8])
    old = NoveltyGuard(**g.get_params()).load_state_dict(state)
    assert not np.any(old.margin_) and old.shrink_[2] == 0.0  # saved before the floor: none
    q = np.tile([0.1, 0.95], (len(X), 1))
    out = old.transform(X, q)
    w = 0.2 + 0.6 * out.novelty
    np.testing.assert_allclose(out.quality, (1 - w[:, None]) * q + w[:, None] * old.prior_[None, :])
    h = old.halfwidth_[np.searchsorted(old.bin_edges_, out.novelty, side="right")]  # no coin: as saved
    np.testing.assert_allclose(out.upper, np.clip(out.quality + h, 0.0, 1.0))


def test_guard_needs_two_families():
    X, Y, _ = _families(n_fam=2)
    with pytest.raises(ValueError, match="two task families"):
        NoveltyGuard().fit(X, Y, ["one"] * len(X), _fit_predict_for(X, Y))


def _est(quality, lower=None) -> Estimates:
    n, m = np.shape(quality)
    z = np.zeros((n, m))
    return Estimates(
        models=[f"m{j}" for j in range(m)],
        quality=np.asarray(quality, float),
        tasks=["qa"] * n,
        cost=z,
        ttft=z,
        latency=z,
        is_local=np.zeros(m, bool),
        quality_lower=None if lower is None else np.asarray(lower, float),
    )


def test_risk_knob_ranks_by_the_lower_bound():
    q, lo = [[0.80, 0.75]], [[0.40, 0.70]]  # m0 looks better but is far less certain
    assert build_policy({"name": "utility"}).choose(_est(q, lo)).tolist() == [0]
    averse = build_policy({"name": "utility", "risk": 1.0})
    assert averse.choose(_est(q, lo)).tolist() == [1]
    assert averse.choose(_est(q)).tolist() == [0]  # no interval: the point estimate
    assert "risk 1" in averse.explain(_est(q, lo), 1)
    with pytest.raises(ValueError, match="risk"):
        build_policy({"name": "utility", "risk": 1.5})


def test_decision_carries_novelty_intervals_and_says_when_it_fell_back():
    pool = ModelPool.simulated()
    names = pool.names[:3]
    layer = DecisionLayer(build_policy({"name": "utility"}), pool)
    layer.fit(_est(np.full((2, len(names)), 0.5)))
    layer.models_ = list(names)
    q = np.array([[0.7, 0.6, 0.5], [0.2, 0.9, 0.3]])
    u = Uncertainty(
        novelty=np.array([0.95, 0.1]),
        shrink=np.array([0.9, 0.05]),
        lower=q - 0.1,
        upper=q + 0.1,
        prior_model=names[0],
    )
    p = np.tile(np.eye(1, 6), (2, 1))
    labels = ["classify", "code", "reason", "creative", "summarize", "qa"]
    d0, d1 = layer.decide(["novel prompt", "familiar prompt"], q, names, p, labels, uncertainty=u)
    assert d0.model == names[0] and d0.fell_back_to_prior and d0.novelty == pytest.approx(0.95)
    assert "fell back to the prior's best model" in d0.reason
    assert d0.quality_interval[names[1]] == pytest.approx((0.5, 0.7))
    assert d1.model == names[1] and not d1.fell_back_to_prior and "novel" not in d1.reason
    # a candidate subset: intervals over the candidates only
    d = layer.decide(["x"], q[:1, 1:], names[1:], p[:1], labels, uncertainty=Uncertainty(
        novelty=u.novelty[:1], shrink=u.shrink[:1], lower=u.lower[:1, 1:], upper=u.upper[:1, 1:],
        prior_model=names[0]))[0]  # fmt: skip
    assert set(d.quality_interval) == set(names[1:]) and not d.fell_back_to_prior


def test_proxy_header_reports_novelty():
    d = RoutingDecision(model="a", task="qa", task_confidence=0.9, predicted_quality={"a": 0.5}, reason="r")
    assert "x-router-novelty" not in decision_headers(d, 0.001)
    d.novelty = 0.8734
    assert decision_headers(d, 0.001)["x-router-novelty"] == "0.873"


def test_a_guard_carried_to_an_added_model_keeps_the_trained_columns_and_is_cautious_on_the_new(fitted):
    g, X, _ = fitted
    g2 = g.with_added_models([0.3])
    assert g2.prior_.shape == (3,) and g2.prior_[2] == 0.3
    np.testing.assert_array_equal(g2.prior_[:2], g.prior_)
    np.testing.assert_array_equal(g2.halfwidth_[:, :2], g.halfwidth_)
    np.testing.assert_array_equal(g2.halfwidth_[:, 2], g.halfwidth_.max(axis=1))  # the widest interval
    assert g2.prior_model == g.prior_model and g.prior_.shape == (2,)  # the original is unchanged
    q = np.tile([0.5, 0.6, 0.55], (5, 1))
    a, b = g.transform(X[:5], q[:, :2]), g2.transform(X[:5], q)
    np.testing.assert_array_equal(a.novelty, b.novelty)
    # a new column that never wins leaves the trained columns' guarded figures as they were
    np.testing.assert_allclose(g2.transform(X[:5], np.c_[q[:, :2], np.zeros(5)]).quality[:, :2], a.quality)
    assert b.quality.shape == (5, 3) and (b.lower <= b.upper).all()
    g3 = NoveltyGuard.load_state_dict(NoveltyGuard(**g2.get_params()), g2.state_dict())  # saved and read back
    np.testing.assert_array_equal(g3.halfwidth_, g2.halfwidth_)
    with pytest.raises(ValueError, match="prior must be finite values in"):
        g.with_added_models([1.5])


def test_trust_mode_defers_to_the_prior_where_the_predicted_gain_is_not_above_tau(fitted):
    g = copy.deepcopy(fitted[0])
    g.prior_ = np.array([0.6, 0.5, 0.4])  # model 0 is the prior's pick
    g.shrink_, g.margin_, g.trust_tau_ = np.zeros(2), np.zeros(3), np.array([0.02])
    q = np.array([[0.5, 0.9, 0.6], [0.5, 0.6, 0.9], [0.58, 0.62, 0.60], [0.9, 0.1, 0.1]])
    out, w = g._apply(q, np.zeros(4), trust=np.array([0.1, 0.02, -0.3, -0.3]))
    # row 0: trusted, the head's pick; rows 1-2: not above tau, the prior's model (row 2 not model 2
    # nor model 1: never a third model); row 3: the head already picks the prior's model
    assert np.argmax(out, axis=1).tolist() == [1, 0, 0, 0]
    assert w.tolist() == [0.0, 1.0, 1.0, 0.0]
    np.testing.assert_allclose(out[:, 0], q[:, 0])


def test_deferral_model_learns_when_the_head_is_worse():
    """Where the head's advantage is large its pick wins, where it is small it loses: the nested
    CV's AUROC is high and the refitted model keeps only the confident picks."""
    rng = np.random.default_rng(0)
    n, fam = 600, np.array([f"fam{i % 6}" for i in range(600)])
    adv = rng.uniform(0.0, 0.4, n)
    Q = np.column_stack([np.full(n, 0.5), 0.5 + adv])  # the head always leaves model 0 (the prior)
    good = adv > 0.2
    Y = np.column_stack([(~good).astype(float), good.astype(float)])
    Y[rng.random(n) < 0.1] = 0.5  # some ties
    F, nu, Yk = rng.random((n, 4)), rng.random(n), np.full((n, 2), 0.5)
    g = NoveltyGuard(mode="trust")
    parts = [(Q, F, nu, np.zeros(n, np.int64), Yk)] * 2
    g._fit_trust(parts, Y, fam, {f"fam{i}": i % 3 for i in range(6)}, lambda gi, gf: gi.mean() + gf.mean())
    assert g.cv_trust_auroc_ > 0.9
    t = g._trust_predict(g.trust_features(F, nu, Q, Yk, 0))
    kept = t > g.trust_tau_[0]
    assert kept[adv > 0.3].mean() > 0.9 and kept[adv < 0.1].mean() < 0.1


def test_trust_guard_round_trip_and_an_old_state_loads_without_it():
    X, Y, fam = _families()
    g = NoveltyGuard(folds=3, coverage=0.8, n_bins=2, mode="trust", features=EMB_FEATURES).fit(
        X, Y, fam, _fit_predict_for(X, Y)
    )
    assert len(g.trust_) and g.bank_y_.shape == (len(g.bank_), 2) and np.isfinite(g.cv_gain_).all()
    q = np.tile([0.1, 0.95], (len(X), 1))
    a = g.transform(X, q)
    back = NoveltyGuard(**g.get_params()).load_state_dict(g.state_dict())
    b = back.transform(X, q)
    np.testing.assert_allclose(a.trust, b.trust, atol=1e-6)
    np.testing.assert_allclose(a.quality, b.quality, atol=1e-6)
    assert set(np.argmax(a.quality, axis=1)) <= {1, g.prior_model}  # the head's pick or the prior's
    state = {k: v for k, v in g.state_dict().items() if not k.startswith(("trust", "bank_y", "cv_trust"))}
    old = NoveltyGuard(**{**g.get_params(), "mode": "shrink"}).load_state_dict(state)
    assert old.transform(X, q).trust is None
    bad = g.state_dict()
    bad["trust"] = bad["trust"][:-1]
    with pytest.raises(ValueError, match="deferral model"):
        NoveltyGuard(**g.get_params()).load_state_dict(bad)


def test_a_trust_guard_carried_to_an_added_model_reads_its_prior_as_the_neighbours_outcome():
    X, Y, fam = _families()
    g = NoveltyGuard(folds=3, coverage=0.8, n_bins=2, mode="trust", features=EMB_FEATURES).fit(
        X, Y, fam, _fit_predict_for(X, Y)
    )
    g2 = g.with_added_models([0.25])
    assert g2.bank_y_.shape == (len(g.bank_), 3)
    np.testing.assert_array_equal(g2.bank_y_[:, :2], g.bank_y_)
    assert (g2.bank_y_[:, 2] == 0.25).all()
    q = np.tile([0.1, 0.95, 0.0], (len(X), 1))  # the new column never wins: the old figures hold
    np.testing.assert_allclose(g2.transform(X, q).quality[:, :2], g.transform(X, q[:, :2]).quality)


def _formatted_families(seed: int = 0, n_fam: int = 6, per: int = 40, d: int = 16):
    """Families the embedding cannot tell apart (one cloud for all) whose prompts are written in
    different formats: only the text says which family a prompt comes from."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(200)]
    templates = [
        "Question: {a} {b}?\nA) {c}\nB) {a}\nAnswer:",
        "def {a}(x):\n    return x == {b}  # {c}",
        "Translate into French: the {a} of {b} and {c}.",
        "Q: what is 17 * 23 + {a}? Let's think step by step. {b}",
        "<|system|>You are a helpful assistant.<|user|>{a} {b} {c}",
        "TL;DR of this passage -- {a}; {b}; {c} --",
    ]
    texts, fam = [], []
    for f in range(n_fam):
        for _ in range(per):
            a, b, c = rng.choice(vocab, 3)
            texts.append(templates[f].format(a=a, b=b, c=c))
            fam.append(f"fam{f}")
    X = rng.normal(size=(len(texts), d)).astype(np.float32)
    Y = rng.binomial(1, 0.5, (len(texts), 2)).astype(float)
    return X, Y, np.array(fam), texts


def test_ngram_bank_sees_the_format_and_round_trips():
    bank = NgramBank("char").fit(["Question: what is 2+2?\nA) 3\nB) 4\nAnswer:", "def f(x):\n    return x"])
    d = bank.distances(["Question: what is 3+3?\nA) 5\nB) 6\nAnswer:", "Translate into French: hello"], k=2)
    assert d.shape == (2, 2) and (d[:, 0] <= d[:, 1] + 1e-6).all()
    assert d[0, 0] < 0.6 < d[1, 0]  # same template: near; another format: far
    np.testing.assert_allclose(bank.distances(["def f(x):\n    return x"], k=1)[0, 0], 0.0, atol=1e-5)
    back = NgramBank("char").load_state_dict(bank.state_dict(prefix="char_"), prefix="char_", n_bank=2)
    np.testing.assert_allclose(back.distances(["def g(y): return y"]), bank.distances(["def g(y): return y"]))
    state = bank.state_dict()
    state["idf"] = state["idf"][:10]
    with pytest.raises(ValueError, match="idf"):
        NgramBank("char").load_state_dict(state)
    with pytest.raises(ValueError, match="analyzer"):
        NgramBank("bytes")
    with pytest.raises(TypeError, match="sequence of strings"):
        bank.distances("one string")


def test_text_features_find_a_family_the_embedding_cannot_see():
    X, Y, fam, texts = _formatted_families()
    fp = _fit_predict_for(X, Y)
    # (not the family classifier's features: see test_family_classifier_features_are_biased_by_construction)
    emb = NoveltyGuard(folds=3, features=["nearest_dist", "knn_mean_dist", "local_scale"]).fit(X, Y, fam, fp)
    txt = NoveltyGuard(folds=3).fit(X, Y, fam, fp, texts=texts)
    assert txt.uses_text and not emb.uses_text and set(txt.ngrams_) == {"char", "word"}
    assert emb.cv_auroc_ < 0.7 < 0.9 < txt.cv_auroc_  # out-of-family prompts: only their text differs
    # a new format scores above the training formats, whatever the embedding says
    new = [f"Solve for x: 3x + {i} = 10. Show your work." for i in range(5)]
    seen = texts[:5]
    assert txt.novelty(X[:5], texts=new).min() > txt.novelty(X[:5], texts=seen).max()
    with pytest.raises(ValueError, match="texts="):
        txt.transform(X[:5], np.full((5, 2), 0.5))
    with pytest.raises(ValueError, match="texts="):
        NoveltyGuard(folds=3).fit(X, Y, fam, fp)
    with pytest.raises(ValueError, match="unknown novelty feature"):
        NoveltyGuard(features=["nearest_dist", "perplexity"])
    # saved and read back: plain arrays, the same scores; a carried guard keeps its text banks
    state = txt.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    back = NoveltyGuard(**txt.get_params()).load_state_dict(state)
    q = np.full((5, 2), 0.5)
    np.testing.assert_allclose(back.transform(X[:5], q, texts=new).novelty, txt.novelty(X[:5], texts=new))
    added = txt.with_added_models([0.4])
    np.testing.assert_allclose(added.novelty(X[:5], texts=new), txt.novelty(X[:5], texts=new))
    bad = dict(state)
    del bad["word_idf"]
    with pytest.raises(ValueError, match="word_idf"):
        NoveltyGuard(**txt.get_params()).load_state_dict(bad)
    # the state says which features its coefficients read: a later default cannot change it
    narrow = NoveltyGuard(folds=3, features=["nearest_dist", "word_nearest_dist"]).fit(
        X, Y, fam, fp, texts=texts
    )
    back = NoveltyGuard().load_state_dict(narrow.state_dict())
    assert back.feature_names == ("nearest_dist", "word_nearest_dist") and set(back.ngrams_) == {"word"}
    np.testing.assert_allclose(back.novelty(X[:5], texts=new), narrow.novelty(X[:5], texts=new))


def test_a_guard_saved_before_its_features_were_a_parameter_reads_the_four_embedding_ones():
    X, Y, fam = _families()
    g = NoveltyGuard(folds=3, n_bins=2, features=LEGACY_FEATURES).fit(X, Y, fam, _fit_predict_for(X, Y))
    state = {k: v for k, v in g.state_dict().items() if k != "bank_kdist"}  # what such a checkpoint holds
    params = {k: v for k, v in g.get_params().items() if k != "features"}
    old = NoveltyGuard(**params).load_state_dict(state)  # router.json without "features"
    assert old.feature_names == LEGACY_FEATURES and not old.uses_text
    np.testing.assert_allclose(old.novelty(X[:20]), g.novelty(X[:20]))


def test_family_energy_is_an_opt_in_feature_that_round_trips():
    from router_ml.predictors.guard import DEFAULT_FEATURES

    assert "family_energy" not in DEFAULT_FEATURES and FEATURES[-1] == "family_energy"
    X, Y, fam = _families(n_fam=5)
    feats = ["nearest_dist", "knn_mean_dist", "local_scale", "family_energy"]
    g = NoveltyGuard(folds=3, family_folds=-1, n_bins=2, features=feats).fit(
        X, Y, fam, _fit_predict_for(X, Y)
    )
    coef, icpt = g.fam_coef_, g.fam_intercept_
    Z = (X[:3] / np.linalg.norm(X[:3], axis=1, keepdims=True)) @ coef.T + icpt
    F = g._served_features(X[:3], None, "test")[0]
    np.testing.assert_allclose(F[:, -1], -np.log(np.exp(Z).sum(axis=1)), rtol=1e-5)
    state = g.state_dict()
    assert state["feature_index"].tolist()[-1] == len(FEATURES) - 1
    back = NoveltyGuard(**{**g.get_params(), "features": None}).load_state_dict(state)  # saved indices decide
    assert back.feature_names == tuple(feats)
    np.testing.assert_allclose(back.novelty(X[:20]), g.novelty(X[:20]), atol=1e-6)


def test_family_classifier_features_are_biased_by_construction():
    """Why the default score leaves the family classifier out: its out-of-family rows are scored by a
    classifier over fewer families than its in-distribution rows (and than the served one), so its
    confidence tells the two kinds of rows apart even where nothing else does (here: one cloud of
    random embeddings, all families alike) and the score learns a rule that fails on new prompts."""
    X, Y, fam, _ = _formatted_families()
    fp = _fit_predict_for(X, Y)
    fam_only = NoveltyGuard(folds=3, features=["family_1_minus_top_prob", "family_entropy"]).fit(
        X, Y, fam, fp
    )
    dist = NoveltyGuard(folds=3, features=["nearest_dist", "knn_mean_dist", "local_scale"]).fit(X, Y, fam, fp)
    assert fam_only.cv_auroc_ > 0.9 and dist.cv_auroc_ < 0.7
    assert not {"family_1_minus_top_prob", "family_entropy"} & set(NoveltyGuard().feature_names)


def test_the_guard_is_fitted_on_the_calibrated_scale_it_is_served_on():
    """``calibrate`` (the router's calibrator) maps the out-of-fold estimates before anything is
    fitted on them: the margin and its routed gain, and the intervals' residuals, are those of the
    calibrated estimates the router serves the guard; the novelty score reads the prompts only."""
    X, Y, fam = _families()
    fp = _fit_predict_for(X, Y)
    seen = []

    def flat(Q):  # an isotonic fit flattens estimates into steps; this one into a single step
        seen.append(Q.shape)
        return np.full_like(Q, 0.5)

    def mute(Q):  # a calibrator that never lets model 1 lead
        return np.column_stack([Q[:, 0], np.zeros(len(Q))])

    kw = {"folds": 3, "coverage": 0.8, "n_bins": 2, "features": EMB_FEATURES, "mode": "margin"}
    raw = NoveltyGuard(**kw).fit(X, Y, fam, fp)
    same = NoveltyGuard(**kw).fit(X, Y, fam, fp, calibrate=lambda Q: Q)
    muted = NoveltyGuard(**kw).fit(X, Y, fam, fp, calibrate=mute)
    cal = NoveltyGuard(**kw).fit(X, Y, fam, fp, calibrate=flat)
    assert seen == [Y.shape, Y.shape]  # the out-of-family and the in-distribution estimates
    np.testing.assert_array_equal(same.halfwidth_, raw.halfwidth_)
    np.testing.assert_array_equal(same.margin_, raw.margin_)
    assert raw.prior_model == 0 and raw.cv_gain_[0] > 0.02  # the head's picks of model 1 pay
    # calibrated, model 1 never leads: in distribution every pick is the best single model's (out
    # of family a fold's best single model may be model 1, and model 0 beats it on its losing families)
    assert muted.cv_gain_[0] == 0.0
    np.testing.assert_array_equal(cal.nov_coef_, raw.nov_coef_)
    assert not np.allclose(cal.halfwidth_, raw.halfwidth_)


@pytest.mark.parametrize("mode", ["shrink", "margin"])
def test_keep_in_distribution_holds_the_heads_own_gain_in_distribution(mode):
    # overlapping families and out-of-family losses priced high: the summed objective gives up
    # in-distribution gain for safety out of family (shrink, below); the constraint may not
    X, Y, fam = _families(win_every=3, spread=1.0)
    head, calls = _fit_predict_for(X, Y), []

    def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        calls.append((tr, te, q := head(tr, te)))
        return q

    kw = {"folds": 3, "coverage": 0.8, "n_bins": 2, "mode": mode, "features": EMB_FEATURES}
    kw.update(family_loss_weight=20.0, shrink_floor=True)
    g = NoveltyGuard(**kw, keep_in_distribution=0.0).fit(X, Y, fam, fit_predict)
    # the random (in-distribution) folds come last: the head's own out-of-fold gain there
    Qi, bi = np.zeros_like(Y), np.zeros(len(Y), np.int64)
    for tr, te, q in calls[-3:]:
        Qi[te], bi[te] = q, np.argmax(np.nanmean(Y[tr], axis=0))
    raw = routed_gain(Qi, Y, bi).mean()
    assert g.cv_gain_[0] >= raw - 1e-12
    if mode == "shrink":
        summed = NoveltyGuard(**kw).fit(X, Y, fam, head)
        assert summed.cv_gain_[0] < raw - 0.01  # what the constraint prevents
    with pytest.raises(ValueError, match="keep_in_distribution"):
        NoveltyGuard(mode="trust", keep_in_distribution=0.01)
    with pytest.raises(ValueError, match="keep_in_distribution"):
        NoveltyGuard(keep_in_distribution=-1.0)


def test_guard_with_layers_reads_each_block_at_unit_length():
    X, Y, fam = _families(win_every=3)
    rng = np.random.default_rng(1)
    L = X @ rng.normal(size=(X.shape[1], X.shape[1])).astype(np.float32) * 50.0  # a "layer", far larger
    wide = np.hstack([X, L]).astype(np.float32)
    kw = {"folds": 3, "coverage": 0.8, "n_bins": 2, "mode": "shrink", "features": EMB_FEATURES}
    g = NoveltyGuard(**kw, layers=[3]).fit(wide, Y, fam, _fit_predict_for(X, Y))
    # the bank: each block at unit length over sqrt(2), so no block outweighs the other
    B = g.bank_.reshape(len(g.bank_), 2, -1)
    np.testing.assert_allclose(np.linalg.norm(B, axis=2), np.sqrt(0.5), atol=1e-5)
    nu = g.novelty(wide[:7])
    np.testing.assert_allclose(g.novelty(wide[:1]), nu[:1], atol=1e-7)  # one prompt as in a batch
    # a prompt far away in the layer block alone is newer than it was
    moved = wide[:7].copy()
    moved[:, X.shape[1] :] = rng.normal(size=(7, X.shape[1])) * 50.0
    assert g.novelty(moved).mean() > nu.mean()
    with pytest.raises(ValueError, match="fitted on 32"):
        g.novelty(X[:3])
    with pytest.raises(ValueError, match="equal blocks"):
        NoveltyGuard(**kw, layers=[3, 4]).fit(wide, Y, fam, _fit_predict_for(X, Y))
    # saved and loaded with its params, the guard reads the same blocks
    again = NoveltyGuard(**g.get_params()).load_state_dict(g.state_dict())
    np.testing.assert_allclose(again.novelty(wide[:7]), nu, atol=1e-12)


def test_auto_mode_keeps_whichever_of_margin_and_shrink_routes_the_out_of_fold_rows_better():
    kw = dict(folds=3, coverage=0.8, n_bins=2, features=EMB_FEATURES, shrink_floor=True)
    for win_every in (2, 3):
        X, Y, fam = _families(win_every=win_every)
        fits = {
            m: NoveltyGuard(mode=m, **kw).fit(X, Y, fam, _fit_predict_for(X, Y))
            for m in ("margin", "shrink", "auto")
        }
        auto = fits["auto"]
        # the same out-of-fold rows and objective as the single-mode fits
        assert auto.cv_objective_ == pytest.approx(
            {m: fits[m].cv_objective_[m] for m in ("margin", "shrink")}
        )
        won = max(auto.cv_objective_, key=auto.cv_objective_.get)
        np.testing.assert_array_equal(auto.margin_, fits[won].margin_)
        np.testing.assert_array_equal(auto.shrink_, fits[won].shrink_)
        np.testing.assert_allclose(auto.cv_gain_, fits[won].cv_gain_)
        assert auto.fitted_mode in (won, "none")
        # what serves is the state alone: a reloaded auto guard routes as the winner does
        back = NoveltyGuard(mode="shrink", n_bins=2, features=EMB_FEATURES).load_state_dict(auto.state_dict())
        q = np.tile([0.1, 0.95], (5, 1))
        np.testing.assert_allclose(
            back.transform(X[:5] + 40.0, q).quality, fits[won].transform(X[:5] + 40.0, q).quality
        )
