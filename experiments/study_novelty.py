"""Study for issue 11, item 2: which novelty features tell a held-out task family from the training
families, per data set (the ablation behind NoveltyGuard's DEFAULT_FEATURES).

    python -m experiments.study_novelty --jobs zeroeval:leave_one_family_out
    python -m experiments.study_novelty --jobs mmlu_pro:leave_one_family_out:2000 llmrouter:leave_one_family_out

The shift harness's own folds (``experiments.evaluate``'s config, ``shift=leave_one_family_out``,
seed 0): per held-out family, the training families less a 10% validation part. On the training
part, the guard's out-of-fold novelty features (:meth:`NoveltyGuard._features`, the production code:
every feature of :data:`FEATURES`), over 3 groups of training families (out of family) and 3 random
folds (in distribution), as ``NoveltyGuard.fit`` computes them; the served features of the
validation and held-out prompts against the whole training part. Then, per feature set, a
logistic regression on the out-of-fold rows (family = 1, random = 0) scores the validation prompts
(in distribution, never in the bank) and the held-out family's: AUROC pooled over folds (the
harness's ``novelty_auroc``) and per family. No quality head is fitted: the score does not read one.
"""

from __future__ import annotations

import argparse

import numpy as np

#: feature sets compared (names of router_ml.predictors.guard.FEATURES)
EMB = ("nearest_dist", "knn_mean_dist")
FAMILY = ("family_1_minus_top_prob", "family_entropy")
TEXT = ("char_nearest_dist", "char_knn_mean_dist", "word_nearest_dist", "word_knn_mean_dist")
#: candidates computed by this study only (columns after FEATURES'): cosine distance to the nearest
#: training-family centroid, and the same over that family's mean distance to its centroid (a local
#: scale per family); the family classifier's energy is FEATURES' ``family_energy``
#: Mahalanobis distance to the nearest training-family Gaussian (shared Ledoit-Wolf covariance, Lee et
#: al. 2018) and the relative one (that minus the distance under one Gaussian of every training
#: prompt, Ren et al. 2021: built for near-OOD, where a new family shares the background's directions)
EXTRA = ("centroid_dist", "centroid_scaled", "maha_min", "maha_relative")
SETS = {
    "before (embedding + family classifier)": EMB + FAMILY,
    "embedding distances": EMB,
    "+ local scale": (*EMB, "local_scale"),
    "+ char/word n-grams": EMB + TEXT,
    "+ local scale + n-grams (default)": (*EMB, "local_scale", *TEXT),
    "all, family classifier included": (*EMB, *FAMILY, "local_scale", *TEXT),
    "n-grams alone": TEXT,
    "default + centroid distances": (*EMB, "local_scale", *TEXT, "centroid_dist", "centroid_scaled"),
    "default + family energy": (*EMB, "local_scale", *TEXT, "family_energy"),
    "default + Mahalanobis": (*EMB, "local_scale", *TEXT, "maha_min", "maha_relative"),
    "default + relative Mahalanobis": (*EMB, "local_scale", *TEXT, "maha_relative"),
    "Mahalanobis alone": ("maha_min", "maha_relative"),
    "default + centroid + energy": (
        *EMB,
        "local_scale",
        *TEXT,
        "centroid_dist",
        "centroid_scaled",
        "family_energy",
    ),
}


