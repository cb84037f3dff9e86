"""Shift evaluation (issue 11): the leave-one-family-out splitter, the best single model chosen on
training families only, deterministic prompt renderings, the Hydra group, and a small end-to-end
run of the harness with a shift (real llmrouter_ulab prompts, subsampled; the static encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from router_ml.evaluation import shift as sh
from router_ml.evaluation.renderings import RENDERINGS, llmrouter_choices, parse_choices, render, render_table

CONF = Path(__file__).resolve().parent.parent / "conf"


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


@pytest.fixture(scope="module")
def small_table(shared_data) -> pd.DataFrame:
    from router_ml.data.adapters import load_source
    from router_ml.data.loading import subsample_prompts

    return subsample_prompts(load_source("llmrouter"), 400, seed=0)


# ---- folds -----------------------------------------------------------------------------------
def test_lofo_holds_out_exactly_one_family_per_fold(small_table):
    families = sorted(small_table["source_task"].unique())
    folds = sh.lofo_folds(small_table)
    assert [f for f, _, _ in folds] == families  # every family held out once
    for fam, train, test in folds:
        assert set(test["source_task"]) == {fam}
        assert fam not in set(train["source_task"])
        assert set(train["source_task"]) == set(families) - {fam}
        assert set(test["prompt_id"]) == set(small_table.loc[small_table["source_task"] == fam, "prompt_id"])
        assert not set(train["prompt_id"]) & set(test["prompt_id"])
    assert [f for f, _, _ in sh.lofo_folds(small_table, families=["mbpp"])] == ["mbpp"]


def test_family_groups_hold_a_groups_families_out_together(small_table):
    table, col = sh.group_families(small_table, "source_task", {"code": ["mbpp", "human_eval"]})
    assert col == "source_task_group" and set(small_table.columns) < set(table.columns)
    folds = {f: (tr, te) for f, tr, te in sh.lofo_folds(table, col)}
    assert "code" in folds and "mbpp" not in folds and "human_eval" not in folds
    train, test = folds["code"]
    assert set(test["source_task"]) == {"mbpp", "human_eval"}
    assert not {"mbpp", "human_eval"} & set(train["source_task"])
    others = sorted(set(small_table["source_task"]) - {"mbpp", "human_eval"})
    assert sorted(set(folds) - {"code"}) == others  # every other family keeps its own fold
    ctx = _context(table, {"knn": {"name": "knn", "task_key": "task", "params": {"k": 5}}})
    ctx.family_by = col
    (fs,) = sh.fold_scores(ctx, "code", train, {"original": test})
    assert set(fs.family) == {"code"} and len(fs.family) == test["prompt_id"].nunique()
    with pytest.raises(ValueError, match="no family 'arc' in 'source_task'"):
        sh.group_families(small_table, "source_task", {"x": ["arc"]})
    with pytest.raises(ValueError, match="'mbpp' is in both 'a' and 'b'"):
        sh.group_families(small_table, "source_task", {"a": ["mbpp"], "b": ["mbpp", "gsm8k"]})
    with pytest.raises(ValueError, match="non-empty list"):
        sh.group_families(small_table, "source_task", {"a": "mbpp"})


def test_shift_table_keeps_models_covering_every_family(small_table):
    t = small_table[~((small_table["model"] == "codegemma-7b") & (small_table["source_task"] == "gsm8k"))]
    kept, dropped = sh.shift_table(t)
    assert dropped == ["codegemma-7b"] and "codegemma-7b" not in set(kept["model"])
    assert (kept.groupby("prompt_id")["model"].nunique() == kept["model"].nunique()).all()


def _context(table: pd.DataFrame, heads: dict) -> sh._Context:
    from router_ml.evaluation.estimates import build_layer

    models = sorted(table["model"].unique())
    rng = np.random.default_rng(0)
    texts = sorted(set(table["prompt"]))
    emb = {t: rng.normal(size=16).astype("float32") for t in texts}  # the feature is not the encoder
    return sh._Context(
        models=models,
        emb=emb,
        tasks=dict.fromkeys(texts, "qa"),
        layer=build_layer({"data": {"adapter": "llmrouter"}, "output_lengths": "prior"}, models),
        heads=heads,
        calibrator="isotonic",
        utility={"name": "utility", "sweep": {"kind": "lam", "num": 4}},
        family_by="source_task",
        val_size=0.1,
        seed=0,
    )


def test_best_single_is_chosen_on_training_families_only(small_table):
    from router_ml.data.schema import to_wide
    from router_ml.data.splits import split_prompts
    from router_ml.metrics import best_single_model

    models = sorted(small_table["model"].unique())
    fam = "gsm8k"
    train_best = best_single_model(to_wide(small_table[small_table["source_task"] != fam], models)[1])
    # on the held-out family the training-worst model is perfect and every other model scores 0
    loser = models[int(np.argmin(np.nanmean(to_wide(small_table, models)[1], axis=0)))]
    t = small_table.copy()
    held = t["source_task"] == fam
    t.loc[held, "score"] = (t.loc[held, "model"] == loser).astype(float)
    ctx = _context(t, {"knn": {"name": "knn", "task_key": "task", "params": {"k": 5}}})
    ((_, train, test),) = sh.lofo_folds(t, families=[fam])
    (fs,) = sh.fold_scores(ctx, fam, train, {"original": test})
    assert set(fs.family) == {fam}
    # chosen on the fold's training part (the other families less their calibration part)
    fit_part = split_prompts(train, test_size=0.0, val_size=0.1, seed=0)["train"]
    assert fam not in set(fit_part["source_task"])
    assert models[fs.best] == models[best_single_model(to_wide(fit_part, models)[1])] != loser
    assert models[train_best] != loser
    assert np.all(fs.Y[:, fs.best] == 0.0)  # the held-out prompts score it as they are
    assert fs.util_score["knn"].shape == (len(fs.Y), 5) == fs.util_cost["knn"].shape


# ---- renderings ------------------------------------------------------------------------------
def test_parse_choices_reads_every_form():
    assert parse_choices("['$100', '$150']") == ["$100", "$150"]
    assert parse_choices("{'label': ['A', 'B'], 'text': ['bus', 'taxi']}") == ["bus", "taxi"]
    assert parse_choices("None") is None and parse_choices(None) is None and parse_choices("[") is None


def test_renderings_are_deterministic_and_change_the_prompt():
    prompts = ["If a bum wanted to ride for free, where might he go?", "Write a function to add two numbers."]
    choices = ["{'label': ['A', 'B'], 'text': ['bus depot', 'taxi']}", "['assert add(1, 2) == 3']"]
    for name in RENDERINGS:
        once, twice = render(name, prompts, choices), render(name, prompts, choices)
        assert once == twice, name
        if name != "original":
            assert all(a != b for a, b in zip(once, prompts, strict=True)), name
    inline = render("choices_inline", prompts, choices)
    assert inline[0].endswith("Options:\nA. bus depot\nB. taxi")
    assert "Your code should pass these tests:\nassert add(1, 2) == 3" in inline[1]
    assert render("choices_inline", prompts) == prompts  # nothing to inline: unchanged
    with pytest.raises(KeyError):
        render("shouting", prompts)


def test_render_table_keeps_outcomes_and_reads_llmrouter_choices(small_table):
    choices = llmrouter_choices(small_table)
    mcq = small_table["source_task"].isin(["commonsense_qa", "openbook_qa", "arc_challenge"])
    assert choices[small_table.loc[mcq, "prompt_id"].unique()].notna().all()
    out = render_table(small_table, "choices_inline", choices)
    cols = ["prompt_id", "model", "score", "cost_usd", "source_task"]
    pd.testing.assert_frame_equal(out[cols], small_table[cols])
    changed = out["prompt"] != small_table["prompt"]
    assert changed[mcq].all() and out.loc[mcq, "prompt"].str.contains("Options:\nA. ").all()


# ---- Hydra group and the harness ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "leave_one_family_out", "in_distribution", "format"])
def test_shift_group_composes(mode):
    cfg = _cfg([f"shift={mode}"])
    assert cfg.shift.name == mode
    assert _cfg([]).shift.name == "none"  # default: today's evaluation
    if mode == "format":
        assert set(cfg.shift.renderings) <= set(RENDERINGS) and cfg.shift.train_rendering in RENDERINGS
    if mode != "none":
        assert cfg.shift.heads.mlp.name == "mlp"
        heads = sh.shift_heads(cfg)
        assert list(heads) == ["taskmix", "knn", "mlp"]  # evaluate's head, the kNN baseline, the MLP


SMALL = [
    "data.max_prompts=300",
    "encoder=static",
    "task_head.params.layers=[]",
    "seeds=[0]",
    "shift.n_boot=100",
    "compare_heads.knn.params.k=10",
    "policies.utility.sweep.num=6",
]


def _check_rows(g: dict, heads: list[str]) -> None:
    p = g["pooled"]
    for h in heads:
        row = p["heads"][h]
        assert row["ci_lo"] <= row["delta"] <= row["ci_hi"]
        assert 0 <= row["quality"] <= 1
        a = p["utility_aiq"][h]
        assert a["ci_lo"] <= a["delta"] + 1e-12 and a["delta"] <= a["ci_hi"] + 1e-12
        assert g["worst_family"][h]["family"] in g["families"]
        assert set(g["targets_met"][h]) == {"pooled_ci_lo", "worst_family", "aiq_vs_zero"}


def test_evaluate_with_lofo_writes_per_family_and_pooled_rows(tmp_path, shared_data, embedding_cache):
    from experiments.evaluate import log_shift
    from router_ml.evaluation.harness import evaluate

    mlp = ["+shift.heads.mlp.params.epochs=5", "+shift.heads.mlp.params.n_members=2"]  # a small MLP
    cfg = _cfg(["shift=leave_one_family_out", "shift.families=[gsm8k,mbpp]", *mlp, *SMALL])
    summary = evaluate(cfg, run_dir=tmp_path)
    on_disk = json.loads((tmp_path / "shift.json").read_text())
    g = on_disk["renderings"]["original"]
    assert set(g["families"]) == {"gsm8k", "mbpp"} and on_disk["folds"] == ["gsm8k", "mbpp"]
    assert g["pooled"]["n"] == sum(f["n"] for f in g["families"].values())
    _check_rows(g, ["taskmix", "knn", "mlp"])
    for fam in g["families"].values():  # each family's best single was chosen on the others
        assert len(fam["best_single_models"]) == 1
    assert "| taskmix |" in (tmp_path / "shift.md").read_text()
    prompts = pd.read_parquet(tmp_path / "shift_prompts.parquet")
    assert len(prompts) == g["pooled"]["n"] and prompts["prompt_id"].is_unique
    assert np.isfinite(log_shift(summary, str(tmp_path)))


def test_evaluate_with_format_shift_reports_every_rendering(tmp_path, shared_data, embedding_cache):
    from router_ml.evaluation.harness import evaluate

    cfg = _cfg(
        ["shift=format", "shift.folds=2", "shift.renderings=[original,lowercase]", "~shift.heads", *SMALL]
    )
    summary = evaluate(cfg, run_dir=tmp_path)
    assert list(summary["renderings"]) == ["original", "lowercase"]
    orig, low = (summary["renderings"][r] for r in ("original", "lowercase"))
    assert orig["pooled"]["n"] == low["pooled"]["n"] == summary["n_prompts"]  # each item once per rendering
    assert orig["pooled"]["best_single"] == low["pooled"]["best_single"]  # outcomes kept from the item
    _check_rows(low, ["taskmix", "knn"])


def test_guarded_heads_report_novelty_and_interval_coverage(small_table):
    ctx = _context(small_table, {"knn": {"name": "knn", "task_key": "task", "params": {"k": 5}}})
    ctx.guard = {"heads": ["knn"], "params": {"folds": 3, "coverage": 0.8}}
    ((_, train, test),) = sh.lofo_folds(small_table, families=["gsm8k"])
    (fs,) = sh.fold_scores(ctx, "gsm8k", train, {"original": test})
    assert set(fs.routed) == {"knn", "knn+guard", sh.PRIOR} and set(fs.novelty) == {"knn+guard"}
    assert fs.util_score["knn+guard"].shape == fs.util_score["knn"].shape == fs.util_score[sh.PRIOR].shape
    # the reference row: no head, the training part's means; at the top, the best single model
    np.testing.assert_array_equal(fs.routed[sh.PRIOR], fs.Y[:, fs.best])
    nov = fs.novelty["knn+guard"]
    assert nov.shape == (len(fs.Y),) and ((nov >= 0) & (nov <= 1)).all()
    assert len(fs.novelty_id["knn+guard"]) > 0  # the fold's in-distribution validation prompts
    w0, w1, _ = fs.guard_fit["knn+guard"]["shrink"]
    assert 0.0 <= w0 <= w1 <= 1.0
    g = sh.guard_summary([fs], ctx.models, 0.8)["knn+guard"]
    assert 0.0 <= g["novelty_auroc"] <= 1.0 and set(g["coverage"]) == set(ctx.models)
    assert all(0.0 <= c <= 1.0 for c in g["coverage"].values())
    gaps = [100 * abs(c - 0.8) for c in g["coverage"].values()]
    assert g["coverage_mean_gap_pts"] == pytest.approx(np.mean(gaps))
    assert g["coverage_worst_gap_pts"] == pytest.approx(max(gaps))


def test_guard_modes_give_one_row_each_and_the_deferral_model_is_scored(small_table):
    ctx = _context(small_table, {"knn": {"name": "knn", "task_key": "task", "params": {"k": 5}}})
    ctx.guard = {"heads": ["knn"], "modes": ["shrink", "trust"], "params": {"folds": 3, "coverage": 0.8}}
    ((_, train, test),) = sh.lofo_folds(small_table, families=["gsm8k"])
    (fs,) = sh.fold_scores(ctx, "gsm8k", train, {"original": test})
    assert set(fs.routed) == {"knn", "knn+shrink", "knn+trust", sh.PRIOR}
    assert set(fs.trust) == {"knn+trust"} and fs.trust["knn+trust"].shape == (len(fs.Y),)
    # the trust row routes to the head's own pick or to the best single model, never a third model
    r = fs.routed["knn+trust"]
    assert np.all((np.abs(r - fs.routed["knn"]) < 1e-12) | (np.abs(r - fs.Y[:, fs.best]) < 1e-12))
    g = sh.guard_summary([fs], ctx.models, 0.8)
    assert "trust_auroc_head_worse" in g["knn+trust"] and "trust_auroc_head_worse" not in g["knn+shrink"]
    assert 0.0 <= g["knn+trust"]["trust_moved_share"] <= 1.0
