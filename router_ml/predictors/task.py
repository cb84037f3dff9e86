"""Task-type classifier: multinomial logistic regression + temperature scaling (the task-mixture
quality head built on it lives in :mod:`router_ml.predictors.taskmix`).

Fitting uses scikit-learn. With ``calibrate=True`` it cross-fits: one model per stratified fold,
a temperature fitted on the out-of-fold logits (every row scored by a model that never saw it; Guo
et al., 2017), and the mean of the fold models as the classifier. A plain refit on all rows would
change the confidence the temperature was fitted for. Inference is numpy:
``softmax((X @ W.T + b + text logits) / T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from router_ml.data.taxonomy import TASK_TYPES
from router_ml.embeddings.base import check_layers
from router_ml.predictors.base import BasePredictor, as_float_matrix, check_state
from router_ml.predictors.task_text import (
    CUE_LEXICON_CRC,
    CUE_TASKS,
    sparse_rows,
    text_terms,
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

    ``C``: inverse L2 strength of the logistic regression. ``calibrate``: cross-fit
    ``cv_folds`` stratified, seeded fold models, average them, and fit a temperature on their
    out-of-fold logits. Labels absent from the training data get
    probability 0. ``class_weight="balanced"`` keeps a flood of benchmark prompts of one type from
    drowning the rarer types.

    ``text_features > 0`` adds hashed word uni- and bigrams of the prompt's instruction view (its
    first and last ``view_words`` words), scaled by ``text_scale``, beside the embedding: when a long
    pasted text dominates the embedding, the words that say what to DO with it ("summarise",
    "label", "TL;DR") still count. Hashing is stateless (no vocabulary to store); the weights are an
    ``(L, text_features)`` array. ``cue_scale > 0`` adds the hand-written instruction cues of
    :mod:`router_ml.predictors.task_text` (per task type, in the view and in the whole prompt), times
    ``cue_scale``; weights ``(L, n_cues)``. Such a head needs the prompt texts at predict time too.

    ``layers``: encoder layers (0 = token embeddings, as Hugging Face's ``hidden_states``) whose
    mean-pooled, unit-norm states the head reads beside the sentence embedding; ``X`` is then the
    encoder's ``encode_layers`` output, ``(n, dim * (1 + len(layers)))``, and ``LearnedRouter``
    asks its encoder for it. The middle layers keep more of the request's form (an instruction vs
    a question about code) than the last one, which sentence-similarity training shaped.
    """

    name = "task"

    def __init__(
        self,
        labels: Sequence[str] = TASK_TYPES,
        C: float = 10.0,
        calibrate: bool = True,
        cv_folds: int = 5,
        seed: int = 0,
        class_weight: str | None = None,
        text_features: int = 0,
        text_scale: float = 2.0,
        view_words: int = 16,
        cue_scale: float = 0.0,
        layers: Sequence[int] = (),
    ) -> None:
        self.labels = labels
        self.C = C
        self.calibrate = calibrate
        self.cv_folds = cv_folds
        self.seed = seed
        self.class_weight = class_weight
        self.text_features = text_features
        self.text_scale = text_scale
        self.view_words = view_words
        self.cue_scale = cue_scale
        self.layers = list(check_layers(layers))

    def _texts(self, texts: Sequence[str] | None, n: int) -> list[str]:
        if texts is None:
            raise ValueError(
                "TaskClassifier: this head uses text features (text_features > 0 or cue_scale > 0); "
                "pass the prompt texts"
            )
        texts = list(texts)
        if len(texts) != n:
            raise ValueError(f"TaskClassifier: {n} embedding rows but {len(texts)} texts")
        return texts

    @property
    def uses_text(self) -> bool:
        """True when the head reads the prompt texts (hashed words or cues)."""
        return bool(self.text_features) or bool(self.cue_scale)

    def _text_terms(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        """Hashed instruction-view indices and weights, and cue counts (see :func:`task_text.text_terms`)."""
        return text_terms(
            texts, int(self.text_features), int(self.view_words), float(self.text_scale), bool(self.cue_scale)
        )

    def _features(self, X: np.ndarray, texts: Sequence[str] | None) -> Any:
        """Design matrix ``[X, hashed view, cues x cue_scale]`` (sparse when there are text features)."""
        if not self.uses_text:
            return X
        import scipy.sparse as sp

        rows, weights, cues = self._text_terms(self._texts(texts, X.shape[0]))
        parts = [sp.csr_matrix(X)]
        if self.text_features:
            parts.append(sparse_rows(rows, weights, int(self.text_features)))
        if cues is not None:
            parts.append(sp.csr_matrix(cues * float(self.cue_scale)))
        return sp.hstack(parts).tocsr()

    def text_part(self, texts: Sequence[str]) -> np.ndarray | None:
        """``(n, L)``: what the texts add to the logits (None for a head without text features).

        It needs no embedding, so a router computes it before the encoder runs, while the CPU
        caches still hold what it reads (the encoder's weights flush them), and passes it to
        :meth:`predict_proba` as ``text_part``."""
        self._check_fitted("coef_")
        if not self.uses_text:
            return None
        texts = list(texts)
        rows, weights, cues = self._text_terms(texts)
        out = np.zeros((len(texts), len(self.labels)))
        if self.text_features:
            for i, idx in enumerate(rows):
                if len(idx):
                    out[i] = self._text_coef_t[idx].sum(axis=0) * weights[i]
        if cues is not None:
            out += (cues * float(self.cue_scale)) @ self._cue_coef_t
        return out

    def _encode(self, y: Sequence[str]) -> np.ndarray:
        index = {lab: i for i, lab in enumerate(self.labels)}
        unknown = sorted({str(v) for v in y if v not in index})
        if unknown:
            raise ValueError(f"TaskClassifier: label(s) {unknown} not in labels {list(self.labels)}")
        return np.array([index[v] for v in y], dtype=np.int64)

    def _fit_lr(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full ``(L, d)`` weights and ``(L,)`` biases; absent classes get bias -inf."""
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        clf = LogisticRegression(C=float(self.C), max_iter=3000, class_weight=self.class_weight)
        with threadpool_limits(1):  # small problem: BLAS threads only contend (40 s vs 2 s on a busy box)
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
        d = X.shape[1]
        F = self._features(X, texts)
        fitted = self._cross_fit(F, yi) if self.calibrate else None
        if fitted is None:
            W, b = self._fit_lr(F, yi)
            temperature = 1.0
        else:
            W, b, temperature = fitted
        nt = int(self.text_features)
        self._set_state(W[:, :d], b, np.array([temperature]), W[:, d : d + nt], W[:, d + nt :])
        return self

    def _cross_fit(self, F: Any, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
        """Cross-fitting: one model per stratified fold, averaged; temperature on out-of-fold logits.

        Each row's out-of-fold logits come from a model that never saw it, so the temperature is
        fitted on honest logits (Guo et al., 2017); the final classifier is the mean of the fold
        models (for a linear model, averaging logits = averaging weights), so every row is used
        for training and the temperature still matches the models it was fitted on.
        Returns None when some class has fewer rows than two folds need.
        """
        from sklearn.model_selection import StratifiedKFold

        counts = np.bincount(y)
        folds = min(int(self.cv_folds), int(counts[counts > 0].min()))
        if folds < 2:
            return None
        Ws, bs, logits, labels = [], [], [], []
        for tr, va in StratifiedKFold(folds, shuffle=True, random_state=int(self.seed)).split(F, y):
            W, b = self._fit_lr(F[tr], y[tr])
            seen = np.isfinite(b)
            z = np.full((len(va), len(self.labels)), -np.inf)
            z[:, seen] = np.asarray(F[va] @ W[seen].T) + b[seen]
            Ws.append(W)
            bs.append(b)
            logits.append(z)
            labels.append(y[va])
        z, lab = np.concatenate(logits), np.concatenate(labels)
        seen = np.isfinite(z).all(axis=0)
        remap = np.cumsum(seen) - 1
        temperature = _fit_temperature(z[:, seen], remap[lab])
        return np.mean(Ws, axis=0), np.mean(bs, axis=0), temperature

    def _set_state(
        self, W: np.ndarray, b: np.ndarray, temperature: np.ndarray, text_W: np.ndarray, cue_W: np.ndarray
    ) -> None:
        self.cue_coef_ = np.ascontiguousarray(cue_W, dtype=np.float64)
        self._cue_coef_t = np.ascontiguousarray(self.cue_coef_.T)
        self.text_coef_ = np.ascontiguousarray(text_W, dtype=np.float64)
        self._text_coef_t = np.ascontiguousarray(self.text_coef_.T)
        self.coef_ = np.ascontiguousarray(W, dtype=np.float64)
        self.intercept_ = np.ascontiguousarray(b, dtype=np.float64)
        self.temperature_ = np.ascontiguousarray(temperature, dtype=np.float64)
        self._coef_t = np.ascontiguousarray(self.coef_.T)
        self._temperature = float(self.temperature_[0])
        self.dim_ = int(self.coef_.shape[1])

    def decision_function(
        self, X: np.ndarray, texts: Sequence[str] | None = None, text_part: np.ndarray | None = None
    ) -> np.ndarray:
        """Temperature-scaled logits ``(n, d) -> (n, L)`` (-inf for labels never seen in training).

        A head with text features needs the ``texts`` or their :meth:`text_part`."""
        self._check_fitted("coef_")
        X = as_float_matrix(X, "TaskClassifier", self.dim_, dtype=np.float64)
        z = X @ self._coef_t + self.intercept_
        if self.uses_text:
            if text_part is None:
                text_part = self.text_part(self._texts(texts, X.shape[0]))
            elif text_part.shape != z.shape:
                raise ValueError(f"TaskClassifier: text_part has shape {text_part.shape}, expected {z.shape}")
            z += text_part
        return z / self._temperature

    def predict_proba(
        self, X: np.ndarray, texts: Sequence[str] | None = None, text_part: np.ndarray | None = None
    ) -> np.ndarray:
        """Calibrated class probabilities ``(n, d) -> (n, len(labels))``, columns in ``labels`` order."""
        return _softmax(self.decision_function(X, texts, text_part))

    def predict(self, X: np.ndarray, texts: Sequence[str] | None = None) -> list[str]:
        """Most probable label per row: ``(n, d) -> list of n strings``."""
        return [self.labels[i] for i in self.decision_function(X, texts).argmax(axis=1)]

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("coef_")
        state = {"coef": self.coef_, "intercept": self.intercept_, "temperature": self.temperature_}
        if self.text_features:
            state["text_coef"] = self.text_coef_
        if self.cue_scale:
            state["cue_coef"] = self.cue_coef_
            state["cue_lexicon_crc"] = np.array([CUE_LEXICON_CRC], dtype=np.int64)
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
        if self.cue_scale:
            shapes["cue_coef"] = (L, 2 * len(CUE_TASKS))
            shapes["cue_lexicon_crc"] = (1,)
        s = check_state(state, shapes, "TaskClassifier")
        if not s["temperature"][0] > 0:
            raise ValueError(f"TaskClassifier: temperature must be > 0, got {s['temperature'][0]}")
        if self.cue_scale and int(s["cue_lexicon_crc"][0]) != CUE_LEXICON_CRC:
            raise ValueError(
                f"TaskClassifier: checkpoint was fitted with cue lexicon {int(s['cue_lexicon_crc'][0])}, "
                f"this code has {CUE_LEXICON_CRC} (router_ml/predictors/task_text.py changed); refit the head"
            )
        text_W = s.get("text_coef", np.zeros((L, 0)))
        cue_W = s.get("cue_coef", np.zeros((L, 0)))
        self._set_state(s["coef"], s["intercept"], s["temperature"], text_W, cue_W)
        return self
