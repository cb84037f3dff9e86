"""Code scorer: run the prompt's unit tests against the program in the answer, in a sandbox.

The program is read out of the answer: the fenced code blocks (```python ... ```, or unlabelled
fences) joined in order; with no fence, the whole answer. When the example names an
``entry_point`` the program does not define (a HumanEval-style completion that continues the
prompt's signature), the prompt is put in front of it. The tests follow the program: plain
asserts (MBPP), or a ``check(candidate)`` function that is then called on the entry point
(HumanEval). Value 1 when the run exits cleanly within the limits, else 0; ``detail`` says how it
ended (exit code, timeout, the last lines of stderr). Runs go through
:func:`router_ml.scoring.sandbox.run_python`: fresh process, time / memory limits, no network,
a throwaway directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from router_ml.scoring.base import Example, Score, Scorer, ScoringError
from router_ml.scoring.sandbox import run_python

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_program(answer: str) -> str:
    """The Python program in an answer: its fenced blocks (Python or unlabelled) joined, else all of it."""
    blocks = [
        body for lang, body in _FENCE.findall(answer) if lang.lower() in ("", "python", "py", "python3")
    ]
    return "\n\n".join(b.rstrip() for b in blocks) if blocks else answer


def program_under_test(ex: Example) -> str:
    """What the sandbox runs: the program (after the prompt, for a bare completion), then the tests."""
    if not ex.tests or not ex.tests.strip():
        raise ScoringError("scorer 'code': the example has no 'tests' to run")
    program = extract_program(ex.answer)
    ep = ex.entry_point
    if ep and not re.search(rf"^\s*def\s+{re.escape(ep)}\s*\(", program, re.MULTILINE):
        program = ex.prompt.rstrip() + "\n" + program
    parts = [program.rstrip(), ex.tests.rstrip()]
    if (
        ep
        and re.search(r"^def\s+check\s*\(", ex.tests, re.MULTILINE)
        and not re.search(r"^check\s*\(", ex.tests, re.MULTILINE)
    ):
        parts.append(f"check({ep})")
    return "\n\n".join(parts) + "\n"


class CodeScorer(Scorer):
    """``timeout_s`` wall seconds and ``memory_mb`` address space per run; ``workers`` runs at a time."""

    name = "code"
    version = "1"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, workers: int = 1) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.workers = workers

    def get_params(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s, "memory_mb": self.memory_mb}  # workers change no verdict

    def score_one(self, ex: Example) -> Score:
        code = program_under_test(ex)
        run = run_python(code, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        tail = "\n".join(run.stderr.strip().splitlines()[-3:])
        detail = {"returncode": run.returncode, "timed_out": run.timed_out, "seconds": round(run.seconds, 3),
                  "stderr_tail": tail, "network_namespace": run.network_namespace}  # fmt: skip
        first = next((ln for ln in extract_program(ex.answer).splitlines() if ln.strip()), "")
        return self.make(float(run.passed), extracted=first[:200], detail=json.dumps(detail))

    def score(self, examples: Sequence[Example]) -> list[Score]:
        if self.workers <= 1:
            return [self.score_one(ex) for ex in examples]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.score_one, examples))
