"""A router that knows when it does not know: novelty, a margin before leaving the prior, intervals.

:class:`NoveltyGuard` sits after a quality head (and its calibrator). Per prompt it gives

- ``novelty`` in [0, 1]: the probability that the prompt comes from a task family the router never
  trained on. Features (:data:`FEATURES`; ``features`` picks, default :data:`DEFAULT_FEATURES`):
  from the embedding (one matrix product against a stored bank of training embeddings) the cosine
  distance to the nearest and the mean distance to the ``k`` nearest bank prompts, and a local
  scale (the distance to the ``k``-th neighbour over those neighbours' own ``k``-th neighbour
  distance, as LOF: a dense family's prompts sit closer together than a sparse one's); from the
  prompt's text, the same two distances in hashed character and word n-gram TF-IDF spaces
  (:class:`~router_ml.predictors.ngram_bank.NgramBank`), which see a benchmark's format that the
  sentence embedding blurs. A logistic regression on these features is fitted to tell out-of-family
  prompts (family-grouped cross-validation) from in-distribution ones (random folds). The top
  probability and entropy of a linear classifier over the training families are still computed
  (the deferral model reads them) but left out of the default score: its out-of-family rows are
  scored by a classifier over fewer families than the in-distribution rows and the served prompts,
  so they separate the two kinds of rows by construction (with two training families the held-out
  fold's classifier has one class and is always certain) and the score learned a rule that
  inverted on new prompts;
- a decision guard against the conservative prior ``prior_`` (the training pool's per-model mean
  quality, whose argmax is the best single model). In ``mode="margin"`` the head's
  estimates are kept, but every model other than the prior's is lowered by a novelty margin::

      m(nu) = a + b * max(nu - t, 0);  q'_j = q_j - m(nu) for j != prior model

  so the router keeps the head's pick only where its predicted advantage over the best single
  model exceeds ``m(nu)``, and otherwise routes to the best single model: never a third model that
  is neither (pulling estimates part-way toward the prior can pick one). Below the novelty floor
  ``t`` the margin is the constant ``a`` (in distribution nothing else changes). ``(a, b, t)`` are
  chosen on a grid (``t`` among quantiles of the in-distribution novelty) to maximise the routed
  quality of the out-of-fold predictions (in-distribution plus out-of-family, losses on held-out
  families counted more), so the margin is fitted by CV on held-out families, never hand-set.
  ``mode="shrink"`` (the default: it measured better under leave-one-family-out, README; and a
  checkpoint saved before the margin existed) blends instead::

      w = clip(w_id + (w_novel - w_id) * max(novelty - t, 0) / (1 - t), 0, 1);  q' = (1 - w) * q + w * prior
      q''_j = q'_j - (k_id + (k_novel - k_id) * novelty) * spread_j

  (the second line in ``mode="spread"`` only) where ``spread_j`` (:func:`family_spread`) is the standard deviation over the training families of
  model ``j``'s per-family mean score minus the best single model's: on a family never seen, a
  model's advantage is the head's estimate plus a family effect of about that size, so a model whose
  lead swings from family to family (strong on some benchmarks, failing another's format) must
  predict a larger lead to be picked than a steady one (a lower bound on the advantage). The spread
  of the best single model is 0, so it keeps its estimate. ``(w_id, w_novel, k_id, k_novel)`` (and
  with ``shrink_floor`` the novelty floor ``t``, among the same quantiles as the margin's; else 0)
  are chosen by the same objective, each fold's rows measured against the prior and the spreads of
  that fold's training part. ``mode="trust"`` learns the decision
  instead of hand-shaping it: a deferral model (ridge regression on standardised per-prompt
  features and their pairwise products, :data:`TRUST_FEATURES`: the novelty features and score, the
  head's predicted advantage of its pick over the prior's model, its top-two gap, the pick's and the
  prior's predicted quality, and the disagreement of a free second head, the mean outcome of the
  ``k`` nearest bank prompts, with the pick) predicts the gain in score of the head's pick over the
  prior's model; the router keeps the pick only where that prediction exceeds a threshold ``tau``,
  otherwise it routes to the prior's model (never a third model). It is fitted on the out-of-fold
  rows where the head leaves the prior's model (in distribution and out of family); its ridge
  strength and ``tau`` are chosen by a nested leave-family-group-out CV of the deferral model itself
  (every out-of-fold row of the held-out families, in-distribution ones included, predicted by a
  deferral model fitted on the other families' rows) with the same objective, then it is refitted
  on every row;
  ``mode="auto"`` fits both the margin and the shrinkage (its floor too with ``shrink_floor``) on
  the same out-of-fold rows and keeps whichever scores higher on the same objective
  (:attr:`NoveltyGuard.fitted_mode` says which), since neither wins on every data set (README
  "Routing under shift": leaving one family out, the shrinkage cost 0.31 points on llmrouter_ulab,
  the margin 0.0013 of AIQ on MMLU-Pro);
- what "routes better" means: the score of the out-of-fold picks against the prior's model at
  the top (the best quality regardless of cost); where ``fit`` is given the training prompts'
  costs (the main job and the shift harness give them), rules that tie there are told apart by
  the utility the policy realises over a range of willingness to pay (:class:`UtilityGain`), each
  pick against the single model the prior picks at that price (lexicographic: the frontier breaks
  ties at the top and never buys utility with top quality; a weighted sum of the two, measured,
  gave up 0.3 points at the top leaving one llmrouter family out, README "Routing under shift";
  ``mode="auto"`` takes the margin only where it is better at the top).
  A head that ties the best single model at the top can still cost quality at a budget: on
  ZeroEval, leaving one task out, a guard fitted at the top alone left the frontier 0.0011 of AIQ
  below the Zero router's, where the prior alone matches it. The margin lowers every model but the
  prior's top one, so it keeps that (dear) model at every budget where the head is not trusted;
  the shrinkage moves toward the prior's own frontier. ``mode="trust"`` is fitted at the top only;
- a split-conformal interval per model: ``q' ± h``, ``h`` the smoothed (randomised) finite-sample
  ``coverage`` quantile of ``|y - q'|`` over the out-of-fold rows of that cell (Mondrian cells:
  the novelty bin, so the intervals widen with novelty where the errors do, and with ``q_bins > 1``
  a bin of the model's own guarded estimate ``q'``: the residual of a {0, 1} outcome is ``q'`` or
  ``1 - q'``, so its quantile depends on where the estimate sits, and one quantile per novelty bin
  over-covered where the served estimates sat nearer 0.5 than the out-of-fold ones; README "Routing
  under shift"): ``halfwidth_[cell, j]`` where the prompt's coin (:func:`prompt_uniform`, a hash
  of its embedding) falls below ``halfwidth_p_[cell, j]``, else ``halfwidth_low_[cell, j]``
  (:func:`smoothed_halfwidths`: exact coverage where {0, 1} outcomes around a shrunk estimate tie
  the residuals and the plain quantile covers one outcome or both). ``intervals`` picks the rows
  (:data:`INTERVALS`: all out-of-fold rows, or the out-of-family ones, optionally each family
  weighted equally, or the wider of the two kinds); all rows measured best (README).

The conformal quantiles are computed here rather than with MAPIE: they are one quantile per
(model, Mondrian cell) of residuals that the family-grouped CV already produced, whereas MAPIE
conformalises a fitted estimator on a calibration set it predicts itself (one per output column),
and would add a dependency to the serving path for a ``np.quantile`` and the coin of
:func:`smoothed_halfwidths` (its documented regression intervals use the deterministic quantile).

``fit`` takes the head as a callable ``fit_predict(train_rows, test_rows) -> (k, m)`` so this
module stays below the training code; state is plain arrays (``state_dict``), no pickle. The
out-of-fold predictions are the head's own, mapped by the router's calibrator (fitted once, on the
head's out-of-fold predictions over the training prompts) before anything is fitted on them: the
router applies the guard after its calibrator, so the guard is fitted on the scale it is served.
The novelty features of the out-of-fold rows are measured against their fold's training part, the served ones against the full bank (slightly nearer neighbours).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router_ml.predictors.base import BasePredictor, check_state, few_rows_blas
from router_ml.predictors.ngram_bank import NgramBank

log = logging.getLogger(__name__)

#: ``fit_predict(train_rows (a,), test_rows (b,)) -> (b, m)`` out-of-fold quality predictions
FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]

GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: ``mode="spread"``: how many family-level standard deviations a model's advantage must clear
SPREAD_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
MODES = ("shrink", "spread", "margin", "trust", "auto")
#: margin grid (quality points on [0, 1]): base ``a`` and slope ``b`` of m(nu) = a + b * max(nu - t, 0)
MARGIN_BASE = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0)
MARGIN_SLOPE = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: ``mode="trust"``: ridge strengths and thresholds ``tau`` on the predicted gain (score on [0, 1])
TRUST_ALPHA = (1.0, 10.0, 100.0, 1000.0)
TRUST_TAU = (-1.0, -0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 2.0)
#: the deferral model's base features (before standardising and pairwise products)
TRUST_FEATURES = (
    "nearest_dist",
    "knn_mean_dist",
    "family_1_minus_top_prob",
    "family_entropy",
    "novelty",
    "head_advantage",  # q[pick] - q[prior]
    "head_top2_gap",
    "head_q_pick",
    "head_q_prior",
    "knn_advantage",  # mean outcome of the k nearest bank prompts: y[pick] - y[prior]
    "knn_agrees",  # argmax of that mean outcome == the head's pick
)
#: every novelty feature, in the columns of the feature matrix (:meth:`NoveltyGuard._features`): from
#: the embedding (one product against the bank): cosine distance to the nearest and mean distance
#: to the ``k`` nearest bank prompts, 1 - top probability and normalised entropy of the family
#: classifier, the local scale (distance to the ``k``-th neighbour over those neighbours' own
#: ``k``-th neighbour distance in the bank, as LOF); from the text (:class:`NgramBank`): the same two
#: distances in hashed character n-gram and word n-gram TF-IDF spaces, which see a format; the
#: family classifier's energy (-logsumexp of its logits: low where some family's logit is high),
#: appended last so a saved guard's feature indices keep their meaning
FEATURES = (
    "nearest_dist",
    "knn_mean_dist",
    "family_1_minus_top_prob",
    "family_entropy",
    "local_scale",
    "char_nearest_dist",
    "char_knn_mean_dist",
    "word_nearest_dist",
    "word_knn_mean_dist",
    "family_energy",
)
#: what a guard saved before ``features`` existed reads (and the deferral model's novelty features)
LEGACY_FEATURES = FEATURES[:4]
#: the default score's features (README, "Routing under shift": measured per data set). Not the family
#: classifier's: its out-of-family training rows are scored by a classifier over fewer families than
#: its in-distribution rows and the served prompts, so its confidence separates the two kinds of
#: rows by construction and the score learns a rule that inverts on new prompts
DEFAULT_FEATURES = ("nearest_dist", "knn_mean_dist", "local_scale", *FEATURES[5:9])
#: text spaces, by the prefix of their features
TEXT_SPACES = ("char", "word")
#: how the conformal table reads the out-of-fold residuals (``intervals``): ``pooled`` every row, in
#: distribution and out of family alike; ``family`` the out-of-family rows only; ``wider`` per bin and
#: model the wider of the two kinds' intervals; ``*_equal`` each held-out family the same weight
INTERVALS = ("pooled", "family", "family_equal", "wider", "wider_equal")
#: novelty floors ``t``: these quantiles of the in-distribution out-of-fold novelty (and 0)
FLOOR_QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99)
#: willingness to pay the frontier averages over where ``fit`` is given the calls' costs:
#: ``lam = x / ref`` (``ref`` the fold's best single model's mean $ per request), so utility =
#: score - x * $ / ref: at x = 0.01 that model's whole price is worth one point of score (quality
#: first), at x = 100 a hundredth of it outweighs the whole score scale (price first)
LAM_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def _unit(A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float32)
    return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)


def _softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def _fill(Y: np.ndarray) -> np.ndarray:
    """``Y`` with each NaN outcome replaced by its column's mean (0 for an all-NaN column)."""
    mu = np.nan_to_num(np.nanmean(np.where(np.isnan(Y).all(axis=0), 0.0, Y), axis=0), nan=0.0)
    return np.where(np.isnan(Y), mu[None, :], Y)


