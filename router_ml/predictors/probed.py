"""A new model column from a few probe outcomes, on top of any fitted quality head.

The existing heads already predict the quality of ``m`` models on every prompt; a new model's
quality is, to a good approximation, a combination of theirs. For each added model ``j``, on the
logit scale (``link="logit"``, what :meth:`ProbedQualityPredictor.add_model` fits by default)::

    q_j(x) = sigmoid(b_j + logit(P(x)) @ w_j),   P(x) = base.predict(x)   (n, m) -> (n,)

an item-response (logistic) regression of the binary / [0, 1] probe outcomes on the existing
models' predicted log-odds (clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]``), fitted by maximum a
posteriori: ``w_j ~ N(1/m, 1 / prior_precision)`` per coefficient (so with few probes the new model
is "the average existing model on the logit scale, shifted by ``b_j``"), ``b_j`` unpenalised
(:func:`fit_probe_logit`). Unlike a linear fit it cannot push a prompt every model gets right above
1 or one every model gets wrong below 0, and the binomial likelihood weights each probe by its
information. The older linear column (``link="identity"``, :func:`fit_probe_column`) is
``clip(b_j + P(x) @ w_j, 0, 1)``, a ridge shrunk towards the pool mean with the strength chosen by
leave-one-out; checkpoints written before the logit fit carry it and still load.

A small correction follows either fit: the probes' residuals ``r_i = y_i - q_j(x_i)``, smoothed over the
``bank_k`` probes most similar to the prompt and shrunk towards zero,
``sum_i s_i r_i / (sum_i s_i + bank_tau)`` with ``s_i = 1 / (1 - cos(x, x_i))`` (what the fit on
the pool's predictions cannot express locally, e.g. a model better at one task family than the pool
would suggest). The base head is untouched: its columns are the same arrays, bit for bit, and
nothing is retrained. Works for every head (``knn``, ``linear``, ``mlp``, ``mf``, ``taskmix``) because it only
reads their predictions. :func:`calibrator_with_identity` gives a fitted calibrator identity
columns for the added models (their regression is fitted to the probe scores themselves, so they
are already on the score scale; a second fit on the same probes would be in-sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from router_ml.predictors.base import BasePredictor, QualityPredictor, as_float_matrix, check_state

#: ridge strengths tried per added column (on the scale of the centred predictions' Gram matrix)
ALPHAS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1e3, 1e4, 1e12)
#: prior precision of the logit fit's coefficients around ``1/m`` (chosen on one benchmark split
#: among 1, 3, 10, 30, 100: ``experiments/bench_add_model.py``, README "Add a model from probes")
PRIOR_PRECISION = 30.0
#: the residual correction: neighbours (probes) per prompt and shrinkage towards 0 (chosen on one
#: benchmark split among k = 20, 50, 100 x tau = 10, 30, 100 by the worse of its two data sets;
#: checkpoints record their own values, those written before this choice tau = 10)
BANK_K, BANK_TAU = 50, 100.0
#: predicted qualities are clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]`` before the logit
LOGIT_EPS = 0.02
#: how an added column maps its linear predictor to a quality (the ``link`` state array)
LINKS = ("identity", "logit")


def _check_probes(P: np.ndarray, y: np.ndarray, owner: str) -> tuple[np.ndarray, np.ndarray]:
    """``(P, y)`` as float arrays, rows with a NaN score dropped; clear errors on bad input."""
    P = np.asarray(P, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    if P.ndim != 2 or P.shape[0] != y.shape[0]:
        raise ValueError(f"{owner}: P must be (p, m) with p = {y.shape[0]} rows, got {P.shape}")
    ok = ~np.isnan(y)
    if not ok.any():
        raise ValueError(f"{owner}: no probe outcome (every score is NaN)")
    if (y[ok] < 0).any() or (y[ok] > 1).any():
        raise ValueError(f"{owner}: probe scores must lie in [0, 1]")
    if not np.isfinite(P[ok]).all():
        raise ValueError(f"{owner}: predictions of the existing models contain NaN or inf")
    return P[ok], y[ok]


def logit(P: np.ndarray, eps: float = LOGIT_EPS) -> np.ndarray:
    """Log-odds of qualities clipped to ``[eps, 1 - eps]`` (same shape)."""
    P = np.clip(np.asarray(P, dtype=np.float64), eps, 1.0 - eps)
    return np.log(P / (1.0 - P))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow warnings."""
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35.0, 35.0)))


