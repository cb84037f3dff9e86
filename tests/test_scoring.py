"""Scorers (issue 14): extraction and verdicts per scorer, the sandbox's limits, the cache, the
judge's parsing (on recorded replies) and position swap, the registry; the math scorer on real
GSM8K responses. The judge against real servers is in tests/integration/test_judge_real.py;
the published-label figures come from experiments/bench_scorers.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass

import pandas as pd
import pytest

from router_ml.scoring.base import Example, Score, ScoringError, StringScorer
from router_ml.scoring.cache import ScoreCache, score_examples
from router_ml.scoring.choice import ChoiceScorer
from router_ml.scoring.code import CodeScorer, extract_program, program_under_test
from router_ml.scoring.judge import PairwiseJudge, RubricJudge, parse_preference, parse_rating
from router_ml.scoring.math_answer import MathScorer, as_number, equivalent, extract_answer, gold_answer
from router_ml.scoring.qa import QAScorer, exact_match, normalize_answer, token_f1
from router_ml.scoring.registry import SCORERS, build_scorer, scorer_name_for
from router_ml.scoring.sandbox import network_namespace_available, run_python
from router_ml.scoring.zeroeval import first_json_object, json_fields, judge, sanitize


# ------------------------------------------------------------------------------------------ choice
@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("D. Because the others are wrong.", "D"),
        ("**A**", "A"),
        ("Let me think. The answer is A. Wait, no: the answer is B", "B"),
        ("\\boxed{C}", "C"),
        ('{"reasoning": "...", "answer": "G"}', "G"),
        ("I think it is a good one", None),  # the pronoun is not option I
        ("Options (A) and (B) are wrong; (C)", None),  # ambiguous: no verdict
    ],
)
def test_choice_extracts_the_chosen_letter(text, letter):
    assert ChoiceScorer().extract(text) == letter


def test_choice_scores_against_the_gold_letter_and_rejects_a_bad_reference():
    s = ChoiceScorer()
    assert [
        x.value for x in s.score([Example("q", "Answer: (b)", "B"), Example("q", "Answer: C", "(B)")])
    ] == [0.0, 0.0]
    assert s.score([Example("q", "Answer: B", "(B)")])[0].value == 1.0
    with pytest.raises(ScoringError, match="reference 'Paris' is not one of the letters"):
        s.score([Example("q", "A", "Paris")])
    with pytest.raises(ScoringError, match="no 'reference'"):
        s.score([Example("q", "A")])


# -------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize(
    ("text", "answer", "where"),
    [
        ("so x = \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", "boxed"),
        ("16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18", "18", "hashes"),
        ('{"reasoning": "9 eggs at $2", "answer": "18"}', "18", "json"),
        ("Therefore the final answer is: $18.", "$18.", "statement"),
        ("She makes 9 * 2 = 18 dollars every day.", "18", "last_number"),
        ("no numbers here", None, "none"),
    ],
)
def test_math_extracts_the_final_answer(text, answer, where):
    assert extract_answer(text) == (answer, where)


@pytest.mark.parametrize(
    ("gold", "pred", "same"),
    [
        ("72", "$72.00", True),
        ("1234", "1,234", True),
        ("18", "18 dollars", True),
        ("0.75", "3/4", True),
        ("\\frac{3}{4}", "0.75", True),
        ("50", "50\\%", True),
        ("4", "Jackson is 4 years old.", True),
        ("4", "4 (3 onions and 1 potato)", True),
        ("16", "2 + 8 + 6 = 16", True),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
        ("x^2+1", "1+x^2", True),
        ("(1,2)", "(1, 2)", True),
        ("3", "3.5", False),
        ("54", "-54", False),
        ("6", "6\\sqrt{2}", False),  # ZeroEval's first-number rule calls this right; it is not
        ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ],
)
def test_math_equivalence(gold, pred, same):
    assert equivalent(gold, pred) is same


def test_math_symbolic_equivalence_holds_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(equivalent, "x^2+1", "1+x^2").result() is True


def test_math_gold_forms_and_numbers():
    assert gold_answer("Janet sells 9 eggs...\n#### 1,080") == "1,080"
    assert gold_answer("# 18") == "18"
    assert gold_answer("The answer is $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert as_number("$1,234.50") == 1234.5 and as_number("(1, 2)") is None
    s = MathScorer().score([Example("q", "#### 18", "# 18"), Example("q", "I don't know", "18")])
    assert [x.value for x in s] == [1.0, 0.0] and s[0].extracted == "hashes: 18" and s[1].extracted is None


def test_math_scorer_on_real_gsm8k_responses_matches_routellm_labels_where_their_rule_reads_right(
    shared_data,
):
    """RouteLLM's labels are its last-digits rule; on the Mixtral responses where that rule and a
    correct reading of the last number agree (the rule has no decimal or sign to misread), the
    scorer must agree with the label on every row."""
    import re

    csv = pd.read_csv(shared_data / "routellm_gpt4_mixtral" / "gsm8k" / "gsm8k_responses.csv").head(300)
    items = pd.read_parquet(shared_data / "zeroeval_math_code" / "items.parquet")
    gold = dict(zip(items["question"].str.strip(), items["answer"], strict=False))
    model = "mistralai/Mixtral-8x7B-Instruct-v0.1"
    checked = agree = 0
    for prompt, resp, label in zip(
        csv["prompt"], csv[f"{model}_response"].fillna(""), csv[model], strict=True
    ):
        ints = re.findall(r"\d+", resp.replace(",", ""))
        nums = re.findall(r"-?\d+(?:\.\d+)?", resp.replace(",", ""))
        if not nums or float(nums[-1]) != float(ints[-1]):  # the rule would misread this response
            continue
        checked += 1
        agree += MathScorer().score([Example(prompt, resp, gold[prompt.strip()])])[0].value == float(
            bool(label)
        )
    assert checked > 250 and agree >= checked - 2, (agree, checked)


# -------------------------------------------------------------------------------------------- code
def test_sandbox_limits_time_memory_and_network_and_cleans_up():
    assert run_python("print(6 * 7)").stdout == "42\n"
    slow = run_python("while True: pass", timeout_s=1)
    assert slow.timed_out and not slow.passed and slow.returncode is None
    hog = run_python("x = bytearray(3_000_000_000)", memory_mb=256)
    assert hog.returncode != 0 and "MemoryError" in hog.stderr
    net = run_python("import socket; socket.create_connection(('127.0.0.1', 9))")
    assert net.returncode != 0 and "network access is disabled" in net.stderr
    raw = run_python("import _socket; s = _socket.socket(); s.connect(('10.255.255.1', 80))", timeout_s=5)
    assert (
        raw.returncode != 0
    )  # no route out, even past the socket module (network namespace or a dead address)
    where = run_python("import os; print(os.getcwd()); open('scratch.txt', 'w').write('x')")
    from pathlib import Path

    assert where.passed and not Path(where.stdout.strip()).exists()  # the throwaway directory is gone
    print("network namespace:", network_namespace_available())


HE_PROMPT = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
HE_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_code_scorer_humaneval_and_mbpp_styles():
    s = CodeScorer(timeout_s=5)
    kw = {"prompt": HE_PROMPT, "tests": HE_TESTS, "entry_point": "add"}
    exs = [
        Example(answer="    return a + b\n", **kw),  # a bare completion: the prompt goes in front
        Example(answer=f"Sure:\n```python\n{HE_PROMPT}    return a + b\n```\nDone.", **kw),  # a full program
        Example(answer="    return a - b\n", **kw),
        Example(answer="```python\ndef add(a, b):\n    while True:\n        pass\n```", **kw),
        Example("Write add(a, b).", "def add(a, b):\n    return a + b", tests="assert add(1, 2) == 3\n"),
        Example("Write add(a, b).", "def add(a, b):\n    return a * b", tests="assert add(1, 2) == 3\n"),
    ]
    got = s.score(exs)
    assert [x.value for x in got] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert [x.value for x in CodeScorer(timeout_s=5, workers=3).score(exs)] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert json.loads(got[2].detail)["stderr_tail"].endswith("AssertionError")
    assert json.loads(got[3].detail)["timed_out"] is True
    assert program_under_test(exs[0]).rstrip().endswith("check(add)")
    with pytest.raises(ScoringError, match="no 'tests'"):
        s.score([Example("p", "x = 1")])


def test_extract_program_joins_python_fences_and_skips_others():
    text = "Plan:\n```bash\nls\n```\n```python\nimport math\n```\nthen\n```py\nx = math.pi\n```"
    assert extract_program(text) == "import math\n\nx = math.pi"
    assert extract_program("x = 1") == "x = 1"


# ---------------------------------------------------------------------------------------------- qa
def test_qa_normalisation_em_and_f1():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower", "Eiffel Tower") == 1.0
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("London", "Paris") == 0.0
    s = QAScorer().score([Example("q", "Let me see. The answer is: Paris.", '["Lyon", "Paris"]')])[0]
    assert s.value == 1.0 and json.loads(s.detail) == {"em": 1.0, "f1": 1.0}
    assert QAScorer("em").score([Example("q", "Paris, France", "Paris\nParis, France")])[0].value == 1.0
    with pytest.raises(ScoringError, match="metric must be"):
        QAScorer("bleu")


# ---------------------------------------------------------------------------------------- zeroeval
# Recorded from ZeroEval's result_dirs/gsm/Meta-Llama-3.1-70B-Instruct.json (gsm8k-main-test-#1),
# Apache-2.0, at yuchenlin/ZeroEval: a well-formed reply.
RECORDED_GSM = (
    '{\n    "reasoning": "To find the total number of bolts needed, we first need to determine the amount '
    "of white fiber required. Since the robe takes half as much white fiber as blue fiber, and it takes 2 "
    "bolts of blue fiber, the amount of white fiber needed is 2 / 2 = 1 bolt. Now, we can add the amount of "
    'blue fiber and white fiber to get the total number of bolts: 2 (blue) + 1 (white) = 3 bolts.",\n    '
    '"answer": "3"\n}'
)


def test_zeroeval_reads_answers_as_zeroeval_does():
    assert judge("gsm", RECORDED_GSM, "# 3") == (True, "3")
    assert first_json_object('text {"answer": 5} more {"answer": 6}') == {"answer": 5}
    assert first_json_object('{"answer": "a\nb", }') is None  # the first object fails: no later try
    assert json_fields('"reasoning": "r", "answer": "4 apples"') == {"reasoning": "r", "answer": "4 apples"}
    assert json_fields("answer: 12, done") == {"answer": "12"}  # unquoted key and value
    assert judge("gsm", "The answer is \\boxed{36}", "# 36") == ("No answer extracted", None)
    # Llama-3.1's boxed fallback stores the dict: its text form is what is compared and recorded
    assert judge("gsm", "The answer is \\boxed{36}", "# 36", "Meta-Llama-3.1-8B-Instruct") == (
        True,
        "{'answer': '36'}",
    )


def test_a_recorded_upstream_reply_gives_the_shared_copys_row(shared_data):
    o = pd.read_parquet(shared_data / "zeroeval_math_code" / "model_outcomes.parquet")
    row = o[(o.model == "Meta-Llama-3.1-70B-Instruct") & (o.item_id == "gsm8k-main-test-#1")].iloc[0]
    matched, answer = judge("gsm", RECORDED_GSM, "# 3", row.model)
    assert (str(matched), answer) == (row.matched, row.model_answer)
    assert (len(RECORDED_GSM), len(RECORDED_GSM.split())) == (row.output_chars, row.output_words)


def test_zeroeval_math_and_crux_rules():
    assert (
        sanitize("$1,234") == "1234"
        and sanitize("3/4") == "0.75"
        and sanitize("__import__('os')/1") == "__import__('os')/1"
    )
    assert judge("math-l5", '{"answer": "\\\\frac{1}{2}"}', "\\frac{1}{3}") == (
        True,
        "\\frac{1}{2}",
    )  # first numbers: 1 == 1
    assert judge("math-l5", '{"answer": "1/2"}', "0.5")[0] is True
    assert judge("crux", '{"answer": "\'abc\'"}', "'abc'") == (True, "abc")
    assert judge("crux", '{"answer": [1, 2]}', "[1, 2]") == (True, "[1, 2]")
    assert judge("crux", '{"answer": "a\\nb"}', "'a\\nb'") == (True, "a\\nb")
    assert judge("crux", "no reply", "1") == ("No answer extracted", "None")
    with pytest.raises(ScoringError, match="unknown task 'mmlu'"):
        judge("mmlu", "", "")


# ------------------------------------------------------------------------------------------- judge
# Recorded from SmolLM2-135M (llama.cpp) asked for MT-Bench verdicts (text, then JSON-constrained).
SMOL_TEXT = "2 + 3 = 5.\n[The End of Assistant's Answer]"
SMOL_PAIR = "[The Start of Assistant B's Answer]\n2 + 3 = 5.\n\nPlease provide the answer to this question:"
SMOL_JSON_PAIR = '{ "verdict": "A"}'


@pytest.mark.parametrize(
    ("text", "rating"),
    [("Good answer. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: 3", 3.0), ('{"rating": 5}', 5.0),
     ("[[11]]", None), (SMOL_TEXT, None), ('{"rating": 0}', None)],
)  # fmt: skip
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("A is better. [[A]]", "A"),
        ("[[A]] ... on reflection [[C]]", "C"),
        (SMOL_JSON_PAIR, "A"),
        (SMOL_PAIR, None),
    ],
)
def test_parse_preference(text, verdict):
    assert parse_preference(text) == verdict


@dataclass
class _Reply:
    text: str
    cost_usd: float | None


class _PositionBiasedClient:
    """A stand-in judge backend (the subject here is the swap arithmetic): always prefers the
    answer shown first, or fails for one backend name."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []

    async def chat(self, name, payload):
        self.payloads.append(payload)
        if name == "down":
            raise ConnectionError("connection refused")
        return _Reply(
            "[[A]]" if "json" not in str(payload.get("response_format")) else '{"verdict": "A"}', 0.001
        )