def conformal_halfwidth(residuals: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile of ``|residuals|`` (NaN ignored): the ``ceil((n+1) coverage)``-th
    smallest, so a new exchangeable residual falls within it with probability >= ``coverage``;
    ``inf`` when there are too few residuals for that."""
    r = np.sort(np.abs(residuals[~np.isnan(residuals)]))
    k = int(np.ceil((len(r) + 1) * coverage))
    return float(r[k - 1]) if 0 < k <= len(r) else float("inf")


def family_spread(Y: np.ndarray, families: np.ndarray, best: int) -> np.ndarray:
    """(m,) the standard deviation over ``families`` of each model's per-family mean score minus
    column ``best``'s (0 for ``best``; 0 everywhere with fewer than two families): how far a model's
    advantage over the best single model moves from one task family to the next."""
    names = np.unique(families)
    if len(names) < 2:
        return np.zeros(Y.shape[1])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a model without outcomes on a family
        M = np.vstack([np.nanmean(Y[families == f], axis=0) for f in names])
        return np.nan_to_num(np.nanstd(M - M[:, [best]], axis=0, ddof=1), nan=0.0)


def smoothed_halfwidths(
    residuals: np.ndarray, coverage: float, weights: np.ndarray | None = None
) -> tuple[float, float, float]:
    """The smoothed (randomised) split-conformal quantile of ``|residuals|`` (NaN ignored):
    ``(h_low, h_high, p)``; a half-width of ``h_high`` with probability ``p`` and ``h_low`` otherwise
    holds a new exchangeable residual with probability exactly ``coverage``. ``h_high`` is
    :func:`conformal_halfwidth`'s quantile; the coin matters where residuals tie, as they do for
    {0, 1} outcomes around a near-constant estimate (a prompt shrunk all the way to the prior), where
    the deterministic quantile covers either one outcome or both and the coverage jumps.
    ``weights`` (same shape, >= 0): a weighted quantile (each residual counts ``weights``, rescaled
    to a mean of 1, and the new one 1), e.g. each task family the same total weight whatever its
    row count. ``(inf, inf, 1)`` when there are too few residuals."""
    residuals = np.asarray(residuals, np.float64)
    ok = ~np.isnan(residuals)
    r = np.abs(residuals[ok])
    w = np.ones(len(r)) if weights is None else np.asarray(weights, np.float64)[ok]
    if not len(r) or not w.sum() > 0:
        return float("inf"), float("inf"), 1.0
    w = w * (len(r) / w.sum())
    target = (len(r) + 1) * coverage
    if target > len(r) + 1e-9:
        return float("inf"), float("inf"), 1.0
    vals, inv = np.unique(r, return_inverse=True)
    c = np.cumsum(np.bincount(inv, weights=w, minlength=len(vals)))
    j = min(int(np.searchsorted(c, target - 1e-9)), len(vals) - 1)  # the first value whose mass reaches it
    c_low, h_low = (float(c[j - 1]), float(vals[j - 1])) if j > 0 else (0.0, 0.0)
    return h_low, float(vals[j]), float(min(max((target - c_low) / (c[j] - c_low), 0.0), 1.0))


def prompt_uniform(X: np.ndarray) -> np.ndarray:
    """(n,) a uniform number in [0, 1) per row of ``X (n, d)``, a hash of the row's float32 bytes: the
    smoothed conformal coin, the same for the same prompt every time it is asked."""
    import hashlib

    X = np.ascontiguousarray(np.asarray(X, np.float32))
    return np.array(
        [int.from_bytes(hashlib.blake2b(x.tobytes(), digest_size=8).digest(), "little") / 2.0**64 for x in X]
    )


def shrink_weight(nu: np.ndarray, shrink: Sequence[float]) -> np.ndarray:
    """(n,) weight of the prior at novelty ``nu`` for ``shrink`` = ``(w_id, w_novel[, t])``: ``w_id``
    up to the novelty floor ``t`` (default 0), then linear to ``w_novel`` at novelty 1."""
    w0, w1, t = (*(float(v) for v in shrink), 0.0)[:3]
    r = np.maximum(np.asarray(nu, np.float64) - t, 0.0) / max(1.0 - t, 1e-9)
    return np.clip(w0 + (w1 - w0) * r, 0.0, 1.0)


def margin_lowered(q: np.ndarray, m: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``q (n, m)`` with every model but the prior's (column ``prior (n,)``) lowered by the margin
    ``m (n,)``: its argmax is the head's pick where that leads the prior's model by more than
    ``m``, else the prior's model (never a third one)."""
    r = np.arange(len(q))
    out = q - m[:, None]
    out[r, prior] = q[r, prior]
    return out


def routed_gain(q: np.ndarray, Y: np.ndarray, best: np.ndarray) -> np.ndarray:
    """(n,) score of the argmax of ``q`` minus the score of column ``best`` (n,), per row; NaN
    outcomes count as 0."""
    r = np.arange(len(q))
    Y0 = np.nan_to_num(Y, nan=0.0)
    return Y0[r, np.argmax(q, axis=1)] - Y0[r, best]


class UtilityGain:
    """Per-row gain of a router's picks over the conservative prior's, at the top and over the frontier.

    ``top(q)`` is ``(n,)``: the score of the argmax of ``q`` minus that of column ``best``
    (:func:`routed_gain`, willingness to pay 0, the best quality regardless of cost).
    ``frontier(q)`` (where ``cost (n, m)`` is given) is ``(n,)``: the mean over :data:`LAM_GRID` of
    the realised utility (score minus ``lam`` x $) of the argmax of ``q - lam * cost`` minus that of
    ``prior - lam * cost`` (the single model the prior picks at that willingness to pay: what the
    utility policy serves with no head), ``lam = x / ref_cost`` per row, each divided by ``1 + x``
    so that every ``x`` weighs on a comparable scale (score points at small ``x``, $ relative to
    ``ref_cost`` at large ``x``). ``gain(q)`` is ``(top, frontier or None)``."""

    def __init__(
        self,
        Y: np.ndarray,
        best: np.ndarray,
        prior: np.ndarray,
        cost: np.ndarray | None = None,
        ref_cost: np.ndarray | None = None,
    ):
        self.Y0, self.best = np.nan_to_num(np.asarray(Y, np.float64), nan=0.0), np.asarray(best)
        self.rows = np.arange(len(self.Y0))
        self.cost = None if cost is None else np.asarray(cost, np.float64)
        if self.cost is None:
            return
        if ref_cost is None or self.cost.shape != self.Y0.shape:
            raise ValueError(
                f"UtilityGain: cost {self.cost.shape} must match Y {self.Y0.shape}, with ref_cost"
            )
        ref = np.maximum(np.asarray(ref_cost, np.float64), 1e-12)
        self.lams = [x / ref for x in LAM_GRID]
        P = np.broadcast_to(np.asarray(prior, np.float64), self.Y0.shape)
        self.prior_u = [self._utility(P, lam) for lam in self.lams]

    def _utility(self, q: np.ndarray, lam: np.ndarray) -> np.ndarray:
        pick = np.argmax(q - lam[:, None] * self.cost, axis=1)
        return self.Y0[self.rows, pick] - lam * self.cost[self.rows, pick]

    def top(self, q: np.ndarray) -> np.ndarray:
        return routed_gain(q, self.Y0, self.best)

    def frontier(self, q: np.ndarray) -> np.ndarray:
        if self.cost is None:
            raise ValueError("UtilityGain.frontier: needs the calls' cost")
        u = sum(
            (self._utility(q, lam) - pu) / (1.0 + x)
            for x, lam, pu in zip(LAM_GRID, self.lams, self.prior_u, strict=True)
        )
        return u / len(LAM_GRID)

    def __call__(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.top(q), (None if self.cost is None else self.frontier(q))


@dataclass
class Guarded:
    """What :meth:`NoveltyGuard.transform` gives for ``n`` prompts over ``m`` models."""

    quality: np.ndarray  # (n, m) shrunk quality
    novelty: np.ndarray  # (n,) in [0, 1]
    shrink: np.ndarray  # (n,) weight of the prior in [0, 1]
    lower: np.ndarray  # (n, m) interval bounds, clipped to [0, 1]
    upper: np.ndarray  # (n, m)
    trust: np.ndarray | None = None  # (n,) mode "trust": predicted gain of the head's pick over the prior's


class NoveltyGuard(BasePredictor):
    """Novelty score, a margin before leaving the pool prior's model (or shrinkage toward the prior) and
    per-model conformal intervals (module doc).

    Params: ``k`` neighbours for the density feature; ``folds`` of the family-grouped and of the
    random CV; ``coverage`` nominal coverage of the intervals; ``n_bins`` novelty bins of the
    conformal table; ``max_bank`` training embeddings kept for the distance features (a seeded
    subsample above it); ``family_loss_weight`` extra weight of out-of-family losses in the
    margin / shrinkage objective; ``mode`` ``"margin"`` (decide), ``"shrink"`` (blend), ``"spread"``
    (blend and ask each model to clear its family spread), ``"trust"`` (a deferral model) or
    ``"auto"`` (whichever of margin and shrink the same CV scores higher); ``seed``;
    ``family_folds`` groups of families for the family-grouped CV (default ``folds``; ``-1``: one
    per family, leave one family out, the structure of the single new family a served router meets:
    holding out a third of the families changes each fold's best single model and made routing look
    safer out of family than it was, README "Routing under shift");
    ``features``: which of :data:`FEATURES` the novelty score reads (None: :data:`DEFAULT_FEATURES`;
    a text feature makes ``fit``, ``novelty`` and ``transform`` need the prompt ``texts``);
    ``intervals``: which out-of-fold rows the conformal table reads (:data:`INTERVALS`);
    ``q_bins``: bins of each model's own guarded estimate in the conformal table (1: by novelty
    only, as guards saved before it; a saved guard's table decides, whatever this says);
    ``shrink_floor``: also fit a novelty floor ``t`` below which only ``w_id`` shrinks
    (``mode="shrink"`` / ``"spread"``; False: ``t = 0``, the weight linear in novelty);
    ``keep_in_distribution``: None (the objective adds in-distribution and out-of-family gains), or
    how much of the head's own out-of-fold gain in distribution (score points on [0, 1]) the guard may
    give up: among those grid points, the best out of family;
    ``layers``: encoder layers whose pooled states the distances read beside the embedding (``X``
    then holds the embedding and those states, as a quality head's :attr:`layers`; each block is
    scaled to unit length, so a cosine is the mean of the blocks' cosines: MiniLM's layers 3 and 4
    keep the benchmark's form that the sentence embedding blurs, README "Routing under shift").
    """

    name = "novelty_shrinkage"

    def __init__(
        self,
        k: int = 10,
        folds: int = 5,
        coverage: float = 0.9,
        n_bins: int = 3,
        max_bank: int = 8192,
        family_loss_weight: float = 2.0,
        mode: str = "shrink",
        seed: int = 0,
        family_folds: int | None = None,
        features: Sequence[str] | None = None,
        intervals: str = "pooled",
        q_bins: int = 1,
        shrink_floor: bool = False,
        keep_in_distribution: float | None = None,
        layers: Sequence[int] = (),
    ):
        if mode not in MODES:
            raise ValueError(f"NoveltyGuard: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if intervals not in INTERVALS:
            raise ValueError(
                f"NoveltyGuard: intervals must be one of {', '.join(map(repr, INTERVALS))}, got {intervals!r}"
            )
        if int(q_bins) != q_bins or q_bins < 1:
            raise ValueError(f"NoveltyGuard: q_bins must be an integer >= 1, got {q_bins!r}")
        unknown = [f for f in (features or ()) if f not in FEATURES]
        if unknown or (features is not None and not len(features)):
            raise ValueError(
                f"NoveltyGuard: unknown novelty feature(s) {unknown or '(none given)'}; known: {list(FEATURES)}"
            )
        self.k = k
        self.folds = folds
        self.coverage = coverage
        self.n_bins = n_bins
        self.max_bank = max_bank
        self.family_loss_weight = family_loss_weight
        self.mode = mode
        self.seed = seed
        self.family_folds = family_folds
        self.features = None if features is None else [str(f) for f in features]
        self.intervals = intervals
        self.q_bins = q_bins
        self.shrink_floor = bool(shrink_floor)
        if keep_in_distribution is not None and (mode == "trust" or not keep_in_distribution >= 0):
            raise ValueError(
                "NoveltyGuard: keep_in_distribution must be a gain (score points on [0, 1]) >= 0, and "
                f"mode shrink, spread or margin; got {keep_in_distribution!r} with mode {mode!r}"
            )
        self.keep_in_distribution = None if keep_in_distribution is None else float(keep_in_distribution)
        self.layers = [int(k) for k in layers]

    def _prep(self, X: np.ndarray, where: str) -> np.ndarray:
        """``X`` as the distances read it: with :attr:`layers`, each of its ``1 + len(layers)``
        equal blocks (the embedding, then each layer's states) at unit length over sqrt(blocks)."""
        X = np.asarray(X, np.float32)
        if X.ndim != 2:
            raise ValueError(f"NoveltyGuard.{where}: X must be (n, d), got shape {X.shape}")
        width = getattr(self, "bank_", None)
        if width is not None and X.shape[1] != width.shape[1]:
            raise ValueError(
                f"NoveltyGuard.{where}: X has {X.shape[1]} features, the guard was fitted on "
                f"{width.shape[1]} (the embedding and the states of layers {self.layers})"
            )
        if not self.layers:
            return X
        b = 1 + len(self.layers)
        if X.shape[1] % b:
            raise ValueError(
                f"NoveltyGuard.{where}: X has {X.shape[1]} features, not {b} equal blocks "
                f"(the embedding and the states of layers {self.layers})"
            )
        B = X.reshape(len(X), b, -1)
        B = B / np.maximum(np.linalg.norm(B, axis=2, keepdims=True), 1e-12)
        return np.ascontiguousarray((B / np.sqrt(b)).reshape(len(X), -1), dtype=np.float32)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The features the novelty score reads, in :data:`FEATURES` order."""
        chosen = set(self.features or DEFAULT_FEATURES)
        return tuple(f for f in FEATURES if f in chosen)

    @property
    def text_spaces(self) -> tuple[str, ...]:
        """The n-gram spaces (:data:`TEXT_SPACES`) the score reads: they need the prompt texts."""
        return tuple(t for t in TEXT_SPACES if any(f.startswith(t + "_") for f in self.feature_names))

    @property
    def uses_text(self) -> bool:
        """Whether ``fit`` / ``novelty`` / ``transform`` need the prompt ``texts``."""
        return bool(self.text_spaces)

    def _check_texts(self, texts: Sequence[str] | None, n: int, where: str) -> list[str] | None:
        if not self.uses_text:
            return None
        if texts is None or isinstance(texts, str) or len(texts) != n:
            raise ValueError(
                f"NoveltyGuard.{where}: this guard's novelty reads the prompt text ({', '.join(self.text_spaces)} "
                f"n-grams): pass texts=, one string per row ({n}), got "
                f"{'none' if texts is None else 'a string' if isinstance(texts, str) else len(texts)}"
            )
        return list(texts)

    # ---- features ------------------------------------------------------------------------------
    @staticmethod
    def _family_head(X: np.ndarray, families: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(coef (F, d), intercept (F,)) of a multinomial logistic regression over the families."""
        from sklearn.linear_model import LogisticRegression

        labels, y = np.unique(families, return_inverse=True)
        if len(labels) < 2:
            return np.zeros((1, X.shape[1]), np.float32), np.zeros(1, np.float32)
        clf = LogisticRegression(C=1.0, max_iter=300, random_state=seed).fit(_unit(X), y)
        coef, icpt = clf.coef_, clf.intercept_
        if len(labels) == 2:  # sklearn keeps one row for two classes: make it a softmax over two
            coef, icpt = np.vstack([-coef / 2, coef / 2]), np.r_[-icpt / 2, icpt / 2]
        return coef.astype(np.float32), icpt.astype(np.float32)

    @staticmethod
    def _kth_dist(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(nn (n, k) indices of the k largest similarities per row, top (n, k) those similarities)``."""
        k = min(k, S.shape[1])
        nn = np.argpartition(S, S.shape[1] - k, axis=1)[:, -k:]
        return nn, np.take_along_axis(S, nn, axis=1)

    @classmethod
    def _bank_kdist(cls, bank: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
        """(b,) cosine distance of each unit-norm bank row to its ``k``-th nearest OTHER bank row."""
        out = np.zeros(len(bank))
        for i in range(0, len(bank), chunk):
            S = bank[i : i + chunk] @ bank.T
            S[np.arange(len(S)), np.arange(i, i + len(S))] = -np.inf  # not its own neighbour
            out[i : i + chunk] = 1.0 - cls._kth_dist(S, k)[1].min(axis=1)
        return out

    @staticmethod
    def _features(
        bank: np.ndarray,
        coef: np.ndarray,
        icpt: np.ndarray,
        X: np.ndarray,
        k: int,
        with_nn: bool = False,
        kdist: np.ndarray | None = None,
        text: dict[str, tuple[Any, Any]] | None = None,
    ) -> Any:
        """(n, len(FEATURES)) novelty features of ``X (n, d)`` against a unit-norm ``bank (b, d)``,
        a family classifier (``coef``, ``icpt``), the bank's own ``k``-th neighbour distances
        ``kdist (b,)`` (None: the local scale is NaN) and, per text space, ``(NgramBank, hashed
        counts of the n prompts)`` (a space not given: NaN); with ``with_nn`` also the (n, k) bank
        rows of the ``k`` nearest."""
        U = _unit(X)
        with few_rows_blas(len(U)):  # a threaded one-row product costs milliseconds on a loaded CPU
            S = U @ bank.T  # (n, b): the one product per row that the embedding features cost
            Z = U @ coef.T + icpt
        nn, top = NoveltyGuard._kth_dist(S, k)
        P = _softmax(Z)
        ent = -(P * np.log(np.maximum(P, 1e-12))).sum(axis=1) / max(np.log(P.shape[1]), 1e-12)
        F = np.full((len(U), len(FEATURES)), np.nan)
        F[:, :4] = np.column_stack([1.0 - top.max(axis=1), 1.0 - top.mean(axis=1), 1.0 - P.max(axis=1), ent])
        zmax = Z.max(axis=1)
        F[:, FEATURES.index("family_energy")] = -(zmax + np.log(np.exp(Z - zmax[:, None]).sum(axis=1)))
        if kdist is not None:
            F[:, 4] = (1.0 - top.min(axis=1)) / np.maximum(kdist[nn].mean(axis=1), 1e-6)
        for space, (ngrams, H) in (text or {}).items():
            c = FEATURES.index(f"{space}_nearest_dist")
            F[:, c : c + 2] = ngrams.distances_counts(H, k)
        return (F, nn) if with_nn else F

    @staticmethod
    def trust_features(
        F: np.ndarray, nu: np.ndarray, Q: np.ndarray, Yk: np.ndarray, prior: Any
    ) -> np.ndarray:
        """(n, len(TRUST_FEATURES)) base features of the deferral model: novelty features ``F (n, 4)``
        and score ``nu (n,)``, the head's quality ``Q (n, m)``, the mean outcome ``Yk (n, m)`` of the
        nearest bank prompts, and the prior's column(s) ``prior`` (int or (n,))."""
        Q = np.asarray(Q, np.float64)
        r = np.arange(len(Q))
        p = np.broadcast_to(np.asarray(prior, np.int64), (len(Q),))
        pick = np.argmax(Q, axis=1)
        top2 = -np.partition(-Q, 1, axis=1)[:, :2] if Q.shape[1] > 1 else np.column_stack([Q[:, 0], Q[:, 0]])
        return np.column_stack(
            [
                F[:, : len(LEGACY_FEATURES)],
                nu,
                Q[r, pick] - Q[r, p],
                top2[:, 0] - top2[:, 1],
                Q[r, pick],
                Q[r, p],
                Yk[r, pick] - Yk[r, p],
                (np.argmax(Yk, axis=1) == pick).astype(np.float64),
            ]
        )

    @staticmethod
    def _expand(Z: np.ndarray) -> np.ndarray:
        """Standardised features ``Z (n, f)`` and their pairwise products (n, f + f(f+1)/2)."""
        i, j = np.triu_indices(Z.shape[1])
        return np.column_stack([Z, Z[:, i] * Z[:, j]])

    @staticmethod
    def _ridge(Phi: np.ndarray, g: np.ndarray, w: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
        """Weighted ridge of ``g`` on ``Phi`` (intercept unpenalised): ``(coef, intercept)``."""
        sw = w / w.sum()
        mu, gm = sw @ Phi, float(sw @ g)
        A = (Phi - mu) * np.sqrt(sw)[:, None]
        coef = np.linalg.solve(
            A.T @ A + (alpha / len(g)) * np.eye(Phi.shape[1]), A.T @ ((g - gm) * np.sqrt(sw))
        )
        return coef, gm - float(mu @ coef)

    # ---- fit -----------------------------------------------------------------------------------
    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        families: Sequence[Any],
        fit_predict: FitPredict,
        texts: Sequence[str] | None = None,
        calibrate: Callable[[np.ndarray], np.ndarray] | None = None,
        cost: np.ndarray | None = None,
    ) -> NoveltyGuard:
        """Fit on the training prompts ``X (n, d)``, outcomes ``Y (n, m)`` and their task
        ``families`` (n,); ``fit_predict`` fits the quality head on some rows and predicts others;
        ``texts`` (n,): the prompts, needed when the score reads text features (:attr:`uses_text`);
        ``calibrate``: the calibrator the router applies before the guard (``(k, m) -> (k, m)``,
        fitted on the head's out-of-fold predictions), applied to the out-of-fold estimates before
        anything is fitted on them, so the shrinkage, the margin, the deferral model and the
        intervals' residuals are all fitted on the scale the router serves the guard (an isotonic
        calibrator turns a head's spread of estimates into steps and can move the argmax: a margin
        fitted on the raw scale and served on the calibrated one routed 1.1 points below).
        ``cost (n, m)``: each training prompt's $ per model (NaN: that model's mean); with it, grid
        points (and, in ``mode="auto"``, rules) that route the out-of-fold rows equally well at the
        top are told apart by the utility the policy serves at every willingness to pay
        (:class:`UtilityGain`); without it the first of them is kept.
        Needs at least two families (the out-of-family folds hold whole families out)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score

        self.__dict__.pop("bank_", None)  # refitting: the width is the new X's
        X, Y = self._prep(X, "fit"), np.asarray(Y, np.float64)
        if cost is not None:
            cost = np.asarray(cost, np.float64)
            if cost.shape != Y.shape:
                raise ValueError(f"NoveltyGuard.fit: cost {cost.shape} must have Y's shape {Y.shape}")
            cost = np.where(np.isnan(cost), np.nan_to_num(np.nanmean(cost, axis=0), nan=0.0), cost)
            if not np.any(cost > 0):  # no prices: the top alone
                cost = None
        fam = np.asarray([str(f) for f in families])
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or len(fam) != len(X):
            raise ValueError(
                f"NoveltyGuard.fit: X {X.shape}, Y {Y.shape} and families ({len(fam)},) must share rows"
            )
        names = np.unique(fam)
        if len(names) < 2:
            raise ValueError(
                f"NoveltyGuard.fit: needs prompts of at least two task families to hold one out, got {list(names)}"
            )
        texts = self._check_texts(texts, len(X), "fit")
        # each text space's hashed counts, once for every fold (hashing is stateless)
        counts = {t: NgramBank(t).hash(texts) for t in self.text_spaces} if texts is not None else {}
        cols = [FEATURES.index(f) for f in self.feature_names]
        local = "local_scale" in self.feature_names

        def fold_features(tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Features of rows ``te`` against a bank and a family head of rows ``tr``."""
            coef, icpt = self._family_head(X[tr], fam[tr], self.seed)
            bank = _unit(X[tr])
            text = {t: (NgramBank(t).fit_counts(H[tr]), H[te]) for t, H in counts.items()}
            kd = self._bank_kdist(bank, self.k) if local else None
            return self._features(bank, coef, icpt, X[te], self.k, with_nn=True, kdist=kd, text=text)

        rng = np.random.default_rng(self.seed)
        n_groups = (
            len(names) if self.family_folds == -1 else min(int(self.family_folds or self.folds), len(names))
        )
        group_of = {f: i % n_groups for i, f in enumerate(rng.permutation(names))}
        groups = {
            "family": np.array([group_of[f] for f in fam]),
            "random": rng.integers(0, self.folds, len(X)),
        }
        Yfill = _fill(Y)
        oof, knn, pri, spr, ref = {}, {}, {}, {}, {}
        for kind, g in groups.items():
            Q, F, best = np.zeros_like(Y), np.zeros((len(X), len(FEATURES))), np.zeros(len(X), np.int64)
            Yk, P, S, R = np.zeros_like(Y), np.zeros_like(Y), np.zeros_like(Y), np.zeros(len(X))
            values = np.unique(g)
            for i, v in enumerate(values):
                te, tr = np.where(g == v)[0], np.where(g != v)[0]
                log.info(
                    "guard: %s-grouped fold %d/%d (%d prompts held out)", kind, i + 1, len(values), len(te)
                )
                Q[te] = fit_predict(tr, te)
                F[te], nn = fold_features(tr, te)
                Yk[te] = Yfill[tr][nn].mean(axis=1)
                # the conservative prior as the fold would have it: its training part's per-model
                # means (an inner held-out family never pulls the estimates toward its own outcomes)
                P[te] = np.nan_to_num(np.nanmean(Y[tr], axis=0), nan=0.0)
                best[te] = int(np.argmax(P[te[0]]))
                S[te] = family_spread(Y[tr], fam[tr], int(best[te[0]]))
                if cost is not None:  # the fold's best single model's $ per request: lam's unit
                    R[te] = cost[tr, best[te[0]]].mean()
            oof[kind], knn[kind], pri[kind], spr[kind], ref[kind] = (Q, F, best), Yk, P, S, R
        (Qf, Ff, bf), (Qi, Fi, bi) = oof["family"], oof["random"]
        if calibrate is not None:  # what the router serves the guard: the calibrated estimates
            Qf, Qi = calibrate(Qf), calibrate(Qi)
        Pf, Pi, Sf, Si = pri["family"], pri["random"], spr["family"], spr["random"]
        # what a pick earns over the prior's, at the top or over the frontier (with costs)
        gain = {
            "i": UtilityGain(Y, bi, Pi, cost, ref["random"]),
            "f": UtilityGain(Y, bf, Pf, cost, ref["family"]),
        }

        # novelty: out-of-family (1) against in-distribution (0) out-of-fold prompts
        Fall = np.vstack([Fi, Ff])[:, cols]
        self.feat_mean_, self.feat_std_ = Fall.mean(axis=0), np.maximum(Fall.std(axis=0), 1e-9)
        lab = np.r_[np.zeros(len(Fi)), np.ones(len(Ff))]
        clf = LogisticRegression(class_weight="balanced", max_iter=1000).fit(
            (Fall - self.feat_mean_) / self.feat_std_, lab
        )
        self.nov_coef_, self.nov_intercept_ = (
            clf.coef_[0].astype(np.float64),
            np.asarray(clf.intercept_, np.float64),
        )
        nu_i, nu_f = self._novelty(Fi), self._novelty(Ff)
        self.cv_auroc_ = float(roc_auc_score(lab, np.r_[nu_i, nu_f]))

        self.prior_ = np.nan_to_num(np.nanmean(Y, axis=0), nan=0.0)
        self.spread_ = family_spread(Y, fam, self.prior_model)
        self.spread_risk_ = np.zeros(2)
        fam_rows = [fam == f for f in names]

        keep = self.keep_in_distribution
        gi_raw = routed_gain(Qi, Y, bi).mean()  # the unguarded head's, in distribution

        def objective(gi: np.ndarray, gf: np.ndarray, constrained: bool = True) -> float:
            per_fam = np.array([gf[r].mean() for r in fam_rows])
            novel = gf.mean() + self.family_loss_weight * np.minimum(per_fam, 0.0).mean()
            if keep is None or not constrained:
                return gi.mean() + novel
            # the in-distribution gain is a constraint, not a price: within ``keep`` of the head's
            # own (the grid's no-guard point always qualifies), the best out of family
            return novel + 1e-3 * gi.mean() if gi.mean() >= gi_raw - keep else -1e9 + gi.mean()

        def score(gi: tuple, gf: tuple) -> tuple[float, float]:
            """Lexicographic: the objective at the top (the best quality regardless of cost), then,
            with costs, the same over the frontier (:class:`UtilityGain`) among rules that tie at
            the top: the frontier breaks ties, it never buys utility with top quality."""
            front = objective(gi[1], gf[1], constrained=False) if gi[1] is not None else 0.0
            return objective(gi[0], gf[0]), front

        def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
            return a[0] > b[0] + 1e-12 or (a[0] >= b[0] - 1e-12 and a[1] > b[1] + 1e-12)

        def fit_shrink(
            spread: bool,
        ) -> tuple[tuple[float, float], tuple[float, float, float], tuple[float, float]]:
            """The (w_id, w_novel, t) shrinkage (and family-spread risk) of the grid with the best
            out-of-fold routing (each fold's own prior and spread): (objective, weights, risk)."""
            best_obj, best_w, best_k = (-np.inf, -np.inf), (0.0, 0.0, 0.0), (0.0, 0.0)
            ks = SPREAD_GRID if spread else (0.0,)
            # the novelty floor: below it only w_id, so prompts like the training ones keep the
            # head's estimates where the out-of-fold rows say that pays (floor 0: linear in novelty)
            floors = np.r_[0.0, np.quantile(nu_i, FLOOR_QUANTILES)] if self.shrink_floor else (0.0,)
            for t in floors:
                for w0 in GRID:
                    for w1 in (w for w in GRID if w >= w0):
                        wt = (w0, w1, float(t))
                        base = {"i": self._shrink(Qi, nu_i, wt, Pi), "f": self._shrink(Qf, nu_f, wt, Pf)}
                        for k0 in ks:
                            for k1 in (k for k in ks if k >= k0):
                                obj = score(
                                    gain["i"](base["i"] - (k0 + (k1 - k0) * nu_i)[:, None] * Si),
                                    gain["f"](base["f"] - (k0 + (k1 - k0) * nu_f)[:, None] * Sf),
                                )
                                if better(obj, best_obj):
                                    best_obj, best_w, best_k = obj, wt, (k0, k1)
            return best_obj, best_w, best_k

        def fit_margin() -> tuple[tuple[float, float], tuple[float, float, float]]:
            """Decide, don't blend: the (a, b, t) of m(nu) = a + b * max(nu - t, 0) with the best
            out-of-fold routing when the head's pick is kept only where its predicted advantage over
            the prior's model (the fold's best single model) exceeds it: (objective, margin)."""
            sw = {}
            for kind, (Q, nu, b) in {"i": (Qi, nu_i, bi), "f": (Qf, nu_f, bf)}.items():
                r = np.arange(len(Q))
                pick = np.argmax(Q, axis=1)
                adv = Q[r, pick] - Q[r, b]
                sw[kind] = (nu, adv, routed_gain(Q, Y, b), Q, b)

            def margin_gain(kind: str, m: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
                _, adv, gh, Q, b = sw[kind]
                top = np.where(adv > m, gh, 0.0)  # the head's pick where it clears the margin
                if cost is None:
                    return top, None
                return top, gain[kind].frontier(margin_lowered(Q, m, b))  # as served (_apply)

            floors = np.r_[0.0, np.quantile(nu_i, FLOOR_QUANTILES)]
            best_obj, best_m = (-np.inf, -np.inf), (0.0, 0.0, 0.0)
            for a in MARGIN_BASE:
                for bslope in MARGIN_SLOPE:
                    for t in floors if bslope > 0 else (0.0,):
                        g = {
                            kind: margin_gain(kind, a + bslope * np.maximum(sw[kind][0] - t, 0.0))
                            for kind in sw
                        }
                        obj = score(g["i"], g["f"])
                        if better(obj, best_obj):
                            best_obj, best_m = obj, (a, bslope, float(t))
            return best_obj, best_m

        self.shrink_, self.margin_ = np.zeros(3), np.zeros(3)
        if self.mode == "trust":
            self._fit_trust(
                [(Qi, Fi, nu_i, bi, knn["random"]), (Qf, Ff, nu_f, bf, knn["family"])],
                Y,
                fam,
                group_of,
                objective,
            )
        else:
            # "auto": whichever of the margin and the shrinkage routes the out-of-fold rows better
            # (the same rows and objective, so the two fits are compared like for like)
            shrunk = fit_shrink(self.mode == "spread") if self.mode != "margin" else None
            margin = fit_margin() if self.mode in ("margin", "auto") else None
            # each fitted rule's objective on the out-of-fold rows (fit-time only, not saved)
            # (at the top, and over the frontier where the costs were given, else 0)
            self.cv_objective_ = {
                name: float(r[0][0]) for name, r in (("shrink", shrunk), ("margin", margin)) if r is not None
            }
            self.cv_frontier_ = {
                name: float(r[0][1]) for name, r in (("shrink", shrunk), ("margin", margin)) if r is not None
            }
            # the margin only where it routes better at the top: where the two tie there, the
            # shrinkage (which moves toward the prior's own frontier; the margin holds the prior's
            # top model at every budget, and the inner folds' frontier did not foresee a new
            # family's: on ZeroEval it chose the margin on 2 of 3 folds, AIQ 0.0016 below the shrinkage)
            if margin is not None and (shrunk is None or margin[0][0] > shrunk[0][0] + 1e-12):
                self.margin_ = np.asarray(margin[1], np.float64)
            else:
                self.shrink_ = np.asarray(shrunk[1], np.float64)
                self.spread_risk_ = np.asarray(shrunk[2], np.float64)
        if self.mode != "trust":
            self.trust_ = np.zeros(0)
            self.trust_scale_ = np.zeros((2, 0))
            self.trust_tau_ = np.zeros(1)
            self.cv_trust_auroc_ = float("nan")
        log.info("guard: %s fitted (shrink %s, margin %s)", self.fitted_mode, self.shrink_, self.margin_)
        T = {"i": None, "f": None}
        if self.mode == "trust":
            T = {
                kind: self._trust_predict(self.trust_features(F, nu, Q, Yk, b))
                for kind, (Q, F, nu, b, Yk) in {
                    "i": (Qi, Fi, nu_i, bi, knn["random"]),
                    "f": (Qf, Ff, nu_f, bf, knn["family"]),
                }.items()
            }
        self.cv_gain_ = np.array(
            [
                routed_gain(self._apply(Q, nu, b, T[kind], P, S)[0], Y, b).mean()
                for kind, Q, nu, b, P, S in (("i", Qi, nu_i, bi, Pi, Si), ("f", Qf, nu_f, bf, Pf, Sf))
            ]
        )

        # split-conformal half-widths per novelty bin and model, on the shrunk out-of-fold residuals
        nu = np.r_[nu_i, nu_f]
        G = np.vstack(
            [
                self._apply(Qi, nu_i, bi, T["i"], Pi, Si)[0],
                self._apply(Qf, nu_f, bf, T["f"], Pf, Sf)[0],
            ]
        )
        kind = np.r_[np.zeros(len(nu_i), np.int64), np.ones(len(nu_f), np.int64)]
        self._fit_intervals(np.abs(np.vstack([Y, Y]) - G), nu, kind, np.r_[fam, fam], G)

        # what serving keeps: a bank of training embeddings and the family head on every prompt
        keep = rng.permutation(len(X))[: self.max_bank] if len(X) > self.max_bank else np.arange(len(X))
        self.bank_ = _unit(X[np.sort(keep)])
        self.bank_kdist_ = self._bank_kdist(self.bank_, self.k) if local else np.zeros(0)
        self.ngrams_ = {t: NgramBank(t).fit_counts(H[np.sort(keep)]) for t, H in counts.items()}
        self.bank_y_ = Yfill[np.sort(keep)] if self.mode == "trust" else np.zeros((0, Y.shape[1]))
        self.fam_coef_, self.fam_intercept_ = self._family_head(X, fam, self.seed)
        return self

    def _fit_intervals(
        self, R: np.ndarray, nu: np.ndarray, kind: np.ndarray, fam: np.ndarray, G: np.ndarray | None = None
    ) -> None:
        """The conformal table from the out-of-fold absolute residuals ``R (r, m)`` (NaN: no outcome) at
        novelty ``nu (r,)``; ``kind (r,)`` 0 for the in-distribution (random-fold) rows, 1 for the
        out-of-family ones; ``fam (r,)`` each row's family; ``G (r, m)`` the guarded estimates the
        residuals are of (read with ``q_bins > 1``). Per cell (novelty bin, edges: quantiles of
        ``nu``; times, with ``q_bins``, a bin of model ``j``'s own estimate, edges: quantiles of
        ``G[:, j]``: Mondrian cells) and model, by :attr:`intervals` (:data:`INTERVALS`). Table row
        ``novelty_bin * q_bins + q_bin``."""
        if self.intervals not in INTERVALS:
            raise ValueError(f"NoveltyGuard: intervals must be one of {INTERVALS}, got {self.intervals!r}")
        self.bin_edges_ = (
            np.quantile(nu, np.linspace(0, 1, self.n_bins + 1)[1:-1]) if self.n_bins > 1 else np.zeros(0)
        )
        b = np.searchsorted(self.bin_edges_, nu, side="right")
        nq = int(self.q_bins)
        if nq > 1 and G is None:
            raise ValueError("NoveltyGuard._fit_intervals: q_bins > 1 needs the estimates G")
        inner = np.linspace(0, 1, nq + 1)[1:-1]
        self.qbin_edges_ = (
            np.vstack([np.nanquantile(G[:, j], inner) for j in range(R.shape[1])])
            if nq > 1
            else np.zeros((R.shape[1], 0))
        )
        cells = [
            b * nq + np.searchsorted(self.qbin_edges_[j], G[:, j], side="right") if nq > 1 else b
            for j in range(R.shape[1])
        ]
        kind = np.asarray(kind)
        equal = self.intervals.endswith("_equal")
        w = np.ones(len(nu))
        if equal:  # each family the same total weight among the out-of-family rows
            for f in np.unique(fam[kind == 1]):
                rows = (kind == 1) & (fam == f)
                w[rows] = 1.0 / rows.sum()

        def smoothed(rows: np.ndarray, j: int) -> tuple[float, float, float]:
            return smoothed_halfwidths(R[rows, j], self.coverage, w[rows] if equal else None)

        def cell(i: int, j: int) -> tuple[float, float, float]:
            here = cells[j] == i
            if self.intervals == "pooled":
                return smoothed(here, j)
            out = smoothed(here & (kind == 1), j)
            if self.intervals.startswith("wider"):  # whichever of the two kinds' intervals is wider
                ind = smoothed(here & (kind == 0), j)
                out = max(out, ind, key=lambda t: (t[1], t[2], t[0]))
            return out

        # smoothed: (h_low, h_high, p) per cell and model; the interval's half-width is h_high where
        # the prompt's coin (prompt_uniform) falls below p
        n_cells = self.n_bins * nq
        table = np.array([[cell(i, j) for j in range(R.shape[1])] for i in range(n_cells)])
        table = table.reshape(n_cells, R.shape[1], 3)
        self.halfwidth_low_, self.halfwidth_, self.halfwidth_p_ = table[..., 0], table[..., 1], table[..., 2]

    def _fit_trust(
        self,
        parts: list[tuple[np.ndarray, ...]],
        Y: np.ndarray,
        fam: np.ndarray,
        group_of: dict[str, int],
        objective: Callable[[np.ndarray, np.ndarray], float],
    ) -> None:
        """The deferral model of ``mode="trust"`` (module doc). ``parts``: the in-distribution and
        the out-of-family out-of-fold ``(Q, F, nu, best, Yk)``; ``group_of``: family -> the family
        group that the nested CV holds out together."""
        from sklearn.metrics import roc_auc_score

        feats, gains, moves = [], [], []
        for Q, F, nu, b, Yk in parts:
            feats.append(self.trust_features(F, nu, Q, Yk, b))
            gains.append(routed_gain(Q, Y, b))
            moves.append(np.argmax(Q, axis=1) != b)
        Z = np.vstack(feats)
        self.trust_scale_ = np.vstack([Z.mean(axis=0), np.maximum(Z.std(axis=0), 1e-9)])
        Phi = self._expand((Z - self.trust_scale_[0]) / self.trust_scale_[1])
        g, move = np.concatenate(gains), np.concatenate(moves)
        n = len(Y)
        grp = np.tile(np.array([group_of[f] for f in fam]), 2)
        # each kind (in distribution, out of family) weighs the same in the regression
        w = np.concatenate([np.full(n, 1.0 / max(m.sum(), 1)) for m in moves])
        pred = {a: np.zeros(2 * n) for a in TRUST_ALPHA}
        for v in np.unique(grp):  # nested: the deferral model never saw the held-out families' rows
            tr, te = (grp != v) & move, grp == v
            if not tr.any():
                continue
            for a in TRUST_ALPHA:
                coef, icpt = self._ridge(Phi[tr], g[tr], w[tr], a)
                pred[a][te] = Phi[te] @ coef + icpt
        best_obj, best_at = -np.inf, (TRUST_ALPHA[0], TRUST_TAU[0])
        for a in TRUST_ALPHA:
            for tau in TRUST_TAU:
                keep = ~move | (pred[a] > tau)
                gi, gf = np.split(np.where(keep, g, 0.0), 2)
                obj = objective(gi, gf)
                if obj > best_obj + 1e-12:
                    best_obj, best_at = obj, (a, tau)
        a, tau = best_at
        lab = g[move] < 0
        self.cv_trust_auroc_ = (
            float(roc_auc_score(lab, -pred[a][move])) if 0 < lab.sum() < len(lab) else float("nan")
        )
        coef, icpt = (
            self._ridge(Phi[move], g[move], w[move], a) if move.any() else (np.zeros(Phi.shape[1]), 0.0)
        )
        self.trust_ = np.r_[icpt, coef]
        self.trust_tau_ = np.array([tau])
        self.trust_alpha_ = float(a)

    def _trust_predict(self, Z: np.ndarray) -> np.ndarray:
        """(n,) the deferral model's predicted gain of the head's pick over the prior's model."""
        Phi = self._expand((Z - self.trust_scale_[0]) / self.trust_scale_[1])
        return Phi @ self.trust_[1:] + self.trust_[0]

    def trust(self, X: np.ndarray, quality: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """(n,) predicted gain in score of the head's pick over the prior's model (``mode="trust"``)
        for ``X (n, d)`` (and the prompt ``texts``, :attr:`uses_text`) and the head's ``quality
        (n, m)``; the router keeps the pick where it exceeds ``trust_tau_``."""
        self._check_fitted("bank_")
        if not len(self.trust_):
            raise ValueError("NoveltyGuard.trust: this guard was not fitted with mode='trust'")
        F, nn = self._served_features(X, texts, "trust")
        nu = self._novelty(F)
        return self._trust_predict(
            self.trust_features(F, nu, quality, self.bank_y_[nn].mean(axis=1), self.prior_model)
        )

    # ---- apply ---------------------------------------------------------------------------------
    def _served_features(
        self, X: np.ndarray, texts: Sequence[str] | None, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(F (n, len(FEATURES)), nn (n, k))``: the features of ``X (n, d)`` (and ``texts``)
        against the stored bank."""
        self._check_fitted("bank_")
        X = self._prep(X, where)
        texts = self._check_texts(texts, len(X), where)
        text = {t: (b, b.hash(texts)) for t, b in self.ngrams_.items()} if texts is not None else {}
        kd = self.bank_kdist_ if "local_scale" in self.feature_names else None
        return self._features(
            self.bank_, self.fam_coef_, self.fam_intercept_, X, self.k, with_nn=True, kdist=kd, text=text
        )

    def _novelty(self, F: np.ndarray) -> np.ndarray:
        """(n,) novelty from the full feature matrix ``F (n, len(FEATURES))``."""
        F = F[:, [FEATURES.index(f) for f in self.feature_names]]
        z = ((F - self.feat_mean_) / self.feat_std_) @ self.nov_coef_ + self.nov_intercept_[0]
        return 1.0 / (1.0 + np.exp(-z))

    def _shrink(
        self, Q: np.ndarray, nu: np.ndarray, shrink: Sequence[float], prior_mean: np.ndarray | None = None
    ) -> np.ndarray:
        w = shrink_weight(nu, shrink)[:, None]
        return (1.0 - w) * Q + w * (self.prior_[None, :] if prior_mean is None else prior_mean)

    def margin(self, nu: np.ndarray) -> np.ndarray:
        """(n,) the advantage over the prior's model that the head's pick needs at novelty ``nu``."""
        a, b, t = (float(v) for v in self.margin_)
        return a + b * np.maximum(np.asarray(nu, np.float64) - t, 0.0)

    def _apply(
        self,
        Q: np.ndarray,
        nu: np.ndarray,
        prior: np.ndarray | int | None = None,
        trust: np.ndarray | None = None,
        prior_mean: np.ndarray | None = None,
        spread: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(guarded quality, weight of the prior)`` for the
        head's quality ``Q (n, m)`` at novelty ``nu (n,)``: shrunk toward the prior, then every model
        but the prior's (column ``prior``, default :attr:`prior_model`) lowered by the margin, so the
        argmax is the head's pick where its advantage exceeds the margin and the prior's otherwise
        (never a third model). The weight is 1 where the margin overrode the head's pick. With a
        deferral model (``trust``: its predicted gain per row), the margin is instead whatever
        makes the prior's model the argmax where ``trust <= tau`` and 0 elsewhere. ``prior_mean``
        ((n, m) or (m,); default :attr:`prior_`): the per-model means to shrink toward, ``spread``
        (same shapes; default :attr:`spread_`) each model's family spread (the fit's out-of-fold rows
        use their fold's). The weight is also 1 where the family-spread risk overrode the pick."""
        w = shrink_weight(nu, self.shrink_)
        P = np.broadcast_to(self.prior_ if prior_mean is None else prior_mean, np.shape(Q))
        q = (1.0 - w[:, None]) * np.asarray(Q, np.float64) + w[:, None] * P
        shrunk = q
        k0, k1 = (float(v) for v in self.spread_risk_)
        if k0 or k1:  # a model must beat the prior's by its family spread times k(nu) to be picked
            S = np.broadcast_to(self.spread_ if spread is None else spread, np.shape(Q))
            q = q - (k0 + (k1 - k0) * nu)[:, None] * S
        if not np.any(self.margin_) and trust is None and q is shrunk:
            return q, w
        r = np.arange(len(q))
        p = np.broadcast_to(np.asarray(self.prior_model if prior is None else prior, np.int64), (len(q),))
        if (
            trust is not None
        ):  # just enough to put the prior's model strictly first where the pick is not trusted
            m = np.where(trust > self.trust_tau_[0], 0.0, np.maximum(q.max(axis=1) - q[r, p], 0.0) + 1e-6)
        else:
            m = self.margin(nu)
        out = margin_lowered(q, m, p)
        pick = np.argmax(shrunk, axis=1)
        overrode = (pick != p) & (np.argmax(out, axis=1) == p)
        return out, np.where(overrode, 1.0, w)

    def novelty(self, X: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """(n,) novelty of the prompts with embeddings ``X (n, d)`` (and ``texts``, :attr:`uses_text`)."""
        return self._novelty(self._served_features(X, texts, "novelty")[0])

    def transform(self, X: np.ndarray, quality: np.ndarray, texts: Sequence[str] | None = None) -> Guarded:
        """Shrunk quality, novelty, shrink weight and interval for ``X (n, d)``, the prompt
        ``texts`` (when :attr:`uses_text`) and the head's (calibrated) ``quality (n, m)``."""
        F, nn = self._served_features(X, texts, "transform")
        nu = self._novelty(F)
        t = None
        if len(self.trust_):
            Yk = self.bank_y_[nn].mean(axis=1)
            t = self._trust_predict(self.trust_features(F, nu, quality, Yk, self.prior_model))
        q, w = self._apply(quality, nu, trust=t)
        c = self._cells(nu, q)
        cols = np.arange(q.shape[1])[None, :]
        coin = prompt_uniform(X)[:, None] < self.halfwidth_p_[c, cols]
        h = np.where(coin, self.halfwidth_[c, cols], self.halfwidth_low_[c, cols])
        return Guarded(q, nu, w, np.clip(q - h, 0.0, 1.0), np.clip(q + h, 0.0, 1.0), t)

    def _cells(self, nu: np.ndarray, q: np.ndarray) -> np.ndarray:
        """(n, m) row of the conformal table per prompt and model: its novelty bin, times
        ``q_bins``, plus the bin of the model's guarded estimate ``q (n, m)``."""
        b = np.searchsorted(self.bin_edges_, nu, side="right")[:, None]
        nq = self.qbin_edges_.shape[1] + 1
        if nq == 1:
            return np.broadcast_to(b, q.shape)
        qb = np.column_stack(
            [np.searchsorted(self.qbin_edges_[j], q[:, j], side="right") for j in range(q.shape[1])]
        )
        return b * nq + qb

    @property
    def fitted_mode(self) -> str:
        """What the fitted guard does, read off its state (``mode="auto"`` picks at fit time):
        ``trust``, ``margin``, ``spread``, ``shrink``, or ``none`` where the fit chose to change
        nothing."""
        self._check_fitted("prior_")
        if len(self.trust_):
            return "trust"
        if np.any(self.margin_):
            return "margin"
        if np.any(self.spread_risk_):
            return "spread"
        return "shrink" if np.any(self.shrink_[:2]) else "none"

    @property
    def prior_model(self) -> int:
        """Column of the conservative prior's best model (the training pool's best single model)."""
        return int(np.argmax(self.prior_))

    def with_added_models(self, prior: Sequence[float]) -> NoveltyGuard:
        """A copy for a pool that gained ``len(prior)`` models (appended columns, e.g. added from
        probes), with ``prior`` their conservative prior mean quality (what the pool prior holds for
        the trained models: their mean score). The novelty score and the shrink / margin parameters
        read no model column and stay as they are; a new column's conformal half-width per novelty
        bin is the widest of the trained columns' (its errors were never measured out of fold, so it
        gets the most cautious interval), and the deferral model's (``mode: trust``) stored
        neighbour outcomes read its prior. The trained columns keep the same arrays.
        """
        self._check_fitted("bank_")
        prior = np.asarray(prior, dtype=np.float64).ravel()
        if not len(prior) or not np.isfinite(prior).all() or (prior < 0).any() or (prior > 1).any():
            raise ValueError(
                f"NoveltyGuard.with_added_models: prior must be finite values in [0, 1], got {prior}"
            )
        out = type(self)(**self.get_params())
        state = {k: np.array(v, copy=True) for k, v in self.state_dict().items()}
        state["prior"] = np.append(state["prior"], prior)
        # per novelty bin the widest of every trained column's cells, in each of the new column's cells
        nq = state["qbin_edges"].shape[1] + 1
        H = state["halfwidth"]
        wide = np.repeat(H.reshape(-1, nq * H.shape[1]).max(axis=1), nq)[:, None]
        for key, new in (("halfwidth", wide), ("halfwidth_low", wide), ("halfwidth_p", np.ones_like(wide))):
            state[key] = np.hstack([state[key], np.repeat(new, len(prior), axis=1)])
        state["qbin_edges"] = np.vstack([state["qbin_edges"], np.zeros((len(prior), nq - 1))])
        # the deferral model's kNN second opinion has no outcomes of a new model: its prior stands in
        # a new model's advantage was never seen across families: the widest spread of the trained ones
        state["spread"] = np.append(state["spread"], np.full(len(prior), state["spread"].max(initial=0.0)))
        bank_y = state["bank_y"]
        state["bank_y"] = np.hstack([bank_y, np.broadcast_to(prior, (bank_y.shape[0], len(prior)))])
        return out.load_state_dict(state)

    # ---- persistence ---------------------------------------------------------------------------
    _STATE = (
        "bank_",
        "fam_coef_",
        "fam_intercept_",
        "feat_mean_",
        "feat_std_",
        "nov_coef_",
        "nov_intercept_",
        "prior_",
        "shrink_",
        "margin_",
        "bin_edges_",
        "qbin_edges_",
        "halfwidth_",
        "halfwidth_low_",
        "halfwidth_p_",
        "cv_gain_",
        "bank_y_",
        "trust_",
        "trust_scale_",
        "trust_tau_",
        "spread_",
        "spread_risk_",
        "bank_kdist_",
    )

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("bank_")
        out = {k.rstrip("_"): np.asarray(getattr(self, k)) for k in self._STATE}
        out["cv_auroc"] = np.asarray([self.cv_auroc_])
        out["cv_trust_auroc"] = np.asarray([self.cv_trust_auroc_])
        # which features the score's coefficients belong to (a later default cannot change a saved guard)
        out["feature_index"] = np.array([FEATURES.index(f) for f in self.feature_names], np.int64)
        for t, bank in self.ngrams_.items():
            out.update(bank.state_dict(prefix=f"{t}_"))
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> NoveltyGuard:
        if "feature_index" in state:
            idx = np.asarray(state["feature_index"]).ravel()
            if not len(idx) or idx.min() < 0 or idx.max() >= len(FEATURES):
                raise ValueError(
                    f"NoveltyGuard: array 'feature_index' {idx} does not index {len(FEATURES)} features"
                )
            self.features = [FEATURES[int(i)] for i in idx]
        elif "bank_kdist" not in state and np.shape(state.get("feat_mean", ())) == (4,):
            # a guard saved before its novelty features were a parameter: the four embedding ones
            self.features = list(LEGACY_FEATURES)
        # the table's estimate bins are the state's (a guard saved before them has one per novelty bin)
        self.q_bins = (
            int(np.shape(state["qbin_edges"])[1]) + 1 if np.ndim(state.get("qbin_edges")) == 2 else 1
        )
        n_feat = len(self.feature_names)
        shapes: dict[str, tuple[int | None, ...]] = {
            "bank": (None, None),
            "fam_coef": (None, None),
            "fam_intercept": (None,),
            "feat_mean": (n_feat,),
            "feat_std": (n_feat,),
            "nov_coef": (n_feat,),
            "nov_intercept": (1,),
            "prior": (None,),
            "shrink": (None,),
            "margin": (3,),
            "bin_edges": (max(self.n_bins - 1, 0),),
            "qbin_edges": (None, max(int(self.q_bins) - 1, 0)),
            "halfwidth": (self.n_bins * int(self.q_bins), None),
            "halfwidth_low": (self.n_bins * int(self.q_bins), None),
            "halfwidth_p": (self.n_bins * int(self.q_bins), None),
            "cv_gain": (2,),
            "cv_auroc": (1,),
            "bank_y": (None, None),
            "trust": (None,),
            "trust_scale": (2, None),
            "trust_tau": (1,),
            "cv_trust_auroc": (1,),
            "spread": (None,),
            "spread_risk": (2,),
            "bank_kdist": (None,),
            "feature_index": (n_feat,),
            **{f"{t}_{k}": (None,) for t in self.text_spaces for k in ("data", "indices", "indptr", "idf")},
        }
        # a guard saved before the margin (or the deferral model) existed only shrinks (or margins)
        m0 = np.asarray(state["prior"]).shape[0] if "prior" in state else 0
        old = {
            "margin": np.zeros(3),
            "bank_y": np.zeros((0, m0)),
            "trust": np.zeros(0),
            "trust_scale": np.zeros((2, 0)),
            "trust_tau": np.zeros(1),
            "cv_trust_auroc": np.array([np.nan]),
            "spread": np.zeros(m0),
            "spread_risk": np.zeros(2),
            "bank_kdist": np.zeros(0),
            "qbin_edges": np.zeros((m0, 0)),
            "feature_index": np.array([FEATURES.index(f) for f in self.feature_names]),
        }
        if "halfwidth" in state:  # saved before the smoothed intervals: the deterministic quantile
            old.update(
                halfwidth_low=np.asarray(state["halfwidth"]),
                halfwidth_p=np.ones(np.shape(state["halfwidth"])),
            )
        st = check_state({**old, **state}, shapes, "NoveltyGuard")
        if np.shape(st["shrink"]) not in ((2,), (3,)):
            raise ValueError(
                f"NoveltyGuard: array 'shrink' has shape {np.shape(st['shrink'])}, expected (3,) "
                "(w_id, w_novel, novelty floor) or (2,) as saved before the floor"
            )
        st["shrink"] = np.r_[st["shrink"], 0.0][:3]  # a guard saved before the floor: t = 0
        n_bank = np.shape(st["bank"])[0]
        if "local_scale" in self.feature_names and st["bank_kdist"].shape != (n_bank,):
            raise ValueError(
                f"NoveltyGuard: array 'bank_kdist' has shape {st['bank_kdist'].shape}, expected ({n_bank},) "
                "(the local_scale feature reads one per bank prompt)"
            )
        self.ngrams_ = {
            t: NgramBank(t).load_state_dict(st, prefix=f"{t}_", n_bank=n_bank) for t in self.text_spaces
        }
        for k in self._STATE:
            setattr(self, k, np.asarray(st[k.rstrip("_")], dtype=np.float32 if k == "bank_" else np.float64))
        self.fam_coef_ = self.fam_coef_.astype(np.float32)
        self.fam_intercept_ = self.fam_intercept_.astype(np.float32)
        self.cv_auroc_ = float(st["cv_auroc"][0])
        self.cv_trust_auroc_ = float(st["cv_trust_auroc"][0])
        m = len(self.prior_)
        n_trust = len(TRUST_FEATURES)
        if len(self.trust_) and (
            len(self.trust_) != 1 + n_trust + n_trust * (n_trust + 1) // 2
            or self.trust_scale_.shape != (2, n_trust)
            or self.bank_y_.shape != (len(self.bank_), m)
        ):
            raise ValueError(
                f"NoveltyGuard: deferral model {self.trust_.shape} / scale {self.trust_scale_.shape} / bank "
                f"outcomes {self.bank_y_.shape} do not match {n_trust} features, a bank of {len(self.bank_)}, {m} models"
            )
        if (
            self.halfwidth_low_.shape != self.halfwidth_.shape
            or self.halfwidth_p_.shape != self.halfwidth_.shape
        ):
            raise ValueError(
                f"NoveltyGuard: halfwidth_low {self.halfwidth_low_.shape} / halfwidth_p {self.halfwidth_p_.shape} "
                f"do not match halfwidth {self.halfwidth_.shape}"
            )
        if (
            self.halfwidth_.shape[1] != m
            or self.bank_.shape[1] != self.fam_coef_.shape[1]
            or self.spread_.shape != (m,)
            or self.qbin_edges_.shape[0] != m
        ):
            raise ValueError(
                f"NoveltyGuard: halfwidth {self.halfwidth_.shape} / bank {self.bank_.shape} / family head "
                f"{self.fam_coef_.shape} / spread {self.spread_.shape} / qbin_edges {self.qbin_edges_.shape} "
                f"do not match {m} models"
            )
        return self
