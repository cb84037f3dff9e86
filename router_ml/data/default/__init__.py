"""The routing data set shipped inside the package: a compact copy of llmrouter_ulab's training table.

``llmrouter_ulab.parquet`` holds one row per prompt (5,478) with ``prompt_id``, ``task_name``,
``prompt``, ``metric`` and one float column ``score/<model>`` per model (9), zstd-compressed;
the scored models' numeric list prices from the source's ``llm_candidates.json`` ride in its
parquet metadata (:data:`router_ml.data.prices.SHIPPED_PRICES_KEY`). The llmrouter adapter reads this copy
when ``$ROUTER_ML_DATA_DIR/llmrouter_ulab`` is absent, and gets the same table row for row
(``tests/test_data.py`` checks it). Provenance and licence (MIT): ``PROVENANCE.md`` and ``LICENSE``
in this folder. Regenerate it from the source folder with::

    python -m router_ml.data.default --rebuild                 # from $ROUTER_ML_DATA_DIR/llmrouter_ulab
    python -m router_ml.data.default --check                   # the shipped copy still matches the source
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from router_ml.data.adapters.llmrouter import DEFAULT_FILE, SCORE_PREFIX, read_jsonl
from router_ml.data.prices import SHIPPED_PRICES_KEY, shipped_llmrouter_prices
from router_ml.paths import SHIPPED_DATA_DIR

HERE = SHIPPED_DATA_DIR
SOURCE_FOLDER = "llmrouter_ulab"
TEXT_COLUMNS: tuple[str, ...] = ("prompt_id", "task_name", "prompt", "metric")
ZSTD_LEVEL = 19


def compact_frame(source: str | os.PathLike | None = None) -> pd.DataFrame:
    """The compact table built from the source folder's ``train.jsonl`` (every line checked).

    Returns one row per prompt, in file order: :data:`TEXT_COLUMNS` then ``score/<model>``
    (float64, NaN where the record has no score), models in the order the adapter meets them.
    ``source`` is the ``llmrouter_ulab`` folder (default: ``$ROUTER_ML_DATA_DIR/llmrouter_ulab``).
    """
    from router_ml.paths import source_dir

    folder = source_dir(SOURCE_FOLDER) if source is None else Path(source).expanduser()
    file = folder / "train.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"llmrouter_ulab: {str(file)!r} not found (expected train.jsonl in it)")
    records = read_jsonl(file)
    missing = sorted({c for r in records for c in ("prompt_id", "metric") if c not in r})
    if missing:
        raise ValueError(f"{file}: every record needs {missing} for the compact copy")
    text = pd.DataFrame({c: [str(r[c]) for r in records] for c in TEXT_COLUMNS})
    scores = pd.DataFrame([r["scores"] for r in records], dtype="float64")
    scores.columns = [SCORE_PREFIX + m for m in scores.columns]
    return pd.concat([text, scores], axis=1)


def compact_prices(source: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """``{model: {input_price, output_price}}`` ($ per 1M tokens) of the models scored in the source
    folder's ``train.jsonl``, from its ``llm_candidates.json`` (numeric fields only)."""
    from router_ml.paths import source_dir

    folder = source_dir(SOURCE_FOLDER) if source is None else Path(source).expanduser()
    cand = folder / "llm_candidates.json"
    if not cand.is_file():
        raise FileNotFoundError(f"llmrouter_ulab: price table {str(cand)!r} not found")
    table = json.loads(cand.read_text())
    scored = [c[len(SCORE_PREFIX) :] for c in compact_frame(folder).columns if c.startswith(SCORE_PREFIX)]
    missing = [m for m in scored if m not in table]
    if missing:
        raise ValueError(f"{str(cand)!r} has no price for scored model(s) {missing}")
    return {m: {k: float(table[m][k]) for k in ("input_price", "output_price")} for m in sorted(scored)}


def write_default(source: str | os.PathLike | None = None, dest: str | os.PathLike = HERE) -> Path:
    """Write ``llmrouter_ulab.parquet`` (zstd) into ``dest``, the scored models' prices in its
    metadata. Returns its path. ``source`` as in :func:`compact_frame`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from router_ml.paths import source_dir

    folder = source_dir(SOURCE_FOLDER) if source is None else Path(source).expanduser()
    frame, prices = compact_frame(folder), compact_prices(folder)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / DEFAULT_FILE.name
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({SHIPPED_PRICES_KEY: json.dumps(prices, sort_keys=True)})
    pq.write_table(table, out, compression="zstd", compression_level=ZSTD_LEVEL)
    return out


def check_default(source: str | os.PathLike | None = None) -> list[str]:
    """Differences between the shipped copy and what :func:`compact_frame` builds from ``source``
    (an empty list when they agree)."""
    from router_ml.paths import source_dir

    folder = source_dir(SOURCE_FOLDER) if source is None else Path(source).expanduser()
    problems = []
    built, shipped = compact_frame(folder), pd.read_parquet(DEFAULT_FILE)
    if not built.equals(shipped):
        problems.append(f"{DEFAULT_FILE.name} differs from the table built from {str(folder)!r}")
    if compact_prices(folder) != shipped_llmrouter_prices():
        problems.append(
            f"the prices in {DEFAULT_FILE.name} differ from {str(folder / 'llm_candidates.json')!r}"
        )
    return problems


__all__ = [
    "DEFAULT_FILE",
    "SCORE_PREFIX",
    "check_default",
    "compact_frame",
    "compact_prices",
    "write_default",
]
