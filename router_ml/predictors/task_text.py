"""Text features of the task-type head, computed from the prompt string (numpy only, no vocabulary).

One pass over each text (:func:`text_terms`) gives both kinds:

- :func:`hashed_view`: lower-cased word uni- and bigrams of the prompt's *instruction view* (its
  first and last ``view_words`` words), hashed with crc32 into ``n_features`` buckets. When a long
  pasted text dominates the embedding, the words that say what to DO with it still count.
- :func:`cue_features`: counts of hand-written instruction cues per task type (a small multilingual
  lexicon: "summarize", "TL;DR", "extract", "classify", "label", "one of", "write a poem",
  "how many", "what is", ``def``, "traceback", "总结", "分类", ...), in the instruction view and in
  the whole prompt: ``(n, 2 * len(CUE_TASKS))`` values ``log1p(count)``. The lexicon is code, not
  learned state; :data:`CUE_LEXICON_CRC` fingerprints it so a checkpoint fitted with another
  lexicon is refused.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

_TOKEN = re.compile(r"(?u)\b\w\w+\b")

# Per task type: (Latin-script prefixes that must start at a word boundary, CJK substrings).
# Written by hand from the task definitions in data/labelled_prompts/README.md.
_CUES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "classify": (
        ("classif", "categori", "label", "tag ", "tag each", "tag this", "tags", "sentiment", "spam",
         "which category", "one of", "yes or no", "yes/no", "true or false", "positive or negative",
         "positive/negative", "neutral", "intent", "detect the", "is this", "is it", "rate ", "score this",
         "assign", "sort these", "sort each", "bucket", "flag", "toxic", "triage", "priority",
         "which department", "route", "clasifica", "etiquet", "categor", "classifique", "classe",
         "klassifizier", "ordne", "einordnen", "kategorie", "classifica", "etichett", "label only",
         "answer only", "just the label", "only the label", "one word"),
        ("分类", "分類", "归类", "类别", "ラベル", "判定", "判断", "肯定的", "否定的", "情感", "感情"),
    ),
    "summarize": (
        ("summar", "tl;dr", "tldr", "recap", "key points", "key takeaways", "main points", "bullet", "gist",
         "condense", "shorten", "boil", "in one sentence", "in two sentences", "in a sentence", "one-line",
         "one line", "extract", "pull out", "pull every", "list every", "list all", "list the", "only:",
         "names only", "urls only", "emails only", "to json", "as json", "into json", "json with", "table",
         "fields", "action items", "minutes", "timeline", "outline", "resum", "résum", "zusammenfass",
         "zusammen", "fasse", "kurzfassung", "riassum", "sintetiz", "samenvat", "samen", "extrai",
         "extrahier", "extrae", "saca ", "sacame", "estrai"),
        ("总结", "概括", "摘要", "提取", "要約", "まとめ", "抽出", "要点"),
    ),
    "code": (
        ("code", "python", "javascript", "typescript", "java ", "c++", "rust", "golang", " go ", "sql", "query",
         "regex", "bash", "shell", "script", "function", "def ", "class ", "import ", "return ", "const ",
         "error", "exception", "traceback", "stack trace", "bug", "compile", "docker", "kubernetes", "yaml",
         "json schema", "api", "endpoint", "git ", "npm", "pip ", "cron", "unit test", "refactor", "debug",
         "excel formula", "formula", "pandas", "numpy", "react", "node", "css", "html", "código", "programa",
         "funci", "fonction", "funktion", "codice", "programm"),
        ("代码", "函数", "程序", "编写", "コード", "関数", "プログラム", "python", "sql"),
    ),
    "reason": (
        ("solve", "how many", "how much", "how long", "probability", "prove", "equation", "calculate",
         "compute", "what is the value", "find the", "integral", "derivative", "puzzle", "riddle", "logic",
         "knight", "knave", "deduce", "step by step", "percent", "%", "average speed", "ratio", "sequence",
         "next number", "if all", "valid argument", "schedule", "cuánto", "cuántos", "cuántas", "quanto",
         "quantos", "quantas", "combien", "wie viel", "wie alt", "wie lange", "calcul", "berechne", "résou",
         "resuelve", "resolva", "risolvi", "razonamiento", "raisonnement", "ragionamento", "explica el"),
        ("多少", "几", "计算", "解题", "求", "いくら", "何人", "何個", "計算", "答え", "式"),
    ),
    "creative": (
        ("write a story", "story", "poem", "haiku", "limerick", "song", "lyrics", "slogan", "tagline",
         "caption", "speech", "toast", "essay", "op-ed", "blog post", "letter", "email to", "message for",
         "birthday", "wedding", "role-play", "roleplay", "role play", "you are", "pretend", "imagine",
         "invent", "brainstorm", "names for", "ideas for", "draft", "rewrite", "make it", "tone", "funny",
         "witty", "persuasive", "advice", "should i", "describe", "description", "histoire", "poème",
         "poema", "poesia", "poesía", "cuento", "geschichte", "gedicht", "storia", "racconto", "escreva",
         "escribe", "écris", "écrire", "schreib", "scrivi", "redacta", "verhaal", "schrijf", "mensagem",
         "mensaje"),
        ("故事", "诗", "写一", "詩", "物語", "書いて", "作文", "歌詞"),
    ),
    "qa": (
        ("what is", "what are", "what was", "what does", "who was", "who is", "who wrote", "who invented",
         "when did", "when was", "where is", "why do", "why does", "why is", "how does", "how do", "how did",
         "explain", "define", "definition", "difference between", "history of", "capital of", "meaning of",
         "which country", "which planet", "tell me about", "qu'est-ce", "qui a", "pourquoi", "quand",
         "qué es", "quién", "por qué", "o que é", "quem", "porque", "was ist", "wer ", "warum", "wann",
         "cos'è", "chi ", "perché", "wat is", "waarom"),
        ("什么是", "为什么", "是谁", "哪", "何ですか", "なぜ", "誰", "とは", "どこ"),
    ),
}  # fmt: skip

CUE_TASKS: tuple[str, ...] = tuple(_CUES)
#: crc32 of the lexicon: stored with a fitted head, checked on load
CUE_LEXICON_CRC: int = zlib.crc32(repr(sorted(_CUES.items())).encode())
_CUE_RX = {
    task: re.compile(
        r"(?<![a-z0-9])(?:" + "|".join(re.escape(w) for w in sorted(lat, key=len, reverse=True)) + ")"
    )
    for task, (lat, _) in _CUES.items()
}


def instruction_view(text: str, view_words: int) -> str:
    """The first and last ``view_words`` whitespace-separated words (the whole text if shorter)."""
    w = str(text).split()
    k = int(view_words)
    return " ".join(w) if len(w) <= 2 * k else " ".join(w[:k] + w[-k:])


def text_terms(
    texts: Sequence[str], n_features: int, view_words: int, scale: float, cues: bool
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """The text features of ``texts``, from one lower-cased instruction view per text.

    - hashed word uni- and bigrams of the view: per text, its unique indices (crc32 of the token mod
      ``n_features``, stable across versions and platforms; tokens are lower-cased words of 2+
      characters) and one weight, ``scale / sqrt(count)`` (binary values, l2-normalised, scaled);
      none for ``n_features`` 0;
    - with ``cues``: the ``(n, 2 * len(CUE_TASKS))`` cue counts per task type, in the view and in
      the whole text, as ``log1p``; otherwise None.

    Returns ``(n index arrays, (n,) weights, cue matrix or None)``.
    """
    nf = int(n_features)
    rows, weights = [], np.zeros(len(texts))
    out = np.zeros((len(texts), 2 * len(CUE_TASKS))) if cues else None
    for i, t in enumerate(texts):
        low = str(t).lower()
        view = instruction_view(low, view_words)  # = instruction_view(t).lower(): lower() keeps spaces
        idx: list[int] = []
        if nf > 0:
            toks = _TOKEN.findall(view)
            feats = set(toks) | {f"{a} {b}" for a, b in itertools.pairwise(toks)}
            idx = sorted({zlib.crc32(f.encode()) % nf for f in feats})  # = np.unique of the hashes
        rows.append(np.array(idx, dtype=np.int64))
        weights[i] = float(scale) / math.sqrt(len(idx)) if idx else 0.0
        if out is not None:
            cjk_free = low.isascii()  # no CJK cue can occur: skip their counts (most prompts)
            for j, task in enumerate(CUE_TASKS):
                rx, cjk = _CUE_RX[task], _CUES[task][1]
                for k, s in enumerate((view, low)):
                    n = len(rx.findall(s))
                    out[i, 2 * j + k] = n if cjk_free else n + sum(s.count(c) for c in cjk)
    return rows, weights, None if out is None else np.log1p(out)


def hashed_view(
    texts: Sequence[str], n_features: int, view_words: int, scale: float
) -> tuple[list[np.ndarray], np.ndarray]:
    """The hashed instruction-view part of :func:`text_terms`: ``n`` index arrays, ``(n,)`` weights."""
    rows, weights, _ = text_terms(texts, n_features, view_words, scale, cues=False)
    return rows, weights


def cue_features(texts: Sequence[str], view_words: int) -> np.ndarray:
    """The cue part of :func:`text_terms`: ``(n, 2 * len(CUE_TASKS))`` counts, ``log1p``; per task,
    [in the view, in the whole text]."""
    return text_terms(texts, 0, view_words, 0.0, cues=True)[2]


def sparse_rows(rows: list[np.ndarray], weights: np.ndarray, n_features: int) -> Any:
    """CSR ``(len(rows), n_features)`` matrix: row ``i`` has ``weights[i]`` at the indices ``rows[i]``."""
    import scipy.sparse as sp

    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    data = np.repeat(weights, [len(r) for r in rows])
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), int(n_features)))
