"""Task-type classifier (multinomial logistic regression + temperature scaling) and the task-mixture
quality head built on it.

Fitting uses scikit-learn. With ``calibrate=True`` the classifier is fitted on all but a seeded,
stratified ``val_fraction`` of the data and a temperature is fitted on that held-out part (Guo et
al., 2017). The classifier is not refitted on all rows afterwards: a refit changes its confidence
and voids the temperature. Inference is numpy: ``softmax((X @ W.T + b) / T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from router_ml.data.taxonomy import TASK_TYPES
from router_ml.predictors.base import (
    BasePredictor,
    QualityPredictor,
    as_float_matrix,
    check_state,
    state_size,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_temperature(logits: np.ndarray, y: np.ndarray, iters: int = 60) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)`` for labels ``y``; ``logits (n, L)``.

    The NLL is convex in ``1 / T``, so a golden-section search over ``1 / T in [0.05, 20]`` finds it.
    """
    rows = np.arange(len(y))

    def nll(beta: float) -> float:
        z = logits * beta
        z = z - z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[rows, y]).mean())

    lo, hi = 0.05, 20.0
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(1.0 / ((lo + hi) / 2.0))


class TaskClassifier(BasePredictor):
    """Predicts the task type of a prompt embedding: ``predict_proba(X (n, d)) -> (n, len(labels))``.

    ``C``: inverse L2 strength of the logistic regression. ``calibrate``: fit a temperature on a
    ``val_fraction`` held-out part (stratified, ``seed``). Labels absent from the training data get
    probability 0. ``class_weight="balanced"`` keeps a flood of benchmark prompts of one type from
    drowning the rarer types.

    ``text_features > 0`` adds hashed word uni- and bigrams of the prompt's instruction view (its
    first and last ``view_words`` words), scaled by ``text_scale``, beside the embedding: when a long
    pasted text dominates the embedding, the words that say what to DO with it ("summarise",
    "label", "TL;DR") still count. Hashing is stateless (no vocabulary to store); the weights are an
    ``(L, text_features)`` array. Such a head needs the prompt texts at predict time too.
    """

    name = "task"

    def __init__(
        self,
        labels: Sequence[str] = TASK_TYPES,
        C: float = 10.0,
        calibrate: bool = True,
        val_fraction: float = 0.2,
        seed: int = 0,
        class_weight: str | None = None,
        text_features: int = 0,
        text_scale: float = 2.0,
        view_words: int = 16,
    ) -> None:
        self.labels = labels
        self.C = C
        self.calibrate = calibrate
        self.val_fraction = val_fraction
        self.seed = seed
        self.class_weight = class_weight
        self.text_features = text_features
        self.text_scale = text_scale
        self.view_words = view_words

    def _text_matrix(self, texts: Sequence[str] | None, n: int) -> Any:
        """Sparse ``(n, text_features)`` hashed n-grams of each text's instruction view."""
        from sklearn.feature_extraction.text import HashingVectorizer

        if texts is None:
            raise ValueError(
                "TaskClassifier: this head uses text features (text_features > 0); pass the prompt texts"
            )
        texts = list(texts)
        if len(texts) != n:
            raise ValueError(f"TaskClassifier: {n} embedding rows but {len(texts)} texts")
        k = int(self.view_words)
        views = []
        for t in texts:
            w = str(t).split()
            views.append(" ".join(w) if len(w) <= 2 * k else " ".join(w[:k] + w[-k:]))
        hv = HashingVectorizer(
            n_features=int(self.text_features),
            ngram_range=(1, 2),
            binary=True,
            norm="l2",
            alternate_sign=False,
        )
        return hv.transform(views) * float(self.text_scale)

    def _features(self, X: np.ndarray, texts: Sequence[str] | None) -> Any:
        if not self.text_features:
            return X
        import scipy.sparse as sp

        return sp.hstack([sp.csr_matrix(X), self._text_matrix(texts, X.shape[0])]).tocsr()

    def _encode(self, y: Sequence[str]) -> np.ndarray:
        index = {lab: i for i, lab in enumerate(self.labels)}
        unknown = sorted({str(v) for v in y if v not in index})
        if unknown:
            raise ValueError(f"TaskClassifier: label(s) {unknown} not in labels {list(self.labels)}")
        return np.array([index[v] for v in y], dtype=np.int64)

    def _fit_lr(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full ``(L, d)`` weights and ``(L,)`` biases; absent classes get bias -inf."""
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=float(self.C), max_iter=3000, class_weight=self.class_weight)
        clf.fit(X, y)
        L = len(self.labels)
        W = np.zeros((L, X.shape[1]))
        b = np.full(L, -np.inf)
        if len(clf.classes_) == 2:  # sklearn keeps one binary row: logit = w.x + c for class 1
            W[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
            W[clf.classes_[0]], b[clf.classes_[0]] = 0.0, 0.0
        else:
            W[clf.classes_] = clf.coef_
            b[clf.classes_] = clf.intercept_
        return W, b

    def fit(self, X: np.ndarray, y: Sequence[str], texts: Sequence[str] | None = None) -> TaskClassifier:
        """Fit on embeddings ``X (n, d)``, label strings ``y (n,)`` and (with text features) the texts."""
        X = as_float_matrix(X, "TaskClassifier", dtype=np.float64)
        yi = self._encode(list(y))
        if yi.shape[0] != X.shape[0]:
            raise ValueError(f"TaskClassifier: {X.shape[0]} rows in X but {yi.shape[0]} labels")
        if len(np.unique(yi)) < 2:
            raise ValueError("TaskClassifier: need at least two distinct labels to fit")
        tr, va = self._holdout(yi) if self.calibrate else (np.arange(len(yi)), np.arange(0))
        if len(va) == 0 or len(np.unique(yi[tr])) < 2:
            tr, va = np.arange(len(yi)), np.arange(0)
        d = X.shape[1]
        F = self._features(X, texts)
        W, b = self._fit_lr(F[tr], yi[tr])
        temperature = 1.0
        keep = np.isfinite(b)[yi[va]]  # held-out rows whose class the model has seen
        if keep.any():
            seen = np.isfinite(b)
            remap = np.cumsum(seen) - 1
            logits = np.asarray(F[va][keep] @ W[seen].T) + b[seen]
            temperature = _fit_temperature(logits, remap[yi[va][keep]])
        self._set_state(W[:, :d], b, np.array([temperature]), W[:, d:])
        return self

    def _holdout(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Seeded stratified split: ``val_fraction`` of each class (classes with >= 2 rows) held out."""
        rng = np.random.default_rng(int(self.seed))
        val = []
        for c in np.unique(y):
            rows = rng.permutation(np.where(y == c)[0])
            n_val = round(len(rows) * float(self.val_fraction))
            if len(rows) >= 2:
                val.extend(rows[: min(n_val, len(rows) - 1)])
        val = np.sort(np.array(val, dtype=np.int64))
        return np.setdiff1d(np.arange(len(y)), val), val

    def _set_state(self, W: np.ndarray, b: np.ndarray, temperature: np.ndarray, text_W: np.ndarray) -> None:
        self.text_coef_ = np.ascontiguousarray(text_W, dtype=np.float64)
        self._text_coef_t = np.ascontiguousarray(self.text_coef_.T)
        self.coef_ = np.ascontiguousarray(W, dtype=np.float64)
        self.intercept_ = np.ascontiguousarray(b, dtype=np.float64)
        self.temperature_ = np.ascontiguousarray(temperature, dtype=np.float64)
        self._coef_t = np.ascontiguousarray(self.coef_.T)
        self.dim_ = int(self.coef_.shape[1])

    def decision_function(self, X: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """Temperature-scaled logits ``(n, d) -> (n, L)`` (-inf for labels never seen in training)."""
        self._check_fitted("coef_")
        X = as_float_matrix(X, "TaskClassifier", self.dim_, dtype=np.float64)
        z = X @ self._coef_t + self.intercept_
        if self.text_features:
            z = z + np.asarray(self._text_matrix(texts, X.shape[0]) @ self._text_coef_t)
        return z / self.temperature_[0]

    def predict_proba(self, X: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """Calibrated class probabilities ``(n, d) -> (n, len(labels))``, columns in ``labels`` order."""
        return _softmax(self.decision_function(X, texts))

    def predict(self, X: np.ndarray, texts: Sequence[str] | None = None) -> list[str]:
        """Most probable label per row: ``(n, d) -> list of n strings``."""
        return [self.labels[i] for i in self.decision_function(X, texts).argmax(axis=1)]

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("coef_")
        state = {"coef": self.coef_, "intercept": self.intercept_, "temperature": self.temperature_}
        if self.text_features:
            state["text_coef"] = self.text_coef_
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> TaskClassifier:
        L = len(self.labels)
        shapes: dict[str, tuple[int | None, ...]] = {
            "coef": (L, None),
            "intercept": (L,),
            "temperature": (1,),
        }
        if self.text_features:
            shapes["text_coef"] = (L, int(self.text_features))
        s = check_state(state, shapes, "TaskClassifier")
        if not s["temperature"][0] > 0:
            raise ValueError(f"TaskClassifier: temperature must be > 0, got {s['temperature'][0]}")
        text_W = s.get("text_coef", np.zeros((L, 0)))
        self._set_state(s["coef"], s["intercept"], s["temperature"], text_W)
        return self


class TaskMixtureQualityPredictor(QualityPredictor):
    """Quality as a task mixture: ``predict(x) = sum_t p(t | x) * mu_t``, ``(n, d) -> (n, m)``.

    ``p(t | x)`` is a calibrated :class:`TaskClassifier` over the integer ``task_ids`` given to
    ``fit`` (required); ``mu_t (T, m)`` is each task's NaN-aware mean score, shrunk towards the
    overall column mean with ``prior_count`` pseudo-rows. Its strength depends on the ids: with
    fine-grained source tasks (benchmarks) it is the strongest head on ``llmrouter_ulab``; with
    the six coarse task types it is weaker than kNN.
    """

    name = "taskmix"

    def __init__(
        self, C: float = 10.0, calibrate: bool = True, prior_count: float = 5.0, seed: int = 0
    ) -> None:
        self.C = C
        self.calibrate = calibrate
        self.prior_count = prior_count
        self.seed = seed

    def _classifier(self, n_tasks: int) -> TaskClassifier:
        labels = tuple(str(t) for t in range(n_tasks))
        return TaskClassifier(
            labels=labels,
            C=self.C,
            calibrate=self.calibrate,
            seed=self.seed,
            class_weight=None,
            text_features=0,
        )

    def fit(
        self, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None = None
    ) -> TaskMixtureQualityPredictor:
        """Fit on ``X (n, d)``, ``Y (n, m)`` (NaN = no outcome) and ``task_ids (n,)`` (required)."""
        if task_ids is None:
            raise ValueError("TaskMixtureQualityPredictor: fit needs task_ids (one integer task id per row)")
        X, Y, task_ids = self._check_fit_inputs(X, Y, task_ids)
        if task_ids.min() < 0:
            raise ValueError("TaskMixtureQualityPredictor: task_ids must be >= 0")
        n_tasks = int(task_ids.max()) + 1
        clf = self._classifier(n_tasks).fit(X, [str(t) for t in task_ids])
        seen = ~np.isnan(Y)
        prior = np.nanmean(Y, axis=0)
        onehot = np.eye(n_tasks)[task_ids]  # (n, T)
        sums = onehot.T @ np.where(seen, Y, 0.0)  # (T, m)
        counts = onehot.T @ seen  # (T, m)
        k = float(self.prior_count)
        with np.errstate(invalid="ignore"):
            mu = (sums + k * prior) / (counts + k)
        mu = np.where(counts + k > 0, mu, prior)
        self._set_state(clf, mu)
        return self

    def _set_state(self, clf: TaskClassifier, mu: np.ndarray) -> None:
        self.classifier_ = clf
        self.task_means_ = np.ascontiguousarray(mu, dtype=np.float64)
        self.n_models_ = int(mu.shape[1])
        self.dim_ = clf.dim_

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Expected score per model, ``(n, d) -> (n, m)`` float64 in [0, 1]."""
        self._check_fitted("task_means_")
        return np.clip(self.classifier_.predict_proba(X) @ self.task_means_, 0.0, 1.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("task_means_")
        return {
            **{f"task.{k}": v for k, v in self.classifier_.state_dict().items()},
            "task_means": self.task_means_,
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> TaskMixtureQualityPredictor:
        owner = "TaskMixtureQualityPredictor"
        T = state_size(state, "task_means", 0)
        s = check_state(
            state,
            {
                "task.coef": (T, None),
                "task.intercept": (T,),
                "task.temperature": (1,),
                "task_means": (T, None),
            },
            owner,
        )
        clf = self._classifier(int(s["task_means"].shape[0]))
        clf.load_state_dict({k[len("task.") :]: v for k, v in s.items() if k.startswith("task.")})
        self._set_state(clf, s["task_means"])
        return self
