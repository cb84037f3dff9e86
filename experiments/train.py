"""Train a router and export its checkpoint into the run folder.

    python -m experiments.train                                  # llmrouter_ulab (shipped copy if no data dir)
    python -m experiments.train data=simulated                   # project prompts, simulated outcomes
    python -m experiments.train +experiment=llmrouter_fast       # MLP without the guard (~1 min)
    python -m experiments.train -m predictor=knn,linear,mlp,mf data=llmrouter   # sweep

Writes <run folder>/checkpoint/, metrics.json and .hydra/ (the resolved config).
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from router_ml.training import train

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir
    metrics = train(cfg, run_dir=run_dir)
    for key in sorted(k for k in metrics if k.startswith(("test/", "ood/"))):
        log.info("%-40s %.4f", key, metrics[key])
    log.info("checkpoint: %s", os.path.join(run_dir, "checkpoint"))
    return metrics.get("test/quality", float("nan"))  # what a sweep optimises


if __name__ == "__main__":
    main()
