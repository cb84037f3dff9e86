"""Benchmark of the learned router core on real data (prints the figures of the core issue).

    python -m experiments.bench_core                      # llmrouter_ulab, split seed 0
    python -m experiments.bench_core --seeds 0 1 2 --cold # several splits; re-measure cold embedding
    python -m experiments.bench_core --speed-only         # decision latency + batched throughput only
    python -m experiments.bench_core --speed-only --guard # the same with the novelty guard (issue 11)
    python -m experiments.bench_core --outer-folds 5      # nested CV: every prompt tested once

For each quality head (knn, linear, mlp, mf), hyper-parameters are tuned by k-fold CV INSIDE the
training part; the head is then fitted on the training part and scored on held-out prompts it
never saw: mean score of routing each prompt to its highest-predicted model, next to the best
single model (chosen on the training part), random and the oracle. The best head is compared with
the tuned kNN by a paired bootstrap over test prompts. Also: task-type macro-F1 on held-out
labelled prompts, embedding/training times, decision latency and batched throughput. Per head,
the calibrators as the main job fits them (isotonic and temperature on out-of-fold predictions
over the training part plus the validation part's): the quality the router then serves (the
argmax after the calibrator) and ECE, next to the head's own (no calibrator).

With ``--outer-folds K`` (nested cross-validation, quality figures only) every llmrouter_ulab
prompt is tested exactly once: the prompts are cut into K outer folds of prompt groups (identical
normalised text stays in one fold; stratified by task; ``--seeds`` gives the fold seed). For each
outer fold, the K-1 other folds are its ONLY training data: the best single model is chosen
there, each head is tuned there by ``--folds``-fold inner CV, fitted there, and routes the
held-out fold, whose prompts, scores and benchmark labels none of it has seen. The per-prompt
routed scores of the K folds are concatenated (one score per prompt) and compared over all
prompts: each head against the best single model (as chosen per outer fold), against the tuned
kNN (paired bootstrap over prompts), and the share of the best-single-to-oracle gap it closes.
Routing by the TRUE benchmark label (per-benchmark means of the outer-training part) is printed
as a reference ceiling; it is not a router.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from router_ml.data.adapters import load_source
from router_ml.data.schema import to_wide
from router_ml.data.taxonomy import TASK_TYPES, task_ids_of
from router_ml.embeddings import CachedEncoder, build_encoder
from router_ml.metrics import (
    best_single_model,
    gap_closed,
    oracle_scores,
    paired_bootstrap,
    random_scores,
    routed_scores,
)
from router_ml.predictors import TaskClassifier, build_calibrator, build_quality_predictor
from router_ml.predictors.calibration import expected_calibration_error
from router_ml.predictors.guard import MODES
from router_ml.predictors.tuning import fit_head, nested_cv_scores, predict_head, tune_quality_head
from router_ml.training import fit_calibrator, out_of_fold, split_data, task_training_data

GRIDS = {
    "knn": {"k": [10, 20, 50, 100, 200], "weights": ["uniform", "distance"]},
    "linear": {"alpha": [1.0, 10.0, 30.0, 100.0]},
    "mlp": {"hidden": [[256], [512]]},
    "mf": {"dim": [8, 16, 32]},
    # prior_count 1 vs 5 routed identically on a held-out fold (hundreds of rows per benchmark);
    # text features raise the benchmark classifier's accuracy, not routed quality, at 3-4x fit time
    "taskmix": {"text_features": [0, 32768]},
}
# which labels a head learns from (as in conf/predictor/*.yaml)
TASK_KEY = {"taskmix": "source_task", "ensemble": "source_task"}
#: the calibrators compared per head, fitted as the main job fits them (conf/calibrator/*.yaml folds)
CALIBRATORS = ("isotonic", "temperature")
CAL_FOLDS = 5
TASK_HEAD = {
    "C": 10.0,
    "class_weight": "balanced",
    "text_features": 32768,
    "text_scale": 2.0,
    "view_words": 16,
    "cue_scale": 0.25,
    # MiniLM's pooled states after layers 3 and 4 beside the sentence embedding: best mean CV
    # macro-F1 (0.911 vs 0.884 without; layer 3 alone 0.907, layers 2-5 0.909) over the 3 splits
    "layers": [3, 4],
}
TASK_GRID = {
    "cue_scale": [0.15, 0.25, 0.35]
}  # tuned per split by CV on the project prompts of the train part
TASK_DATA = {"max_per_source_task": 10}  # chosen by that CV and llmrouter validation accuracy
SHORT = [
    "Is this email spam? 'You won a free cruise, click here'",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia?",
    "Fix the off-by-one error in my for loop.",
]


def pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q))


def source_label_scores(p_tr, Y_tr: np.ndarray, p_te, Y_te: np.ndarray) -> np.ndarray:
    """(n_test,) scores of routing each test prompt by its TRUE ``source_task`` label to the model
    with the best mean training score on that source (unseen sources: the overall best model).

    Not a router (it reads the benchmark label): the reference ceiling of any head whose signal is
    "which benchmark is this". On llmrouter_ulab, CV inside the training part finds no per-prompt
    signal beyond it (kNN or ridge residuals within the true source do not beat the source mean).
    """
    labels = sorted(set(p_tr["source_task"]))
    src = p_tr["source_task"].to_numpy()
    overall = np.nanmean(Y_tr, axis=0)
    means = {}
    for s in labels:
        with np.errstate(all="ignore"):
            mu = np.nanmean(Y_tr[src == s], axis=0) if np.any(src == s) else overall
        means[s] = np.where(np.isnan(mu), overall, mu)
    pred = np.stack([means.get(s, overall) for s in p_te["source_task"]])
    return routed_scores(pred, Y_te)


def run_seed(seed: int, table, emb, heads, folds) -> dict:
    splits = split_data(table, {"test_size": 0.2, "val_size": 0.1}, seed)
    models = sorted(table["model"].unique())
    (p_tr, Y_tr, _), (p_va, Y_va, _), (p_te, Y_te, _) = (
        to_wide(splits[s], models) for s in ("train", "val", "test")
    )
    X = {
        s: np.stack([emb[t] for t in p["prompt"]])
        for s, p in (("train", p_tr), ("val", p_va), ("test", p_te))
    }
    best = best_single_model(Y_tr)
    res = {
        "seed": seed,
        "n_train": len(p_tr),
        "n_test": len(p_te),
        "best_single_model": models[best],
        "best_single": float(np.nanmean(Y_te[:, best])),
        "random": float(random_scores(Y_te).mean()),
        "oracle": float(oracle_scores(Y_te).mean()),
        "heads": {},
    }
    by_source = source_label_scores(p_tr, Y_tr, p_te, Y_te)
    res["source_label"] = float(by_source.mean())
    res["source_label_gap_closed"] = gap_closed(res["source_label"], res["best_single"], res["oracle"])
    per_prompt = {}
    texts = {s: list(p["prompt"]) for s, p in (("train", p_tr), ("val", p_va), ("test", p_te))}
    for name in heads:
        tid = task_ids_of(p_tr[TASK_KEY.get(name, "task")])
        t0 = time.perf_counter()
        params, cv = tune_quality_head(
            name, {}, GRIDS[name], X["train"], Y_tr, tid, folds=folds, seed=seed, texts=texts["train"]
        )
        tune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        head = fit_head(name, params, X["train"], Y_tr, tid, texts["train"])
        fit_s = time.perf_counter() - t0
        raw = predict_head(head, X["test"], texts["test"])
        routed = routed_scores(raw, Y_te)
        per_prompt[name] = routed
        # the calibrators as the main job fits them (out-of-fold predictions over the training part
        # and the validation part's), and the quality the router then serves: its argmax after them
        oof = out_of_fold(name, params, p_tr, X["train"], Y_tr, tid, CAL_FOLDS, seed)
        held_out = (predict_head(head, X["val"], texts["val"]), Y_va)
        served = {}
        for c in CALIBRATORS:
            cal = fit_calibrator(c, CAL_FOLDS, name, params, p_tr, X["train"], Y_tr, tid, seed, held_out, oof)
            q = cal.transform(raw)
            served[c] = {
                "calibrator": cal,
                "quality": float(routed_scores(q, Y_te).mean()),
                "ece": expected_calibration_error(q, Y_te),
            }
        res["heads"][name] = {
            "params": params,
            "cv_quality": cv,
            "quality": float(routed.mean()),
            "gap_closed": gap_closed(float(routed.mean()), res["best_single"], res["oracle"]),
            "ece_raw": expected_calibration_error(raw, Y_te),
            "ece_isotonic": served["isotonic"]["ece"],
            "served": {c: {k: v for k, v in f.items() if k != "calibrator"} for c, f in served.items()},
            "tune_s": tune_s,
            "fit_s": fit_s,
            "head": head,
            "calibrator": served["isotonic"]["calibrator"],
        }
    top = max(res["heads"], key=lambda n: res["heads"][n]["cv_quality"])  # chosen on CV, not on test
    res["chosen"] = top
    if "knn" in per_prompt and top != "knn":
        res["chosen_vs_knn"] = paired_bootstrap(per_prompt[top], per_prompt["knn"], seed=seed)
    res["chosen_vs_best_single"] = paired_bootstrap(per_prompt[top], Y_te[:, best], seed=seed)
    if "knn" in per_prompt:
        res["source_label_vs_knn"] = paired_bootstrap(by_source, per_prompt["knn"], seed=seed)
    res["splits"] = splits
    return res


def nested_figures(table, emb, heads, outer: int, inner: int, seed: int) -> dict:
    """Nested CV over all prompts (see the module docstring): per-head figures, printed; returns
    them (per-prompt arrays left out)."""
    t0 = time.perf_counter()
    r = nested_cv_scores(
        table,
        emb,
        heads,
        GRIDS,
        TASK_KEY,
        outer_folds=outer,
        inner_folds=inner,
        seed=seed,
        references={"source_label": source_label_scores},
    )
    single, oracle = float(np.nanmean(r["best_single"])), float(r["oracle"].mean())
    ok = ~np.isnan(r["best_single"])  # prompts where the best single model has an outcome
    out = {
        "outer_folds": outer,
        "inner_folds": inner,
        "seed": seed,
        "n_prompts": len(r["prompt_id"]),
        "best_single_model_per_fold": r["best_single_model"],
        "best_single": single,
        "random": float(r["random"].mean()),
        "oracle": oracle,
        "rows": {},
        "wall_s": 0.0,
    }
    rows = {**{h: r["heads"][h] for h in heads}, "true label (ref.)": r["references"]["source_label"]}
    for name, sc in rows.items():
        q = float(sc.mean())
        row = {"quality": q, "vs_best_single": q - single, "gap_closed": gap_closed(q, single, oracle)}
        row["vs_best_single_ci"] = paired_bootstrap(sc[ok], r["best_single"][ok], seed=seed)
        if "knn" in r["heads"] and name != "knn":
            row["vs_knn_ci"] = paired_bootstrap(sc, r["heads"]["knn"], seed=seed)
        if name in r["params"]:
            row.update(params=r["params"][name], cv=r["cv"][name], tune_s=sum(r["tune_s"][name]))
            row["fit_s"] = r["fit_s"][name]
        out["rows"][name] = row
    out["wall_s"] = time.perf_counter() - t0
    print(
        f"\n== llmrouter_ulab nested CV: {out['n_prompts']} prompts, each tested once; {outer} outer folds "
        f"(seed {seed}), heads tuned by {inner}-fold CV inside each outer-training part"
    )
    print(
        f"best single (chosen per outer fold: {', '.join(sorted(set(r['best_single_model'])))}): {single:.4f}   "
        f"random: {out['random']:.4f}   oracle: {oracle:.4f}"
    )
    print(
        f"{'router':17s} {'quality':>8s} {'vs best':>8s} {'gap':>6s}  {'vs best single, 95% CI':24s}  vs tuned kNN, 95% CI"
    )
    ci = lambda t: "{:+.2f} [{:+.2f}, {:+.2f}]".format(*(100 * v for v in t))  # noqa: E731
    for name, row in out["rows"].items():
        knn = ci(row["vs_knn_ci"]) if "vs_knn_ci" in row else "-"
        print(
            f"{name:17s} {row['quality']:8.4f} {100 * row['vs_best_single']:+7.2f}p {row['gap_closed']:6.1%}  "
            f"{ci(row['vs_best_single_ci']):24s}  {knn}"
        )
    for name in heads:
        row = out["rows"][name]
        print(f"  {name}: tune {row['tune_s']:.0f} s; params per fold {row['params']}")
    print(f"nested CV wall time {out['wall_s']:.0f} s (figures in points = 100 x mean score)")
    return out


def latency(router, n: int = 200, batch: int = 1000, batch_reps: int = 3) -> dict:
    """Decision latency of ``router.route`` on one short prompt (p50/p99 over ``n`` calls, and the
    part after the embedding) and batched throughput of ``router.route_batch`` on ``batch`` short
    prompts (median of ``batch_reps`` runs after a warm-up run)."""
    for p in SHORT * 3:  # warm-up
        router.route(p)
    total, after = [], []
    for i in range(n):
        p = SHORT[i % len(SHORT)]
        t0 = time.perf_counter()
        X, X_task, X_quality = router._encode([p])  # the embedding (and the heads' layer states)
        t1 = time.perf_counter()
        router.task_head.predict_proba(X_task, texts=[p])
        q = router._quality_from_embeddings(X_quality, texts=[p])
        router._guarded(X, q, list(range(len(router.models))), [p])  # the novelty guard, when there is one
        t2 = time.perf_counter()
        router.route(p)
        t3 = time.perf_counter()
        total.append(t3 - t2)
        after.append(t2 - t1)
    prompts = [SHORT[i % len(SHORT)] + f" (#{i})" for i in range(batch)]
    router.route_batch(prompts[: max(1, batch // 4)])  # warm-up: worker threads, GEMM shapes
    rates = []
    for _ in range(batch_reps):
        t0 = time.perf_counter()
        router.route_batch(prompts)
        rates.append(len(prompts) / (time.perf_counter() - t0))
    ms = lambda a, q: pct(np.array(a) * 1e3, q)  # noqa: E731
    return {
        "route_p50_ms": ms(total, 50),
        "route_p99_ms": ms(total, 99),
        "after_embed_p50_ms": ms(after, 50),
        "after_embed_p99_ms": ms(after, 99),
        "batched_prompts_per_s": float(np.median(rates)),
        "batched_prompts_per_s_runs": rates,
    }


def task_figures(res: dict, cached, out: dict):
    """Tune (CV inside the training part), fit and score the task head on one split; returns it."""
    from sklearn.metrics import f1_score

    from router_ml.data.labelled import load_labelled
    from router_ml.predictors.task_tuning import tune_task_head

    task_train, task_test = task_training_data(res["splits"], TASK_DATA, res["seed"])
    layers = TASK_HEAD.get("layers") or []

    def features(texts) -> np.ndarray:  # the sentence embeddings and the layers' pooled states
        return cached.encode_layers(list(texts), layers) if layers else cached.encode(list(texts))

    X_tr, tr_texts = features(task_train["prompt"]), list(task_train["prompt"])
    project = task_train["prompt"].isin(set(load_labelled("project")["prompt"])).to_numpy()
    params, cv_f1, _ = tune_task_head(
        TASK_HEAD, TASK_GRID, X_tr, task_train["task"], tr_texts, eval_mask=project, seed=res["seed"]
    )
    t0 = time.perf_counter()
    task_head = TaskClassifier(labels=list(TASK_TYPES), **params).fit(
        X_tr, list(task_train["task"]), texts=tr_texts
    )
    out.setdefault("task_head_fit_s", time.perf_counter() - t0)
    pred = task_head.predict(features(task_test["prompt"]), texts=list(task_test["prompt"]))
    f1 = float(f1_score(task_test["task"], pred, average="macro"))
    out.setdefault("task_macro_f1_heldout_by_seed", []).append(f1)
    out["task_heldout_n"] = len(task_test)
    ood = []
    for name in ("wizardlm", "mt_bench", "fresh"):  # fresh: written blind after tuning; test only
        lab = load_labelled(name)
        p = task_head.predict(features(lab["prompt"]), texts=list(lab["prompt"]))
        ood.append(float(f1_score(lab["task"], p, average="macro")))
        out.setdefault(f"task_macro_f1_{name}_by_seed", []).append(ood[-1])
    print(
        f"\ntask head, split seed {res['seed']}: cue_scale={params['cue_scale']} (CV macro-F1 {cv_f1:.3f}); macro-F1 {f1:.3f} "
        f"on {len(task_test)} held-out labelled prompts; fresh blind set {ood[2]:.3f}; "
        f"WizardLM {ood[0]:.3f}, MT-Bench {ood[1]:.3f} (OOD)"
    )
    return task_head


def print_speed(out: dict, head: str) -> None:
    print(
        f"decision latency ({head}): p50 {out['route_p50_ms']:.2f} ms, p99 {out['route_p99_ms']:.2f} ms; "
        f"after the embedding p50 {out['after_embed_p50_ms']:.3f} ms, p99 {out['after_embed_p99_ms']:.3f} ms; "
        f"batched {out['batched_prompts_per_s']:.0f} prompts/s (median of "
        + ", ".join(f"{r:.0f}" for r in out["batched_prompts_per_s_runs"])
        + ")"
    )


def speed_only(
    head: str,
    guard: bool = False,
    guard_mode: str = "shrink",
    quality_layers: list[int] | None = None,
    guard_layers: list[int] | None = None,
) -> dict:
    """Speed figures only: a router with the ``head`` quality head at default parameters (no
    tuning; ``quality_layers``: the encoder layers it reads beside the embedding) and the bench's
    task head, fitted on llmrouter_ulab's training split (seed 0); with ``guard``, a
    :class:`~router_ml.predictors.guard.NoveltyGuard` in ``guard_mode`` after it (fitted by 3 + 3
    folds of the head; ``guard_layers``: the encoder layers its distances read)."""
    from router_ml.router import LearnedRouter

    table = load_source("llmrouter")
    splits = split_data(table, {"test_size": 0.2, "val_size": 0.1}, 0)
    models = sorted(table["model"].unique())
    (p_tr, Y_tr, _), (p_va, Y_va, _) = (to_wide(splits[s], models) for s in ("train", "val"))
    task_train, _ = task_training_data(splits, TASK_DATA, 0)
    encoder = build_encoder("minilm")
    cached = CachedEncoder(encoder)
    t0 = time.perf_counter()
    X_tr = cached.encode(list(p_tr["prompt"]))
    qp = {"layers": list(quality_layers)} if quality_layers else {}
    H_tr, H_va = (
        cached.encode_layers(list(p), quality_layers) if quality_layers else cached.encode(list(p))
        for p in (p_tr["prompt"], p_va["prompt"])
    )
    layers, task_texts = TASK_HEAD.get("layers"), list(task_train["prompt"])
    X_task = cached.encode_layers(task_texts, layers) if layers else cached.encode(task_texts)
    out: dict = {"embed_s": time.perf_counter() - t0}
    task_head = TaskClassifier(labels=list(TASK_TYPES), **TASK_HEAD)
    task_head.fit(X_task, list(task_train["task"]), texts=list(task_train["prompt"]))
    quality = build_quality_predictor(head, **qp).fit(
        H_tr, Y_tr, task_ids_of(p_tr[TASK_KEY.get(head, "task")])
    )
    cal = build_calibrator("isotonic").fit(quality.predict(H_va), Y_va)
    g = None
    if guard:
        from router_ml.predictors.guard import NoveltyGuard

        tid = task_ids_of(p_tr[TASK_KEY.get(head, "task")])

        def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
            return build_quality_predictor(head, **qp).fit(H_tr[tr], Y_tr[tr], tid[tr]).predict(H_tr[te])

        G_tr = cached.encode_layers(list(p_tr["prompt"]), guard_layers) if guard_layers else X_tr
        g = NoveltyGuard(folds=3, mode=guard_mode, layers=guard_layers or ()).fit(
            G_tr, Y_tr, p_tr["source_task"].to_numpy(), fit_predict, texts=list(p_tr["prompt"])
        )
    out.update(latency(LearnedRouter(encoder, task_head, quality, models, calibrator=cal, guard=g)))
    name = head + (f" (layers {quality_layers})" if quality_layers else "")
    gname = f" + guard ({guard_mode}{f', layers {guard_layers}' if guard_layers else ''})"
    print_speed(out, name + (gname if guard else ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--heads", nargs="+", default=["knn", "linear", "mlp", "mf", "taskmix"])
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument(
        "--cold", action="store_true", help="also time a cold (uncached) embedding of all prompts"
    )
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument(
        "--outer-folds",
        type=int,
        default=0,
        help="K >= 2: nested CV instead of held-out splits, every prompt tested once (quality "
        "figures only; --folds inner folds, --seeds fold seeds, --heads which heads)",
    )
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="only the decision latency and batched throughput, from a quickly fitted router "
        "(the first of --heads if given, else taskmix; ~1 min with the embedding cache filled)",
    )
    ap.add_argument("--guard", action="store_true", help="--speed-only with the novelty guard")
    ap.add_argument(
        "--quality-layers",
        type=int,
        nargs="*",
        default=None,
        help="--speed-only: encoder layers the head reads",
    )
    ap.add_argument(
        "--guard-layers", type=int, nargs="*", default=None, help="--guard: encoder layers its distances read"
    )
    ap.add_argument(
        "--guard-mode",
        default="shrink",
        choices=list(MODES),
        help="the guard's mode (the main job's default: auto)",
    )
    args = ap.parse_args()
    if args.speed_only:
        head = args.heads[0] if args.heads != ap.get_default("heads") else "taskmix"
        out = speed_only(
            head,
            guard=args.guard,
            guard_mode=args.guard_mode,
            quality_layers=args.quality_layers,
            guard_layers=args.guard_layers,
        )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)
        return

    from router_ml.router import LearnedRouter

    table = load_source("llmrouter")
    encoder = build_encoder("minilm")
    texts = sorted(set(table["prompt"]))
    out: dict = {"n_prompts": len(texts)}
    if args.cold:
        t0 = time.perf_counter()
        encoder.encode(texts, show_progress=True)
        out["embed_cold_s"] = time.perf_counter() - t0
    cached = CachedEncoder(encoder)
    cached.encode(texts)  # fill the cache if needed
    t0 = time.perf_counter()
    vecs = cached.encode(texts)
    out["embed_cached_s"] = time.perf_counter() - t0
    emb = dict(zip(texts, vecs, strict=True))
    if args.outer_folds:
        nested = [nested_figures(table, emb, args.heads, args.outer_folds, args.folds, s) for s in args.seeds]
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**out, "nested": nested}, f, indent=2, default=str)
        return

    results = []
    for seed in args.seeds:
        res = run_seed(seed, table, emb, args.heads, args.folds)
        results.append(res)
        print(
            f"\n== llmrouter_ulab held-out split, seed {seed}: {res['n_train']} train / {res['n_test']} test prompts"
        )
        print(
            f"best single ({res['best_single_model']}, chosen on train): {res['best_single']:.4f}   "
            f"random: {res['random']:.4f}   oracle: {res['oracle']:.4f}"
        )
        print(
            f"{'head':8s} {'quality':>8s} {'vs best':>8s} {'gap':>6s} {'cv':>7s} {'ECE raw':>8s} {'ECE iso':>8s} "
            f"{'fit s':>6s} {'tune s':>7s}  params"
        )
        for name, h in res["heads"].items():
            print(
                f"{name:8s} {h['quality']:8.4f} {h['quality'] - res['best_single']:+8.4f} {h['gap_closed']:6.1%} "
                f"{h['cv_quality']:7.4f} {h['ece_raw']:8.4f} {h['ece_isotonic']:8.4f} {h['fit_s']:6.2f} "
                f"{h['tune_s']:7.1f}  {h['params']}"
            )
        print("served (argmax after the calibrator, fitted on out-of-fold predictions): vs best single, ECE")
        for name, h in res["heads"].items():
            cells = [
                f"{c} {100 * (f['quality'] - res['best_single']):+.2f}p ECE {f['ece']:.4f}"
                for c, f in h["served"].items()
            ]
            print(
                f"  {name:8s} none {100 * (h['quality'] - res['best_single']):+.2f}p ECE {h['ece_raw']:.4f}; "
                + "; ".join(cells)
            )
        d, lo, hi = res["chosen_vs_best_single"]
        print(f"chosen head (by CV): {res['chosen']}; vs best single {d:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}]")
        if "chosen_vs_knn" in res:
            d, lo, hi = res["chosen_vs_knn"]
            print(f"chosen head vs tuned kNN: {d:+.4f} [95% paired-bootstrap CI {lo:+.4f}, {hi:+.4f}]")
        line = (
            f"reference, routing by the TRUE source-task label (not a router): {res['source_label']:.4f} "
            f"({res['source_label'] - res['best_single']:+.4f} vs best single, {res['source_label_gap_closed']:.1%} of the gap)"
        )
        if "source_label_vs_knn" in res:
            d, lo, hi = res["source_label_vs_knn"]
            line += f"; vs tuned kNN {d:+.4f} [CI {lo:+.4f}, {hi:+.4f}]"
        print(line)

    # task head on every seed's split (tuned by CV inside its training part); latency on the first
    task_heads = [task_figures(r, cached, out) for r in results]
    task_head = task_heads[0]
    for key in ("heldout", "fresh", "wizardlm", "mt_bench"):
        out[f"task_macro_f1_{key}"] = float(np.mean(out[f"task_macro_f1_{key}_by_seed"]))
    print(
        f"task head: macro-F1 {out['task_macro_f1_heldout']:.3f} on {out['task_heldout_n']} held-out labelled "
        f"prompts (mean of {len(results)} split seed(s)); fresh blind set {out['task_macro_f1_fresh']:.3f}; WizardLM {out['task_macro_f1_wizardlm']:.3f}, "
        f"MT-Bench {out['task_macro_f1_mt_bench']:.3f} (OOD)"
    )

    res = results[0]
    h = res["heads"][res["chosen"]]
    router = LearnedRouter(
        encoder, task_head, h["head"], sorted(table["model"].unique()), calibrator=h["calibrator"]
    )
    out.update(latency(router))
    out["train_s_on_cached_embeddings"] = {n: r["fit_s"] for n, r in res["heads"].items()}
    print(
        f"embedding {len(texts)} prompts: cold {out.get('embed_cold_s', float('nan')):.1f} s, "
        f"cached {out['embed_cached_s']:.2f} s"
    )
    print(
        "training on cached embeddings (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in out["train_s_on_cached_embeddings"].items())
    )
    print_speed(out, res["chosen"])
    if args.out:
        slim = [{k: v for k, v in r.items() if k != "splits"} for r in results]
        for r in slim:
            r["heads"] = {
                n: {k: v for k, v in h.items() if k not in ("head", "calibrator")}
                for n, h in r["heads"].items()
            }
        with open(args.out, "w") as f:
            json.dump({**out, "seeds": slim}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
