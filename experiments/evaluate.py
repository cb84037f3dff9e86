"""Quality against spend: sweep every policy on held-out prompts and write the frontier.

    python -m experiments.evaluate                                   # llmrouter_ulab, seeds 0-2
    python -m experiments.evaluate data=routerbench                  # RouterBench's measured $
    python -m experiments.evaluate checkpoint=<run>/checkpoint       # a trained, exported router
    python -m experiments.evaluate -m data=llmrouter,routerbench hydra/launcher=joblib2
    python -m experiments.evaluate shift=leave_one_family_out data=mmlu_pro   # under shift
    python -m experiments.evaluate shift=format                      # prompts rendered otherwise

Writes <run folder>/metrics.json, frontier.parquet, per_task.parquet, PNG plots and .hydra/;
with a shift (conf/shift/): shift.json, shift.md and shift_prompts.parquet.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from router_ml.evaluation.harness import evaluate

log = logging.getLogger(__name__)

HEADLINE = (
    "best_single/quality",
    "oracle/quality",
    "utility/aiq",
    "utility[knn]/aiq",
    "zero/aiq",
    "utility/quality_at_best_cost",
    "utility/cost_share_to_95pct_best",
    "utility/cost_share_to_100pct_best",
    "utility/gap_closed_at_best_cost",
)


def log_shift(summary: dict, run_dir: str) -> float:
    """Log a shift run's pooled figures; returns the learned head's pooled gain over the best single."""
    for rendering, g in summary["renderings"].items():
        p = g["pooled"]
        for head, row in p["heads"].items():
            a, w = p["utility_aiq"][head], g["worst_family"][head]
            log.info(
                "%s %-20s %-8s q %.4f vs best single %.4f: %+.2f pts [%+.2f, %+.2f]; worst family %s %+.2f; "
                "utility AIQ %.4f vs Zero %.4f",
                summary["mode"], rendering, head, row["quality"], p["best_single"], 100 * row["delta"],
                100 * row["ci_lo"], 100 * row["ci_hi"], w["family"], 100 * w["delta"], a["aiq"], a["zero_aiq"],
            )  # fmt: skip
    log.info("run folder: %s (%.1f s)", run_dir, summary["time"]["total_s"])
    first = next(iter(summary["renderings"].values()))["pooled"]["heads"]
    return next(iter(first.values()))["delta"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir
    summary = evaluate(cfg, run_dir=run_dir)
    if "renderings" in summary:
        return log_shift(summary, run_dir)
    for split, metrics in summary["splits"].items():
        for key in HEADLINE:
            if key in metrics:
                m = metrics[key]
                log.info("%-5s %-38s %.4f  [%.4f, %.4f]", split, key, m["mean"], m["ci_lo"], m["ci_hi"])
    for key, m in summary.get("pacing", {}).items():
        log.info("pacing %-34s %.4f", key, m["mean"])
    log.info("run folder: %s (%.1f s)", run_dir, summary["time"]["total_s"])
    test = summary["splits"].get("test", {})
    return test.get("utility/aiq", {}).get("mean", float("nan"))


if __name__ == "__main__":
    main()
