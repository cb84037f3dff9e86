"""Leak-free splits of a long routing table: by prompt, by whole task (OOD), and k-fold.

All splits are over prompt GROUPS: prompts whose normalised text (:func:`normalize_text`) is
identical form one group, whatever their prompt_id or source, so a duplicate can never sit on
both sides. Assignment is seeded and independent of row order (groups are sorted by key before
the seeded shuffle), and stratified by task where a task has enough groups.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd


def normalize_text(text: str) -> str:
    """Unicode NFKC, lower case, whitespace collapsed: the key under which two prompts are the same."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


def normalize_series(texts: pd.Series) -> pd.Series:
    """:func:`normalize_text` of each element, computed once per distinct text; same index."""
    uniq = texts.drop_duplicates()
    return texts.map(dict(zip(uniq, uniq.map(normalize_text), strict=True)))


def prompt_groups(df: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt_id: prompt_id, task, group (the normalised text); (n_prompts, 3)."""
    for col in ("prompt_id", "prompt", "task"):
        if col not in df.columns:
            raise KeyError(f"split: table lacks column {col!r}")
    prompts = df.drop_duplicates("prompt_id")[["prompt_id", "prompt", "task"]]
    return pd.DataFrame(
        {
            "prompt_id": prompts["prompt_id"].to_numpy(),
            "task": prompts["task"].to_numpy(),
            "group": normalize_series(prompts["prompt"]).to_numpy(),
        }
    )


def _group_strata(groups: pd.DataFrame, stratify: bool) -> pd.Series:
    """Stratum of each group key (its most common task, or one stratum), sorted by key."""
    if not stratify:
        keys = np.sort(groups["group"].unique())
        return pd.Series("all", index=pd.Index(keys, name="group"))
    counts = groups.groupby(["group", "task"]).size().rename("n").reset_index()
    counts = counts.sort_values(["group", "n", "task"], ascending=[True, False, True], kind="stable")
    return counts.drop_duplicates("group").set_index("group")["task"]


def _assign(df: pd.DataFrame, groups: pd.DataFrame, label_of_group: dict[str, str]) -> pd.Series:
    """Split label per row of ``df`` from the label of its prompt's group."""
    by_id = groups.set_index("prompt_id")["group"].map(label_of_group)
    return df["prompt_id"].map(by_id)


def split_prompts(
    df: pd.DataFrame, test_size: float = 0.2, val_size: float = 0.0, seed: int = 0, stratify: bool = True
) -> dict[str, pd.DataFrame]:
    """Split rows into "train", "test" (and "val" when ``val_size > 0``) by prompt group.

    Sizes are fractions of prompt groups, taken per task stratum (rounded). No prompt_id and no
    normalised prompt text ever appears in two splits.
    """
    if not (0 <= test_size < 1 and 0 <= val_size < 1 and test_size + val_size < 1):
        raise ValueError(
            "split_prompts: need 0 <= test_size, val_size and test_size + val_size < 1, "
            f"got test_size={test_size}, val_size={val_size}"
        )
    groups = prompt_groups(df)
    strata = _group_strata(groups, stratify)
    rng = np.random.default_rng(seed)
    label: dict[str, str] = {}
    for _, keys in strata.groupby(strata, sort=True):
        keys = np.sort(keys.index.to_numpy())
        order = keys[rng.permutation(len(keys))]
        n_test, n_val = round(len(keys) * test_size), round(len(keys) * val_size)
        label.update(dict.fromkeys(order[:n_test], "test"))
        label.update(dict.fromkeys(order[n_test : n_test + n_val], "val"))
        label.update(dict.fromkeys(order[n_test + n_val :], "train"))
    split = _assign(df, groups, label)
    names = ["train", "val", "test"] if val_size > 0 else ["train", "test"]
    return {name: df[split == name].reset_index(drop=True) for name in names}


def split_tasks(df: pd.DataFrame, holdout: Iterable[str], by: str = "source_task") -> dict[str, pd.DataFrame]:
    """Hold out whole tasks (OOD): "test" = rows whose ``by`` value is in ``holdout``, "train" = the rest.

    Train rows whose normalised prompt text also occurs in the held-out tasks are dropped, so a
    prompt shared across tasks cannot leak.
    """
    if by not in df.columns:
        raise KeyError(f"split_tasks: table has no column {by!r}")
    holdout = list(dict.fromkeys(holdout))
    present = set(df[by].astype(str))
    unknown = sorted(set(holdout) - present)
    if unknown or not holdout:
        raise ValueError(
            f"split_tasks: held-out {by} value(s) {unknown or holdout} not in the table; "
            f"present: {sorted(present)}"
        )
    is_test = df[by].astype(str).isin(holdout)
    if is_test.all():
        raise ValueError(f"split_tasks: holding out {holdout} leaves no training rows")
    test, train = df[is_test], df[~is_test]
    test_texts = set(normalize_series(test["prompt"].drop_duplicates()))
    train = train[~normalize_series(train["prompt"]).isin(test_texts)]
    return {"train": train.reset_index(drop=True), "test": test.reset_index(drop=True)}


def kfold_prompts(
    df: pd.DataFrame, n_splits: int = 5, seed: int = 0
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Yield ``n_splits`` (train_df, val_df) pairs; folds are prompt groups, stratified by task."""
    if n_splits < 2:
        raise ValueError(f"kfold_prompts: n_splits must be >= 2, got {n_splits}")
    groups = prompt_groups(df)
    strata = _group_strata(groups, stratify=True)
    if len(strata) < n_splits:
        raise ValueError(f"kfold_prompts: {len(strata)} prompt groups cannot fill {n_splits} folds")
    rng = np.random.default_rng(seed)
    fold: dict[str, int] = {}
    offset = 0  # continue the round robin across strata so small tasks do not all land in fold 0
    for _, keys in strata.groupby(strata, sort=True):
        keys = np.sort(keys.index.to_numpy())
        order = keys[rng.permutation(len(keys))]
        fold.update({k: (offset + i) % n_splits for i, k in enumerate(order)})
        offset = (offset + len(order)) % n_splits
    row_fold = _assign(df, groups, fold)
    for k in range(n_splits):
        yield df[row_fold != k].reset_index(drop=True), df[row_fold == k].reset_index(drop=True)
