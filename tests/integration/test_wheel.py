"""A proxy from a wheel: router-ml built as a wheel, installed into a fresh venv outside the
checkout, serving a checkpoint in front of a REAL llama.cpp server to the real ``openai`` client.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation``, the project venv's
setuptools) from a copy of the files git lists, so nothing ignored or stale (``build/``) slips in.
The venv gets the wheel with ``--no-deps`` and a ``.pth`` line naming the project venv's
site-packages, so torch and the other dependencies are not installed again: a venv's own
site-packages come first, and a ``.pth`` there does not run the ``.pth`` files of the folder it
names, so the project's editable install of ``router_ml`` is not seen. The tests check that
``router_ml`` is imported from the venv and run ``router-ml serve`` with the working directory
outside the checkout and no ``ROUTER_ML_DATA_DIR``: whatever the proxy needs must come from the
checkpoint, the backend catalog or the wheel's package data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from router_ml.backends.local.launch_spec import free_port

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[2]
PACKAGE_FILES_SKIPPED = ("__pycache__/", ".pyc")


def _source_files() -> list[str]:
    """The repository's files (relative paths): git's list of tracked and new, not ignored files,
    or every file when this is no git checkout (a source archive)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
        files = [f for f in out.split("\0") if f and (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()]
    return [f for f in files if not any(s in f for s in PACKAGE_FILES_SKIPPED)]


def _package_files() -> list[str]:
    return sorted(f for f in _source_files() if f.startswith("router_ml/"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """router-ml's wheel, built offline from a copy of pyproject.toml, README.md and router_ml/."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for rel in ["pyproject.toml", "README.md", *_package_files()]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(dist), "-q"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = dist.glob("router_ml-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv outside the checkout with the wheel installed (``--no-deps``); the project venv's
    site-packages give it the dependencies."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (Path(purelib) / "router-ml-test-deps.pth").write_text("\n".join(deps) + "\n")
    return venv


def _outside_env(tmp: Path) -> dict[str, str]:
    """The environment of a process that must not see the checkout: no PYTHONPATH, no data dir."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROUTER_ML_DATA_DIR", "VIRTUAL_ENV")
    }
    cache = tmp / "cache"
    cache.mkdir(exist_ok=True)
    return env | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ROUTER_ML_CACHE_DIR": str(cache)}


def test_the_wheel_holds_every_file_of_the_package(wheel):
    """Every file of router_ml/ that git lists (code, shipped data, policy configs, latency priors,
    licences) is in the wheel: a file left out of pyproject's package-data fails here by name."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = [f for f in _package_files() if f not in names]
    assert not missing, f"files of router_ml/ missing from the wheel (pyproject package-data?): {missing}"
    assert "router_ml/conf/policy/utility.yaml" in names and "router_ml/decision/latency_priors.json" in names


def test_router_ml_is_imported_from_the_venv(venv, tmp_path):
    code = (
        "import router_ml, router_ml.paths as p; "
        "print(router_ml.__file__); print(p.POLICY_CONFIG_DIR); print(p.SHIPPED_LLMROUTER_FILE.is_file())"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=tmp_path, env=_outside_env(tmp_path), capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    module, policies, shipped = Path(out[0]), Path(out[1]), out[2]
    assert venv in module.parents and REPO not in module.parents
    assert venv in policies.parents and sorted(p.stem for p in policies.glob("*.yaml"))
    assert shipped == "True"  # the default data set ships too


@pytest.fixture(scope="module")
def served(venv, trained_run, llamacpp_server, tmp_path_factory):
    """``router-ml serve`` from the venv, cwd outside the checkout, in front of one real llama.cpp
    server seen as two backends: ``smollm2-local`` (a local machine's price and latency) and
    ``smollm2-api`` (an API's list prices and NO latency block: the shipped llmperf priors)."""
    tmp = tmp_path_factory.mktemp("serve")
    assert REPO not in tmp.parents
    ckpt = shutil.copytree(trained_run / "checkpoint", tmp / "ckpt")
    (tmp / "backends.yaml").write_text(
        "backends:\n"
        f"  - {{name: smollm2-local, kind: vllm, base_url: '{llamacpp_server.base_url}', "
        "served_model_id: smollm2-135m, prices: {gpu_hour_usd: 0.1, decode_tokens_per_s: 155}, "
        "latency: {ttft_s: 0.06, tokens_per_s: 155}, first_token_timeout_s: 60, timeout_s: 180}\n"
        f"  - {{name: smollm2-api, kind: api, base_url: '{llamacpp_server.base_url}', "
        "served_model_id: smollm2-135m, prices: {input_per_mtok: 3.0, output_per_mtok: 15.0}, "
        "first_token_timeout_s: 60, timeout_s: 180}\n"
    )
    from router_ml.checkpoint import read_config

    aliases = []
    for m in read_config(ckpt)["models"]:  # the small local models -> the local backend
        aliases += ["--alias", f"{m}={'smollm2-local' if m.startswith('qwen') else 'smollm2-api'}"]
    port = free_port()
    log = tmp / "serve.log"
    cmd = [str(venv / "bin" / "router-ml"), "serve", "--ckpt", "ckpt", "--backends", "backends.yaml",
           "--port", str(port), "--ledger", "sqlite:spend.sqlite", "--routing-log", "routing.jsonl", *aliases]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=_outside_env(tmp), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"router-ml serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"router-ml serve not ready after 180 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serves_routed_and_passthrough_requests_from_the_wheel(served):
    from router_ml.decision.latency import latency_prior

    url, tmp = served
    # before any answer: the API backend's models have the shipped latency prior of a model of
    # unknown size (llmperf's 70B medians), read from the wheel, not from a data folder
    latency = {r["model"]: r for r in httpx.get(f"{url}/health").json()["latency"]}
    ttft, tokens_per_s = latency_prior(None)
    api_models = [m for m in latency if not m.startswith("qwen")]
    assert api_models and all(latency[m]["source"] == "prior" for m in api_models)
    for m in api_models:
        assert latency[m]["ttft_s"] == pytest.approx(ttft) and latency[m]["tokens_per_s"] == pytest.approx(
            tokens_per_s
        )
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    ask = [{"role": "user", "content": "Is this review positive or negative? 'Great phone.'"}]
    poem = [{"role": "user", "content": "Write a long, moving poem about the sea at night."}]
    # routed, non-stream: the cheapest model (lam huge) is a local one; the best one (lam 0) an API model
    cheap = client.chat.completions.with_raw_response.create(
        model="router:utility:1e9", max_tokens=8, messages=ask
    )
    assert cheap.headers["x-router-route"] == "router" and cheap.headers["x-router-model"].startswith("qwen")
    assert cheap.parse().model == "smollm2-local" and cheap.parse().choices[0].message.content
    best = client.chat.completions.with_raw_response.create(
        model="router:utility:0", max_tokens=8, messages=poem
    )
    assert best.parse().model == "smollm2-api" and best.parse().choices[0].message.content
    assert float(best.headers["x-router-expected-cost-usd"]) > float(
        cheap.headers["x-router-expected-cost-usd"]
    )
    # routed, stream, with the default policy; a policy fitted at start-up (capability's auto tiers)
    for model in ("router", "router:capability"):
        chunks = list(client.chat.completions.create(model=model, stream=True, max_tokens=8, messages=ask))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip(), model
        assert {c.model for c in chunks} <= {"smollm2-local", "smollm2-api"}
    # pass-through, both ways
    reply = client.chat.completions.with_raw_response.create(model="smollm2-api", max_tokens=8, messages=ask)
    assert reply.headers["x-router-route"] == "passthrough" and reply.parse().choices[0].message.content
    chunks = list(
        client.chat.completions.create(model="smollm2-local", stream=True, max_tokens=8, messages=ask)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert (tmp / "routing.jsonl").stat().st_size > 0 and (tmp / "spend.sqlite").is_file()