def job_folds(job: str) -> tuple[list[dict], dict]:
    """The harness's folds of ``job`` (``data:mode[:max_prompts]``): ``[{fold, tr, va, te}]`` with
    prompts and families per part, and the embeddings of every prompt (on-disk cache)."""
    from experiments.bench_shift import job_config
    from router_ml.data.loading import load_routing_data
    from router_ml.data.schema import to_wide
    from router_ml.data.splits import split_prompts
    from router_ml.embeddings import CachedEncoder, build_encoder
    from router_ml.evaluation.shift import _folds, shift_table

    data, mode, *cap = job.split(":")
    cfg = job_config(data, mode, ["seeds=[0]", *([f"data.max_prompts={cap[0]}"] if cap else [])])
    family_by = cfg["shift"].get("family_by", "source_task")
    table, _ = shift_table(load_routing_data(cfg["data"], seed=0), family_by, 0.98)
    models = sorted(table["model"].unique())
    folds = []
    for fold, tr, tests in _folds(cfg, table, 0):
        parts = split_prompts(tr, test_size=0.0, val_size=float(cfg["shift"].get("val_size", 0.1)), seed=0)
        f = {"fold": fold}
        for key, df in (("tr", parts["train"]), ("va", parts["val"]), ("te", tests["original"])):
            p = to_wide(df, models)[0]
            f[key] = (list(p["prompt"]), p[family_by].astype(str).to_numpy())
        folds.append(f)
    texts = sorted({t for f in folds for k in ("tr", "va", "te") for t in f[k][0]})
    emb = CachedEncoder(build_encoder(cfg["encoder"]), cache_dir=cfg.get("cache_dir")).encode(texts)
    return folds, dict(zip(texts, emb, strict=True))


