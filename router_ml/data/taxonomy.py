"""The project's task taxonomy and the mapping from every source's own task names onto it.

Six task types, chosen to match the seed article's capability table:

- ``classify``  - classification, tagging, sentiment, routing/intent labels, yes/no judgements
- ``summarize`` - summaries and extraction (pull fields, entities, key points out of a text)
- ``code``      - write, fix, explain or execute code
- ``reason``    - math and logic: word problems, competition math, puzzles, multi-step deduction
- ``creative``  - open-ended writing and analysis: stories, essays, marketing, role-play, advice
- ``qa``        - knowledge and factual questions, including multiple-choice knowledge exams

Source task names are mapped per source (the same name can mean different things in two
sources). :func:`map_task` raises on a name it does not know, so a new benchmark cannot slip
into training with a silent default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

TASK_TYPES: tuple[str, ...] = ("classify", "summarize", "code", "reason", "creative", "qa")

# source -> {source task name -> task type}. "*" is the fallback for that source only.
SOURCE_TASK_MAP: dict[str, dict[str, str]] = {
    "llmrouter_ulab": {
        "math": "reason",
        "gsm8k": "reason",
        "agentverse-mgsm": "reason",
        "agentverse-logicgrid": "reason",
        "mbpp": "code",
        "human_eval": "code",
        "commongen": "creative",
        "natural_qa": "qa",
        "trivia_qa": "qa",
        "mmlu": "qa",
        "gpqa": "qa",
        "commonsense_qa": "qa",
        "openbook_qa": "qa",
        "arc_challenge": "qa",
    },
    "routerbench_subset_routerdc": {
        "arc-challenge": "qa",
        "mbpp": "code",
        # Winogrande: pick which of two referents a blank refers to - commonsense inference.
        "winogrande": "reason",
    },
    "routellm_gpt4_mixtral": {
        # MMLU subjects are mapped by prefix in map_task ("mmlu_*" -> qa).
        "gsm8k": "reason",
        # MT-Bench categories
        "writing": "creative",
        "roleplay": "creative",
        "humanities": "creative",  # essay-style analysis questions
        "reasoning": "reason",
        "math": "reason",
        "coding": "code",
        "extraction": "summarize",
        "stem": "qa",
    },
    "routerdc_7models": {
        "mmlu": "qa",
        "cmmlu": "qa",
        "ceval": "qa",
        "arc_challenge": "qa",
        "arc_easy": "qa",
        "gsm8k": "reason",
        "MATH_prealgebra": "reason",
        "humaneval": "code",
        "mbpp": "code",
        "javascript": "code",
    },
    "mmlu_pro_model_outputs": {
        # Calculation-heavy subjects are solved by multi-step chain of thought -> reason.
        "math": "reason",
        "physics": "reason",
        "chemistry": "reason",
        "engineering": "reason",
        "law": "qa",
        "other": "qa",
        "economics": "qa",
        "health": "qa",
        "psychology": "qa",
        "business": "qa",
        "biology": "qa",
        "philosophy": "qa",
        "computer science": "qa",
        "history": "qa",
    },
    "zeroeval_math_code": {
        "gsm": "reason",
        "math-l5": "reason",
        "crux": "code",  # CRUXEval: predict the output of a Python function
    },
    "alpaca_eval_annotations": {
        # Open-ended instructions (advice, writing, explanations) judged by preference.
        "*": "creative",
    },
    "mt_bench": {
        "writing": "creative",
        "roleplay": "creative",
        "humanities": "creative",
        "reasoning": "reason",
        "math": "reason",
        "coding": "code",
        "extraction": "summarize",
        "stem": "qa",
    },
    "wizardlm": {
        # Skill -> task, checked against every prompt of each skill in wizardlm_testset.jsonl
        # (218 prompts). "mixed" notes give the per-prompt split; the skill takes the majority.
        "Math": "reason",  # 19/19 (incl. 3 "solve this open conjecture" prompts)
        "Reasoning": "reason",  # 12/13 puzzles and word problems; 1 asks what kinds of reasoning exist
        # Open-ended "what if X had never happened" essays, not logic problems.
        "Counterfactual": "creative",  # 8/8
        "Code Generation": "code",
        "Code Debug": "code",
        "Writting": "creative",  # [sic]
        "Academic Writing": "creative",  # mixed: review/writing advice/polish 3, LaTeX table 1
        "Roleplay": "creative",
        # Long pasted programming questions (SQL, C++, Python, C#, LeetCode), not format requests.
        "Complex Format": "code",  # mixed: code 11, one right-triangle math problem (reason)
        # mixed: concept explanations 8, write-a-program 5 (FizzBuzz, palindrome, sorts), poem/essay 2
        "Computer Science": "qa",
        # mixed: everyday-knowledge questions 4 (thirst, red light, raw egg, unknown words), trick
        # riddles 4 (reason), one opinion question; tie kept at qa.
        "Common-Sense": "qa",
        # mixed: translate a phrase / say X in language Y 5 (treated as knowledge), haiku 1, essay 1
        "Multilingual": "qa",
        "Biology": "qa",
        "Technology": "qa",  # mixed: impact/application questions 5, cover letter 1
        # mixed: "what are the main theories/principles/issues" 3 + multiple choice 1, debate/ranking 2
        "Ethics": "qa",
        "TruthfulQA": "qa",
        "Sport": "qa",
        "Law": "qa",  # incl. 3 case scenarios that ask how the law applies
        "Medicine": "qa",
        # Literary analysis essays ("significance of the green light ... provide evidence from the
        # text") 3 + a ranking of classics 1; one multiple-choice question.
        "Literature": "creative",  # mixed: creative 4, qa 1
        "Entertainment": "qa",  # mixed: factual 4, symbolism essay 1
        "Art": "qa",  # mixed: factual/multiple choice 3, symbolism essay 2
        "Music": "qa",  # mixed: factual/multiple choice 4, song-meaning essay 1
        "Economy": "qa",
        # Work/force calculations (W = F d, F = m a) are arithmetic word problems.
        "Physics": "reason",  # mixed: calculations 3, explain speed vs velocity / teach basics 2
        # 2 knowledge questions (felony murder, multiple-choice toxicity) and 2 bare social-media
        # comments with no request; tie kept at qa, the only explicit requests.
        "Toxicity": "qa",
        "History": "qa",
        "Chemistry": "qa",
        "Philosophy": "qa",  # 1 prompt: "deepest philosophical questions, attempt answers"
    },
    # The project's own labelled prompts carry taxonomy labels directly.
    "router_ml_labelled": {t: t for t in TASK_TYPES},
    # A user's collection store (router_ml/data/adapters/collected.py): the task a prompt file gives,
    # lower-cased. Task types stand for themselves; benchmark and scorer names (the scorer registry's
    # TASK_SCORERS) map as the public sets above map them; "mmlu_*" subjects are qa (map_task).
    "collected": {
        **{t: t for t in TASK_TYPES},
        **dict.fromkeys(
            [
                "choice",
                "mcq",
                "multiple_choice",
                "mmlu",
                "mmlu_pro",
                "mmlu-pro",
                "arc",
                "arc_challenge",
                "arc-challenge",
                "arc_easy",
                "gpqa",
                "commonsense_qa",
                "openbook_qa",
                "cmmlu",
                "ceval",
                "natural_qa",
                "trivia_qa",
                "squad",
                "stem",
                "knowledge",
                "factual",
            ],
            "qa",
        ),
        **dict.fromkeys(
            [
                "math",
                "gsm8k",
                "gsm",
                "math-l5",
                "math_prealgebra",
                "agentverse-mgsm",
                "reasoning",
                "logic",
                "winogrande",
            ],
            "reason",
        ),
        **dict.fromkeys(["coding", "mbpp", "humaneval", "human_eval", "crux", "javascript"], "code"),
        **dict.fromkeys(["summarization", "summary", "extraction"], "summarize"),
        **dict.fromkeys(["classification", "sentiment", "tagging"], "classify"),
        **dict.fromkeys(["writing", "roleplay", "humanities", "commongen", "open_ended", "chat"], "creative"),
    },
}


class UnknownTaskError(KeyError):
    """A source task name with no mapping onto the taxonomy."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def map_task(source: str, name: str) -> str:
    """Map one source task name onto :data:`TASK_TYPES`.

    >>> map_task("llmrouter_ulab", "gsm8k")
    'reason'
    """
    if source not in SOURCE_TASK_MAP:
        raise UnknownTaskError(f"unknown source {source!r}; known sources: {sorted(SOURCE_TASK_MAP)}")
    table = SOURCE_TASK_MAP[source]
    if name in table:
        return table[name]
    if source in ("routellm_gpt4_mixtral", "collected") and name.startswith("mmlu_"):
        return "qa"
    if "*" in table:
        return table["*"]
    raise UnknownTaskError(f"source {source!r}: no task-type mapping for task name {name!r}")


def task_ids_of(tasks: pd.Series) -> np.ndarray:
    """Integer task ids: the taxonomy's order for task types, sorted order for any other labels."""
    labels = list(TASK_TYPES) if set(tasks) <= set(TASK_TYPES) else sorted(set(tasks))
    return tasks.map({t: i for i, t in enumerate(labels)}).to_numpy(dtype="int64")
