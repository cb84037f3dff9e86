"""Prompt renderings for the format-shift evaluation: the same item, its prompt written another way.

A rendering is a small, deterministic function ``(prompt, choices) -> prompt``: no randomness, no
model, no data beyond the item itself. ``choices`` is the item's answer options or test asserts
where the data set keeps them apart from the prompt (llmrouter_ulab's ``choices`` field), else
``None``. Renderings that need what an item lacks return the prompt unchanged.

ASSUMPTION (stated in the README): an item's outcomes (every model's score) and billed costs are
kept from the original item. The models were only ever run on the original prompt; the format-shift
evaluation asks whether the ROUTER's decision survives a change of wording, not whether the models'
answers would. A preamble that adds input tokens would also cost a little more; that is left out.

Renderings (``RENDERINGS``):

- ``original``: the prompt as the data set gives it.
- ``choices_inline``: multiple-choice options appended as lettered lines (``A. ...``) after an
  ``Options:`` line; for code items whose ``choices`` are test asserts (mbpp), the asserts after
  "Your code should pass these tests:" (MBPP's own prompt format). Other items: unchanged.
- ``instruction_preamble``: a fixed, long instruction preamble (about 70 words) before the prompt.
- ``few_shot``: two fixed worked examples, written for this project (not drawn from any data
  set), then the prompt as the third question.
- ``chat_template``: a system / user / assistant wrapper with role markers.
- ``lowercase``: the prompt lower-cased.
"""

from __future__ import annotations

import ast
import json
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

__all__ = ["RENDERINGS", "llmrouter_choices", "parse_choices", "render", "render_table"]

PREAMBLE = (
    "You are a careful, knowledgeable assistant. Read the whole task below before you answer. "
    "Think about what is being asked, check any numbers, facts or code you rely on, and keep your "
    "answer focused on the question. If the task gives options, pick the single best one. If it "
    "asks for code, write correct, runnable code. If it asks for a number, give the final number "
    "clearly. Do not add unrelated commentary.\n\nTask:\n"
)

FEW_SHOT = (
    "Answer the last question in the same way as the examples.\n\n"
    "Question: A shop sells pens at 3 for $2. How much do 12 pens cost?\n"
    "Answer: 12 pens are 4 groups of 3, so they cost 4 x $2 = $8.\n\n"
    "Question: Which gas do plants take in for photosynthesis?\n"
    "Answer: Carbon dioxide.\n\n"
    "Question: "
)


def parse_choices(choices: str | None) -> list[str] | None:
    """The option texts (or test asserts) of an item's ``choices`` string, ``None`` when it has none.

    Accepts llmrouter_ulab's forms: a Python/JSON list (``"['$100', '$150']"``) or a dict with a
    ``text`` list (``"{'label': [...], 'text': [...]}"``); ``None``/``"None"``/unparsable -> ``None``.
    """
    if choices is None or (isinstance(choices, float) and pd.isna(choices)):
        return None
    text = str(choices).strip()
    if not text or text == "None":
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, dict):
        value = value.get("text")
    if not isinstance(value, (list, tuple)) or not value:
        return None
    return [str(v) for v in value]


def _original(prompt: str, choices: str | None) -> str:
    return prompt


def _choices_inline(prompt: str, choices: str | None) -> str:
    opts = parse_choices(choices)
    if not opts:
        return prompt
    if all(o.lstrip().startswith("assert") for o in opts):  # code items: the unit tests
        return f"{prompt.rstrip()}\nYour code should pass these tests:\n" + "\n".join(opts)
    if len(opts) > len(string.ascii_uppercase):
        return prompt
    lines = [f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(opts)]
    return f"{prompt.rstrip()}\n\nOptions:\n" + "\n".join(lines)


def _instruction_preamble(prompt: str, choices: str | None) -> str:
    return PREAMBLE + prompt


def _few_shot(prompt: str, choices: str | None) -> str:
    return f"{FEW_SHOT}{prompt.rstrip()}\nAnswer:"


def _chat_template(prompt: str, choices: str | None) -> str:
    return (
        "<|system|>\nYou are a helpful assistant. Answer the user's request.\n"
        f"<|user|>\n{prompt}\n<|assistant|>\n"
    )


def _lowercase(prompt: str, choices: str | None) -> str:
    return prompt.lower()


RENDERINGS: dict[str, Callable[[str, str | None], str]] = {
    "original": _original,
    "choices_inline": _choices_inline,
    "instruction_preamble": _instruction_preamble,
    "few_shot": _few_shot,
    "chat_template": _chat_template,
    "lowercase": _lowercase,
}


def render(name: str, prompts: Sequence[str], choices: Sequence[str | None] | None = None) -> list[str]:
    """``prompts`` (n,) rendered by the rendering ``name``; ``choices`` (n,) per item or ``None``."""
    if name not in RENDERINGS:
        raise KeyError(f"unknown rendering {name!r}; known: {sorted(RENDERINGS)}")
    fn = RENDERINGS[name]
    opts = list(choices) if choices is not None else [None] * len(prompts)
    if len(opts) != len(prompts):
        raise ValueError(f"render: {len(prompts)} prompts but {len(opts)} choices")
    return [fn(p, c) for p, c in zip(prompts, opts, strict=True)]


def llmrouter_choices(table: pd.DataFrame, data_root: str | Path | None = None) -> pd.Series:
    """``choices`` per prompt_id for the llmrouter_ulab rows of ``table`` (read from its JSONL,
    which keeps them outside the prompt text); ids of other sources map to ``None``."""
    from router_ml.paths import source_dir

    out = pd.Series(None, index=pd.Index(table["prompt_id"].unique(), name="prompt_id"), dtype=object)
    prefix = "llmrouter_ulab/"
    if not out.index.str.startswith(prefix).any():
        return out
    file = source_dir("llmrouter_ulab", data_root) / "train.jsonl"
    found = {}
    with open(file, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                if "prompt_id" in rec:
                    found[prefix + str(rec["prompt_id"])] = rec.get("choices")
    return out.index.to_series().map(found).astype(object).where(lambda s: s.notna(), None)


def render_table(table: pd.DataFrame, name: str, choices: pd.Series | None = None) -> pd.DataFrame:
    """A copy of the long ``table`` whose ``prompt`` is rendered by ``name`` (outcomes, costs, ids
    and labels kept: see the module docstring); ``choices`` maps prompt_id -> choices string."""
    prompts = table.drop_duplicates("prompt_id")[["prompt_id", "prompt"]]
    opts = None if choices is None else [choices.get(pid) for pid in prompts["prompt_id"]]
    rendered = dict(zip(prompts["prompt_id"], render(name, list(prompts["prompt"]), opts), strict=True))
    out = table.copy()
    out["prompt"] = out["prompt_id"].map(rendered)
    return out
