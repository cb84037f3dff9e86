"""Study (not yet part of the router): can a novelty-gated margin keep routing at least as good as
the best single model when a whole task family is held out (issue 11, item 2)?

    python -m experiments.study_shift_guard --head knn --novelty confidence
    python -m experiments.study_shift_guard --head taskmix --novelty knn

Leave-one-family-out over llmrouter_ulab's 14 benchmarks. For each held-out family, everything is
fitted on the other 13 only:

- the quality head, and its out-of-fold predictions twice: over 5 groups of training FAMILIES
  (out-of-family predictions) and over 5 random folds of training prompts (in-distribution ones);
- a novelty score per prompt: ``knn`` = 1 - mean cosine similarity of the 10 nearest training
  prompts; ``confidence`` = 1 - the top probability of a logistic regression that tells the
  training families apart (a held-out family has no class of its own);
- a guard: a bonus ``d0`` (in distribution) or ``d1`` (novelty above ``c``) added to the predicted
  quality of the training part's best single model, so the router leaves that model only when it
  predicts a larger gain. (c, d0, d1) maximise the out-of-fold gain over the best single model,
  in-distribution plus out-of-family, with out-of-family losses counted three times.

Prints per family: the head's raw gain over the best single model, the guarded gain, and the
novelty score's AUROC at telling the held-out family's prompts from in-distribution out-of-fold
ones; then the pooled figures. Figures are in score units (x100 = points).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

BONUS_ID = (0.0, 0.01, 0.02, 0.04, 0.06, 0.1)
BONUS_NOVEL = (0.0, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 1.0)
PARAMS = {"knn": {"k": 100, "weights": "distance"}, "taskmix": {}, "mlp": {"epochs": 30, "n_members": 2}}


def _unit(A: np.ndarray) -> np.ndarray:
    return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)


def knn_novelty(bank: np.ndarray, Q: np.ndarray, k: int = 10) -> np.ndarray:
    S = _unit(Q) @ _unit(bank).T
    return 1.0 - np.partition(S, S.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def confidence_novelty(X_tr: np.ndarray, fam_tr: np.ndarray, Q: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=10.0, max_iter=2000).fit(X_tr, fam_tr)
    return 1.0 - clf.predict_proba(Q).max(axis=1)


def guarded(q: np.ndarray, best: np.ndarray, nov: np.ndarray, c: float, d0: float, d1: float) -> np.ndarray:
    out = q.copy()
    out[np.arange(len(q)), best] += np.where(nov > c, d1, d0)
    return out


def main() -> None:
    from sklearn.metrics import roc_auc_score
    from tqdm.auto import tqdm

    from router_ml.data.loading import load_routing_data
    from router_ml.data.schema import to_wide
    from router_ml.data.taxonomy import task_ids_of
    from router_ml.embeddings import CachedEncoder, build_encoder
    from router_ml.evaluation.shift import shift_table
    from router_ml.predictors.tuning import fit_head, predict_head

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head", choices=sorted(PARAMS), default="knn")
    ap.add_argument("--novelty", choices=("knn", "confidence"), default="confidence")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data = {"name": "llmrouter", "adapter": "llmrouter", "options": {}, "models": None, "max_prompts": None}
    table, _ = shift_table(load_routing_data(data, seed=args.seed), "source_task")
    models = sorted(table["model"].unique())
    P, Y, _ = to_wide(table, models)
    enc = build_encoder({"type": "sentence_transformer", "model": "minilm", "max_seq_length": 256})
    X = CachedEncoder(enc).encode(list(P["prompt"])).astype("float32")
    fam = P["source_task"].astype(str).to_numpy()
    tid, texts = task_ids_of(P["source_task"]), list(P["prompt"])
    rng = np.random.default_rng(args.seed)

    def novelty(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        if args.novelty == "knn":
            return knn_novelty(X[tr], X[te])
        return confidence_novelty(X[tr], fam[tr], X[te])

    def fitted(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        head = fit_head(args.head, PARAMS[args.head], X[tr], Y[tr], tid[tr], [texts[i] for i in tr])
        return predict_head(head, X[te], [texts[i] for i in te])

    def out_of_fold(idx: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, ...]:
        q, nov, best = np.zeros((len(idx), len(models))), np.zeros(len(idx)), np.zeros(len(idx), int)
        for g in np.unique(groups):
            te, tr = idx[groups == g], idx[groups != g]
            q[groups == g], nov[groups == g] = fitted(tr, te), novelty(tr, te)
            best[groups == g] = int(np.nanargmax(np.nanmean(Y[tr], axis=0)))
        return q, nov, best

    def gain(q: np.ndarray, Yp: np.ndarray, best: np.ndarray) -> float:
        r = np.arange(len(q))
        return float(np.mean(Yp[r, q.argmax(axis=1)] - Yp[r, best]))

    rows = []
    t0 = time.perf_counter()
    for f in tqdm(sorted(set(fam)), desc=f"LOFO {args.head} / {args.novelty}"):
        tr, te = np.where(fam != f)[0], np.where(fam == f)[0]
        families = sorted(set(fam[tr]))
        group = {x: j % 5 for j, x in enumerate(rng.permutation(families))}
        qf, nf, bf = out_of_fold(tr, np.array([group[x] for x in fam[tr]]))
        qi, ni, bi = out_of_fold(tr, rng.integers(0, 5, len(tr)))
        best_fit = (-np.inf, (0.0, 0.0, 0.0), 0.0, 0.0)
        for c in np.quantile(np.r_[nf, ni], [0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]):
            for d0 in BONUS_ID:
                for d1 in (d for d in BONUS_NOVEL if d >= d0):
                    gf = gain(guarded(qf, bf, nf, c, d0, d1), Y[tr], bf)
                    gi = gain(guarded(qi, bi, ni, c, d0, d1), Y[tr], bi)
                    score = gi + gf + 2.0 * min(gf, 0.0)
                    if score > best_fit[0] + 1e-12:
                        best_fit = (score, (float(c), d0, d1), gf, gi)
        c, d0, d1 = best_fit[1]
        q, nov = fitted(tr, te), novelty(tr, te)
        best = np.full(len(te), int(np.nanargmax(np.nanmean(Y[tr], axis=0))))
        auroc = roc_auc_score(np.r_[np.zeros(len(ni)), np.ones(len(nov))], np.r_[ni, nov])
        rows.append(
            {
                "family": f,
                "n": len(te),
                "raw": gain(q, Y[te], best),
                "guarded": gain(guarded(q, best, nov, c, d0, d1), Y[te], best),
                "auroc": auroc,
                "c": c,
                "d0": d0,
                "d1": d1,
                "inner_family_gain": best_fit[2],
                "inner_id_gain": best_fit[3],
            }
        )
    df = pd.DataFrame(rows)
    print(df.round(3).to_string(index=False))
    w = df["n"] / df["n"].sum()
    print(
        f"pooled gain over best single: raw {100 * (df['raw'] * w).sum():+.2f} pts, guarded "
        f"{100 * (df['guarded'] * w).sum():+.2f} pts; worst family {100 * df['guarded'].min():+.2f} pts "
        f"({df.loc[df['guarded'].idxmin(), 'family']}); novelty AUROC mean {df['auroc'].mean():.3f}; "
        f"in-distribution out-of-fold gain kept {100 * df['inner_id_gain'].mean():+.2f} pts; "
        f"{time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
