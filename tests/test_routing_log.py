"""The routing log: credentials never written, prompt modes, torn lines, rotation, propensities,
and the round trip from logged requests (real MT-Bench prompts) to a valid routing table."""

from __future__ import annotations

import hashlib
import json
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from router_ml.data.labelled import load_labelled
from router_ml.data.schema import to_wide, validate_table
from router_ml.decision.base import Estimates, RoutingDecision
from router_ml.decision.policies import RandomPolicy, UtilityPolicy, ZeroRouterPolicy
from router_ml.serving.routing_log import (
    FIELDS,
    REDACTED,
    RoutingLog,
    RoutingLogError,
    policy_propensity,
    read_routing_log,
    scrub,
    to_routing_table,
)

MODELS = ["small", "large"]


def _decision(task: str = "qa", model: str = "large", policy: str = "random") -> RoutingDecision:
    return RoutingDecision(
        model=model,
        task=task,
        task_confidence=0.8,
        predicted_quality={"small": 0.4, "large": 0.7},
        reason="test",
        fallbacks=[m for m in MODELS if m != model],
        policy=policy,
        expected_cost_usd=0.002,
    )


def test_keys_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    openai_key = "sk-proj-Abc123def456ghi789jkl012mno345"
    custom = "zq-custom-credential-7781"  # matches no pattern: caught as an env var's value
    given = "catalog-secret-0042xyz"  # matches no pattern: caught because it was handed over
    monkeypatch.setenv("OPENAI_API_KEY", openai_key)
    monkeypatch.setenv("MY_SERVICE_TOKEN", custom)
    path = tmp_path / "routing.jsonl"
    with RoutingLog(path, log_prompts="full", secrets=[given]) as log:
        rec = log.log(
            "req-1",
            f"Why does my call fail? I pass api_key={openai_key} and then {custom}",
            _decision(),
            outcome="AuthenticationError",
            error=f"401 Incorrect API key provided: {openai_key}. Header was Bearer {openai_key}",
            extra={
                "headers": {"Authorization": f"Bearer {given}", "X-Api-Key": "short", "Accept": "json"},
                "aws": "AKIAIOSFODNN7EXAMPLE",
                "hf": "hf_" + "a1" * 17,
                "jwt": "eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0NTY3.SflKxwRJSMeKKF2QT4fw",
                "note": f"key {given} in free text",
            },
        )
    raw = path.read_text()
    for secret in (openai_key, custom, given, "AKIAIOSFODNN7EXAMPLE", "a1" * 17, "SflKxwRJSMeKKF2QT4fw"):
        assert secret not in raw, f"{secret!r} reached the log"
    assert json.loads(raw) == rec
    assert rec["extra"]["headers"] == {"Authorization": REDACTED, "X-Api-Key": REDACTED, "Accept": "json"}
    assert rec["prompt"].startswith("Why does my call fail? I pass api_key=")  # the prose stays
    assert rec["error"].startswith("401 Incorrect API key provided: ") and REDACTED in rec["error"]
    assert "Authorization" not in raw.replace('"Authorization":"[REDACTED]"', "")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "prompts are private: the file is 0600"
    # ordinary prose that merely mentions the words is kept
    prose = "basic principles of token sequences; the secret of good bread"
    assert scrub(prose) == prose


