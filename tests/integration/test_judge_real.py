"""The LLM judge against a real llama.cpp server serving SmolLM2-135M (issue 14's scorers).

SmolLM2-135M is no judge: asked for MT-Bench's text verdicts it echoes the answers (no verdict:
an error is recorded); constrained to a JSON verdict by the server (``verdict_format="json_object"``,
llama.cpp's grammar) it gives readable but arbitrary ones. What is tested is the plumbing through
the real backend client: the calls are made (both orders for pairwise), priced, their replies
kept, verdicts parsed where there is one and an error recorded where there is not, a dead backend
recorded as an error naming it, and failed scores kept out of the cache.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from router_ml.backends.catalog import Catalog
from router_ml.backends.client import BackendClient
from router_ml.backends.local.launch_spec import free_port
from router_ml.scoring.base import Example
from router_ml.scoring.cache import ScoreCache, score_examples
from router_ml.scoring.judge import PairwiseJudge, RubricJudge

pytestmark = pytest.mark.integration

EXAMPLES = [
    Example("What is 2 + 3?", "2 + 3 = 5.", reference="5"),
    Example(
        "Name the capital of France.", "The capital of France is Paris.", reference="Paris is the capital."
    ),
    Example(
        "Write a haiku about rain.",
        "Rain on the tin roof / a slow drum for sleepy cats / puddles hold the sky",
    ),
]


def _catalog(base_url: str) -> Catalog:
    common = {"kind": "vllm", "served_model_id": "smollm2-135m", "max_retries": 0, "connect_timeout_s": 1,
              "first_token_timeout_s": 60, "timeout_s": 120,
              "prices": {"gpu_hour_usd": 0.5, "decode_tokens_per_s": 155}}  # fmt: skip
    return Catalog.from_entries(
        [
            {"name": "smol-judge", "base_url": base_url, **common},
            {"name": "dead-judge", "base_url": f"http://127.0.0.1:{free_port()}/v1", **common},
        ]
    )


def _run(judge_cls, catalog: Catalog, backend: str, examples: list[Example], verdict_format: str = "text"):
    async def go():
        async with BackendClient(catalog) as client:
            judge = judge_cls(client, backend, max_tokens=96, concurrency=2, verdict_format=verdict_format)
            return await judge.ascore(examples)

    return asyncio.run(go())


@pytest.mark.parametrize("verdict_format", ["text", "json_object"])
def test_rubric_judge_on_a_real_server(llamacpp_server, verdict_format):
    scores = _run(RubricJudge, _catalog(llamacpp_server.base_url), "smol-judge", EXAMPLES, verdict_format)
    assert len(scores) == len(EXAMPLES)
    for s in scores:
        assert s.scorer == "judge_rubric" and s.version == RubricJudge.version
        assert s.cost_usd > 0  # the judge's own call was priced
        reply = json.loads(s.detail)["reply"]
        assert isinstance(reply, str) and reply.strip()
        if s.error is None:
            assert 0.0 <= s.value <= 1.0 and 1 <= float(s.extracted) <= 10
        else:
            assert s.value is None and "'smol-judge'" in s.error and "no 1-10 rating" in s.error
    if verdict_format == "json_object":  # the server's grammar makes every reply a readable verdict
        assert all(s.ok for s in scores)
    print(f"\nSmolLM2 rubric verdicts ({verdict_format}):", [(s.value, s.error) for s in scores])


@pytest.mark.parametrize("verdict_format", ["text", "json_object"])
def test_pairwise_judge_asks_both_orders_on_a_real_server(llamacpp_server, verdict_format):
    scores = _run(
        PairwiseJudge, _catalog(llamacpp_server.base_url), "smol-judge", EXAMPLES[:2], verdict_format
    )
    for s in scores:
        detail = json.loads(s.detail)
        orders = detail["orders"]
        assert [o["answer_position"] for o in orders] == ["A", "B"]
        assert all(isinstance(o["reply"], str) for o in orders)
        assert s.cost_usd > 0
        if s.error is None:
            assert s.value in (0.0, 0.25, 0.5, 0.75, 1.0)
            verdicts = [o["verdict"] for o in orders]
            assert s.extracted == ",".join(verdicts)
            # the answer is A in the first order and B in the second: the same preferred text agrees
            points = [0.5 if v == "C" else float(v == pos) for v, pos in zip(verdicts, "AB", strict=True)]
            assert s.value == sum(points) / 2 and detail["consistent"] == (points[0] == points[1])
        else:
            assert s.value is None and "no [[A]]/[[B]]/[[C]] verdict" in s.error
    if verdict_format == "json_object":
        assert all(s.ok for s in scores)
    print(
        f"\nSmolLM2 pairwise verdicts ({verdict_format}):", [(s.value, s.extracted, s.error) for s in scores]
    )


def test_dead_judge_backend_is_recorded_and_not_cached(llamacpp_server, tmp_path):
    catalog = _catalog(llamacpp_server.base_url)

    async def go():
        async with BackendClient(catalog) as client:
            judge = RubricJudge(client, "dead-judge", max_tokens=16)
            return await judge.ascore(EXAMPLES[:2]), judge

    scores, judge = asyncio.run(go())
    for s in scores:
        assert s.value is None and s.cost_usd == 0.0
        assert "judge backend 'dead-judge'" in s.error
    cache = ScoreCache(tmp_path / "scores.sqlite")
    cache.put(judge, [e.digest() for e in EXAMPLES[:2]], scores)
    assert len(cache) == 0  # failed verdicts are retried on the next run, never served from the cache
    assert score_examples(RubricJudge(None, "dead-judge"), [], cache=cache, progress=False) == []


def test_judge_through_the_cli_and_the_cache_on_a_real_server(llamacpp_server, tmp_path):
    """``router-ml score --scorer judge_rubric``: a catalog file, the blocking path batch after batch
    on one client, the scores written with scorer, version and cost; a rerun is served by the cache."""
    import pandas as pd
    import yaml

    from router_ml.cli import main

    catalog = tmp_path / "judge.yaml"
    catalog.write_text(yaml.safe_dump({"backends": [
        {"name": "smol-judge", "kind": "vllm", "base_url": llamacpp_server.base_url, "served_model_id": "smollm2-135m",
         "first_token_timeout_s": 60, "timeout_s": 120, "prices": {"gpu_hour_usd": 0.5, "decode_tokens_per_s": 155}},
    ]}))  # fmt: skip
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in EXAMPLES))
    args = ["score", str(answers), "--scorer", "judge_rubric", "--backends", str(catalog), "--judge", "smol-judge",
            "--verdict-format", "json_object", "--cache", str(tmp_path / "scores.sqlite"), "--out", str(tmp_path / "s.parquet")]  # fmt: skip
    assert main(args) == 0
    out = pd.read_parquet(tmp_path / "s.parquet")
    assert out["score"].between(0, 1).all() and (out["scorer"] == "judge_rubric").all()
    assert (out["scorer_version"] == RubricJudge.version).all() and (out["score_cost_usd"] > 0).all()
    assert len(ScoreCache(tmp_path / "scores.sqlite")) == len(EXAMPLES)
    assert main([*args[:-1], str(tmp_path / "again.parquet")]) == 0
    again = pd.read_parquet(tmp_path / "again.parquet")
    assert again["score"].tolist() == out["score"].tolist()
    assert (
        main(
            ["score", str(answers), "--scorer", "judge_rubric", "--backends", str(catalog), "--judge", "gpt"]
        )
        == 2
    )

    async def one_client_many_batches():
        return BackendClient(Catalog.load(catalog))

    client = asyncio.run(one_client_many_batches())
    judge = RubricJudge(client, "smol-judge", max_tokens=24, verdict_format="json_object")
    scores = score_examples(judge, EXAMPLES, batch_size=1, progress=False)  # three batches, one loop
    judge.run(client.aclose())
    assert all(s.ok for s in scores)


def test_judges_on_vllm_with_openai_structured_outputs(vllm_server):
    """vLLM takes OpenAI's ``response_format: json_schema``: both judges get readable verdicts."""
    catalog = _catalog(vllm_server.base_url)
    rubric = _run(RubricJudge, catalog, "smol-judge", EXAMPLES, "json_schema")
    pairwise = _run(PairwiseJudge, catalog, "smol-judge", EXAMPLES[:2], "json_schema")
    for s in [*rubric, *pairwise]:
        assert s.ok and 0.0 <= s.value <= 1.0 and s.cost_usd > 0, s
    print(
        "\nSmolLM2 on vLLM (json_schema):", [(s.scorer, s.value, s.extracted) for s in [*rubric, *pairwise]]
    )