def test_pairwise_swap_cancels_a_position_bias_and_records_cost_and_errors():
    client = _PositionBiasedClient()
    s = PairwiseJudge(client, "j").score([Example("q", "mine", reference="theirs")])[0]
    assert s.value == 0.5 and s.extracted == "A,A" and s.cost_usd == pytest.approx(0.002)
    assert json.loads(s.detail)["consistent"] is False
    users = [p["messages"][1]["content"] for p in client.payloads]
    assert users[0].index("mine") < users[0].index("theirs") and users[1].index("theirs") < users[1].index(
        "mine"
    )
    down = PairwiseJudge(client, "down").score([Example("q", "mine", reference="theirs")])[0]
    assert down.value is None and "judge backend 'down': ConnectionError: connection refused" in down.error
    j = PairwiseJudge(client, "j", verdict_format="json_object")
    assert j.score([Example("q", "a", reference="b")])[0].value == 0.5
    assert client.payloads[-1]["response_format"]["schema"]["properties"]["verdict"]["enum"] == [
        "A",
        "B",
        "C",
    ]
    with pytest.raises(ScoringError, match="verdict_format must be one of"):
        RubricJudge(client, "j", verdict_format="yaml")
    with pytest.raises(ScoringError, match="reference model's answer"):
        asyncio.run(PairwiseJudge(client, "j").ascore([Example("q", "a")]))