def fit_probe_logit(
    P: np.ndarray, y: np.ndarray, precision: float = PRIOR_PRECISION, eps: float = LOGIT_EPS
) -> np.ndarray:
    """Logistic regression of probe outcomes on the existing models' predicted log-odds.

    ``P (p, m)`` predicted qualities of the existing models on the probe prompts, ``y (p,)`` the new
    model's scores in [0, 1] (fractional scores count as a binomial share; NaN rows ignored).
    Maximises ``sum_i [y_i log q_i + (1 - y_i) log(1 - q_i)] - precision / 2 |w - 1/m|^2`` with
    ``q_i = sigmoid(b + logit(P_i) @ w)`` by damped Newton steps; ``b`` carries only a vanishing
    prior (precision 1e-6), enough to keep it finite when the probes are all 0 or all 1 (the
    column then sits at the edge of the score range). Returns ``coef (m + 1,) = [w, b]``.
    """
    if not precision > 0:
        raise ValueError(f"fit_probe_logit: precision must be > 0, got {precision}")
    P, y = _check_probes(P, y, "fit_probe_logit")
    m = P.shape[1]
    F = np.column_stack([logit(P, eps), np.ones(len(y))])
    prior_mean = np.append(np.full(m, 1.0 / m), 0.0)
    prior_prec = np.append(np.full(m, float(precision)), 1e-6)  # a whisper on b: finite when y is all 0 / 1
    coef = prior_mean.copy()
    for _ in range(100):
        q = sigmoid(F @ coef)
        grad = F.T @ (y - q) - prior_prec * (coef - prior_mean)
        hess = (F * (q * (1.0 - q))[:, None]).T @ F + np.diag(prior_prec)
        step = np.linalg.solve(hess, grad)
        # damped: a full Newton step from the prior mean can overshoot on separable probes
        coef = coef + step / max(1.0, float(np.abs(step).max()) / 5.0)
        if np.abs(step).max() < 1e-10:
            break
    return coef


def fit_probe_column(
    P: np.ndarray, y: np.ndarray, alphas: Sequence[float] = ALPHAS
) -> tuple[np.ndarray, float, float]:
    """Ridge of probe outcomes on the existing models' predictions, shrunk towards their mean.

    ``P (p, m)`` predicted qualities of the existing models on the probe prompts, ``y (p,)`` the new
    model's observed scores (NaN rows ignored). Minimises ``|y - b - P w|^2 + alpha |w - 1/m|^2``
    (intercept unpenalised) for each ``alpha`` and keeps the strongest one whose exact leave-one-out
    squared error is within one standard error of the least (``1e12``: the pool mean plus a fitted
    offset). Returns ``(coef (m + 1,) = [w, b], alpha, loo_mse)``.
    """
    P, y = _check_probes(P, y, "fit_probe_column")
    p, m = P.shape
    w0 = np.full(m, 1.0 / m)
    r = y - P @ w0  # what the pool mean misses
    Pm, rm = P.mean(axis=0), r.mean()
    Pc, rc = P - Pm, r - rm
    if p < 3:  # too few for leave-one-out: the pool mean plus a shift
        return np.append(w0, rm), float("inf"), float("nan")
    U, s, Vt = np.linalg.svd(Pc, full_matrices=False)
    Ur = U.T @ rc
    errs = []
    for alpha in alphas:
        f = s**2 / (s**2 + alpha)  # shrink factors
        h = (U**2) @ f + 1.0 / p  # hat diagonal, the intercept included
        errs.append(((rc - U @ (f * Ur)) / np.maximum(1.0 - h, 1e-9)) ** 2)
    mse = np.array([e.mean() for e in errs])
    best = int(np.argmin(mse))
    # one-standard-error rule: the strongest shrinkage whose leave-one-out error is within one
    # standard error of the least (the least-error alpha overfits a few probes)
    within = mse <= mse[best] + errs[best].std(ddof=1) / np.sqrt(p)
    i = max((j for j in range(len(alphas)) if within[j]), key=lambda j: alphas[j])
    alpha = float(alphas[i])
    delta = Vt.T @ (s / (s**2 + alpha) * Ur)
    w = w0 + delta
    b = rm - Pm @ delta  # = mean(y) - mean(P) @ w
    return np.append(w, b), alpha, float(mse[i])