def test_prompt_modes_and_record_fields(tmp_path: Path) -> None:
    prompt = "Summarise the following email in two sentences."
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    seen = {}
    for mode in ("full", "hash", "none"):
        with RoutingLog(tmp_path / f"{mode}.jsonl", log_prompts=mode) as log:
            log.log(
                "r",
                prompt,
                _decision("summarize", "small"),
                knob="p_strong",
                knob_value=0.3,
                propensity=0.7,
                served_model="large",
                fallbacks_tried=["small"],
                latency_s=1.25,
                ttft_s=float("nan"),  # unknown: written as null, not NaN
                input_tokens=np.int64(12),
                output_tokens=30,
                cost_usd=0.0021,
                stream=True,
                ts=1000.0,
            )
        df = read_routing_log(tmp_path / f"{mode}.jsonl")
        assert list(df.columns) == FIELDS
        seen[mode] = df.iloc[0]
    assert seen["full"]["prompt"] == prompt and seen["full"]["prompt_sha256"] == digest
    assert pd.isna(seen["hash"]["prompt"]) and seen["hash"]["prompt_sha256"] == digest
    assert pd.isna(seen["none"]["prompt"]) and pd.isna(seen["none"]["prompt_sha256"])
    row = seen["full"]
    assert (row["model"], row["served_model"], row["fallbacks_tried"]) == ("small", "large", ["small"])
    assert (row["policy"], row["knob"], row["knob_value"], row["propensity"]) == (
        "random",
        "p_strong",
        0.3,
        0.7,
    )
    assert row["predicted_quality"] == {"small": 0.4, "large": 0.7} and row["task"] == "summarize"
    assert np.isnan(row["ttft_s"]) and row["input_tokens"] == 12.0 and row["ts"] == 1000.0
    with pytest.raises(RoutingLogError, match="log_prompts"):
        RoutingLog(tmp_path / "x.jsonl", log_prompts="some")
    with RoutingLog(tmp_path / "y.jsonl") as log:
        with pytest.raises(RoutingLogError, match="model"):
            log.log("r", "p")  # neither a decision nor a model
        with pytest.raises(RoutingLogError, match="propensity"):
            log.log("r", "p", model="small", propensity=1.5)
        rec = log.log("direct", "p", model="small")  # a backend named directly: no decision
    assert rec["policy"] is None and rec["propensity"] == 1.0 and rec["served_model"] == "small"
    with pytest.raises(RoutingLogError, match="closed"):
        log.log("late", "p", model="small")


