"""PNG plots of an evaluation run (read from its ``frontier.parquet``, ``per_task.parquet`` and
``metrics.json``), so a notebook or a person can look instead of read.

- ``frontier_<split>.png``: quality vs $ per 1k requests: every single model, random, the oracle, the
  Zero-router hull (the single models' NDCH) and the main routers' NDCH with their sweep points;
  ``frontier_all_<split>.png`` the same with every router of the run.
- ``per_task_<split>.png``: quality per true task type, best single vs oracle vs the utility policy.
- ``reliability_<split>.png``: calibration of the learned quality head (reliability diagram).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from router_ml.decision.hull import ndch
from router_ml.evaluation.frontier import zero_router

# the routers of the main frontier plot (frontier_all_<split>.png has every router)
MAIN_ROUTERS = ("utility", "utility[knn]", "cost_aware", "capability", "threshold", "random", "oracle")
BASELINE_STYLE = {"oracle": dict(marker="*", s=160, color="gold", edgecolor="k", zorder=5)}


def plot_frontier(
    fdf: pd.DataFrame, metrics: dict, split: str, out: Path, routers: list[str] | None = None
) -> Path:
    """One seed's quality-vs-cost frontier (the first seed: every seed has its own test prompts)."""
    seed = fdf["seed"].min()
    d = fdf[(fdf["split"] == split) & (fdf["seed"] == seed)]
    fig, ax = plt.subplots(figsize=(11, 6))
    singles = d[d["policy"] == "single"]
    n = max(1, int(metrics.get("n_prompts", {}).get("mean", 1000))) if isinstance(metrics, dict) else 1000
    scale = 1000.0 / n
    ax.scatter(
        singles["cost"] * scale, singles["quality"], color="k", marker="o", zorder=4, label="single models"
    )
    for _, r in singles.iterrows():
        ax.annotate(
            r["router"].removeprefix("single:"), (r["cost"] * scale, r["quality"]), fontsize=7, alpha=0.8
        )
    zc, zq = zero_router(singles["cost"].to_numpy(), singles["quality"].to_numpy())
    ax.plot(zc * scale, zq, "k--", lw=1.2, label="Zero router (single-model hull)")
    names = routers or [r for r in d["router"].unique() if not r.startswith("single:")]
    for r in names:
        g = d[d["router"] == r]
        if not len(g):
            continue
        if r == "oracle":
            ax.scatter(g["cost"] * scale, g["quality"], label="oracle", **BASELINE_STYLE["oracle"])
            continue
        if len(g) == 1:
            ax.scatter(g["cost"] * scale, g["quality"], marker="D", s=50, label=r, zorder=4)
            continue
        hc, hq = ndch(g["cost"].to_numpy(), g["quality"].to_numpy())
        (line,) = ax.plot(hc * scale, hq, lw=1.8, label=r)
        ax.scatter(g["cost"] * scale, g["quality"], s=8, color=line.get_color(), alpha=0.5)
    ax.set_xlabel("$ per 1k requests (log scale)")
    ax.set_xscale("log")
    ax.set_ylabel("mean quality (observed score of the chosen model)")
    ax.set_title(f"Quality vs cost, {split} prompts (seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / (f"frontier_{split}.png" if routers else f"frontier_all_{split}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_task(per_task: pd.DataFrame, split: str, out: Path) -> Path:
    d = per_task[per_task["split"] == split].groupby(["task", "router"], as_index=False)["quality"].mean()
    wide = d.pivot(index="task", columns="router", values="quality")
    fig, ax = plt.subplots(figsize=(9, 5))
    wide.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel("mean quality (mean over seeds)")
    ax.set_xlabel("true task type")
    ax.set_title(f"Quality per task type, {split} prompts")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"per_task_{split}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(rel: dict, split: str, out: Path) -> Path:
    conf, acc, count = (np.asarray(rel[k], dtype="float64") for k in ("confidence", "accuracy", "count"))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    ok = count > 0
    ax.plot(conf[ok], acc[ok], "o-", label="learned quality head")
    ax.set_xlabel("predicted quality (bin mean)")
    ax.set_ylabel("observed score (bin mean)")
    ax.set_title(f"Reliability, {split} prompts (seed 1st)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"reliability_{split}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Every plot of an evaluation run directory; returns the written paths."""
    run_dir = Path(run_dir)
    fdf = pd.read_parquet(run_dir / "frontier.parquet")
    per_task = pd.read_parquet(run_dir / "per_task.parquet")
    summary = json.loads((run_dir / "metrics.json").read_text())
    paths = []
    for split in sorted(fdf["split"].unique()):
        metrics = summary["splits"].get(split, {})
        present = set(fdf["router"])
        paths.append(plot_frontier(fdf, metrics, split, run_dir, [r for r in MAIN_ROUTERS if r in present]))
        paths.append(plot_frontier(fdf, metrics, split, run_dir))
        if len(per_task) and split in set(per_task["split"]):
            paths.append(plot_per_task(per_task, split, run_dir))
        if split in summary.get("reliability", {}):
            paths.append(plot_reliability(summary["reliability"][split], split, run_dir))
    return paths
