"""How far a prompt's TEXT is from a bank of training prompts: hashed n-gram TF-IDF neighbours.

A sentence embedding (MiniLM) keeps what a prompt is about and blurs how it is written: a
benchmark's format (option letters, a few-shot frame, code scaffolding, a "Question: ... Answer:"
template, the length and punctuation of its prompts) mostly disappears from it. Hashed character
and word n-grams keep it. :class:`NgramBank` stores the TF-IDF vectors (sublinear term
frequency, inverse document frequency of the bank, unit norm) of a bank of training prompts as a
sparse matrix and gives, per new prompt, the cosine distance to its nearest bank prompt and the
mean distance to its ``k`` nearest: two novelty features of
:class:`~router_ml.predictors.guard.NoveltyGuard`.

Hashing is scikit-learn's :class:`~sklearn.feature_extraction.text.HashingVectorizer` (stateless:
no vocabulary to store). State: plain arrays (the bank's CSR ``data``, ``indices``, ``indptr`` and
the ``idf`` vector), no pickle. Cost per prompt: hashing its text (capped at ``max_chars``) and
one sparse product with the bank.

    bank = NgramBank("char").fit(train_texts)
    bank.distances(["Question: ...", ...], k=10)  # (n, 2): nearest, mean of the 10 nearest
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: analyzers: hashed character n-grams inside word boundaries, or words and word pairs (punctuation
#: kept as tokens: option letters "(A)" and code's "==" are format)
ANALYZERS = {
    "char": {"analyzer": "char_wb", "ngram_range": (3, 5), "lowercase": True},
    "word": {
        "analyzer": "word",
        "ngram_range": (1, 2),
        "lowercase": False,
        "token_pattern": r"(?u)\b\w+\b|[^\w\s]",
    },
}


def _clip_text(text: str, max_chars: int) -> str:
    """The first two thirds and the last third of ``max_chars`` of a long text (a format shows at
    both ends: a preamble, a trailing "Answer:")."""
    if len(text) <= max_chars:
        return text
    head = 2 * max_chars // 3
    return text[:head] + " " + text[-(max_chars - head) :]


class NgramBank:
    """A bank of hashed n-gram TF-IDF vectors (module doc). ``analyzer``: a key of
    :data:`ANALYZERS`; ``n_features``: hash dimension; ``max_chars``: characters read per prompt."""

    def __init__(self, analyzer: str = "char", n_features: int = 2**18, max_chars: int = 3000):
        if analyzer not in ANALYZERS:
            raise ValueError(f"NgramBank: analyzer must be one of {sorted(ANALYZERS)}, got {analyzer!r}")
        self.analyzer = analyzer
        self.n_features = int(n_features)
        self.max_chars = int(max_chars)

    def hash(self, texts: Sequence[str]) -> Any:
        """(n, n_features) CSR term counts of ``texts`` (what :meth:`fit` and :meth:`distances`
        read; hash once, reuse over folds with ``fit_counts`` / ``distances_counts``)."""
        from sklearn.feature_extraction.text import HashingVectorizer

        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise TypeError("NgramBank: texts must be a sequence of strings")
        vec = HashingVectorizer(
            n_features=self.n_features, alternate_sign=False, norm=None, **ANALYZERS[self.analyzer]
        )
        return vec.transform([_clip_text(t, self.max_chars) for t in texts]).tocsr()

    def _tfidf(self, H: Any) -> Any:
        """Sublinear TF times the bank's IDF, unit rows (float32 CSR; on the stored values, no
        (n_features, n_features) diagonal product per call)."""
        H = H.astype(np.float32)
        H.data = np.log1p(H.data) * self.idf_[H.indices]
        row = np.repeat(np.arange(H.shape[0]), np.diff(H.indptr))
        norm = np.sqrt(np.bincount(row, weights=H.data.astype(np.float64) ** 2, minlength=H.shape[0]))
        H.data /= np.maximum(norm[row], 1e-12).astype(np.float32)
        return H

    def fit(self, texts: Sequence[str]) -> NgramBank:
        """Store the TF-IDF vectors of the bank ``texts`` (IDF from these texts)."""
        return self.fit_counts(self.hash(texts))

    def fit_counts(self, H: Any) -> NgramBank:
        """:meth:`fit` from the bank's hashed counts ``H`` (:meth:`hash`)."""
        df = np.bincount(H.indices, minlength=self.n_features)
        self.idf_ = (np.log((1.0 + H.shape[0]) / (1.0 + df)) + 1.0).astype(np.float32)
        self.bank_ = self._tfidf(H).T.tocsr()  # (n_features, b): a query row times it is one product
        return self

    def distances(self, texts: Sequence[str], k: int = 10) -> np.ndarray:
        """(n, 2) cosine distance to the nearest bank prompt and mean distance to the ``k`` nearest."""
        return self.distances_counts(self.hash(texts), k)

    def distances_counts(self, H: Any, k: int = 10) -> np.ndarray:
        """:meth:`distances` from hashed counts ``H`` (:meth:`hash`)."""
        S = (self._tfidf(H) @ self.bank_).toarray()
        k = max(1, min(int(k), S.shape[1]))
        top = -np.partition(-S, k - 1, axis=1)[:, :k]
        return np.column_stack([1.0 - top.max(axis=1), 1.0 - top.mean(axis=1)])

    # ---- persistence ---------------------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """``{prefix + "data" | "indices" | "indptr" | "idf": array}`` (the bank as CSR rows of features)."""
        b = self.bank_
        return {
            f"{prefix}data": np.asarray(b.data, np.float32),
            f"{prefix}indices": np.asarray(b.indices, np.int32),
            f"{prefix}indptr": np.asarray(b.indptr, np.int64),
            f"{prefix}idf": np.asarray(self.idf_, np.float32),
        }

    def load_state_dict(
        self, state: dict[str, np.ndarray], prefix: str = "", n_bank: int | None = None
    ) -> NgramBank:
        """Rebuild from :meth:`state_dict`; ``n_bank`` (the bank size) is checked when given. Raises
        ``ValueError`` naming the array that does not fit."""
        import scipy.sparse as sp

        missing = [k for k in ("data", "indices", "indptr", "idf") if f"{prefix}{k}" not in state]
        if missing:
            raise ValueError(f"NgramBank: state has no {[prefix + k for k in missing]}")
        data, idx, ptr, idf = (
            np.asarray(state[f"{prefix}{k}"]) for k in ("data", "indices", "indptr", "idf")
        )
        if idf.shape != (self.n_features,) or ptr.shape != (self.n_features + 1,):
            raise ValueError(
                f"NgramBank: arrays {prefix}idf {idf.shape} / {prefix}indptr {ptr.shape} do not match "
                f"n_features={self.n_features}"
            )
        if (
            data.shape != idx.shape
            or ptr[-1] != len(data)
            or (len(idx) and (idx.min() < 0 or (n_bank is not None and idx.max() >= n_bank)))
        ):
            raise ValueError(
                f"NgramBank: arrays {prefix}data / {prefix}indices / {prefix}indptr are not a CSR bank"
                + (f" of {n_bank} prompts" if n_bank is not None else "")
            )
        cols = int(n_bank) if n_bank is not None else (int(idx.max()) + 1 if len(idx) else 0)
        self.idf_ = idf.astype(np.float32)
        self.bank_ = sp.csr_matrix((data.astype(np.float32), idx, ptr), shape=(self.n_features, cols))
        return self