class ProbedQualityPredictor(QualityPredictor):
    """A fitted quality head plus model columns added from probes (see the module docstring).

    ``base``: ``{"type": registry key, "params": constructor params}`` of the wrapped head (what
    ``router.json`` records; the arrays are stored under ``base.``). ``bank_k``/``bank_tau``: the
    residual correction's neighbours and shrinkage (``bank_k=0``: none). ``link``: how the next
    added column is fitted (``"logit"``: :func:`fit_probe_logit` with ``prior_precision``;
    ``"identity"``: :func:`fit_probe_column`); each column keeps its own link in the ``link`` state
    array, so columns added before the logit fit existed predict as they did. Built with
    :meth:`from_head`, grown with :meth:`add_model`; it is not trained from scratch.
    """

    name = "probed"

    def __init__(
        self,
        base: dict[str, Any] | None = None,
        bank_k: int = BANK_K,
        bank_tau: float = BANK_TAU,
        link: str = "logit",
        prior_precision: float = PRIOR_PRECISION,
    ) -> None:
        self.base = base
        self.bank_k = bank_k
        self.bank_tau = bank_tau
        self.link = link
        self.prior_precision = prior_precision

    @classmethod
    def from_head(cls, head: QualityPredictor, **kwargs: Any) -> ProbedQualityPredictor:
        """Wrap a fitted head (a probed head is copied, so adding to it leaves the original as is);
        ``kwargs``: ``bank_k``, ``bank_tau``, ``link``, ``prior_precision`` (for a copy: how the
        next column is fitted)."""
        if isinstance(head, ProbedQualityPredictor):
            out = cls(**{**head.get_params(), "base": dict(head.base or {}), **kwargs})
            out._set_state(
                head.base_, head.coef_, head.alpha_, head.n_probes_, head.bank_X_, head.bank_r_, head.link_
            )
            return out
        head._check_fitted("n_models_")
        m, d = int(head.n_models_), int(head.dim_)
        out = cls(base={"type": type(head).name, "params": head.get_params()}, **kwargs)
        empty = (
            np.zeros((0, m + 1)),
            np.zeros(0),
            np.zeros(0, dtype=np.int64),
            np.zeros((0, d)),
            np.zeros(0),
            np.zeros(0, dtype=np.int64),
        )
        out._set_state(head, *empty)
        return out

    def fit(self, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None = None) -> QualityPredictor:
        raise TypeError(
            "ProbedQualityPredictor is built from a fitted head (ProbedQualityPredictor.from_head) and "
            "grown with add_model; fit the base head instead"
        )

    def _set_state(
        self,
        base: Any,
        coef: np.ndarray,
        alpha: np.ndarray,
        n_probes: np.ndarray,
        bank_X: np.ndarray,
        bank_r: np.ndarray,
        link: np.ndarray,
    ) -> None:
        self.base_ = base
        self.coef_ = np.ascontiguousarray(coef, dtype=np.float64)  # (a, m_base + 1) = [w, b] per column
        # (a,) per column: the ridge strength (identity link) or the prior precision (logit link)
        self.alpha_ = np.ascontiguousarray(alpha, dtype=np.float64)
        self.link_ = np.ascontiguousarray(link, dtype=np.int64)  # (a,) index into LINKS
        self.n_probes_ = np.ascontiguousarray(n_probes, dtype=np.int64)  # (a,)
        # the probes of every added column in turn (column j's are the n_probes_[j] rows after the
        # earlier columns'): unit-norm embeddings (P, d) and residuals (P,)
        self.bank_X_ = np.ascontiguousarray(bank_X, dtype=np.float32)
        self.bank_r_ = np.ascontiguousarray(bank_r, dtype=np.float64)
        self._starts = np.concatenate([[0], np.cumsum(self.n_probes_)])
        self.n_base_ = int(base.n_models_)
        self.n_models_ = self.n_base_ + int(self.coef_.shape[0])
        self.dim_ = int(base.dim_)

    @property
    def uses_text(self) -> bool:  # type: ignore[override]
        """The base head's: a head that reads the text needs it for the added columns too."""
        return bool(getattr(getattr(self, "base_", None), "uses_text", False))

    @property
    def layers(self) -> list[int]:  # type: ignore[override]
        """The base head's encoder layers: ``X`` (and the probe bank) hold their states too."""
        return list(getattr(getattr(self, "base_", None), "layers", ()))

    def text_part(self, texts: Sequence[str]) -> Any:
        self._check_fitted("base_")
        return self.base_.text_part(texts)

    def base_predict(
        self, X: np.ndarray, texts: Sequence[str] | None = None, text_part: Any = None
    ) -> np.ndarray:
        """The base head's predictions ``(n, m_base)``, exactly as it makes them."""
        self._check_fitted("base_")
        if self.base_.uses_text:
            return self.base_.predict(X, texts=texts, text_part=text_part)
        return self.base_.predict(X)

    def predict(self, X: np.ndarray, texts: Sequence[str] | None = None, text_part: Any = None) -> np.ndarray:
        """``(n, d) -> (n, m_base + a)``: the base head's columns unchanged, then the added ones."""
        base = np.asarray(self.base_predict(X, texts=texts, text_part=text_part), dtype=np.float64)
        if not self.coef_.shape[0]:
            return base
        Xn = _unit(X) if int(self.bank_k) > 0 else None
        # one product per added column: a column predicts the same bits however many follow it
        added = [self._column(j, base, Xn) for j in range(self.coef_.shape[0])]
        return np.concatenate([base, np.column_stack(added)], axis=1)

    def _column(self, j: int, base: np.ndarray, Xn: np.ndarray | None) -> np.ndarray:
        """Added column ``j`` from the base predictions ``(n, m_base)`` and unit-norm prompts."""
        c = self.coef_[j]
        q = (
            sigmoid(logit(base) @ c[:-1] + c[-1])
            if LINKS[self.link_[j]] == "logit"
            else base @ c[:-1] + c[-1]
        )
        if Xn is not None:
            lo, hi = self._starts[j], self._starts[j + 1]
            q = q + bank_correction(Xn, self.bank_X_[lo:hi], self.bank_r_[lo:hi], self.bank_k, self.bank_tau)
        return np.clip(q, 0.0, 1.0)

    def add_model(
        self,
        X_probe: np.ndarray,
        y_probe: np.ndarray,
        texts: Sequence[str] | None = None,
        observed: np.ndarray | None = None,
        alphas: Sequence[float] = ALPHAS,
    ) -> int:
        """Add one model from its scores ``y_probe (p,)`` in [0, 1] on prompts ``X_probe (p, d)``
        (and their ``texts`` when the base head reads text); returns the new column's index. The
        column is fitted as ``self.link`` says (the default: the logit fit, see the module docstring);
        ``alphas``: the ridge strengths tried by the ``identity`` fit.

        ``observed (p, m_base)``: the existing models' own scores on the probe prompts where known
        (NaN elsewhere). The regression then reads them instead of the predictions there: the same
        questions answered by both models pin the new one's relation to each far better than
        predictions do. At prediction time the fitted weights apply to the predicted qualities.
        """
        X_probe = as_float_matrix(X_probe, "ProbedQualityPredictor.add_model", self.dim_)
        y = np.asarray(y_probe, dtype=np.float64).ravel()
        if y.shape[0] != X_probe.shape[0]:
            raise ValueError(f"add_model: {X_probe.shape[0]} probe prompts but {y.shape[0]} scores")
        P = np.asarray(self.base_predict(X_probe, texts=texts), dtype=np.float64)
        if observed is not None:
            observed = np.asarray(observed, dtype=np.float64)
            if observed.shape != P.shape:
                raise ValueError(f"add_model: observed must have shape {P.shape}, got {observed.shape}")
            P = np.where(np.isnan(observed), P, observed)
        if self.link not in LINKS:
            raise ValueError(f"ProbedQualityPredictor: link must be one of {LINKS}, got {self.link!r}")
        if self.link == "logit":
            coef, alpha = fit_probe_logit(P, y, self.prior_precision), float(self.prior_precision)
        else:
            coef, alpha, _ = fit_probe_column(P, y, alphas)
        ok = ~np.isnan(y)
        pred = (
            P if observed is None else np.asarray(self.base_predict(X_probe, texts=texts), dtype=np.float64)
        )[ok]
        fitted = (
            sigmoid(logit(pred) @ coef[:-1] + coef[-1])
            if self.link == "logit"
            else pred @ coef[:-1] + coef[-1]
        )
        resid = y[ok] - np.clip(fitted, 0.0, 1.0)
        self._set_state(
            self.base_,
            np.vstack([self.coef_, coef[None, :]]),
            np.append(self.alpha_, alpha),
            np.append(self.n_probes_, int(ok.sum())),
            np.vstack([self.bank_X_, _unit(X_probe[ok])]),
            np.append(self.bank_r_, resid),
            np.append(self.link_, LINKS.index(self.link)),
        )
        return self.n_models_ - 1

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("base_")
        return {
            **{f"base.{k}": v for k, v in self.base_.state_dict().items()},
            "coef": self.coef_,
            "alpha": self.alpha_,
            "n_probes": self.n_probes_,
            "bank_X": self.bank_X_,
            "bank_r": self.bank_r_,
            "link": self.link_,
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> ProbedQualityPredictor:
        from router_ml.predictors import build_quality_predictor

        owner = "ProbedQualityPredictor"
        spec = self.base or {}
        if "type" not in spec:
            raise ValueError(f"{owner}: params 'base' must name the wrapped head's type")
        shapes = {
            "coef": (None, None),
            "alpha": (None,),
            "n_probes": (None,),
            "bank_X": (None, None),
            "bank_r": (None,),
        }
        s = check_state({k: state[k] for k in shapes if k in state}, shapes, owner)
        a = s["coef"].shape[0]
        # checkpoints written before the logit fit: every added column is linear (identity)
        link = np.asarray(state["link"]) if "link" in state else np.zeros(a, dtype=np.int64)
        base = build_quality_predictor(spec["type"], **spec.get("params", {}))
        base.load_state_dict({k[len("base.") :]: v for k, v in state.items() if k.startswith("base.")})
        total = int(s["n_probes"].sum())
        if (
            s["coef"].shape[1] != base.n_models_ + 1
            or s["alpha"].shape != (a,)
            or s["n_probes"].shape != (a,)
            or s["bank_X"].shape != (total, base.dim_)
            or s["bank_r"].shape != (total,)
            or link.shape != (a,)
        ):
            raise ValueError(
                f"{owner}: arrays { ({k: v.shape for k, v in {**s, 'link': link}.items()}) } do not fit a "
                f"base head of {base.n_models_} models and {base.dim_} features"
            )
        if ((link < 0) | (link >= len(LINKS))).any():
            raise ValueError(f"{owner}: 'link' holds {sorted(set(link.tolist()))}, not indices into {LINKS}")
        self._set_state(base, s["coef"], s["alpha"], s["n_probes"], s["bank_X"], s["bank_r"], link)
        return self


def _unit(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32."""
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def bank_correction(Xn: np.ndarray, bank_X: np.ndarray, bank_r: np.ndarray, k: int, tau: float) -> np.ndarray:
    """``(n,)`` residuals of the ``k`` probes most similar to each unit-norm prompt of ``Xn (n, d)``,
    weighted ``1 / (1 - cos)`` and shrunk towards 0 by ``tau``."""
    if not len(bank_r):
        return np.zeros(Xn.shape[0])
    sims = (Xn @ bank_X.T).astype(np.float64)  # (n, P)
    k = min(int(k), sims.shape[1])
    idx = (
        np.argpartition(-sims, k - 1, axis=1)[:, :k]
        if k < sims.shape[1]
        else np.tile(np.arange(k), (len(sims), 1))
    )
    w = 1.0 / np.maximum(1.0 - np.take_along_axis(sims, idx, axis=1), 1e-6)
    return (w * bank_r[idx]).sum(axis=1) / (w.sum(axis=1) + float(tau))


def calibrator_with_identity(calibrator: BasePredictor, n_new: int = 1) -> BasePredictor:
    """A copy of a fitted calibrator with ``n_new`` identity columns appended (the added models).

    The old columns' maps are the same arrays, so they transform exactly as before. Supports the
    ``isotonic`` and ``temperature`` calibrators; anything else raises ``ValueError``.
    """
    state = {k: np.asarray(v) for k, v in calibrator.state_dict().items()}
    kind = type(calibrator).name
    if kind == "isotonic":
        width = state["x_thresholds"].shape[1]
        pad = np.zeros((n_new, width))
        state = {
            "x_thresholds": np.vstack([state["x_thresholds"], pad]),
            "y_thresholds": np.vstack([state["y_thresholds"], pad]),
            "counts": np.append(state["counts"], np.zeros(n_new, dtype=np.int64)),  # 0 = identity
        }
    elif kind == "temperature":
        state = {"a": np.append(state["a"], np.ones(n_new)), "b": np.append(state["b"], np.zeros(n_new))}
    else:
        raise ValueError(f"calibrator_with_identity: cannot extend a {kind!r} calibrator")
    return type(calibrator)(**calibrator.get_params()).load_state_dict(state)