def test_torn_last_line_skipped_and_sealed(tmp_path: Path) -> None:
    path = tmp_path / "routing.jsonl"
    with RoutingLog(path) as log:
        for i in range(3):
            log.log(f"r{i}", f"prompt {i}", _decision())
    with open(path, "ab") as f:  # a crash in the middle of the fourth write
        f.write(b'{"v":1,"ts":17.5,"request_id":"r3","prom')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn last line is expected: no warning
        assert read_routing_log(path)["request_id"].tolist() == ["r0", "r1", "r2"]
    with RoutingLog(path) as log:  # the restarted writer seals the torn line first
        log.log("r4", "prompt 4", _decision())
    with pytest.warns(UserWarning, match=r"routing\.jsonl:4: unreadable"):
        df = read_routing_log(path)
    assert df["request_id"].tolist() == ["r0", "r1", "r2", "r4"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_routing_log(tmp_path / "nowhere.jsonl")


def test_rotation_by_size(tmp_path: Path) -> None:
    path = tmp_path / "routing.jsonl"
    with RoutingLog(path, max_bytes=2500, backups=2, fsync=True) as log:
        sizes = {len(json.dumps(log.log(f"r{i:02d}", "x" * 40, _decision()))) for i in range(40)}
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["routing.jsonl", "routing.jsonl.1", "routing.jsonl.2"], "older backups dropped"
    assert all((tmp_path / f).stat().st_size <= 2500 for f in files)
    assert max(sizes) < 2500
    df = read_routing_log(path)
    ids = [int(r[1:]) for r in df["request_id"]]
    assert ids == list(range(ids[0], 40)) and ids[0] > 0, "the newest records, oldest first, no gaps"
    current = read_routing_log(path, include_rotated=False)
    assert current["request_id"].iloc[-1] == "r39" and len(current) < len(df)
    with pytest.raises(RoutingLogError, match="max_bytes"):
        RoutingLog(tmp_path / "z.jsonl", max_bytes=0)


def _est(n: int, quality: list[float], cost: list[float]) -> Estimates:
    m = len(quality)
    return Estimates(
        models=[f"m{j}" for j in range(m)],
        quality=np.tile(quality, (n, 1)).astype("float64"),
        tasks=np.array(["qa"] * n, dtype=object),
        cost=np.tile(cost, (n, 1)).astype("float64"),
        ttft=np.full((n, m), 0.1),
        latency=np.full((n, m), 1.0),
        is_local=np.zeros(m, bool),
    )


def test_propensity_matches_the_policies_choice_frequencies() -> None:
    est = _est(6000, [0.3, 0.6, 0.9], [0.1, 0.5, 1.0])
    models = est.models
    for policy in (RandomPolicy(p_strong=0.3, seed=1), ZeroRouterPolicy(position=0.7, seed=2)):
        choice = policy.fit(est).choose(est)
        for j, model in enumerate(models):
            freq = float(np.mean(choice == j))
            p = policy_propensity(policy, model, models) if freq > 0 else 0.0
            assert abs(freq - p) < 0.03, (policy.name, model, freq, p)
    assert policy_propensity(RandomPolicy(uniform=True), "m1", models) == pytest.approx(1 / 3)
    assert policy_propensity(UtilityPolicy(), "m2", models) == 1.0


def test_round_trip_to_a_valid_routing_table(tmp_path: Path, shared_data: Path) -> None:
    prompts = load_labelled("mt_bench")  # real prompts with their task labels
    path = tmp_path / "routing.jsonl"
    scores, expected = {}, {}
    for mode in ("full", "hash"):
        with RoutingLog(path.with_suffix(f".{mode}"), log_prompts=mode) as log:
            for i, row in prompts.iterrows():
                served = MODELS[i % 2]
                for k in range(2 if i < 10 else 1):  # the first ten prompts were asked twice
                    rid = f"req-{i}-{k}"
                    outcome = "TimeoutError" if i % 7 == 3 else "ok"
                    log.log(
                        rid,
                        row["prompt"],
                        _decision(row["task"], served),
                        output_tokens=20 + k,
                        cost_usd=0.001 * (k + 1),
                        latency_s=0.5,
                        outcome=outcome,
                    )
                    scores[rid] = 0.25 * (k + 1) if i < 10 else float(i % 5) / 4
                    if outcome == "ok" and mode == "full":
                        expected.setdefault(row["prompt"], []).append(scores[rid])
    log_df = read_routing_log(path.with_suffix(".full"))
    table = to_routing_table(log_df, scores, source="proxy-log", known_models=MODELS)
    assert validate_table(table, known_models=MODELS).shape == table.shape
    assert len(table) == len(expected) == sum(1 for i in range(80) if i % 7 != 3)
    got = dict(zip(table["prompt"], table["score"], strict=True))
    assert got == {p: float(np.mean(s)) for p, s in expected.items()}, "repeated requests averaged"
    truth = prompts.set_index("prompt")
    assert (table["task"].to_numpy() == truth.loc[table["prompt"], "task"].to_numpy()).all()
    first = table[table["prompt"] == prompts["prompt"].iloc[0]].iloc[0]
    assert (
        first["model"] == "small"
        and first["output_tokens"] == 20.5
        and first["cost_usd"] == pytest.approx(0.0015)
    )
    assert set(table["source"]) == {"proxy-log"} and table["prompt_id"].str.startswith("log-").all()
    assert to_wide(table, MODELS)[1].shape == (len(table), 2)
    # a hash-only log needs the texts from elsewhere (sha256 -> text)
    hashed = read_routing_log(path.with_suffix(".hash"))
    assert hashed["prompt"].isna().all()
    texts = {hashlib.sha256(p.encode()).hexdigest(): p for p in prompts["prompt"]}
    pd.testing.assert_frame_equal(to_routing_table(hashed, scores, prompts=texts, source="proxy-log"), table)
    with (
        pytest.warns(UserWarning, match="skipped"),
        pytest.raises(RoutingLogError, match="no logged request"),
    ):
        to_routing_table(hashed, scores)
    frame = pd.DataFrame({"request_id": list(scores), "score": list(scores.values())})
    assert to_routing_table(log_df, frame, source="proxy-log").equals(table)
