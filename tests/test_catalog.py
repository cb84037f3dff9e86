"""The backend catalog: the shipped YAML files load, and invalid entries fail naming file, backend, field."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_ml.backends.catalog import Catalog, CatalogError, looks_like_secret
from router_ml.decision.spec import UnknownModelError

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "backends"


def _entry(**kw):
    base = {
        "name": "m1",
        "kind": "api",
        "base_url": "https://api.example.com/v1",
        "api_key_env": "EXAMPLE_API_KEY",
        "prices": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
    }
    return base | kw


def _write(path: Path, entries: list[dict]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"backends": entries}))
    return path


def test_shipped_catalogs_load_and_build_a_pool(monkeypatch):
    monkeypatch.setenv("ROUTER_ML_MODELS_DIR", "/opt/models")
    cat = Catalog.load(CONF)
    assert cat.names == ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4", "smollm2-vllm", "smollm2-llamacpp"]
    pool = cat.pool()
    assert pool.names == cat.names
    assert pool.is_local.tolist() == [False, False, False, True, True]
    gpt = cat.get("gpt-4o-mini")
    assert (gpt.kind, gpt.api_key_env, gpt.served_model_id) == ("api", "OPENAI_API_KEY", "gpt-4o-mini")
    assert pool.get("gpt-4o").prices() == (2.5, 10.0)
    claude = cat.get("claude-sonnet-4")
    assert claude.chat_url == "https://api.anthropic.com/v1/chat/completions"  # trailing slash dropped
    vllm, llama = cat.get("smollm2-vllm"), cat.get("smollm2-llamacpp")
    assert vllm.launch["model"] == "/opt/models/smollm2-135m"  # ${oc.env:...} resolved at load
    assert llama.launch["engine"] == "llamacpp" and llama.launch["model"].endswith(".gguf")
    assert vllm.spec.ttft_s < llama.spec.ttft_s and vllm.spec.tokens_per_s < llama.spec.tokens_per_s
    assert vllm.root_url == "http://127.0.0.1:8101"
    assert vllm.spec.kind == "local" and pool.get("smollm2-vllm").prices()[1] > 0  # priced by the hour
    assert "smollm2-vllm" in cat and "nope" not in cat
    with pytest.raises(UnknownModelError, match="gpt-4o-mini"):
        cat.get("nope")


def test_api_key_is_read_from_the_environment_at_call_time(monkeypatch):
    backend = Catalog.from_entries([_entry()]).get("m1")
    monkeypatch.delenv("EXAMPLE_API_KEY", raising=False)
    assert backend.api_key() is None
    monkeypatch.setenv("EXAMPLE_API_KEY", "sk-live-123")
    assert backend.api_key() == "sk-live-123"
    assert "sk-live" not in repr(backend)


@pytest.mark.parametrize(
    ("entry", "field", "extra"),
    [
        (_entry(temperature=0.2), "temperature", "unknown field"),
        (_entry(base_url="api.example.com/v1"), "base_url", "http(s) URL"),
        (_entry(base_url="ftp://host/v1"), "base_url", "http(s) URL"),
        (_entry(kind="openai"), "kind", "'vllm' or 'api'"),
        (_entry(api_key_env="OPENAI-KEY"), "api_key_env", "environment variable name"),
        (_entry(first_token_timeout_s=0), "first_token_timeout_s", "greater than 0"),
        (_entry(first_token_timeout_s=200, timeout_s=100), "first_token_timeout_s", "timeout_s"),
        (_entry(max_retries=-1), "max_retries", "greater than or equal to 0"),
        (_entry(prices={"input_per_mtok": 1.0, "output_per_mtok": 2.0, "per_call": 1}), "prices", "per_call"),
        (_entry(prices={}), "input_per_mtok", "no price"),
        (_entry(latency={"ttft_s": -1}), "latency.ttft_s' = -1", "greater than 0"),
        (
            _entry(prices={"input_per_mtok": -1.0, "output_per_mtok": 2.0}),
            "prices.input_per_mtok",
            "greater than",
        ),
        (
            _entry(prices={"input_per_mtok": "cheap", "output_per_mtok": 2.0}),
            "prices.input_per_mtok",
            "number",
        ),
        (_entry(timeout_s=True), "timeout_s", "number"),
        (
            _entry(
                name="m1",
                launch={"port": 8101},
                kind="vllm",
                base_url="http://127.0.0.1:8101/v1",
                prices={"gpu_hour_usd": 0.5, "decode_tokens_per_s": 9},
            ),
            "field 'launch.model'",
            "missing",
        ),
        (
            _entry(
                kind="vllm",
                base_url="http://127.0.0.1:8101/v1",
                launch={"model": "m", "port": 8101, "gpus": 2},
                prices={"gpu_hour_usd": 0.5, "decode_tokens_per_s": 9},
            ),
            "unknown field 'launch.gpus'",
            "'n_ctx'",
        ),
        (_entry(launch={"engine": "vllm"}), "launch", "only allowed for kind 'vllm'"),
        (
            _entry(kind="vllm", base_url="http://127.0.0.1:8101/v1", launch={"model": "m", "port": 8102}),
            "launch.port' = 8102",
            "differs from the base_url port 8101",
        ),
        (_entry(kind="vllm", prices={"gpu_hour_usd": 0.5}), "decode_tokens_per_s", "derive its price"),
    ],
)
def test_invalid_entries_name_file_backend_and_field(tmp_path, entry, field, extra):
    path = _write(tmp_path / "bad.yaml", [entry])
    with pytest.raises(CatalogError) as info:
        Catalog.load(path)
    msg = str(info.value)
    assert str(path) in msg and "'m1'" in msg and field in msg and extra in msg, msg


@pytest.mark.parametrize(
    "secret", ["sk-proj-abcdefghijklmnop1234", "sk-ant-api03-xyz", "gsk_abc123", "AIzaSyA1b2C3"]
)
def test_a_literal_key_in_api_key_env_is_refused_without_echoing_it(tmp_path, secret):
    path = _write(tmp_path / "keys.yaml", [_entry(api_key_env=secret)])
    with pytest.raises(CatalogError, match="api_key_env") as info:
        Catalog.load(path)
    assert secret not in str(info.value) and "literal API key" in str(info.value)


def test_secret_heuristic_leaves_env_var_names_alone():
    assert not looks_like_secret("OPENAI_API_KEY")
    assert not looks_like_secret("MY_COMPANY_GATEWAY_API_KEY_2")
    assert looks_like_secret("a8f3k2m9q7x1z5c4v6b0n2m8l4k")


def test_duplicate_names_within_and_across_files(tmp_path):
    one = _write(tmp_path / "one.yaml", [_entry(), _entry()])
    with pytest.raises(CatalogError, match=r"one\.yaml.*'m1'.*'name'.*duplicate"):
        Catalog.load(one)
    folder = tmp_path / "dir"
    folder.mkdir()
    _write(folder / "a.yaml", [_entry()])
    _write(folder / "b.yaml", [_entry(name="m2"), _entry()])
    with pytest.raises(CatalogError, match=r"b\.yaml: backend 'm1': field 'name' duplicates .*a\.yaml"):
        Catalog.load(folder)


def test_file_level_errors(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        Catalog.load(tmp_path / "missing.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CatalogError, match=r"no \*\.yaml"):
        Catalog.load(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("backends: [\n")
    with pytest.raises(CatalogError, match=r"broken\.yaml"):
        Catalog.load(broken)
    top = tmp_path / "top.yaml"
    top.write_text("models: []\n")
    with pytest.raises(CatalogError, match=r"top\.yaml: unknown top-level key\(s\) \['models'\]"):
        Catalog.load(top)
    unnamed = _write(tmp_path / "unnamed.yaml", [{"kind": "api"}])
    with pytest.raises(CatalogError, match=r"backend #0: field 'name'"):
        Catalog.load(unnamed)


def test_defaults_served_model_id_and_timeouts():
    backend = Catalog.from_entries([_entry(api_key_env=None)]).get("m1")
    assert backend.served_model_id == "m1"
    assert (
        backend.connect_timeout_s,
        backend.first_token_timeout_s,
        backend.timeout_s,
        backend.max_retries,
    ) == (
        2.0,
        10.0,
        120.0,
        2,
    )
    assert backend.api_key() is None and backend.launch is None


def test_a_composed_hydra_group_is_accepted(monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("ROUTER_ML_MODELS_DIR", "/srv/m")
    cfg = OmegaConf.load(CONF / "local.yaml")  # what `backends=local` composes, interpolations unresolved
    cat = Catalog.from_entries(cfg, source="backends=local")
    assert cat.names == ["smollm2-vllm", "smollm2-llamacpp"]
    assert cat.get("smollm2-vllm").launch["args"][0] == "--max-model-len"
    assert cat.get("smollm2-llamacpp").spec.tokenizer == "hf:/srv/m/smollm2-135m"
