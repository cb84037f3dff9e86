"""Export a trained run's checkpoint to a destination folder (checked, atomic, never half-written).

A checkpoint written before checkpoints carried a policy fit set gets one on export (the proxy
refuses to start without it): the router's predictions for the project's labelled prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from router_ml.checkpoint import CONFIG_NAME, CheckpointError, read_arrays, read_config


def export_run(run: str | Path, to: str | Path, overwrite: bool = False) -> Path:
    """Copy ``run``/checkpoint (or ``run`` itself if it is a checkpoint) to ``to``.

    The checkpoint is verified first (schema, checksum, shapes); the run's ``metrics.json`` is
    copied beside it; one without a policy fit set gains one (:func:`add_policy_fit`). Refuses to
    replace an existing destination unless ``overwrite``.
    """
    run = Path(run)
    src = run if (run / CONFIG_NAME).is_file() else run / "checkpoint"
    config = read_config(src)
    read_arrays(src, config)
    dest = Path(to)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"export destination {str(dest)!r} exists; pass overwrite=true to replace it")
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if config.get("policy_fit") is None:
        add_policy_fit(tmp)
    metrics = run / "metrics.json"
    if metrics.is_file() and src != run:
        json.loads(metrics.read_text())  # a corrupted metrics file should not ship
        shutil.copy2(metrics, tmp / "metrics.json")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    if not (dest / "README.md").is_file():
        raise CheckpointError(f"exported checkpoint {str(dest)!r} has no model card")
    return dest


def add_policy_fit(ckpt: str | Path) -> Path:
    """Rewrite the checkpoint ``ckpt`` in place with the policy fit set of
    :func:`router_ml.training.default_policy_fit` (needs the project's labelled prompts)."""
    from router_ml.router import LearnedRouter
    from router_ml.training import default_policy_fit

    router = LearnedRouter.from_pretrained(ckpt)
    router.policy_fit = default_policy_fit(router)
    router.save_pretrained(ckpt, metrics=router.metadata.get("metrics"))
    return Path(ckpt)
