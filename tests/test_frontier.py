"""Frontier metrics on small hand-computed examples: NDCH, AIQ, Zero router, cost to reach,
PGR/APGR/CPT (RouteLLM) and the seed CI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from router_ml.decision.hull import ndch
from router_ml.evaluation.frontier import (
    aiq,
    apgr,
    cost_to_reach,
    cpt,
    hull_quality,
    mean_ci,
    pgr,
    zero_router,
)


def _hull(cost, quality):
    hx, hy = ndch(np.array(cost, float), np.array(quality, float))
    return hx.tolist(), hy.tolist()


def test_ndch_drops_a_dominated_point() -> None:
    # (3, 0.7) costs more than (2, 0.9) and is worse
    assert _hull([1, 2, 3], [0.6, 0.9, 0.7]) == ([1, 2], [0.6, 0.9])
    # a cheaper-and-better point dominates everything after it
    assert _hull([0, 1, 2], [0.5, 0.3, 0.4]) == ([0], [0.5])


def test_ndch_drops_a_non_convex_middle_point() -> None:
    # at cost 1 the mix of (0, 0) and (2, 1) gives 0.5 > 0.2
    assert _hull([0, 1, 2], [0.0, 0.2, 1.0]) == ([0, 2], [0.0, 1.0])
    # above the chord it stays; on the chord it is redundant
    assert _hull([0, 1, 2], [0.0, 0.8, 1.0]) == ([0, 1, 2], [0.0, 0.8, 1.0])
    assert _hull([0, 1, 2], [0.0, 0.5, 1.0]) == ([0, 2], [0.0, 1.0])


def test_ndch_sorts_ties_and_flat_tops() -> None:
    # unsorted input, two points at one cost (the better counts), a flat top (cheapest end kept)
    assert _hull([2, 0, 1, 1, 3], [0.9, 0.2, 0.3, 0.7, 0.9]) == ([0, 1, 2], [0.2, 0.7, 0.9])
    assert _hull([5.0], [0.4]) == ([5.0], [0.4])


def test_ndch_is_the_upper_envelope_of_all_mixes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        c, q = rng.random(12), rng.random(12)
        hx, hy = ndch(c, q)
        assert np.all(np.diff(hx) > 0) and np.all(np.diff(hy) > 0)
        grid = np.linspace(c.min(), c.max(), 101)
        # best quality reachable at cost <= x by mixing any two points (or one point), by brute force
        best = np.full(grid.shape, -np.inf)
        for i, j in itertools.product(range(12), repeat=2):
            lo, hi = min(c[i], c[j]), max(c[i], c[j])
            qi, qj = (q[i], q[j]) if c[i] <= c[j] else (q[j], q[i])
            at = np.clip(grid, lo, hi)
            val = qi if hi == lo else qi + (qj - qi) * (at - lo) / (hi - lo)
            best = np.maximum(best, np.where(grid >= lo, val, -np.inf))
        np.testing.assert_allclose(hull_quality(hx, hy, grid), best, atol=1e-12)


def test_hull_quality_interpolates_and_extends_flat() -> None:
    hx, hy = np.array([1.0, 3.0]), np.array([0.5, 0.9])
    out = hull_quality(hx, hy, np.array([0.5, 1.0, 2.0, 3.0, 10.0]))
    assert np.isnan(out[0])  # below the cheapest configuration: unreachable
    np.testing.assert_allclose(out[1:], [0.5, 0.7, 0.9, 0.9])
    with pytest.raises(ValueError, match="strictly increasing"):
        hull_quality(np.array([3.0, 1.0]), hy, 2.0)


def test_aiq_of_a_flat_line_is_its_quality() -> None:
    assert aiq([0.0, 2.0], [0.7, 0.7], cost_range=(0.0, 5.0)) == pytest.approx(0.7)
    assert aiq([1.0], [0.4], cost_range=(1.0, 3.0)) == pytest.approx(0.4)


def test_aiq_two_single_models_and_their_mix() -> None:
    cost, quality = np.array([1.0, 3.0]), np.array([0.5, 0.9])
    cr = (1.0, 3.0)
    assert aiq(cost[:1], quality[:1], cr) == pytest.approx(0.5)  # the cheap model alone, flat
    assert aiq(cost[1:], quality[1:], cr) == pytest.approx(0.0)  # the dear one only exists at c_max
    zc, zq = zero_router(cost, quality)
    assert (zc.tolist(), zq.tolist()) == ([1.0, 3.0], [0.5, 0.9])
    assert aiq(zc, zq, cr) == pytest.approx(0.7)  # the random mix: the mean of the segment
    # a router with a point above the mixing line beats the Zero router
    r = aiq([1.0, 2.0, 3.0], [0.5, 0.85, 0.9], cr)
    assert r == pytest.approx(((0.5 + 0.85) / 2 + (0.85 + 0.9) / 2) / 2)
    assert r > aiq(zc, zq, cr)
    # RouterBench's calc_AIQ convention: range from 0, nothing before the cheapest point
    assert aiq(cost, quality, (0.0, 3.0)) == pytest.approx(2 * 0.7 / 3)


def test_aiq_clips_to_the_cost_range() -> None:
    assert aiq([2.0], [0.6], (0.0, 4.0)) == pytest.approx(0.6 * 2 / 4)  # starts late: 0 before
    assert aiq([0.0, 4.0], [0.0, 1.0], (0.0, 2.0)) == pytest.approx(0.25)  # cut at c_max
    assert aiq([0.0, 4.0], [0.0, 1.0], (2.0, 4.0)) == pytest.approx(0.75)  # starts inside the hull
    assert aiq([5.0], [0.9], (0.0, 4.0)) == 0.0
    with pytest.raises(ValueError, match="cost_range"):
        aiq([0.0], [0.5], (1.0, 1.0))


def test_cost_to_reach_interpolates_on_the_hull() -> None:
    cost, quality = [1.0, 3.0, 4.0, 2.0], [0.5, 0.9, 0.8, 0.55]  # (2, .55) under the chord, (4, .8) dominated
    assert cost_to_reach(cost, quality, 0.7) == pytest.approx(2.0)
    assert cost_to_reach(cost, quality, 0.9) == pytest.approx(3.0)
    assert cost_to_reach(cost, quality, 0.4) == pytest.approx(1.0)  # the cheapest point already does
    assert np.isnan(cost_to_reach(cost, quality, 0.95))


def test_pgr() -> None:
    assert pgr(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert pgr(0.5, 0.5, 0.9) == 0.0 and pgr(0.9, 0.5, 0.9) == 1.0
    assert np.isnan(pgr(0.7, 0.6, 0.6))


def test_apgr_references() -> None:
    qw, qs = 0.5, 0.9
    share = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    assert apgr(share, np.full(5, qw), qw, qs) == pytest.approx(0.0)  # never better than weak
    assert apgr(share, np.full(5, qs), qw, qs) == pytest.approx(1.0)  # strong quality at any share
    assert apgr(share, qw + share * (qs - qw), qw, qs) == pytest.approx(0.5)  # random: the straight line
    # only interior points: (0, qw) and (1, qs) are added, so the straight line again
    assert apgr([0.5], [0.7], qw, qs) == pytest.approx(0.5)
    # by hand: AUC = 0.25 * (0.5 + 0.8) / 2 + 0.75 * (0.8 + 0.9) / 2 = 0.8 -> (0.8 - 0.5) / 0.4
    assert apgr([0.25, 0.0, 1.0], [0.8, 0.5, 0.9], qw, qs) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apgr([0.5, 1.5], [0.7, 0.9], qw, qs)


def test_cpt() -> None:
    qw, qs = 0.5, 0.9
    share = np.linspace(0, 1, 11)
    for p in (0.2, 0.5, 0.8):
        assert cpt(share, qw + share * (qs - qw), qw, qs, p) == pytest.approx(p)
    # concave curve: 0.7 is reached inside the first segment; same as RouteLLM's np.interp
    s, q = [0.0, 0.5, 1.0], [0.5, 0.85, 0.9]
    assert cpt(s, q, qw, qs, 0.5) == pytest.approx(0.5 * 0.2 / 0.35)
    assert cpt(s, q, qw, qs, 0.5) == pytest.approx(np.interp(0.7, q, s))
    # a bumpy curve: the first crossing (np.interp is undefined on non-increasing quality)
    assert cpt([0.0, 0.2, 0.6, 1.0], [0.5, 0.8, 0.7, 0.9], qw, qs, 0.5) == pytest.approx(0.2 * 0.2 / 0.3)
    assert cpt([0.0, 0.5], [0.5, 0.95], qw, qs, 0.0) == 0.0
    assert np.isnan(cpt(s, q, qw, qs, 1.2))  # above the strong model: never reached


def test_mean_ci() -> None:
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0, np.nan])
    half = 4.302652729911275 / np.sqrt(3)  # t(0.975, df=2) * sd 1 / sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert mean_ci([1.0, 2.0, 3.0], alpha=0.5)[2] < hi  # a narrower interval at a lower level
    m, lo1, hi1 = mean_ci([0.4])
    assert m == 0.4 and np.isnan(lo1) and np.isnan(hi1)
    assert all(np.isnan(mean_ci([np.nan, np.nan])))


def test_bad_points_are_refused() -> None:
    with pytest.raises(ValueError, match="same length"):
        ndch([1.0, 2.0], [0.5])
    with pytest.raises(ValueError, match="empty"):
        ndch([], [])
    with pytest.raises(ValueError, match="finite"):
        aiq([1.0, np.nan], [0.5, 0.6], (0.0, 2.0))
