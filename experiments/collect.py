"""Collect answers from a pool of backends into an append-only store (resumable, spend-capped).

    python -m experiments.collect prompts=my_prompts.jsonl                  # the local pool
    python -m experiments.collect collect=api prompts=my.parquet spend_cap_usd=5 models=[gpt-4o-mini]
    python -m experiments.collect data=llmrouter data.max_prompts=100 store=outputs/collect/llmrouter.sqlite

Writes every call to ``store`` (SQLite; ``router_ml.collect.store.read_store`` reads it as a
pandas table) and this run's summary to <run folder>/collect.json.
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from router_ml.collect.runner import collect_from_config

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="collect")
def main(cfg: DictConfig) -> int:
    summary = collect_from_config(cfg)
    out = os.path.join(HydraConfig.get().runtime.output_dir, "collect.json")
    with open(out, "w") as fh:
        json.dump(summary, fh, indent=2)
    log.info(
        "%d calls: %d answers, %d errors, $%.4f spent, %d left (%s); store %s",
        summary["calls"], summary["answers"], summary["errors"], summary["spent_usd"],
        summary["left"], summary["stop_reason"], summary["store"],
    )  # fmt: skip
    return summary["answers"]


if __name__ == "__main__":
    main()
