"""Your own pool, end to end, on REAL local servers (issue 14): collect answers from vLLM and
llama.cpp serving SmolLM2-135M, score them, train a router on the store, add a third model from a
probe set, and serve the new checkpoint through the proxy to the real ``openai`` client.

The README's "Train a router for your own pool" walks a user through the same steps.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from router_ml.backends.catalog import Catalog
from router_ml.cli import main
from router_ml.collect.pacing import BackendLimit
from router_ml.collect.prompts import Prompt, prompt_id_for
from router_ml.collect.runner import RequestSettings, collect
from router_ml.data.adapters.collected import load_collected
from router_ml.router import LearnedRouter
from router_ml.serving.engine import RoutingEngine
from router_ml.serving.engine_support import load_policy_configs
from router_ml.serving.proxy import ProxySettings, create_app

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[2]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Greece": "Athens", "Russia": "Moscow", "Canada": "Ottawa", "Peru": "Lima",
            "Kenya": "Nairobi", "Norway": "Oslo"}  # fmt: skip
SUMS = [(2, 3), (7, 5), (10, 4), (6, 6), (9, 8), (12, 1), (3, 14), (20, 5), (8, 7), (11, 11), (4, 9), (15, 6)]
NEW = "smollm2-llamacpp-b"  # the model added from probes: the llama.cpp server under a second name


def _prompts() -> list[Prompt]:
    out = []
    for a, b in SUMS:
        text = f"What is {a} + {b}? Answer with just the number."
        out.append(Prompt(prompt_id_for(text), text, reference=str(a + b), task="gsm8k"))
    for country, capital in CAPITALS.items():
        text = f"What is the capital of {country}? Answer in one word."
        out.append(Prompt(prompt_id_for(text), text, reference=capital, task="qa"))
    return out


def _catalog(vllm_server, llamacpp_server) -> Catalog:
    common = {"kind": "vllm", "served_model_id": "smollm2-135m", "first_token_timeout_s": 60, "timeout_s": 180,
              "tokenizer": f"hf:{vllm_server.model}", "context_window": 2048, "max_tokens": 512}  # fmt: skip
    return Catalog.from_entries(
        {"backends": [
            {"name": "smollm2-vllm", "base_url": vllm_server.base_url,
             "prices": {"input_per_mtok": 0.2, "output_per_mtok": 0.6}, **common},
            {"name": "smollm2-llamacpp", "base_url": llamacpp_server.base_url,
             "prices": {"input_per_mtok": 0.05, "output_per_mtok": 0.1}, **common},
            {"name": NEW, "base_url": llamacpp_server.base_url,
             "prices": {"input_per_mtok": 0.01, "output_per_mtok": 0.02}, **common},
        ]}
    )  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collect_score_train_add_a_model_and_serve(
    vllm_server, llamacpp_server, tmp_path, embedding_cache, capsys
):
    catalog, prompts = _catalog(vllm_server, llamacpp_server), _prompts()
    limits = {"smollm2-vllm": BackendLimit(4), "smollm2-llamacpp": BackendLimit(1), NEW: BackendLimit(1)}
    request = RequestSettings(max_tokens=8)

    # 1. collect the pool's answers, 2. score them in the store
    store = tmp_path / "answers.sqlite"
    summary = collect(prompts, catalog, store, models=["smollm2-vllm", "smollm2-llamacpp"], limits=limits,
                      request=request, spend_cap_usd=0.05, progress=False)  # fmt: skip
    assert summary["answers"] == 2 * len(prompts) and summary["errors"] == 0, summary
    assert main(["score", "--store", str(store), "--cache", ""]) == 0
    capsys.readouterr()
    table = load_collected(store)
    assert len(table) == 2 * len(prompts) and table["score"].between(0, 1).all()
    assert set(table["scorer"]) == {"math", "qa"}

    # 3. train a router on the store (the main job, composed with data=collected)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "data=collected", f"data.path={store}", "predictor=linear",
         "calibrator=temperature", "calibrator.folds=3", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = run / "checkpoint"
    assert LearnedRouter.from_pretrained(ckpt).models == ["smollm2-llamacpp", "smollm2-vllm"]

    # 4. add a third model from a probe set: choose the probes, collect and score its answers on them
    probes_file = tmp_path / "probes.jsonl"
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in prompts))
    assert main(["probe-set", "--ckpt", str(ckpt), "--k", "8", "--from", str(prompts_file),
                 "--out", str(probes_file)]) == 0  # fmt: skip
    capsys.readouterr()
    chosen = {json.loads(line)["prompt"] for line in probes_file.read_text().splitlines()}
    assert len(chosen) == 8
    probe_store = tmp_path / "probes.sqlite"
    got = collect([p for p in prompts if p.prompt in chosen], catalog, probe_store, models=[NEW],
                  limits=limits, request=request, spend_cap_usd=0.05, progress=False)  # fmt: skip
    assert got["answers"] == 8, got
    assert main(["score", "--store", str(probe_store), "--cache", ""]) == 0
    scores = tmp_path / "probe_scores.parquet"
    load_collected(probe_store).to_parquet(scores)
    new_ckpt = tmp_path / "with-new"
    assert main(["add-model", "--ckpt", str(ckpt), "--probes", str(scores), "--model", NEW,
                 "--out", str(new_ckpt), "--input-price", "0.01", "--output-price", "0.02"]) == 0  # fmt: skip
    capsys.readouterr()
    router = LearnedRouter.from_pretrained(new_ckpt)
    assert router.models[-1] == NEW and len(router.models) == 3
    assert router.policy_fit is not None and router.policy_fit.models == router.models  # the proxy fits on it
    old = LearnedRouter.from_pretrained(ckpt).predict_quality([p.prompt for p in prompts])
    new = router.predict_quality([p.prompt for p in prompts])
    assert (new[old.columns].to_numpy() == old.to_numpy()).all()  # the old columns are untouched

    # 5. serve the new checkpoint: routed and pass-through, through the real openai client
    engine = RoutingEngine(router, catalog, load_policy_configs())
    assert engine.served == router.models
    port = _port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, ProxySettings()), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        # the cheapest model under a huge lambda is the one just added
        cheap = client.chat.completions.with_raw_response.create(
            model="router:utility:1e9", max_tokens=8,
            messages=[{"role": "user", "content": "What is the capital of Chile? Answer in one word."}],
        )  # fmt: skip
        assert cheap.parse().model == NEW, dict(cheap.headers)
        assert cheap.parse().choices[0].message.content
        routed = client.chat.completions.create(
            model="router", max_tokens=8, stream=True,
            messages=[{"role": "user", "content": "What is 5 + 6? Answer with just the number."}],
        )  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in routed if c.choices).strip()
        direct = client.chat.completions.create(
            model=NEW, max_tokens=8, messages=[{"role": "user", "content": "Say hello."}]
        )
        assert direct.model == NEW and direct.choices[0].message.content
    finally:
        server.should_exit = True
        thread.join(timeout=10)