def mahalanobis(A: np.ndarray, fam: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min over the families of ``A`` of the Mahalanobis distance of each row of ``B`` to that
    family's mean under their shared within-family covariance, that minus the distance to the mean of
    every row of ``A`` under its own covariance); covariances by Ledoit-Wolf shrinkage."""
    from sklearn.covariance import LedoitWolf

    names = np.unique(fam)
    M = np.stack([A[fam == x].mean(axis=0) for x in names])
    within = A - M[np.searchsorted(names, fam)]
    P = LedoitWolf(assume_centered=True).fit(within).precision_
    mu0 = A.mean(axis=0)
    P0 = LedoitWolf().fit(A).precision_

    def dist(X: np.ndarray, mu: np.ndarray, prec: np.ndarray) -> np.ndarray:
        D = X - mu
        return np.einsum("ij,jk,ik->i", D, prec, D)

    dmin = np.min(np.stack([dist(B, m, P) for m in M]), axis=0)
    return dmin, dmin - dist(B, mu0, P0)


def fold_features(
    folds: list[dict], emb: dict, k: int = 10, n_folds: int = 3, family_folds: int | None = None
) -> list[dict]:
    """Per fold: the out-of-fold features (``Fi`` random, ``Ff`` family-grouped) of the training
    part and the served features of the validation (``Fva``) and held-out (``Fte``) prompts."""
    from tqdm.auto import tqdm

    from router_ml.predictors.guard import FEATURES, NoveltyGuard, _unit
    from router_ml.predictors.ngram_bank import NgramBank

    def feats(E, fam, H, tr, te):
        coef, icpt = NoveltyGuard._family_head(E[tr], fam[tr], 0)
        bank = _unit(E[tr])
        text = {t: (NgramBank(t).fit_counts(h[tr]), h[te]) for t, h in H.items()}
        kd = NoveltyGuard._bank_kdist(bank, k)
        F = NoveltyGuard._features(bank, coef, icpt, E[te], k, kdist=kd, text=text)
        names = np.unique(fam[tr])
        C = _unit(np.stack([bank[fam[tr] == x].mean(axis=0) for x in names]))
        spread = np.array([1.0 - (bank[fam[tr] == x] @ c).mean() for x, c in zip(names, C, strict=True)])
        U = _unit(E[te])
        D = 1.0 - U @ C.T
        near = D.argmin(axis=1)
        maha = mahalanobis(E[tr].astype(np.float64), fam[tr], E[te].astype(np.float64))
        return np.column_stack([F, D.min(axis=1), D.min(axis=1) / np.maximum(spread[near], 1e-6), *maha])

    out = []
    for f in tqdm(folds, desc="folds"):
        (t_tr, fam), t_q = f["tr"], f["va"][0] + f["te"][0]
        E = np.stack([emb[t] for t in t_tr + t_q]).astype(np.float32)
        H = {s: NgramBank(s).hash(t_tr + t_q).tocsr() for s in ("char", "word")}
        n = len(t_tr)
        # the guard's folds: the same seeded draws as NoveltyGuard.fit
        rng = np.random.default_rng(0)
        names = np.unique(fam)
        n_groups = len(names) if family_folds == -1 else min(int(family_folds or n_folds), len(names))
        group_of = {x: i % n_groups for i, x in enumerate(rng.permutation(names))}
        groups = {"Ff": np.array([group_of[x] for x in fam]), "Fi": rng.integers(0, n_folds, n)}
        row = {}
        for key, g in groups.items():
            F = np.zeros((n, len(FEATURES) + len(EXTRA)))
            for v in np.unique(g):
                a, b = np.where(g != v)[0], np.where(g == v)[0]
                F[b] = feats(E, fam, H, a, b)
            row[key] = F
        Fq = feats(E, np.r_[fam, [""] * len(t_q)], H, np.arange(n), np.arange(n, n + len(t_q)))
        nv = len(f["va"][0])
        out.append({"fold": f["fold"], **row, "Fva": Fq[:nv], "Fte": Fq[nv:]})
    return out


def score_sets(rows: list[dict], exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Per feature set: pooled AUROC (held-out family vs validation prompts), the same without the
    folds of the families in ``exclude``, and per fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from router_ml.predictors.guard import FEATURES

    def auroc(v, t):
        return float(roc_auc_score(np.r_[np.zeros(len(v)), np.ones(len(t))], np.r_[v, t]))

    out = {}
    for name, feats in SETS.items():
        c = [(FEATURES + EXTRA).index(x) for x in feats]
        pv, pt, per = [], [], {}
        for r in rows:
            Fa = np.vstack([r["Fi"], r["Ff"]])[:, c]
            mu, sd = Fa.mean(axis=0), Fa.std(axis=0) + 1e-9
            lab = np.r_[np.zeros(len(r["Fi"])), np.ones(len(r["Ff"]))]
            m = LogisticRegression(class_weight="balanced", max_iter=2000).fit((Fa - mu) / sd, lab)
            v, t = (m.predict_proba((r[k][:, c] - mu) / sd)[:, 1] for k in ("Fva", "Fte"))
            pv.append(v)
            pt.append(t)
            per[r["fold"]] = auroc(v, t)
        keep = [i for i, r in enumerate(rows) if r["fold"] not in exclude]
        out[name] = {
            "pooled": auroc(np.concatenate(pv), np.concatenate(pt)),
            "pooled_without": auroc(
                np.concatenate([pv[i] for i in keep]), np.concatenate([pt[i] for i in keep])
            ),
            "per_family": per,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="+", default=["zeroeval:leave_one_family_out"])
    ap.add_argument("--family-folds", type=int, default=None, help="as the guard's (-1: each family alone)")
    ap.add_argument(
        "--exclude", nargs="*", default=[], help="families also left out of a second pooled AUROC"
    )
    args = ap.parse_args()
    for job in args.jobs:
        rows = fold_features(*job_folds(job), family_folds=args.family_folds)
        res = score_sets(rows, tuple(args.exclude))
        print(f"\n== {job}: novelty AUROC, held-out family vs in-distribution validation prompts")
        for name, r in res.items():
            per = r["per_family"]
            worst = min(per, key=per.get)
            without = (
                f" (without {','.join(args.exclude)}: {r['pooled_without']:.3f})" if args.exclude else ""
            )
            print(f"{name:40s} pooled {r['pooled']:.3f}{without}  worst family {worst} {per[worst]:.2f}  | "
                  + " ".join(f"{k}:{v:.2f}" for k, v in per.items()))  # fmt: skip


if __name__ == "__main__":
    main()