# ------------------------------------------------------------------------------------------- cache
class _Counting(StringScorer):
    """Counts the examples it really scores (the subject is the cache); fails on 'boom'."""

    name = "counting"
    version = "1"

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.calls = 0

    def score_one(self, ex):
        self.calls += 1
        if ex.answer == "boom":
            raise RuntimeError("scorer crashed")
        if ex.answer == "err":
            return self.make(None, error="backend down")
        return self.make(float(len(ex.answer) % 2))


def test_cache_serves_hits_misses_on_new_version_and_keeps_finished_batches_after_a_crash(tmp_path):
    path = tmp_path / "scores.sqlite"
    exs = [Example("p", f"answer {i}", "r") for i in range(10)]
    s = _Counting()
    first = score_examples(s, exs, cache=ScoreCache(path), batch_size=4, progress=False)
    assert s.calls == 10
    again = score_examples(s, exs, cache=ScoreCache(path), progress=False)
    assert s.calls == 10 and [x.value for x in again] == [x.value for x in first]
    assert all(x.scorer == "counting" and x.version == "1" for x in again)
    bumped = _Counting(version="2")
    score_examples(bumped, exs[:3], cache=ScoreCache(path), progress=False)
    assert bumped.calls == 3  # a new version never reads the old one's verdicts
    # a crash in the third batch: the two finished batches are on disk, a rerun scores only the rest
    crashing = [Example("q", f"x{i}") for i in range(8)] + [Example("q", "boom")]
    c = _Counting()
    with pytest.raises(RuntimeError, match="scorer crashed"):
        score_examples(c, crashing, cache=ScoreCache(path), batch_size=4, progress=False)
    stored = {d for (d,) in sqlite3.connect(path).execute("SELECT digest FROM scores")}
    rows = sum(e.digest() in stored for e in crashing)
    assert rows == 8
    c2 = _Counting()
    score_examples(c2, [*crashing[:8], Example("q", "fine")], cache=ScoreCache(path), progress=False)
    assert c2.calls == 1
    # failed scores are not cached: retried next time
    e = _Counting()
    assert (
        score_examples(e, [Example("q", "err")], cache=ScoreCache(path), progress=False)[0].error
        == "backend down"
    )
    score_examples(e, [Example("q", "err")], cache=ScoreCache(path), progress=False)
    assert e.calls == 2


