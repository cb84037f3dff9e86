"""The prompt set of a collection: a user's JSONL / parquet file, or the prompts of a data adapter.

A file holds one prompt per line (JSONL) or row (parquet) with the fields::

    {"prompt": "What is 7 * 8?",            # required, a non-empty string
     "id": "arith-1",                        # optional (str or int); default: a hash of the prompt
     "reference": "56",                      # optional reference answer (scorers compare with it)
     "tests": ["assert mul(7, 8) == 56"],    # optional unit tests: a string or a list of strings
     "task": "math"}                         # optional task name

Every bad row is a :class:`PromptFileError` naming the file, the line (or row) and the field.
Ids are stable across reruns: a given id, else :func:`prompt_id_for` of the text, so a rerun of
the same file maps each prompt onto the answers already stored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router_ml.data.jsonl import iter_jsonl

FIELDS = ("id", "prompt", "reference", "tests", "task")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file, the line or row and the field."""


@dataclass(frozen=True)
class Prompt:
    """One prompt to send to every model. ``tests``: unit tests as given (a string or a tuple of
    strings); ``source``: where it came from (a file name or a data set)."""

    prompt_id: str
    prompt: str
    reference: str | None = None
    tests: str | tuple[str, ...] | None = None
    task: str | None = None
    source: str | None = None

    def tests_json(self) -> str | None:
        """``tests`` as stored: JSON of the string or of the list."""
        if self.tests is None:
            return None
        return json.dumps(self.tests if isinstance(self.tests, str) else list(self.tests))


def prompt_id_for(text: str) -> str:
    """A stable id for a prompt without one: the first 16 hex digits of the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _missing(value: Any) -> bool:
    """None, or a parquet null (NaN / pandas NA)."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN and pd.NA
    except (TypeError, ValueError):
        return False


def prompt_from_row(row: Mapping[str, Any], where: str, source: str | None = None) -> Prompt:
    """Validate one row (``where`` labels errors, e.g. ``"prompts.jsonl:12"``)."""
    if not isinstance(row, Mapping):
        raise PromptFileError(
            f"{where}: expected a JSON object with a 'prompt' field, got {type(row).__name__}"
        )
    unknown = sorted(str(k) for k in row if k not in FIELDS)
    if unknown:
        raise PromptFileError(f"{where}: unknown field(s) {unknown}; allowed fields: {list(FIELDS)}")

    def bad(field: str, rule: str) -> PromptFileError:
        return PromptFileError(f"{where}: field {field!r} = {_short(row.get(field))} {rule}")

    text = row.get("prompt")
    if _missing(text):
        raise PromptFileError(f"{where}: field 'prompt' is missing")
    if not isinstance(text, str) or not text.strip():
        raise bad("prompt", "must be a non-empty string")
    pid = row.get("id")
    if _missing(pid):
        pid = prompt_id_for(text)
    elif isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
        raise bad("id", "must be a non-empty string or an integer")
    out: dict[str, Any] = {}
    for field in ("reference", "task"):
        value = row.get(field)
        if _missing(value):
            continue
        if not isinstance(value, str):
            raise bad(field, "must be a string")
        out[field] = value
    tests = row.get("tests")
    if not _missing(tests):
        out["tests"] = _tests(tests, bad)
    return Prompt(prompt_id=str(pid), prompt=text, source=source, **out)


def _tests(value: Any, bad: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):  # a parquet list column arrives as a numpy array
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return tuple(value)
    raise bad("tests", "must be a string or a list of strings")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise PromptFileError(f"{path}: unknown prompt file type; expected one of {sorted(SUFFIXES)}")
    if kind == "jsonl":
        for where, _, value in iter_jsonl(path, PromptFileError):
            yield where, value
        return
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for an unreadable file
        raise PromptFileError(f"{path}: cannot read the parquet file: {err}") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{path}: row {i}", row


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL or parquet file, in file order; duplicates of a prompt (same id and
    text) are kept once; the same id for two different texts is an error naming both places."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    prompts = unique_prompts(
        ((where, prompt_from_row(row, where, source=path.name)) for where, row in _rows(path)),
    )
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in the file")
    return prompts


def unique_prompts(items: Iterable[tuple[str, Prompt]]) -> list[Prompt]:
    """``(where, prompt)`` pairs -> prompts with distinct ids; a clash of texts names both places."""
    seen: dict[str, tuple[str, Prompt]] = {}
    out: list[Prompt] = []
    for where, p in items:
        first = seen.get(p.prompt_id)
        if first is None:
            seen[p.prompt_id] = (where, p)
            out.append(p)
        elif first[1].prompt != p.prompt:
            raise PromptFileError(
                f"{where}: field 'id' = {p.prompt_id!r} is already used by {first[0]} for a different prompt"
            )
    return out


def prompts_from_data(data_cfg: Mapping[str, Any], seed: int = 0) -> list[Prompt]:
    """The distinct prompts of a data config (``conf/data/*.yaml``; ``max_prompts`` samples them,
    stratified by task and seeded), with their task type and source task."""
    from router_ml.data.loading import load_routing_data

    table = load_routing_data(data_cfg, seed=seed).drop_duplicates("prompt_id")
    name = str(data_cfg.get("name") or data_cfg.get("adapter"))
    return [
        Prompt(prompt_id=str(pid), prompt=str(text), task=str(task), source=f"{name}/{src}")
        for pid, text, task, src in zip(
            table["prompt_id"], table["prompt"], table["task"], table["source_task"], strict=True
        )
    ]
