"""Benchmark: adding a model from K probes against a full retrain (issue 14), leave-one-model-out.

    python -m experiments.bench_add_model                                  # mmlu_pro (4,000 prompts) + zeroeval
    python -m experiments.bench_add_model --data mmlu_pro --max-prompts 4000 --ks 25 50 100 200
    python -m experiments.bench_add_model --data zeroeval mmlu_pro --max-prompts 0 4000 --ks 100 \
        --pool-sizes 4 --n-random 1 --methods logit+bank ridge+bank --seed 1  # another split
    python -m experiments.bench_add_model --replot outputs/bench_add_model/bench_add_model.json \
        --plot data/results/add_model.png                                   # redraw the figure

Per data set, prompts are split once (seeded, by prompt, stratified by task): 20% test; of the
rest, 80% train the router ("router part") and 20% are the probe pool (also training prompts,
never tested on). For each held-out model h:

- without: a kNN quality head (k=100, distance weights: the cheap head of the sweep) fitted on
  the router part with every model but h; routed quality = mean test score of the argmax model;
- full retrain: the same head fitted on the router part with all of h's labels too;
- probes: the "without" head plus h added from K probe prompts of the pool (its scores there),
  the probes drawn at random (3 draws, averaged) or chosen as informative
  (:func:`router_ml.predictors.probe_set.select_probes`: disagreement of the existing models'
  predictions, k-center coverage, stratified by the data's task type);
- methods: ``logit+bank`` (what :class:`router_ml.predictors.probed.ProbedQualityPredictor` and
  ``router-ml add-model`` fit: a logistic regression on the existing columns' predicted log-odds,
  coefficients shrunk to their mean, plus the probes' residuals smoothed over the 50 nearest
  probes, shrunk towards 0 by ``BANK_TAU``), ``ridge+bank`` (what they fitted before the logit
  fit: a ridge on the predictions shrunk to their mean, plus the same correction), ``logit`` /
  ``ridge`` (without the residual correction),
  ``shift`` (infinite shrinkage: the pool mean plus a fitted offset) and ``bank`` (kNN over the
  probes alone: k = min(10, K), distance weights); opt-in (``--methods``):
  ``ridge+family`` (the ridge plus the probes' mean residual per family, shrunk to 0; the families a
  3-means of the router part's embeddings), ``ridge+family+bank``, and ``logit+bank-tau10`` /
  ``ridge+bank-tau10`` (the correction shrunk by tau = 10, as add-model did before tau = 100).
- pools: ``--pool-sizes 4`` = 10 random pools of 4 other models per held-out model (a user's own
  pool); ``0`` = every other model (there the argmax gains only from the single best model, so
  the share is a ratio of near-zero numbers).

Share of the gain = (probes - without) / (full - without), pooled over (held-out model, pool)
pairs as the ratio of the summed gains, with a 95% bootstrap CI over held-out models; per-model
rows in the JSON.
Writes ``<out>/bench_add_model.json`` and ``.md``; prints the tables. Embeddings come from the
on-disk cache (computed once).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

KS = (25, 50, 100, 200)
METHODS = ("logit+bank", "ridge+bank", "logit", "ridge", "shift", "bank")
#: opt-in variants (``--methods``): per-family intercepts of the ridge residuals, the families a
#: k-means (FAMILIES clusters) of the router part's embeddings; ``+bank`` adds the residual smoother
#: ``-tau10``: the residual correction with the shrinkage add-model used before (tau = 10 instead of
#: :data:`router_ml.predictors.probed.BANK_TAU`), to compare old and new in one run
EXTRA_METHODS = ("ridge+family", "ridge+family+bank", "logit+bank-tau10", "ridge+bank-tau10")
OLD_BANK_TAU = 10.0
FAMILIES, FAMILY_TAU = 3, 10.0
CONF = Path(__file__).resolve().parent.parent / "conf"


def load(data: str, max_prompts: int | None, seed: int):
    """The routing table, its split (router part, probe pool, test) and the cached embeddings."""
    from hydra import compose, initialize_config_dir

    from router_ml.data.loading import load_routing_data
    from router_ml.data.schema import to_wide
    from router_ml.data.splits import split_prompts
    from router_ml.embeddings import CachedEncoder, build_encoder
    from router_ml.training import _as_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = _as_dict(compose(config_name="train", overrides=[f"data={data}"]))
    cfg["data"]["max_prompts"] = max_prompts
    table = load_routing_data(cfg["data"], seed=seed)
    models = sorted(table["model"].unique())
    parts = split_prompts(table, test_size=0.2, val_size=0.16, seed=seed)  # val = the probe pool
    enc = CachedEncoder(build_encoder(cfg["encoder"]), cache_dir=cfg.get("cache_dir"))
    out = {}
    for name, key in (("train", "router"), ("val", "pool"), ("test", "test")):
        prompts, Y, _ = to_wide(parts[name], models)
        X = enc.encode(list(prompts["prompt"]), show_progress=True).astype(np.float32)
        out[key] = (X, Y, prompts["task"].to_numpy())
    return models, out


def routed(pred: np.ndarray, Y: np.ndarray) -> float:
    from router_ml.metrics import routed_scores

    return float(np.nanmean(routed_scores(pred, Y)))


def add_column(method: str, P_probe, y_probe, X_probe, X_test, P_test, centroids=None) -> np.ndarray:
    """The new model's predicted quality on the test prompts ``(n_test,)``, from its probe scores
    ``y_probe (K,)``; ``P_probe (K, m)`` / ``P_test (n, m)`` the existing columns' predictions.
    ``logit+bank`` is what ``ProbedQualityPredictor.add_model`` fits (its functions, on the kNN
    columns of this pool; ``ridge+bank`` what it fitted before). ``centroids (c, d)`` unit-norm
    family centres (``ridge+family``)."""
    from router_ml.predictors import KnnQualityPredictor, ProbedQualityPredictor
    from router_ml.predictors.probed import (
        ALPHAS,
        bank_correction,
        fit_probe_column,
        fit_probe_logit,
        logit,
        sigmoid,
    )

    def unit(X: np.ndarray) -> np.ndarray:
        return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)

    d = ProbedQualityPredictor()
    tau = d.bank_tau
    if method.endswith("-tau10"):
        method, tau = method.removesuffix("-tau10"), OLD_BANK_TAU
    if method == "bank":
        bank = KnnQualityPredictor(k=min(10, len(y_probe)), weights="distance")
        return bank.fit(X_probe, y_probe[:, None]).predict(X_test)[:, 0]
    if method.startswith("logit"):
        coef = fit_probe_logit(P_probe, y_probe)
        q = sigmoid(logit(P_test) @ coef[:-1] + coef[-1])
        resid = y_probe - sigmoid(logit(P_probe) @ coef[:-1] + coef[-1])
    else:
        coef, _, _ = fit_probe_column(P_probe, y_probe, (1e12,) if method == "shift" else ALPHAS)
        q = P_test @ coef[:-1] + coef[-1]
        resid = y_probe - np.clip(P_probe @ coef[:-1] + coef[-1], 0.0, 1.0)
    if method.startswith("ridge+family"):  # per-family mean residual, shrunk to 0 by FAMILY_TAU
        fam_p, fam_t = (np.argmax(unit(A) @ centroids.T, axis=1) for A in (X_probe, X_test))
        off = np.array(
            [resid[fam_p == f].sum() / ((fam_p == f).sum() + FAMILY_TAU) for f in range(len(centroids))]
        )
        q, resid = q + off[fam_t], resid - off[fam_p]
    if method.endswith("+bank"):
        q = q + bank_correction(unit(X_test), unit(X_probe), resid, d.bank_k, tau)
    return np.clip(q, 0.0, 1.0)


def one_model(
    h: int,
    split: dict,
    pred: dict,
    ks,
    pool_size: int,
    n_pools: int,
    n_random: int,
    seed: int,
    methods=METHODS,
    centroids=None,
) -> dict:
    """Held-out model ``h``: per pool of ``pool_size`` other models (``n_pools`` random ones, or
    every other model when ``pool_size`` is 0), the without / full / probes routed qualities."""
    from router_ml.predictors.probe_set import select_probes

    (Xp, Yp, tp), (Xt, Yt, _) = split["pool"], split["test"]
    m = Yt.shape[1]
    others = np.array([j for j in range(m) if j != h])
    rng = np.random.default_rng(seed + h)
    pools = (
        [others] if not pool_size else [rng.choice(others, pool_size, replace=False) for _ in range(n_pools)]
    )
    seen = np.where(~np.isnan(Yp[:, h]))[0]  # pool prompts h was run on
    out = []
    for keep in pools:
        both = np.append(keep, h)
        # kNN columns are independent of one another: the head fitted on these columns predicts
        # exactly the matching columns of the head fitted on all of them
        P_test, P_pool = pred["test"][:, keep], pred["pool"][seen][:, keep]
        res = {
            "pool": keep.tolist(),
            "without": routed(P_test, Yt[:, keep]),
            "full": routed(pred["test"][:, both], Yt[:, both]),
            "probes": {},
        }
        Xs, ys = Xp[seen], Yp[seen, h]
        for k in ks:
            kk = min(k, len(seen))
            draws = {
                "informative": [select_probes(Xs, P_pool, tp[seen], kk)],
                "random": [rng.choice(len(seen), kk, replace=False) for _ in range(n_random)],
            }
            for how, sets in draws.items():
                for method in methods:
                    qs = []
                    for idx in sets:
                        new = add_column(method, P_pool[idx], ys[idx], Xs[idx], Xt, P_test, centroids)
                        qs.append(routed(np.column_stack([P_test, new]), Yt[:, both]))
                    res["probes"][f"{k}/{how}/{method}"] = float(np.mean(qs))
        out.append(res)
    return {"name_index": h, "pools": out}


def summarise(rows: dict[str, dict], n_boot: int, seed: int) -> dict:
    """Pooled share of the full-retrain gain per ``K/probes/method``, CI by resampling held-out models."""
    names = list(rows)
    full = np.array([sum(p["full"] - p["without"] for p in rows[n]["pools"]) for n in names])
    n_pairs = sum(len(rows[n]["pools"]) for n in names)
    rng = np.random.default_rng(seed)
    boots = rng.integers(0, len(names), size=(n_boot, len(names)))
    out = {
        "n_models": len(names),
        "n_pairs": n_pairs,
        "mean_full_gain_pts": 100 * float(full.sum() / n_pairs),
    }
    out["shares"] = {}
    for key in rows[names[0]]["pools"][0]["probes"]:
        gain = np.array([sum(p["probes"][key] - p["without"] for p in rows[n]["pools"]) for n in names])
        bs = gain[boots].sum(axis=1) / full[boots].sum(axis=1)
        lo, hi = np.percentile(bs, [2.5, 97.5])
        out["shares"][key] = {
            "share": float(gain.sum() / full.sum()),
            "ci": [float(lo), float(hi)],
            "mean_gain_pts": 100 * float(gain.sum() / n_pairs),
        }
    return out


def table_md(title: str, summary: dict, ks, methods=METHODS) -> str:
    lines = [
        f"### {title}: {summary['n_models']} held-out models, {summary['n_pairs']} (model, pool) pairs, "
        f"mean full-retrain gain {summary['mean_full_gain_pts']:.2f} pts",
        "",
        "| K | probes | " + " | ".join(f"{m}: share of full gain [95% CI]" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for k in ks:
        for how in ("informative", "random"):
            cells = []
            for m in methods:
                s = summary["shares"][f"{k}/{how}/{m}"]
                cells.append(f"{100 * s['share']:.0f}% [{100 * s['ci'][0]:.0f}, {100 * s['ci'][1]:.0f}]")
            lines.append(f"| {k} | {how} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Share of the full-retrain gain against K (pools of 4), one panel per data set."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = [d for d in report if any(k.startswith("pool_") and k != "pool_0" for k in report[d])]
    if not datas:  # only whole-pool runs: their shares are ratios of near-zero gains, not plotted
        return
    fig, axes = plt.subplots(1, len(datas), figsize=(5 * len(datas), 3.6), squeeze=False)
    for ax, data in zip(axes[0], datas, strict=True):
        key = next(k for k in report[data] if k.startswith("pool_") and k != "pool_0")
        shares = report[data][key]["summary"]["shares"]
        ks = sorted({int(k.split("/")[0]) for k in shares})
        for (how, method), style in {
            ("informative", "logit+bank"): "o-",
            ("random", "logit+bank"): "s--",
            ("informative", "ridge+bank"): "^:",
            ("informative", "logit+bank-tau10"): "v-.",
            ("informative", "ridge+bank-tau10"): "^:",
        }.items():
            if f"{ks[0]}/{how}/{method}" not in shares:
                continue
            s = [shares[f"{k}/{how}/{method}"] for k in ks]
            y = np.array([100 * v["share"] for v in s])
            err = np.array([[y[i] - 100 * v["ci"][0], 100 * v["ci"][1] - y[i]] for i, v in enumerate(s)]).T
            ax.errorbar(ks, y, yerr=err, fmt=style, capsize=3, label=f"{method}, {how}")
        ax.axhline(90, color="grey", lw=0.8)
        ax.set(xscale="log", xticks=ks, xticklabels=[str(k) for k in ks], ylim=(0, 110), xlabel="probes K")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set(ylabel="% of the full-retrain gain", title=f"{data}: {key[5:]} models + the new one")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from router_ml.predictors import KnnQualityPredictor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["mmlu_pro", "zeroeval"])
    ap.add_argument("--max-prompts", type=int, nargs="+", default=[4000, 0], help="per data set; 0 = all")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS))
    ap.add_argument("--n-random", type=int, default=3, help="random probe draws per K (averaged)")
    ap.add_argument(
        "--max-models", type=int, default=0, help="held-out models, spread over quality (0 = all)"
    )
    ap.add_argument(
        "--pool-sizes", type=int, nargs="+", default=[4, 0], help="existing models per pool; 0 = all"
    )
    ap.add_argument("--n-pools", type=int, default=10, help="random pools per held-out model")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=[*METHODS, *EXTRA_METHODS],
        help="how the new column is fitted (the first is what add-model does)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench_add_model")
    ap.add_argument("--plot", default=None, help="also write the figure here (.png)")
    ap.add_argument("--replot", default=None, help="only draw --plot from this bench_add_model.json")
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.plot or "bench_add_model.png"))
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, md = {}, []
    for data, cap in zip(args.data, args.max_prompts, strict=True):
        models, split = load(data, cap or None, args.seed)
        head = KnnQualityPredictor(k=100, weights="distance").fit(*split["router"][:2])
        pred = {"pool": head.predict(split["pool"][0]), "test": head.predict(split["test"][0])}
        centroids = None
        if any(m.startswith("ridge+family") for m in args.methods):
            from sklearn.cluster import KMeans

            Xr = split["router"][0] / np.linalg.norm(split["router"][0], axis=1, keepdims=True)
            c = KMeans(FAMILIES, n_init=3, random_state=args.seed).fit(Xr).cluster_centers_
            centroids = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        order = np.argsort(np.nanmean(split["router"][1], axis=0))
        held = order
        if args.max_models:
            held = order[np.linspace(0, len(order) - 1, args.max_models).round().astype(int)]
        sizes = {k: int(v[0].shape[0]) for k, v in split.items()}
        report[data] = {"max_prompts": cap or None, "sizes": sizes, "held_out": [models[h] for h in held]}
        for pool_size in args.pool_sizes:
            rows = {}
            for h in tqdm(held.tolist(), desc=f"{data}, pools of {pool_size or 'all'}: held-out models"):
                rows[models[h]] = one_model(
                    h, split, pred, args.ks, pool_size, args.n_pools, args.n_random, args.seed,
                    args.methods, centroids,
                )  # fmt: skip
            summary = summarise(rows, args.n_boot, args.seed)
            title = (
                f"{data}, pool = {pool_size} random other models + the new one"
                if pool_size
                else f"{data}, pool = every other model + the new one"
            )
            report[data][f"pool_{pool_size}"] = {"summary": summary, "per_model": rows}
            md.append(table_md(title, summary, args.ks, args.methods) + f"\n\nprompts: {sizes}\n")
            (out_dir / "bench_add_model.json").write_text(json.dumps(report, indent=2) + "\n")
            (out_dir / "bench_add_model.md").write_text("\n".join(md))
            print(md[-1], flush=True)
    plot(report, Path(args.plot) if args.plot else out_dir / "bench_add_model.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