def test_digest_covers_every_field_the_verdict_reads():
    base = Example("p", "a", "r", "t", "f", task="code")
    others = [Example("P", "a", "r", "t", "f"), Example("p", "A", "r", "t", "f"), Example("p", "a", "R", "t", "f"),
              Example("p", "a", "r", "T", "f"), Example("p", "a", "r", "t", "F")]  # fmt: skip
    assert len({base.digest(), *(o.digest() for o in others)}) == 6
    assert (
        base.digest() == Example("p", "a", "r", "t", "f", task="other").digest()
    )  # the task chooses, not judges


# ---------------------------------------------------------------------------------------- registry
def test_registry_builds_by_name_and_chooses_per_task():
    assert set(SCORERS) == {"choice", "math", "code", "qa", "judge_rubric", "judge_pairwise", "zeroeval"}
    assert build_scorer({"name": "code", "timeout_s": 5}).get_params()["timeout_s"] == 5
    assert build_scorer("math").fingerprint() != build_scorer({"name": "math", "timeout_s": 1}).fingerprint()
    with pytest.raises(ScoringError, match="unknown scorer 'bleu'"):
        build_scorer("bleu")
    with pytest.raises(ScoringError, match="bad parameters"):
        build_scorer({"name": "math", "letters": "AB"})
    assert scorer_name_for(Example("q", "a", task="GSM8K")) == "math"
    assert scorer_name_for(Example("q", "a", task="mmlu_anatomy")) == "choice"
    assert scorer_name_for(Example("q", "a", tests="assert True", task="my_task")) == "code"
    with pytest.raises(ScoringError, match=r"no scorer for task 'poetry'.*judge"):
        scorer_name_for(Example("q", "a", task="poetry"))


