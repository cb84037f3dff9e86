"""The scorer registry: name -> class, :func:`build_scorer`, and which scorer a task gets.

    build_scorer("math")                                   # MathScorer()
    build_scorer({"name": "code", "timeout_s": 5})         # CodeScorer(timeout_s=5)
    build_scorer("judge_rubric", client=c, backend="gpt")  # a judge needs a chat client and backend
    scorer_name_for(Example(..., task="gsm8k"))            # "math"

Task names map onto scorers in :data:`TASK_SCORERS` (benchmark names and the project's task
types); an example with ``tests`` and no known task goes to ``code``; any other unknown task is
an error that lists the known names (an open-ended task has no automatic right answer: choose a
judge for it explicitly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router_ml.scoring.base import Example, Scorer, ScoringError
from router_ml.scoring.choice import ChoiceScorer
from router_ml.scoring.code import CodeScorer
from router_ml.scoring.judge import PairwiseJudge, RubricJudge
from router_ml.scoring.math_answer import MathScorer
from router_ml.scoring.qa import QAScorer
from router_ml.scoring.zeroeval import ZeroEvalScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (ChoiceScorer, MathScorer, CodeScorer, QAScorer, RubricJudge, PairwiseJudge, ZeroEvalScorer)
}
JUDGES = frozenset({RubricJudge.name, PairwiseJudge.name})

TASK_SCORERS: dict[str, str] = {
    **dict.fromkeys(("choice", "mcq", "multiple_choice", "mmlu", "mmlu_pro", "mmlu-pro", "arc",
                     "arc_challenge", "arc-challenge", "arc_easy", "gpqa", "commonsense_qa",
                     "openbook_qa", "cmmlu", "ceval"), "choice"),
    **dict.fromkeys(("math", "gsm8k", "gsm", "math-l5", "math_prealgebra", "agentverse-mgsm"), "math"),
    **dict.fromkeys(("code", "mbpp", "humaneval", "human_eval"), "code"),
    **dict.fromkeys(("qa", "natural_qa", "trivia_qa", "squad"), "qa"),
}  # fmt: skip


def scorer_name_for(ex: Example) -> str:
    """The scorer for an example's task (``mmlu_<subject>`` counts as ``mmlu``)."""
    task = (ex.task or "").strip().lower()
    if task.startswith("mmlu_"):
        task = "mmlu"
    if task in TASK_SCORERS:
        return TASK_SCORERS[task]
    if ex.tests:
        return "code"
    raise ScoringError(
        f"no scorer for task {ex.task!r}: known tasks {sorted(TASK_SCORERS)}; for open-ended tasks "
        f"name a judge ({sorted(JUDGES)}) explicitly"
    )


def build_scorer(cfg: Mapping[str, Any] | str, **extra: Any) -> Scorer:
    """A scorer from ``{"name": ..., **params}`` or a bare name; ``extra`` adds parameters (a judge's
    ``client`` and ``backend``)."""
    params = {"name": cfg} if isinstance(cfg, str) else dict(cfg)
    name = params.pop("name", None)
    params.update(extra)
    if name not in SCORERS:
        raise ScoringError(f"unknown scorer {name!r}; known: {sorted(SCORERS)}")
    try:
        return SCORERS[name](**params)
    except TypeError as e:
        raise ScoringError(f"scorer {name!r}: bad parameters {sorted(params)}: {e}") from None
