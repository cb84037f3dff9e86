"""A router that knows when it does not know: novelty, a margin before leaving the prior, intervals.

:class:`NoveltyGuard` sits after a quality head (and its calibrator). Per prompt it gives

- ``novelty`` in [0, 1]: the probability that the prompt comes from a task family the router never
  trained on. Features (all from the embedding, one matrix product against stored arrays): the
  cosine distance to the nearest and to the ``k`` nearest prompts of a stored bank of training
  embeddings, and the top probability and entropy of a linear classifier over the training
  families. A logistic regression on these features is fitted to tell out-of-family prompts
  (family-grouped cross-validation) from in-distribution ones (random folds);
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

      w = clip(w_id + (w_novel - w_id) * novelty, 0, 1);  q' = (1 - w) * q + w * prior

  with ``(w_id, w_novel)`` chosen by the same objective;
- a split-conformal interval per model: ``q' ± halfwidth_[bin, j]``, the finite-sample
  ``coverage`` quantile of ``|y - q'|`` over the out-of-fold rows of that novelty bin (the
  intervals widen with novelty where the errors do).

The conformal quantiles are computed here rather than with MAPIE: they are one quantile per
(model, novelty bin) of residuals that the family-grouped CV already produced, whereas MAPIE
conformalises a fitted estimator on a calibration set it predicts itself (one per output column),
and would add a dependency to the serving path for a ``np.quantile``.

``fit`` takes the head as a callable ``fit_predict(train_rows, test_rows) -> (k, m)`` so this
module stays below the training code; state is plain arrays (``state_dict``), no pickle. The
out-of-fold predictions are the head's own (uncalibrated: a calibrator per inner fold would need a
calibration part of each); the router applies the guard after its calibrator, which maps the same
[0, 1] quality scale. The novelty features of the out-of-fold rows are measured against their
fold's training part, the served ones against the full bank (slightly nearer neighbours).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router_ml.predictors.base import BasePredictor, check_state, few_rows_blas

#: ``fit_predict(train_rows (a,), test_rows (b,)) -> (b, m)`` out-of-fold quality predictions
FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]

GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: margin grid (quality points on [0, 1]): base ``a`` and slope ``b`` of m(nu) = a + b * max(nu - t, 0)
MARGIN_BASE = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0)
MARGIN_SLOPE = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: novelty floors ``t``: these quantiles of the in-distribution out-of-fold novelty (and 0)
FLOOR_QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99)


def _unit(A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float32)
    return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)


def _softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def conformal_halfwidth(residuals: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile of ``|residuals|`` (NaN ignored): the ``ceil((n+1) coverage)``-th
    smallest, so a new exchangeable residual falls within it with probability >= ``coverage``;
    ``inf`` when there are too few residuals for that."""
    r = np.sort(np.abs(residuals[~np.isnan(residuals)]))
    k = int(np.ceil((len(r) + 1) * coverage))
    return float(r[k - 1]) if 0 < k <= len(r) else float("inf")


def routed_gain(q: np.ndarray, Y: np.ndarray, best: np.ndarray) -> np.ndarray:
    """(n,) score of the argmax of ``q`` minus the score of column ``best`` (n,), per row; NaN
    outcomes count as 0."""
    r = np.arange(len(q))
    Y0 = np.nan_to_num(Y, nan=0.0)
    return Y0[r, np.argmax(q, axis=1)] - Y0[r, best]


@dataclass
class Guarded:
    """What :meth:`NoveltyGuard.transform` gives for ``n`` prompts over ``m`` models."""

    quality: np.ndarray  # (n, m) shrunk quality
    novelty: np.ndarray  # (n,) in [0, 1]
    shrink: np.ndarray  # (n,) weight of the prior in [0, 1]
    lower: np.ndarray  # (n, m) interval bounds, clipped to [0, 1]
    upper: np.ndarray  # (n, m)


