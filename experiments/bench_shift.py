"""Benchmark: routing quality under shift (issue 11), the figures of the README's shift table.

    python -m experiments.bench_shift                      # every job below (~17 min on 2 shared cores)
    python -m experiments.bench_shift --jobs llmrouter:leave_one_family_out llmrouter:format
    python -m experiments.bench_shift --max-prompts 600 --n-boot 200   # a quick look

A job is ``data:mode`` or ``data:mode:max_prompts`` (a seeded, task-stratified subsample of that
data set; the format job renders every prompt five more ways, so it runs on 2,000 prompts, and
MMLU-Pro LOFO on 4,000; `mmlu_pro:leave_one_family_out` runs all 12,008).

Each job is ``data:mode`` with mode one of conf/shift/ (leave_one_family_out, in_distribution,
format) and runs ``experiments.evaluate``'s own config (conf/evaluate.yaml composed with
``data=<data> shift=<mode>``) through :func:`router_ml.evaluation.shift.evaluate_shift`: heads
(evaluate's taskmix, the main job's MLP, kNN as the baseline) fitted on the training folds only,
the best single model chosen there, routed quality (argmax of predicted quality) against it with a
paired bootstrap 95% CI over held-out prompts, the worst family, and the utility policy's AIQ
against the Zero router's. ``<head>+guard`` rows: the head with its NoveltyGuard (shift.guard),
with the guard's novelty AUROC, interval coverage and fitted shrinkage printed after the table.
The ``prior`` row (:data:`router_ml.evaluation.shift.PRIOR`) routes no head: the training part's
per-model means, so at each willingness to pay the single model the training families favour; its
AIQ against the Zero router's (whose hull knows the held-out prompts' single-model results) says
how much of a router's AIQ gap is that hindsight.
Embeddings come from the on-disk cache (the first run fills it).

Writes ``<out>/<data>_<mode>/`` (shift.json, shift.md, shift_prompts.parquet per job) and
``<out>/bench_shift.json`` / ``bench_shift.md`` (the headline rows); prints the headline table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

JOBS = [
    "llmrouter:in_distribution",
    "llmrouter:leave_one_family_out",
    "llmrouter:format:2000",
    "routerdc:leave_one_family_out",
    "mmlu_pro:leave_one_family_out:4000",
    "zeroeval:leave_one_family_out",
]
CONF = Path(__file__).resolve().parent.parent / "conf"


def job_config(data: str, mode: str, extra: list[str]) -> dict:
    """experiments.evaluate's config for one job, as a plain dict."""
    from hydra import compose, initialize_config_dir

    from router_ml.training import _as_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return _as_dict(compose(config_name="evaluate", overrides=[f"data={data}", f"shift={mode}", *extra]))