def test_score_is_stamped_with_name_and_version():
    s = Score(1.0, "math", "1")
    assert s.ok and not Score(None, "judge_rubric", "1", error="x").ok


# --------------------------------------------------------------------------------------------- cli
def test_cli_scores_a_jsonl_by_task_and_names_bad_input(tmp_path, capsys):
    from router_ml.cli import main

    rows = [
        {"prompt": "What is 2+3?", "answer": "2+3 = 5\n#### 5", "reference": "5", "task": "gsm8k"},
        {"prompt": "Capital of France? (A) Paris (B) Rome", "answer": "The answer is (B)", "reference": "A", "task": "mmlu"},
        {"prompt": "Write add(a, b).", "answer": "```python\ndef add(a, b):\n    return a + b\n```",
         "tests": "assert add(1, 2) == 3", "task": "mbpp"},
        {"prompt": "Who wrote Hamlet?", "answer": "Shakespeare.", "reference": "Shakespeare", "task": "trivia_qa"},
    ]  # fmt: skip
    src = tmp_path / "answers.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "scores.sqlite"
    assert main(["score", str(src), "--cache", str(cache)]) == 0
    out = pd.read_parquet(tmp_path / "answers.scored.parquet")
    assert out["scorer"].tolist() == ["math", "choice", "code", "qa"]
    assert out["score"].tolist() == [1.0, 0.0, 1.0, 1.0] and (out["scorer_version"] == "1").all()
    assert len(ScoreCache(cache)) == 4
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answer": "y", "task": "poetry"}\n')
    assert main(["score", str(tmp_path / "bad.jsonl"), "--cache", ""]) == 2
    assert "bad.jsonl: row 0: no scorer for task 'poetry'" in capsys.readouterr().err
    (tmp_path / "short.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["score", str(tmp_path / "short.jsonl"), "--cache", ""]) == 2
    assert "missing column(s) ['answer']" in capsys.readouterr().err
