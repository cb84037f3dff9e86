"""Copy a run's checkpoint to a named place, with its model card, after checking it loads.

python -m experiments.export run=outputs/train/2026-12-06/21-40-02_llmrouter-taskmix to=checkpoints/llmrouter-taskmix
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from router_ml.export import export_run

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    dest = export_run(cfg.run, cfg.to, overwrite=bool(cfg.overwrite))
    log.info("exported %s -> %s", cfg.run, dest)


if __name__ == "__main__":
    main()
