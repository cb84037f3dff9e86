"""Local model servers: the launcher against a fake engine (fast), then REAL vLLM and llama.cpp servers.

The fast tests start a tiny stand-in ``llama_cpp.server`` (stdlib HTTP, written to a temp dir) so
that start / ready / stop by PID / the PID file run for real without the engines. The tests marked
``integration`` need ``bash scripts/setup_local_models.sh`` and run with ``pytest -m integration``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router_ml.backends.local.launch_spec import (
    EngineNotInstalledError,
    LaunchConfigError,
    LaunchError,
    ModelNotFoundError,
    PortBusyError,
    ServerExitedError,
    ServerNotReadyError,
    free_port,
)
from router_ml.backends.local.launcher import models_down, models_up
from router_ml.backends.local.local_server import LocalServer, group_members

SERVED_ID = "smollm2-135m"  # as in conftest.py

FAKE_SERVER = """
import argparse, json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
p = argparse.ArgumentParser()
for flag in ("--model", "--model_alias", "--host", "--port", "--n_ctx", "--n_threads", "--interrupt_requests"):
    p.add_argument(flag)
a, _ = p.parse_known_args()
if os.environ.get("FAKE_EXIT"):
    print("fake failure: " + os.environ["FAKE_EXIT"], flush=True)
    sys.exit(3)
if os.environ.get("FAKE_WORKER"):  # like vLLM's engine process: a child in the server's process group
    import subprocess
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("worker pid", worker.pid, flush=True)
status = 503 if os.environ.get("FAKE_NOT_READY") else 200
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": a.model_alias, "object": "model"}]}).encode()
        self.send_response(status); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
