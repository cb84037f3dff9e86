"""Task-mixture quality head: ``predict(x) = sum_t p(t | x) * mu_t``.

``p(t | x)`` is a calibrated :class:`~router_ml.predictors.task.TaskClassifier` over the integer
task ids given to ``fit``; ``mu_t`` is each task's mean score per model, shrunk towards the
overall mean. With fine-grained source-task ids (the benchmarks of ``llmrouter_ulab``) the
classifier learns "which benchmark is this prompt from", which carries most of the routing signal.
With ``text_features > 0`` (or ``cue_scale > 0``) the classifier also reads the prompt text
(hashed word n-grams of its instruction view, instruction cues), so ``fit`` and ``predict`` need
the prompt texts: :attr:`TaskMixtureQualityPredictor.uses_text` says so to the router. With
``layers`` (e.g. ``[3, 4]``) the classifier also reads the encoder's pooled middle-layer states,
which keep a benchmark's form that the sentence embedding blurs: on ``llmrouter_ulab`` benchmark
accuracy 87% -> 93% (README, "Routing under shift"); they come from the embedding's own forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from router_ml.embeddings.base import check_layers
from router_ml.predictors.base import QualityPredictor, as_float_matrix, check_state, state_size
from router_ml.predictors.task import TaskClassifier
from router_ml.predictors.task_text import CUE_TASKS


class TaskMixtureQualityPredictor(QualityPredictor):
    """Quality as a task mixture: ``predict(X (n, d)[, texts]) -> (n, m)``.

    ``p(t | x)`` is a calibrated :class:`TaskClassifier` (``C``, ``calibrate``, ``seed``) over the
    integer ``task_ids`` given to ``fit`` (required); ``mu_t (T, m)`` is each task's NaN-aware mean
    score, shrunk towards the overall column mean with ``prior_count`` pseudo-rows. Its strength
    depends on the ids: with fine-grained source tasks (benchmarks) it is the strongest head on
    ``llmrouter_ulab``; with the six coarse task types it is weaker than kNN.

    ``text_features``, ``text_scale``, ``view_words`` and ``cue_scale`` are the classifier's text
    features (see :class:`TaskClassifier`); ``0`` for both ``text_features`` and ``cue_scale``
    (the default) keeps an embedding-only head that needs no texts. ``layers``: encoder layers whose
    pooled states the classifier reads beside the embedding (``X`` is then ``encode_layers``'s
    output; see :attr:`QualityPredictor.layers`).
    """

    name = "taskmix"

    def __init__(
        self,
        C: float = 10.0,
        calibrate: bool = True,
        prior_count: float = 5.0,
        seed: int = 0,
        text_features: int = 0,
        text_scale: float = 2.0,
        view_words: int = 16,
        cue_scale: float = 0.0,
        layers: Sequence[int] = (),
    ) -> None:
        self.C = C
        self.calibrate = calibrate
        self.prior_count = prior_count
        self.seed = seed
        self.text_features = text_features
        self.text_scale = text_scale
        self.view_words = view_words
        self.cue_scale = cue_scale
        self.layers = list(check_layers(layers))

    @property
    def uses_text(self) -> bool:
        """True when ``fit`` and ``predict`` need the prompt texts (text features or cues on)."""
        return bool(self.text_features) or bool(self.cue_scale)

    def _classifier(self, n_tasks: int) -> TaskClassifier:
        labels = tuple(str(t) for t in range(n_tasks))
        return TaskClassifier(
            labels=labels,
            C=self.C,
            calibrate=self.calibrate,
            seed=self.seed,
            class_weight=None,
            text_features=int(self.text_features),
            text_scale=float(self.text_scale),
            view_words=int(self.view_words),
            cue_scale=float(self.cue_scale),
            layers=self.layers,
        )

    def _check_texts(self, texts: Sequence[str] | None, n: int) -> list[str] | None:
        if not self.uses_text:
            return None
        if texts is None:
            raise ValueError(
                "TaskMixtureQualityPredictor: this head reads the prompt text (text_features > 0 or "
                "cue_scale > 0); pass texts= to fit and predict"
            )
        texts = list(texts)
        if len(texts) != n:
            raise ValueError(f"TaskMixtureQualityPredictor: {n} embedding rows but {len(texts)} texts")
        return texts

    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        task_ids: np.ndarray | None = None,
        texts: Sequence[str] | None = None,
    ) -> TaskMixtureQualityPredictor:
        """Fit on ``X (n, d)``, ``Y (n, m)`` (NaN = no outcome), ``task_ids (n,)`` (required) and,
        when :attr:`uses_text`, the ``n`` prompt ``texts``."""
        if task_ids is None:
            raise ValueError("TaskMixtureQualityPredictor: fit needs task_ids (one integer task id per row)")
        X, Y, task_ids = self._check_fit_inputs(X, Y, task_ids)
        if task_ids.min() < 0:
            raise ValueError("TaskMixtureQualityPredictor: task_ids must be >= 0")
        texts = self._check_texts(texts, X.shape[0])
        n_tasks = int(task_ids.max()) + 1
        clf = self._classifier(n_tasks).fit(X, [str(t) for t in task_ids], texts=texts)
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

    def text_part(self, texts: Sequence[str]) -> np.ndarray | None:
        """What the texts add to the task classifier's logits (see ``TaskClassifier.text_part``);
        None for an embedding-only head."""
        self._check_fitted("task_means_")
        return self.classifier_.text_part(texts)

    def predict(
        self, X: np.ndarray, texts: Sequence[str] | None = None, text_part: np.ndarray | None = None
    ) -> np.ndarray:
        """Expected score per model, ``(n, d) -> (n, m)`` float64 in [0, 1]; when :attr:`uses_text`,
        the ``n`` prompt ``texts`` or their :meth:`text_part`."""
        self._check_fitted("task_means_")
        X = as_float_matrix(X, "TaskMixtureQualityPredictor", self.dim_, dtype=np.float64)
        if text_part is None:
            texts = self._check_texts(texts, X.shape[0])
        p = self.classifier_.predict_proba(X, texts=texts, text_part=text_part)
        return np.clip(p @ self.task_means_, 0.0, 1.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("task_means_")
        return {
            **{f"task.{k}": v for k, v in self.classifier_.state_dict().items()},
            "task_means": self.task_means_,
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> TaskMixtureQualityPredictor:
        T = state_size(state, "task_means", 0)
        shapes: dict[str, tuple[int | None, ...]] = {
            "task.coef": (T, None),
            "task.intercept": (T,),
            "task.temperature": (1,),
            "task_means": (T, None),
        }
        if self.text_features:
            shapes["task.text_coef"] = (T, int(self.text_features))
        if self.cue_scale:
            shapes["task.cue_coef"] = (T, 2 * len(CUE_TASKS))
            shapes["task.cue_lexicon_crc"] = (1,)
        s = check_state(state, shapes, "TaskMixtureQualityPredictor")
        clf = self._classifier(int(s["task_means"].shape[0]))
        clf.load_state_dict({k[len("task.") :]: v for k, v in s.items() if k.startswith("task.")})
        self._set_state(clf, s["task_means"])
        return self
