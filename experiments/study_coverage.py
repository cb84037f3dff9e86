"""Study for issue 11, item 2: how the guard's per-model intervals cover, in and out of family, under
several ways of computing the conformal table from the same out-of-fold residuals.

    python -m experiments.study_coverage --jobs mmlu_pro:leave_one_family_out:2000 --out DIR
    python -m experiments.study_coverage --load DIR/mmlu_pro_leave_one_family_out_2000_shrink.npz

The shift harness's own folds and pipeline (``experiments.evaluate``'s config with
``predictor=ensemble``, ``shift=<mode>``, seed 0), for the head and guard of the README's guarded
rows: per outer fold, the head fitted on the training part less a 10% validation part, its isotonic
calibrator fitted on that part, and a :class:`~router_ml.predictors.guard.NoveltyGuard` (``--mode``,
``folds: 3``, ``family_folds: -1``) fitted by ``shift._fit_guard``, the harness's own code. What is
kept per fold (``.npz``): the guard's out-of-fold absolute residuals on the served scale with
their novelty, kind (in distribution / out of family) and family (what ``_fit_intervals`` reads),
and, for the validation prompts (training families, never trained on: in distribution) and the
held-out prompts, the guarded calibrated estimate, the novelty, the prompt's conformal coin and the
observed scores (and the out-of-fold raw and calibrated head estimates, priors and folds, for
other rules). Each interval rule of :data:`RULES` is then fitted on the out-of-fold rows and
scored on the held-out and validation prompts: per model coverage pooled over folds, its worst and
mean gap to the nominal 0.9. No routing: the rules change the intervals only.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import numpy as np


def capture(job: str, mode: str, extra: list[str]) -> dict[str, np.ndarray]:
    """Run ``job``'s folds with the guard and return the arrays the rules read (module doc)."""
    from tqdm.auto import tqdm

    from experiments.bench_shift import job_config
    from router_ml.data.loading import load_routing_data
    from router_ml.data.schema import to_wide
    from router_ml.data.splits import split_prompts
    from router_ml.data.taxonomy import task_ids_of
    from router_ml.embeddings import CachedEncoder, build_encoder
    from router_ml.evaluation.shift import _fit_guard, _folds, shift_table
    from router_ml.predictors.guard import NoveltyGuard, prompt_uniform
    from router_ml.predictors.tuning import fit_head, predict_head
    from router_ml.training import calibration_folds, fit_calibrator

    data, smode, *cap = job.split(":")
    cfg = job_config(
        data,
        smode,
        ["seeds=[0]", "predictor=ensemble", *([f"data.max_prompts={cap[0]}"] if cap else []), *extra],
    )
    s = cfg["shift"]
    family_by = s.get("family_by", "source_task")
    table, _ = shift_table(load_routing_data(cfg["data"], seed=0), family_by, 0.98)
    models = sorted(table["model"].unique())
    folds = _folds(cfg, table, 0)
    texts = sorted({t for _, tr, te in folds for df in (tr, *te.values()) for t in df["prompt"].unique()})
    enc = CachedEncoder(build_encoder(cfg["encoder"]), cache_dir=cfg.get("cache_dir"))
    emb = dict(zip(texts, enc.encode(texts), strict=True))
    hcfg = dict(cfg["predictor"])
    gparams = {"folds": 3, "family_folds": -1, "mode": mode}
    ctx = types.SimpleNamespace(seed=0, family_by=family_by, guard={"params": gparams})
    captured: list[dict] = []
    orig = NoveltyGuard._fit_intervals

    def spy(self, R, nu, kind, fam, G=None):
        import inspect

        loc = inspect.currentframe().f_back.f_locals  # NoveltyGuard.fit's: the out-of-fold arrays
        extra = {k: loc[k] for k in ("Y", "Qi", "Qf", "Pi", "Pf", "bi", "bf")}
        extra.update(  # the fit's out-of-fold estimates are already through the router's calibrator
            Ci=loc["Qi"], Cf=loc["Qf"], gi=loc["groups"]["random"], gf=loc["groups"]["family"],
            shrink=np.asarray(self.shrink_),
        )  # fmt: skip
        captured.append({"R": R, "nu": nu, "kind": kind, "fam": fam, "G": G, **extra})
        return orig(self, R, nu, kind, fam, G)

    NoveltyGuard._fit_intervals = spy
    out: dict[str, list] = {}
    try:
        for fold, train, tests in tqdm(folds, desc=job):
            parts = split_prompts(train, test_size=0.0, val_size=float(s.get("val_size", 0.1)), seed=0)
            (p_tr, Y_tr, _), (p_va, Y_va, _) = (to_wide(parts[k], models) for k in ("train", "val"))
            p_te, Y_te, _ = to_wide(tests["original"], models)
            X = {k: np.stack([emb[t] for t in p["prompt"]]).astype(np.float32) for k, p in
                 (("tr", p_tr), ("va", p_va), ("te", p_te))}  # fmt: skip
            t_tr, t_va, t_te = (list(p["prompt"]) for p in (p_tr, p_va, p_te))
            tid = task_ids_of(p_tr[hcfg.get("task_key", "task")])
            head = fit_head(hcfg["name"], dict(hcfg.get("params") or {}), X["tr"], Y_tr, tid, t_tr)
            raw_va = predict_head(head, X["va"], t_va)
            # calibrated as the harness and the router are (out-of-fold over the training part + val)
            cal = fit_calibrator(
                cfg["calibrator"]["name"],
                calibration_folds(cfg),
                hcfg["name"],
                dict(hcfg.get("params") or {}),
                p_tr,
                X["tr"],
                Y_tr,
                tid,
                0,
                (raw_va, Y_va),
            )
            g = _fit_guard(
                ctx,
                hcfg,
                p_tr,
                Y_tr,
                X["tr"],
                X["tr"],  # the head's features: the study's heads read the embedding only
                t_tr,
                (head, cal, types.SimpleNamespace(risk=0.0)),
                X["va"],
                t_va,
                None,
                None,
            )[3]
            row = {"fold": fold, **captured.pop()}
            for key, Xk, tk, Yk, p in (("va", X["va"], t_va, Y_va, p_va), ("te", X["te"], t_te, Y_te, p_te)):
                raw = predict_head(head, Xk, tk)
                gd = g.transform(Xk, raw if cal is None else cal.transform(raw), texts=tk)
                row[f"{key}_raw"] = raw
                row.update({f"{key}_q": gd.quality, f"{key}_nu": gd.novelty, f"{key}_coin": prompt_uniform(Xk),
                            f"{key}_Y": Yk, f"{key}_fam": p[family_by].astype(str).to_numpy()})  # fmt: skip
            for k, v in row.items():
                out.setdefault(k, []).append(v)
    finally:
        NoveltyGuard._fit_intervals = orig
    arrays = {k: np.array(v, dtype=object) for k, v in out.items()}
    arrays["models"] = np.array(models)
    return arrays