print("fake llama_cpp.server on", a.host, a.port, flush=True)
ThreadingHTTPServer((a.host, int(a.port)), H).serve_forever()
"""


@dataclass(frozen=True)
class StandInBackend:
    """The catalog ``Backend`` fields the launcher reads (contract in serving_common.md)."""

    name: str
    kind: str
    base_url: str
    served_model_id: str
    launch: dict[str, Any] | None = None


@dataclass
class StandInCatalog:
    backends: list[StandInBackend] = field(default_factory=list)

    def get(self, name: str) -> StandInBackend:
        return next(b for b in self.backends if b.name == name)


@pytest.fixture
def fake_engine(tmp_path) -> dict[str, Any]:
    """A launch mapping for the stand-in llama.cpp engine (own PYTHONPATH) and a real GGUF-named file."""
    pkg = tmp_path / "fakepkgs" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(FAKE_SERVER)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return {
        "engine": "llamacpp",
        "model": str(gguf),
        "port": free_port(),
        "python": sys.executable,
        "env": {"PYTHONPATH": str(tmp_path / "fakepkgs")},
    }


def _backend(name: str, launch: dict[str, Any]) -> StandInBackend:
    return StandInBackend(name, "vllm", f"http://127.0.0.1:{launch['port']}/v1", f"{name}-id", launch)


# ----------------------------------------------------------------------------- commands and config errors


def test_vllm_command_and_environment(tmp_path, monkeypatch):
    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setenv("ROUTER_ML_VLLM_PYTHON", str(python))
    launch = {"engine": "vllm", "model": "models/m", "port": 8101, "args": ["--dtype", "bfloat16"]}
    server = LocalServer.from_backend(
        StandInBackend("m-vllm", "vllm", "http://127.0.0.1:8101/v1", "m", launch)
    )
    assert server.command() == [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", "models/m",
        "--served-model-name", "m", "--host", "127.0.0.1", "--port", "8101", "--dtype", "bfloat16",
    ]  # fmt: skip
    env = server.environment()
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert server.base_url == "http://127.0.0.1:8101/v1"


def test_vllm_cli_on_path_is_the_gpu_default(tmp_path, monkeypatch):
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)  # no .venv-vllm of the set-up script here
    monkeypatch.delenv("ROUTER_ML_VLLM_PYTHON", raising=False)
    monkeypatch.delenv("ROUTER_ML_VLLM_VENV", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    server = LocalServer.from_launch("m", {"engine": "vllm", "model": "/m", "port": 9000})
    assert server.command()[:3] == [str(exe), "serve", "/m"]


def test_llamacpp_command_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("ROUTER_ML_LLAMACPP_PYTHON", raising=False)
    launch = {"engine": "llamacpp", "model": "m.gguf", "port": 8102, "python": sys.executable}
    cmd = LocalServer.from_launch("m", launch, "m-id").command()
    assert cmd[1:3] == ["-m", "llama_cpp.server"]
    assert cmd[cmd.index("--model_alias") + 1] == "m-id" and cmd[cmd.index("--n_threads") + 1] == "2"
    assert cmd[cmd.index("--interrupt_requests") + 1] == "False"  # a new request must not end a stream
    cmd = LocalServer.from_launch("m", {**launch, "args": ["--n_threads", "4"]}).command()
    assert cmd.count("--n_threads") == 1 and cmd[-2:] == ["--n_threads", "4"]


def test_default_interpreter_is_the_set_up_scripts_venv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROUTER_ML_LLAMACPP_PYTHON", raising=False)
    monkeypatch.delenv("ROUTER_ML_LLAMACPP_VENV", raising=False)
    launch = {"engine": "llamacpp", "model": "m.gguf", "port": 8102}
    assert LocalServer.from_launch("m", launch).command()[0] == sys.executable
    python = tmp_path / ".venv-llamacpp" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert os.path.samefile(LocalServer.from_launch("m", launch).command()[0], python)
    monkeypatch.setenv("ROUTER_ML_LLAMACPP_PYTHON", "/opt/py/bin/python3")
    assert LocalServer.from_launch("m", launch).python == "/opt/py/bin/python3"


@pytest.mark.parametrize(
    ("launch", "match"),
    [
        ({"model": "m", "port": 1, "gpus": 2}, "unknown launch field.*gpus"),
        ({"engine": "tgi", "model": "m", "port": 1}, "'engine' = 'tgi'"),
        ({"engine": "vllm", "port": 1}, "'model'"),
        ({"engine": "vllm", "model": "m", "port": "80"}, "'port' = '80'"),
        ({"engine": "vllm", "model": "m", "port": 1, "args": "--x"}, "'args'"),
    ],
)
def test_launch_config_errors_name_backend_and_field(launch, match):
    with pytest.raises(LaunchConfigError, match=f"backend 'b'.*{match}"):
        LocalServer.from_launch("b", launch)


def test_from_backend_rejects_api_backends_and_port_mismatch():
    with pytest.raises(LaunchConfigError, match=r"'gpt'.*kind 'api'"):
        LocalServer.from_backend(StandInBackend("gpt", "api", "https://api.example/v1", "gpt"))
    launch = {"engine": "vllm", "model": "m", "port": 8101}
    with pytest.raises(LaunchConfigError, match="does not use launch port 8101"):
        LocalServer.from_backend(StandInBackend("m", "vllm", "http://127.0.0.1:9999/v1", "m", launch))


def test_start_errors_name_the_problem(tmp_path, fake_engine):
    with pytest.raises(EngineNotInstalledError, match=r"interpreter .*not found"):
        LocalServer.from_launch("b", {**fake_engine, "python": str(tmp_path / "nope" / "python")}).start()
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    vllm = {"engine": "vllm", "model": str(model_dir), "port": free_port(), "python": sys.executable}
    with pytest.raises(EngineNotInstalledError, match="engine 'vllm' is not installed"):
        LocalServer.from_launch("b", vllm).start()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        LocalServer.from_launch("b", {**vllm, "model": str(tmp_path)}).start()
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        LocalServer.from_launch("b", {**fake_engine, "model": str(tmp_path / "x.gguf")}).start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", fake_engine["port"]))
        busy.listen()
        with pytest.raises(PortBusyError, match=f"port 127.0.0.1:{fake_engine['port']} is busy"):
            LocalServer.from_launch("b", fake_engine).start()


# ----------------------------------------------------------------------------- life cycle (stand-in engine)


def test_start_ready_stop_by_pid(tmp_path, fake_engine):
    log = tmp_path / "b.log"
    with LocalServer.from_launch("b", fake_engine, "b-id", log_path=log) as server:
        pid = server.pid
        assert server.is_running() and server.is_ready() and server.ready_s is not None
        assert os.getpgid(pid) == pid  # own process group: stop() reaches the engine's workers too
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "llama_cpp.server" in log.read_text() and "fake llama_cpp.server on" in log.read_text()
    server.stop()  # stopping twice is a no-op


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_stop_reaches_workers_of_a_killed_server(tmp_path, fake_engine):
    fake_engine["env"]["FAKE_WORKER"] = "1"
    log = tmp_path / "b.log"
    server = LocalServer.from_launch("b", fake_engine, log_path=log).start()
    server.wait_ready(timeout=30)
    worker = int(re.search(r"worker pid (\d+)", log.read_text()).group(1))
    assert not _gone(worker)
    _kill_watchdog(server.record())  # so that stop() alone must reach the worker
    os.kill(server.pid, signal.SIGKILL)  # the leader dies; its worker lives on in the group
    time.sleep(0.5)
    assert not _gone(worker)
    server.stop()
    deadline = time.monotonic() + 5
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(worker)


def _kill_watchdog(record: dict[str, Any]) -> None:
    pid = record["watchdog_pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_the_watchdog_stops_the_orphans_of_a_killed_server(tmp_path, fake_engine):
    """The vLLM case: the API server's PID is killed (not its group); its engine worker would live
    on as an orphan. The watchdog started beside it stops the group within about a second, with no
    call to stop() or models down."""
    fake_engine["env"]["FAKE_WORKER"] = "1"
    log = tmp_path / "b.log"
    server = LocalServer.from_launch("b", fake_engine, log_path=log).start()
    try:
        server.wait_ready(timeout=30)
        worker = int(re.search(r"worker pid (\d+)", log.read_text()).group(1))
        watchdog = server.record()["watchdog_pid"]
        assert os.getpgid(watchdog) != server.pid  # not in the group it stops
        os.kill(server.pid, signal.SIGKILL)
        t = time.monotonic()
        while not _gone(worker) and time.monotonic() - t < 10:
            time.sleep(0.05)
        assert _gone(worker)
        assert group_members(server.pid) == []
        while not _gone(watchdog) and time.monotonic() - t < 10:  # it exits after saying so
            time.sleep(0.05)
        assert "is gone; stopped its group" in log.read_text()
    finally:
        server.stop()


def test_models_down_stops_the_orphans_of_a_dead_server(tmp_path, fake_engine):
    """The API server's recorded PID is killed and its watchdog is gone too (killed with it): the
    engine worker lives on in the group; ``models down`` (another process, no handle on the
    server) finds and stops it."""
    fake_engine["env"]["FAKE_WORKER"] = "1"
    state = tmp_path / "state"
    (server,) = models_up(StandInCatalog([_backend("a", fake_engine)]), state=state, timeout=30)
    log = state / "logs" / "a.log"
    worker = int(re.search(r"worker pid (\d+)", log.read_text()).group(1))
    recorded = json.loads((state / "servers.json").read_text())["a"]
    assert recorded["pgid"] == server.pid == os.getpgid(worker)
    _kill_watchdog(recorded)
    os.kill(server.pid, signal.SIGKILL)
    server._proc.wait(timeout=5)  # reaped: its PID is gone, only the orphaned worker is left
    assert not _gone(worker)
    with pytest.raises(LaunchError, match="already running as process group"):
        models_up(StandInCatalog([_backend("a", fake_engine)]), state=state, timeout=30)
    code = (
        f"from router_ml.backends.local.launcher import models_down; print(models_down(state={str(state)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "['a']"
    assert _gone(worker)
    assert group_members(server.pid) == []
    assert models_down(state=state) == []  # nothing left to stop


def test_exit_before_ready_reports_code_and_last_log_lines(tmp_path, fake_engine):
    fake_engine["env"]["FAKE_EXIT"] = "no such tensor"
    server = LocalServer.from_launch("b", fake_engine, log_path=tmp_path / "b.log").start()
    with pytest.raises(ServerExitedError, match=r"(?s)exited with code 3.*fake failure: no such tensor"):
        server.wait_ready(timeout=30)


def test_not_ready_times_out_and_stop_still_works(tmp_path, fake_engine):
    fake_engine["env"]["FAKE_NOT_READY"] = "1"
    server = LocalServer.from_launch("b", fake_engine, log_path=tmp_path / "b.log").start()
    try:
        with pytest.raises(ServerNotReadyError, match="did not answer"):
            server.wait_ready(timeout=0.5)
    finally:
        server.stop()
    assert not server.is_running()


def test_models_up_then_down_from_another_process(tmp_path, fake_engine):
    other = {**fake_engine, "port": free_port()}
    catalog = StandInCatalog(
        [
            _backend("a", fake_engine),
            StandInBackend("gpt", "api", "https://x/v1", "gpt"),
            _backend("b", other),
        ]
    )
    state = tmp_path / "state"
    servers = models_up(catalog, state=state, timeout=30)
    assert [s.name for s in servers] == ["a", "b"] and all(s.is_ready() for s in servers)
    recorded = json.loads((state / "servers.json").read_text())
    assert {k: v["pid"] for k, v in recorded.items()} == {s.name: s.pid for s in servers}
    with pytest.raises(LaunchError, match="'a' is already running"):
        models_up(catalog, ["a"], state=state)
    with pytest.raises(LaunchConfigError, match="'gpt'"):
        models_up(catalog, ["gpt"], state=state)
    code = (
        f"from router_ml.backends.local.launcher import models_down; print(models_down(state={str(state)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "['a', 'b']"
    assert not any(s.is_running() for s in servers)
    assert json.loads((state / "servers.json").read_text()) == {}


def test_models_down_never_signals_a_reused_pid(tmp_path, fake_engine):
    (server,) = models_up(StandInCatalog([_backend("a", fake_engine)]), state=tmp_path, timeout=30)
    try:
        pids = json.loads((tmp_path / "servers.json").read_text())
        pids["a"]["start_ticks"] += 1  # as if the server had died and another process got its PID
        (tmp_path / "servers.json").write_text(json.dumps(pids))
        assert models_down(state=tmp_path) == []
        assert server.is_running()
        assert json.loads((tmp_path / "servers.json").read_text()) == {}
    finally:
        server.stop()


def test_models_up_stops_what_it_started_when_one_fails(tmp_path, fake_engine):
    bad = {**fake_engine, "port": free_port(), "env": {**fake_engine["env"], "FAKE_EXIT": "boom"}}
    catalog = StandInCatalog([_backend("good", fake_engine), _backend("bad", bad)])
    with pytest.raises(ServerExitedError, match="'bad'"):
        models_up(catalog, state=tmp_path, timeout=30)
    assert json.loads((tmp_path / "servers.json").read_text()) == {}
    assert LocalServer.from_launch("good", fake_engine).check()  # port free again: 'good' was stopped


# ----------------------------------------------------------------------------- REAL servers

PROMPT = [{"role": "user", "content": "Write three short sentences about the sea."}]


def _stream(server: LocalServer, max_tokens: int = 48, **extra: Any) -> dict[str, Any]:
    """One streamed chat completion, timed client-side: text, chunks, TTFT, decode tokens/s, usage."""
    import httpx

    body = {
        "model": SERVED_ID,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    stamps, text, usage, done = [], [], None, False
    with httpx.stream(
        "POST", f"{server.base_url}/chat/completions", json={**body, **extra}, timeout=60
    ) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter() - t0)
                    text.append(choice["delta"]["content"])
    n = (usage or {}).get("completion_tokens") or len(stamps)
    tps = (n - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return {"text": "".join(text), "chunks": len(stamps), "ttft_s": stamps[0] if stamps else None, "tps": tps, "usage": usage, "done": done}  # fmt: skip


@pytest.mark.integration
def test_chat_completion_answers(any_server):
    import httpx

    body = {"model": SERVED_ID, "messages": PROMPT, "max_tokens": 32, "temperature": 0}
    resp = httpx.post(f"{any_server.base_url}/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["choices"][0]["message"]["content"].strip()
    assert 0 < data["usage"]["completion_tokens"] <= 32 and data["usage"]["prompt_tokens"] > 0


@pytest.mark.integration
def test_chat_completion_streams_and_ttft_is_measured(any_server, timings):
    runs = [_stream(any_server) for _ in range(3)]
    for run in runs:
        assert run["done"] and run["chunks"] > 1 and run["text"].strip()
    name = any_server.name
    timings[f"{name}/ttft_ms_median"] = round(1000 * statistics.median(r["ttft_s"] for r in runs), 1)
    timings[f"{name}/tokens_per_s_median"] = round(statistics.median(r["tps"] for r in runs), 1)
    assert all(0 < r["ttft_s"] < 30 for r in runs)


@pytest.mark.integration
def test_vllm_stream_reports_usage_with_include_usage(vllm_server):
    run = _stream(vllm_server, max_tokens=16, stream_options={"include_usage": True})
    assert run["usage"] is not None, "vLLM sent no usage chunk"
    assert run["usage"]["completion_tokens"] == run["chunks"] <= 16  # one content chunk per token
    assert run["usage"]["prompt_tokens"] > 0


@pytest.mark.integration
def test_vllm_metrics_expose_queue_depth(vllm_server):
    import httpx

    root = vllm_server.base_url.removesuffix("/v1")
    text = httpx.get(f"{root}/metrics", timeout=10).text
    samples = [line for line in text.splitlines() if line.startswith("vllm:num_requests_waiting")]
    assert samples, "no vllm:num_requests_waiting sample in /metrics"
    assert float(samples[0].rsplit(" ", 1)[1]) >= 0
    assert "vllm:kv_cache_usage_perc" in text or "vllm:gpu_cache_usage_perc" in text


@pytest.mark.integration
def test_server_killed_by_pid_is_seen_as_down(llamacpp_launch_factory, tmp_path, timings):
    import httpx

    server = LocalServer.from_launch(
        "llamacpp-victim", llamacpp_launch_factory(), SERVED_ID, log_path=tmp_path / "v.log"
    )
    with server:
        timings["llamacpp/ready_s_second_start"] = round(server.ready_s, 2)
        assert _stream(server, max_tokens=8)["done"]
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.is_running() and server.returncode() == -signal.SIGKILL
        assert not server.is_ready()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.base_url}/models", timeout=2)
        with pytest.raises(ServerExitedError, match="exited with code -9"):
            server.wait_ready(timeout=5)


@pytest.mark.integration
def test_models_up_and_down_from_the_project_catalog(llamacpp_launch_factory, tmp_path):
    """conf/backends/local.yaml's llama.cpp backend (on a free port) through the real Catalog."""
    from omegaconf import OmegaConf

    from router_ml.backends.catalog import Catalog

    root = Path(__file__).resolve().parents[2]
    entries = OmegaConf.to_container(OmegaConf.load(root / "conf/backends/local.yaml"), resolve=True)
    (entry,) = [e for e in entries["backends"] if e["launch"]["engine"] == "llamacpp"]
    launch = llamacpp_launch_factory()
    entry["base_url"] = f"http://127.0.0.1:{launch['port']}/v1"
    entry["launch"].update(model=launch["model"], port=launch["port"], python=launch["python"])
    catalog = Catalog.from_entries([entry])
    (server,) = models_up(catalog, state=tmp_path, timeout=60)
    assert server.name == entry["name"] and _stream(server, max_tokens=8)["done"]
    code = f"from router_ml.backends.local.launcher import models_down; print(models_down(state={str(tmp_path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == repr([entry["name"]])
    assert not server.is_running() and not server.is_ready()
