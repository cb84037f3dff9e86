"""Regenerate the README's results tables from real data (issue 3): one evaluation per row.

    python -m experiments.results_table                 # every row, seeds 0 1 2 (~15 min cold, ~5 cached)
    python -m experiments.results_table --rows llmrouter routellm_gsm8k --seeds 0

Each row runs ``router_ml.evaluation.harness.evaluate`` (conf/evaluate.yaml plus the row's overrides)
into ``outputs/results/<row>/``; the tables go to ``data/results/results.md`` (+ ``results.json``) and
between the ``<!-- results:start -->`` / ``<!-- results:end -->`` markers of README.md.
RouteLLM's published figures come from ``experiments/published_routellm.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml

from router_ml.metrics import json_safe

ROOT = Path(__file__).resolve().parents[1]
ROWS: dict[str, dict] = {
    "llmrouter": {"overrides": ["data=llmrouter"], "split": "test", "label": "llmrouter_ulab (9 models)"},
    "routerbench": {
        "overrides": ["data=routerbench"],
        "split": "test",
        "label": "routerbench_subset_routerdc (11 models, measured $)",
    },
    "routellm_mmlu": {
        "overrides": ["data=routellm_mmlu"],
        "split": "test",
        "label": "routellm MMLU (GPT-4 vs Mixtral)",
    },
    "routellm_gsm8k": {
        "overrides": ["data=routellm_gsm8k", "predictor=mlp"],  # one task: taskmix has nothing to mix
        "split": "test",
        "label": "routellm GSM8K (GPT-4 vs Mixtral)",
    },
    "llmrouter_ood": {
        "overrides": [
            "data=llmrouter",
            "split.holdout_tasks=[human_eval,commonsense_qa]",
            "name=eval-llmrouter-ood",
        ],
        "split": "ood",
        "label": "llmrouter OOD: human_eval + commonsense_qa held out of training",
    },
}


def run_row(name: str, seeds: list[int], extra: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from router_ml.evaluation.harness import evaluate

    overrides = [*ROWS[name]["overrides"], f"seeds=[{','.join(map(str, seeds))}]", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    return evaluate(cfg, run_dir=ROOT / "outputs" / "results" / name)


def fmt(m: dict | None, key: str, pct: bool = False, digits: int = 3) -> str:
    if m is None or key not in m or m[key]["mean"] is None or not math.isfinite(m[key]["mean"]):
        return "n/a"
    v, lo, hi = m[key]["mean"], m[key]["ci_lo"], m[key]["ci_hi"]
    scale = 100 if pct else 1
    unit = "%" if pct else ""
    d = 0 if pct else digits
    if lo is None or not math.isfinite(lo):
        return f"{v * scale:.{d}f}{unit}"
    return f"{v * scale:.{d}f}{unit} ±{(hi - lo) / 2 * scale:.{d}f}"


def main_table(results: dict[str, dict]) -> str:
    head = (
        "| data (held-out split) | best single q | oracle q | AIQ: learned utility | AIQ: kNN utility "
        "| AIQ: Zero router | q at best-single cost | cost to 95% of best | cost to 100% of best "
        "| gap closed at best cost |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, summary in results.items():
        m = summary["splits"].get(ROWS[name]["split"])
        lines.append(
            f"| {ROWS[name]['label']} | {fmt(m, 'best_single/quality')} | {fmt(m, 'oracle/quality')} "
            f"| {fmt(m, 'utility/aiq')} | {fmt(m, 'utility[knn]/aiq')} | {fmt(m, 'zero/aiq')} "
            f"| {fmt(m, 'utility/quality_at_best_cost')} | {fmt(m, 'utility/cost_share_to_95pct_best', True)} "
            f"| {fmt(m, 'utility/cost_share_to_100pct_best', True)} "
            f"| {fmt(m, 'utility/gap_closed_at_best_cost', True)} |"
        )
    return head + "\n".join(lines) + "\n"


def baselines_table(results: dict[str, dict]) -> str:
    """Each policy's AIQ and its quality at its best operating point that costs no more than the
    best single model (a single-point policy such as capability has an AIQ near 0 whenever that
    point is expensive, so the second figure says more about it)."""
    routers = [
        "utility",
        "utility[knn]",
        "cost_aware",
        "capability",
        "latency_aware",
        "budget_ratio",
        "threshold",
        "random",
    ]
    head = "| data | " + " | ".join(routers) + " |\n|---|" + "---|" * len(routers) + "\n"
    lines = []
    for name, summary in results.items():
        m = summary["splits"].get(ROWS[name]["split"])
        cells = [
            f"{fmt(m, f'{r}/aiq', digits=3).split(' ')[0]} / {fmt(m, f'{r}/op_quality').split(' ')[0]}"
            for r in routers
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def routellm_table(results: dict[str, dict]) -> str:
    pub = yaml.safe_load((ROOT / "experiments" / "published_routellm.yaml").read_text())
    head = "| benchmark | router | trained on | APGR | CPT(50%) | CPT(80%) |\n|---|---|---|---|---|---|\n"
    lines = []
    for bench in ("mmlu", "gsm8k"):
        name = f"routellm_{bench}"
        if name in results:
            m = results[name]["splits"].get("test")
            for r, label in (
                ("threshold", "router-ml learned head"),
                ("threshold[knn]", "router-ml kNN head"),
            ):
                lines.append(
                    f"| {bench.upper()} | **{label}** (threshold sweep) | 70% of the benchmark's prompts "
                    f"| {fmt(m, f'{r}/apgr')} | {fmt(m, f'{r}/cpt50', True)} | {fmt(m, f'{r}/cpt80', True)} |"
                )
            lines.append(
                f"| {bench.upper()} | router-ml random (measured) | - | {fmt(m, 'random/apgr')} "
                f"| {fmt(m, 'random/cpt50', True)} | {fmt(m, 'random/cpt80', True)} |"
            )
        for r, v in (pub.get(bench) or {}).items():
            if not isinstance(v, dict):
                continue
            lines.append(
                f"| {bench.upper()} | RouteLLM {r} (published) | {v.get('training_data', '')} | {v['apgr']:.3f} "
                f"| {v['cpt50'] * 100:.1f}% | {v['cpt80'] * 100:.1f}% |"
            )
    return head + "\n".join(lines) + "\n"


def pacing_table(results: dict[str, dict]) -> str:
    head = "| data | requests | budget | spent / budget | never over the hard cap | refused | spend at half stream |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for name, s in results.items():
        p = s.get("pacing") or {}
        if not p:
            continue
        lines.append(
            f"| {name} | {p['requests']['mean']:.0f} | ${p['budget_usd']['mean']:.3f} | {fmt(p, 'spend_vs_target')} "
            f"| {'yes' if p['never_over_cap']['mean'] == 1.0 else 'NO'} | {fmt(p, 'refused_share', True)} "
            f"| {fmt(p, 'spent_at_half_stream')} |"
        )
    return head + "\n".join(lines) + "\n"


def write_readme(block: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        logging.warning("README.md has no results markers; not updated")
        return
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{block}{end}{after}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="rebuild the tables from data/results/results.json without re-running",
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = {}
    if args.reuse:
        saved = json.loads((ROOT / "data" / "results" / "results.json").read_text())
        results = {k: saved[k] for k in args.rows if k in saved}
        args.seeds = next(iter(results.values()))["seeds"] if results else args.seeds
    for name in [] if args.reuse else args.rows:
        logging.info("row %s", name)
        results[name] = run_row(name, args.seeds, args.overrides)
    seeds = ", ".join(map(str, args.seeds))
    block = (
        f"Held-out prompts, mean ± half-width of the 95% CI over seeds {seeds} "
        "(`python -m experiments.results_table`). q = mean observed score of the chosen model; "
        "cost shares are of the best single model's $ on the same prompts; AIQ is comparable within a row only.\n\n"
        + main_table(results)
        + "\nEvery policy, `AIQ / quality at its best point costing no more than the best single model` "
        "(means over seeds; learned head unless marked):\n\n"
        + baselines_table(results)
        + "\nRouteLLM's benchmark (strong = GPT-4-1106, weak = Mixtral-8x7B; x axis = share of GPT-4 calls):\n\n"
        + routellm_table(results)
        + "\nBudget pacing (`cost_aware`, budget = 30% of the best single model's spend on a 10,000-request "
        "replay of the test prompts):\n\n" + pacing_table(results)
    )
    out = ROOT / "data" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(block)
    slim = {
        k: {"splits": v["splits"], "pacing": v.get("pacing"), "seeds": v["seeds"], "time": v["time"]}
        for k, v in results.items()
    }
    for name in results:  # the main frontier plot of each row, for the README
        run = ROOT / "outputs" / "results" / name
        if (run / "frontier.parquet").exists():
            from router_ml.evaluation.plots import plot_run

            plot_run(run)
            png = run / f"frontier_{ROWS[name]['split']}.png"
            if png.exists():
                shutil.copyfile(png, out / f"frontier_{name}.png")
    if not args.reuse:
        (out / "results.json").write_text(json.dumps(json_safe(slim), indent=1, allow_nan=False) + "\n")
    if not args.no_readme:
        write_readme(block)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