# ---- interval rules: (R, nu, kind, fam) -> a function (nu, coin) -> (n, m) half-widths ----------
def _guarded(arrays: dict, i: int) -> np.ndarray:
    """Fold ``i``'s out-of-fold guarded estimates (captured, or for a shrink guard rebuilt)."""
    from router_ml.predictors.guard import shrink_weight

    if "G" in arrays and arrays["G"][i] is not None:
        return arrays["G"][i]
    nu, w, n = arrays["nu"][i], arrays["shrink"][i], len(arrays["Y"][i])
    out = []
    for C, P, v in ((arrays["Ci"][i], arrays["Pi"][i], nu[:n]), (arrays["Cf"][i], arrays["Pf"][i], nu[n:])):
        ww = shrink_weight(v, w)[:, None]
        out.append((1 - ww) * C + ww * P)
    return np.vstack(out)


def _table(guard_kwargs: dict, arrays: dict, i: int):
    from router_ml.predictors.guard import NoveltyGuard

    g = NoveltyGuard(**guard_kwargs)
    g._fit_intervals(*(arrays[k][i] for k in ("R", "nu", "kind", "fam")), _guarded(arrays, i))

    def half(v, q, coin):
        c, cols = g._cells(v, q), np.arange(q.shape[1])[None, :]
        return np.where(
            coin[:, None] < g.halfwidth_p_[c, cols], g.halfwidth_[c, cols], g.halfwidth_low_[c, cols]
        )

    return half


RULES = {
    f"{rule}, {n} novelty bin{'s' if n > 1 else ''} x {k} estimate bin{'s' if k > 1 else ''}": {
        "intervals": rule,
        "n_bins": n,
        "q_bins": k,
    }
    for rule in ("pooled", "family", "family_equal", "wider")
    for n in (1, 3)
    for k in (1, 5, 10)
}


def score(arrays: dict, rules: dict[str, dict], nominal: float = 0.9) -> dict[str, dict]:
    """Per rule: coverage per model on the held-out (``te``) and validation (``va``) prompts, pooled over
    folds: worst and mean |gap| in points, and the mean half-width."""
    res = {}
    for name, kw in rules.items():
        cov = {"te": [], "va": []}
        width = {"te": [], "va": []}
        for i in range(len(arrays["fold"])):
            half = _table(kw, arrays, i)
            for key in ("te", "va"):
                q, Y = arrays[f"{key}_q"][i], arrays[f"{key}_Y"][i]
                h = half(arrays[f"{key}_nu"][i], q, arrays[f"{key}_coin"][i])
                lo, hi = np.clip(q - h, 0, 1), np.clip(q + h, 0, 1)
                cov[key].append(np.where(np.isnan(Y), np.nan, (lo - 1e-9 <= Y) & (hi + 1e-9 >= Y)))
                width[key].append(hi - lo)
        r = {}
        for key in ("te", "va"):
            c = np.nanmean(np.vstack(cov[key]), axis=0)
            gap = 100 * np.abs(c - nominal)
            r[key] = {"worst": float(gap.max()), "mean": float(gap.mean()), "width": float(np.mean(np.vstack(width[key]))),
                      "min": float(c.min()), "max": float(c.max())}  # fmt: skip
        res[name] = r
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="*", default=[])
    ap.add_argument("--load", nargs="*", default=[])
    ap.add_argument("--out", default="outputs/study_coverage")
    ap.add_argument("--mode", default="shrink")
    args, extra = ap.parse_known_args()
    files = [Path(f) for f in args.load]
    for job in args.jobs:
        arrays = capture(job, args.mode, extra)
        f = Path(args.out) / f"{job.replace(':', '_')}_{args.mode}.npz"
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez(f, **arrays)
        files.append(f)
    for f in files:
        arrays = dict(np.load(f, allow_pickle=True))
        print(f"\n== {f.name}: coverage per model (nominal 0.90), pooled over folds; worst / mean |gap| pts")
        for name, r in score(arrays, RULES).items():
            print(f"{name:55s} out of family {r['te']['worst']:5.1f} / {r['te']['mean']:4.1f} "
                  f"(width {r['te']['width']:.2f})   in distribution {r['va']['worst']:5.1f} / {r['va']['mean']:4.1f} "
                  f"(width {r['va']['width']:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