class NoveltyGuard(BasePredictor):
    """Novelty score, a margin before leaving the pool prior's model (or shrinkage toward the prior) and
    per-model conformal intervals (module doc).

    Params: ``k`` neighbours for the density feature; ``folds`` of the family-grouped and of the
    random CV; ``coverage`` nominal coverage of the intervals; ``n_bins`` novelty bins of the
    conformal table; ``max_bank`` training embeddings kept for the distance features (a seeded
    subsample above it); ``family_loss_weight`` extra weight of out-of-family losses in the
    margin / shrinkage objective; ``mode`` ``"margin"`` (decide) or ``"shrink"`` (blend); ``seed``.
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
    ):
        if mode not in ("margin", "shrink"):
            raise ValueError(f"NoveltyGuard: mode must be 'margin' or 'shrink', got {mode!r}")
        self.k = k
        self.folds = folds
        self.coverage = coverage
        self.n_bins = n_bins
        self.max_bank = max_bank
        self.family_loss_weight = family_loss_weight
        self.mode = mode
        self.seed = seed

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
    def _features(bank: np.ndarray, coef: np.ndarray, icpt: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
        """(n, 4) novelty features of ``X (n, d)`` against a unit-norm ``bank (b, d)`` and a family
        classifier: nearest distance, mean distance of the ``k`` nearest, 1 - top family
        probability, normalised family entropy."""
        U = _unit(X)
        with few_rows_blas(len(U)):  # a threaded one-row product costs milliseconds on a loaded CPU
            S = U @ bank.T  # (n, b): the one product per row that the score costs
            Z = U @ coef.T + icpt
        k = min(k, S.shape[1])
        top = np.partition(S, S.shape[1] - k, axis=1)[:, -k:]
        P = _softmax(Z)
        ent = -(P * np.log(np.maximum(P, 1e-12))).sum(axis=1) / max(np.log(P.shape[1]), 1e-12)
        return np.column_stack([1.0 - top.max(axis=1), 1.0 - top.mean(axis=1), 1.0 - P.max(axis=1), ent])

    # ---- fit -----------------------------------------------------------------------------------
    def fit(
        self, X: np.ndarray, Y: np.ndarray, families: Sequence[Any], fit_predict: FitPredict
    ) -> NoveltyGuard:
        """Fit on the training prompts ``X (n, d)``, outcomes ``Y (n, m)`` and their task
        ``families`` (n,); ``fit_predict`` fits the quality head on some rows and predicts others.
        Needs at least two families (the out-of-family folds hold whole families out)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score

        X, Y = np.asarray(X, np.float32), np.asarray(Y, np.float64)
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
        rng = np.random.default_rng(self.seed)
        n_groups = min(int(self.folds), len(names))
        group_of = {f: i % n_groups for i, f in enumerate(rng.permutation(names))}
        groups = {
            "family": np.array([group_of[f] for f in fam]),
            "random": rng.integers(0, self.folds, len(X)),
        }
        oof = {}
        for kind, g in groups.items():
            Q, F, best = np.zeros_like(Y), np.zeros((len(X), 4)), np.zeros(len(X), np.int64)
            for v in np.unique(g):
                te, tr = np.where(g == v)[0], np.where(g != v)[0]
                Q[te] = fit_predict(tr, te)
                coef, icpt = self._family_head(X[tr], fam[tr], self.seed)
                F[te] = self._features(_unit(X[tr]), coef, icpt, X[te], self.k)
                best[te] = int(np.nanargmax(np.nanmean(Y[tr], axis=0)))
            oof[kind] = (Q, F, best)
        (Qf, Ff, bf), (Qi, Fi, bi) = oof["family"], oof["random"]

        # novelty: out-of-family (1) against in-distribution (0) out-of-fold prompts
        Fall = np.vstack([Fi, Ff])
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
        fam_rows = [fam == f for f in names]

        def objective(gi: np.ndarray, gf: np.ndarray) -> float:
            per_fam = np.array([gf[r].mean() for r in fam_rows])
            return gi.mean() + gf.mean() + self.family_loss_weight * np.minimum(per_fam, 0.0).mean()

        if self.mode == "shrink":
            # shrinkage strength: the (w_id, w_novel) of the grid with the best out-of-fold routing
            best_obj, best_w = -np.inf, (0.0, 0.0)
            for w0 in GRID:
                for w1 in (w for w in GRID if w >= w0):
                    obj = objective(
                        routed_gain(self._shrink(Qi, nu_i, w0, w1), Y, bi),
                        routed_gain(self._shrink(Qf, nu_f, w0, w1), Y, bf),
                    )
                    if obj > best_obj + 1e-12:
                        best_obj, best_w = obj, (w0, w1)
            self.shrink_, self.margin_ = np.asarray(best_w, np.float64), np.zeros(3)
        else:
            # decide, don't blend: keep the head's pick only where its predicted advantage over the
            # prior's model (the fold's best single model) exceeds m(nu) = a + b * max(nu - t, 0)
            sw = {}
            for kind, (Q, nu, b) in {"i": (Qi, nu_i, bi), "f": (Qf, nu_f, bf)}.items():
                r = np.arange(len(Q))
                pick = np.argmax(Q, axis=1)
                adv = Q[r, pick] - Q[r, b]
                sw[kind] = (nu, adv, routed_gain(Q, Y, b))
            floors = np.r_[0.0, np.quantile(nu_i, FLOOR_QUANTILES)]
            best_obj, best_m = -np.inf, (0.0, 0.0, 0.0)
            for a in MARGIN_BASE:
                for bslope in MARGIN_SLOPE:
                    for t in floors if bslope > 0 else (0.0,):
                        g = {
                            kind: np.where(adv > a + bslope * np.maximum(nu - t, 0.0), gh, 0.0)
                            for kind, (nu, adv, gh) in sw.items()
                        }
                        obj = objective(g["i"], g["f"])
                        if obj > best_obj + 1e-12:
                            best_obj, best_m = obj, (a, bslope, float(t))
            self.shrink_, self.margin_ = np.zeros(2), np.asarray(best_m, np.float64)
        self.cv_gain_ = np.array(
            [
                routed_gain(self._apply(Q, nu, b)[0], Y, b).mean()
                for Q, nu, b in ((Qi, nu_i, bi), (Qf, nu_f, bf))
            ]
        )

        # split-conformal half-widths per novelty bin and model, on the shrunk out-of-fold residuals
        nu = np.r_[nu_i, nu_f]
        R = np.abs(
            np.vstack([Y, Y]) - np.vstack([self._apply(Qi, nu_i, bi)[0], self._apply(Qf, nu_f, bf)[0]])
        )
        self.bin_edges_ = (
            np.quantile(nu, np.linspace(0, 1, self.n_bins + 1)[1:-1]) if self.n_bins > 1 else np.zeros(0)
        )
        b = np.searchsorted(self.bin_edges_, nu, side="right")
        self.halfwidth_ = np.array(
            [
                [conformal_halfwidth(R[b == i, j], self.coverage) for j in range(Y.shape[1])]
                for i in range(self.n_bins)
            ]
        )

        # what serving keeps: a bank of training embeddings and the family head on every prompt
        keep = rng.permutation(len(X))[: self.max_bank] if len(X) > self.max_bank else np.arange(len(X))
        self.bank_ = _unit(X[np.sort(keep)])
        self.fam_coef_, self.fam_intercept_ = self._family_head(X, fam, self.seed)
        return self

    # ---- apply ---------------------------------------------------------------------------------
    def _novelty(self, F: np.ndarray) -> np.ndarray:
        z = ((F - self.feat_mean_) / self.feat_std_) @ self.nov_coef_ + self.nov_intercept_[0]
        return 1.0 / (1.0 + np.exp(-z))

    def _shrink(self, Q: np.ndarray, nu: np.ndarray, w0: float, w1: float) -> np.ndarray:
        w = np.clip(w0 + (w1 - w0) * nu, 0.0, 1.0)[:, None]
        return (1.0 - w) * Q + w * self.prior_[None, :]

    def margin(self, nu: np.ndarray) -> np.ndarray:
        """(n,) the advantage over the prior's model that the head's pick needs at novelty ``nu``."""
        a, b, t = (float(v) for v in self.margin_)
        return a + b * np.maximum(np.asarray(nu, np.float64) - t, 0.0)

    def _apply(
        self, Q: np.ndarray, nu: np.ndarray, prior: np.ndarray | int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(guarded quality, weight of the prior)`` for the
        head's quality ``Q (n, m)`` at novelty ``nu (n,)``: shrunk toward the prior, then every model
        but the prior's (column ``prior``, default :attr:`prior_model`) lowered by the margin, so the
        argmax is the head's pick where its advantage exceeds the margin and the prior's otherwise
        (never a third model). The weight is 1 where the margin overrode the head's pick."""
        w0, w1 = (float(v) for v in self.shrink_)
        w = np.clip(w0 + (w1 - w0) * nu, 0.0, 1.0)
        q = (1.0 - w[:, None]) * np.asarray(Q, np.float64) + w[:, None] * self.prior_[None, :]
        if not np.any(self.margin_):
            return q, w
        r = np.arange(len(q))
        p = np.broadcast_to(np.asarray(self.prior_model if prior is None else prior, np.int64), (len(q),))
        m = self.margin(nu)
        out = q - m[:, None]
        out[r, p] = q[r, p]
        pick = np.argmax(q, axis=1)
        overrode = (pick != p) & (np.argmax(out, axis=1) == p)
        return out, np.where(overrode, 1.0, w)

    def novelty(self, X: np.ndarray) -> np.ndarray:
        """(n,) novelty of the prompts with embeddings ``X (n, d)``."""
        self._check_fitted("bank_")
        return self._novelty(self._features(self.bank_, self.fam_coef_, self.fam_intercept_, X, self.k))

    def transform(self, X: np.ndarray, quality: np.ndarray) -> Guarded:
        """Shrunk quality, novelty, shrink weight and interval for ``X (n, d)`` and the head's
        (calibrated) ``quality (n, m)``."""
        nu = self.novelty(X)
        q, w = self._apply(quality, nu)
        h = self.halfwidth_[np.searchsorted(self.bin_edges_, nu, side="right")]
        return Guarded(q, nu, w, np.clip(q - h, 0.0, 1.0), np.clip(q + h, 0.0, 1.0))

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
        gets the most cautious interval). The trained columns keep the same arrays.
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
        wide = state["halfwidth"].max(axis=1, keepdims=True)
        state["halfwidth"] = np.hstack([state["halfwidth"], np.repeat(wide, len(prior), axis=1)])
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
        "halfwidth_",
        "cv_gain_",
    )

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("bank_")
        out = {k.rstrip("_"): np.asarray(getattr(self, k)) for k in self._STATE}
        out["cv_auroc"] = np.asarray([self.cv_auroc_])
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> NoveltyGuard:
        shapes: dict[str, tuple[int | None, ...]] = {
            "bank": (None, None),
            "fam_coef": (None, None),
            "fam_intercept": (None,),
            "feat_mean": (4,),
            "feat_std": (4,),
            "nov_coef": (4,),
            "nov_intercept": (1,),
            "prior": (None,),
            "shrink": (2,),
            "margin": (3,),
            "bin_edges": (max(self.n_bins - 1, 0),),
            "halfwidth": (self.n_bins, None),
            "cv_gain": (2,),
            "cv_auroc": (1,),
        }
        # a guard saved before the margin existed only shrinks: no margin
        st = check_state({"margin": np.zeros(3), **state}, shapes, "NoveltyGuard")
        for k in self._STATE:
            setattr(self, k, np.asarray(st[k.rstrip("_")], dtype=np.float32 if k == "bank_" else np.float64))
        self.fam_coef_ = self.fam_coef_.astype(np.float32)
        self.fam_intercept_ = self.fam_intercept_.astype(np.float32)
        self.cv_auroc_ = float(st["cv_auroc"][0])
        m = len(self.prior_)
        if self.halfwidth_.shape[1] != m or self.bank_.shape[1] != self.fam_coef_.shape[1]:
            raise ValueError(
                f"NoveltyGuard: halfwidth {self.halfwidth_.shape} / bank {self.bank_.shape} / family head "
                f"{self.fam_coef_.shape} do not match {m} models"
            )
        return self