def headline(job: str, summary: dict) -> list[dict]:
    """One row per rendering and head: pooled Δ vs best single with its CI, worst family, AIQ."""
    rows = []
    for rendering, g in summary["renderings"].items():
        p = g["pooled"]
        for head, r in p["heads"].items():
            a, w = p["utility_aiq"][head], g["worst_family"][head]
            rows.append(
                {
                    "job": job,
                    "rendering": rendering,
                    "head": head,
                    "n": p["n"],
                    "best_single": p["best_single"],
                    "best_single_models": sorted(set(p["best_single_models"].values())),
                    "oracle": p["oracle"],
                    "quality": r["quality"],
                    "delta_pts": 100 * r["delta"],
                    "ci_pts": [100 * r["ci_lo"], 100 * r["ci_hi"]],
                    "gap_closed": r["gap_closed"],
                    "worst_family": w["family"],
                    "worst_family_pts": 100 * w["delta"],
                    "utility_aiq": a["aiq"],
                    "zero_aiq": a["zero_aiq"],
                    "aiq_delta_ci": [a["ci_lo"], a["ci_hi"]],
                    "targets_met": g["targets_met"][head],
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| job | rendering | head | n | best single q | routed q | Δ pts [95% CI] | gap closed | "
        "worst family (Δ pts) | utility AIQ | Zero AIQ | AIQ − Zero [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r = {k: float("nan") if v is None else v for k, v in r.items()}  # NaN is null in JSON
        lo, hi = (float("nan") if v is None else v for v in r["ci_pts"])
        alo, ahi = (float("nan") if v is None else v for v in r["aiq_delta_ci"])
        out.append(
            f"| {r['job']} | {r['rendering']} | {r['head']} | {r['n']} | {r['best_single']:.4f} | "
            f"{r['quality']:.4f} | {r['delta_pts']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {r['gap_closed']:.1%} | "
            f"{r['worst_family']} ({r['worst_family_pts']:+.2f}) | {r['utility_aiq']:.4f} | "
            f"{r['zero_aiq']:.4f} | {r['utility_aiq'] - r['zero_aiq']:+.4f} [{alo:+.4f}, {ahi:+.4f}] |"
        )
    return "\n".join(out) + "\n"


def guard_lines(job: str, summary: dict) -> str:
    """The novelty guard's figures of a job: novelty AUROC (held-out prompts against the folds'
    in-distribution validation prompts), per-model interval coverage against nominal, and the
    shrinkage (w_id, w_novel, novelty floor) fitted per fold."""
    out = []
    for head, g in (summary.get("guard") or {}).items():
        cov = g["coverage"]
        fits = g["fits"].values()
        w0 = [f["shrink"][0] for f in fits]
        w1 = [f["shrink"][1] for f in fits]
        floor = [(f["shrink"] + [0.0])[2] for f in fits]
        mg = [f.get("margin", [0.0, 0.0, 0.0]) for f in fits]
        margins = "; ".join(f"{a:.2f}+{b:.1f}*(nu-{t:.2f})+" for a, b, t in mg)
        chosen = [f.get("fitted_mode", "?") for f in fits]
        chosen_s = ", ".join(f"{m} {chosen.count(m)}" for m in sorted(set(chosen)))
        out.append(
            f"{job} {head}: novelty AUROC {g['novelty_auroc']:.3f} (mean novelty held-out "
            f"{g['novelty_test_mean']:.2f} vs in-distribution {g['novelty_id_mean']:.2f}); interval "
            f"coverage (nominal {g['coverage_nominal']:.2f}) per model {min(cov.values()):.3f}..{max(cov.values()):.3f}, "
            f"worst gap {g['coverage_worst_gap_pts']:.1f} pts, mean gap {g.get('coverage_mean_gap_pts', float('nan')):.1f} pts; shrink w_id {min(w0):.2f}..{max(w0):.2f}, "
            f"w_novel {min(w1):.2f}..{max(w1):.2f}, novelty floor {min(floor):.2f}..{max(floor):.2f} over {len(w0)} folds; margin a+b*(nu-t)+ per fold: {margins}; fitted mode per fold: {chosen_s}"
        )
        if "trust_auroc_head_worse" in g:  # mode "trust": the deferral model
            taus = [f.get("trust_tau", float("nan")) for f in fits]
            cva = [f.get("cv_trust_auroc", float("nan")) for f in fits]
            out.append(
                f"{job} {head}: deferral model AUROC at telling where the head's pick is worse than the "
                f"best single model {g['trust_auroc_head_worse']:.3f} (nested CV on the training families "
                f"{min(cva):.3f}..{max(cva):.3f}); the head left the best single model on "
                f"{g['trust_moved_share']:.1%} of held-out prompts, worse there on {g['trust_head_worse_share']:.1%}, "
                f"kept {g['trust_kept_share']:.1%} of those picks; tau per fold {min(taus):+.2f}..{max(taus):+.2f}"
            )
    return "\n".join(out) + ("\n" if out else "")


def main() -> None:
    from router_ml.evaluation.shift import evaluate_shift

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="+", default=JOBS, help="data:mode[:max_prompts] (default: %(default)s)")
    ap.add_argument("--out", default=None, help="output folder (default outputs/bench_shift/<date>_<time>)")
    ap.add_argument("--max-prompts", type=int, default=None, help="subsample every data set (seeded)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="read jobs whose shift.json is already in --out instead of rerunning",
    )
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for every job (key=value)")
    args = ap.parse_args()
    # overrides written right after --jobs land in it (nargs="+"): a job never holds "="
    moved = [j for j in args.jobs if "=" in j or j.startswith(("~", "+"))]
    args.jobs = [j for j in args.jobs if j not in moved]
    args.overrides = [*moved, *args.overrides]
    out = Path(args.out or time.strftime("outputs/bench_shift/%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, times, guards = [], {}, []
    for job in args.jobs:
        data, mode, *cap = job.split(":")
        extra = [f"shift.n_boot={args.n_boot}", f"seeds=[{args.seed}]", *args.overrides]
        max_prompts = int(cap[0]) if cap else args.max_prompts
        if max_prompts:
            extra.append(f"data.max_prompts={max_prompts}")
        done = out / f"{data}_{mode}" / "shift.json"
        if args.resume and done.is_file():
            summary = json.loads(done.read_text())
        else:
            summary = evaluate_shift(job_config(data, mode, extra), done.parent)
        times[job] = summary["time"]["total_s"]
        rows.extend(headline(job, summary))
        print(f"\n== {job}: {summary['n_prompts']} prompts, {len(summary['models'])} models, "
              f"{len(summary['folds'])} folds, {times[job]:.0f} s")  # fmt: skip
        print(table([r for r in rows if r["job"] == job]), flush=True)
        guards.append(guard_lines(job, summary))
        print(guards[-1], flush=True)
    total = sum(times.values()) if args.resume else time.perf_counter() - t0
    (out / "bench_shift.json").write_text(
        json.dumps({"rows": rows, "time_s": times, "total_s": total}, indent=2)
    )
    (out / "bench_shift.md").write_text(
        f"# bench_shift ({total:.0f} s; points = 100 x mean score)\n\n" + table(rows) + "\n" + "".join(guards)
    )
    print(f"\nall jobs: {total:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
