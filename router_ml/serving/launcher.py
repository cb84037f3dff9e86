"""Start, watch and stop the real local model servers of a catalog (vLLM or llama.cpp), by PID.

A backend of kind ``vllm`` carries a ``launch`` mapping (conf/backends/*.yaml)::

    launch: {engine: vllm, model: models/smollm2-135m, port: 8101,
             args: [--max-model-len, "2048", --dtype, bfloat16, --enforce-eager]}

engine ``vllm``      ``<python> -m vllm.entrypoints.openai.api_server --model DIR --served-model-name ID
                     --host H --port P ARGS`` (or ``vllm serve DIR ...`` when only the ``vllm`` executable
                     is found), with ``HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1``;
engine ``llamacpp``  ``<python> -m llama_cpp.server --model GGUF --model_alias ID --host H --port P
                     --n_ctx N --n_threads T ARGS``.

Other keys: ``host`` (default 127.0.0.1), ``python`` (the interpreter; default ``$ROUTER_ML_VLLM_PYTHON``
/ ``$ROUTER_ML_LLAMACPP_PYTHON``, else the venv of scripts/setup_local_models.sh (``.venv-vllm`` /
``.venv-llamacpp``, or ``$ROUTER_ML_VLLM_VENV`` / ``$ROUTER_ML_LLAMACPP_VENV``), else ``vllm`` on PATH
(GPU machines: ``pip install 'router-ml[vllm]'``), else this interpreter), ``env`` (extra environment), ``n_ctx`` / ``n_threads`` (llama.cpp), ``ready_timeout_s``. Models are local paths: nothing
is downloaded from a hub. :func:`models_up` records each server in ``.router-ml/servers.json``
(``$ROUTER_ML_STATE_DIR``) so that :func:`models_down` can stop them from another process; logs go to
``.router-ml/logs/<name>.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from router_ml.serving.catalog import Backend, Catalog

ENGINES = ("vllm", "llamacpp")
LAUNCH_KEYS = (
    "engine",
    "model",
    "port",
    "host",
    "python",
    "args",
    "env",
    "n_ctx",
    "n_threads",
    "ready_timeout_s",
)
PYTHON_ENV = {"vllm": "ROUTER_ML_VLLM_PYTHON", "llamacpp": "ROUTER_ML_LLAMACPP_PYTHON"}
#: Where scripts/setup_local_models.sh puts each engine's venv (env var, default folder).
VENV = {
    "vllm": ("ROUTER_ML_VLLM_VENV", ".venv-vllm"),
    "llamacpp": ("ROUTER_ML_LLAMACPP_VENV", ".venv-llamacpp"),
}
_MODULES = {"vllm": "vllm.entrypoints.openai.api_server", "llamacpp": "llama_cpp.server"}
STATE_DIR_ENV = "ROUTER_ML_STATE_DIR"


class LaunchError(RuntimeError):
    """A local model server could not be started, got ready or stopped (the message says why)."""


class LaunchConfigError(LaunchError, ValueError):
    """A backend's ``launch`` mapping is invalid (the message names the backend and the field)."""


class EngineNotInstalledError(LaunchError):
    """The interpreter or executable for the engine is missing (run scripts/setup_local_models.sh)."""


class PortBusyError(LaunchError):
    """Something already listens on the server's port."""


class ModelNotFoundError(LaunchError, FileNotFoundError):
    """The model directory (vLLM) or GGUF file (llama.cpp) does not exist."""


class ServerExitedError(LaunchError):
    """The server process exited (the message carries its exit code and last log lines)."""


class ServerNotReadyError(LaunchError, TimeoutError):
    """The server did not answer ``/v1/models`` before the deadline."""


def state_dir(override: str | os.PathLike | None = None) -> Path:
    """Folder of the PID file and logs: ``override``, ``$ROUTER_ML_STATE_DIR`` or ``.router-ml``."""
    return Path(override or os.environ.get(STATE_DIR_ENV) or ".router-ml")


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` (a socket in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _setup_python(engine: str) -> str | None:
    """The interpreter of the venv scripts/setup_local_models.sh made for ``engine``, if there is one."""
    env, default = VENV[engine]
    python = Path(os.environ.get(env) or default) / "bin" / "python"
    return str(python.absolute()) if python.is_file() else None  # not resolve(): keep the venv's link


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie has exited even though kill(0) succeeds
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the PID, it names one process for good."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return None


def _flags(pairs: Mapping[str, object]) -> list[str]:
    return [str(x) for pair in pairs.items() for x in pair]


def _tail(path: Path, n: int = 20) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join("    " + line for line in lines)
    return "    (no log)"


class LocalServer:
    """One OpenAI-compatible server process: ``start()``, ``wait_ready()``, ``stop()``; a context manager.

    Built from a catalog backend with :meth:`from_backend` or from a bare ``launch`` mapping with
    :meth:`from_launch`. ``base_url`` is the OpenAI root (``http://host:port/v1``).
    """

    def __init__(
        self,
        name: str,
        launch: Mapping[str, Any],
        served_model_id: str | None = None,
        *,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.name = name
        self.served_model_id = served_model_id or name
        unknown = sorted(set(launch) - set(LAUNCH_KEYS))
        if unknown:
            raise LaunchConfigError(
                f"backend {name!r}: unknown launch field(s) {unknown}; allowed: {list(LAUNCH_KEYS)}"
            )
        self.engine = launch.get("engine", "vllm")
        if self.engine not in ENGINES:
            raise LaunchConfigError(
                f"backend {name!r}: launch field 'engine' = {self.engine!r} must be one of {list(ENGINES)}"
            )
        if not launch.get("model"):
            raise LaunchConfigError(
                f"backend {name!r}: launch field 'model' (model dir or GGUF path) is missing"
            )
        self.model = Path(str(launch["model"])).expanduser()
        port = launch.get("port")
        if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
            raise LaunchConfigError(
                f"backend {name!r}: launch field 'port' = {port!r} must be an integer in 1..65535"
            )
        self.port: int = port
        self.host: str = str(launch.get("host", "127.0.0.1"))
        args = launch.get("args") or []
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise LaunchConfigError(
                f"backend {name!r}: launch field 'args' = {args!r} must be a list of strings"
            )
        self.args = [str(a) for a in args]
        self.env = {str(k): str(v) for k, v in (launch.get("env") or {}).items()}
        self.n_ctx = int(launch.get("n_ctx", 2048))
        self.n_threads = int(launch.get("n_threads", 2))
        self.ready_timeout_s = float(launch.get("ready_timeout_s", 300.0))
        self.python = (
            launch.get("python") or os.environ.get(PYTHON_ENV[self.engine]) or _setup_python(self.engine)
        )
        self.log_path = Path(log_path) if log_path else state_dir() / "logs" / f"{name}.log"
        self.pid: int | None = None
        self.ready_s: float | None = None  # seconds from start() to the first answer of /v1/models
        self._proc: subprocess.Popen | None = None
        self._started_at: float | None = None

    @classmethod
    def from_launch(
        cls, name: str, launch: Mapping[str, Any], served_model_id: str | None = None, **kw: Any
    ) -> LocalServer:
        return cls(name, launch, served_model_id, **kw)

    @classmethod
    def from_backend(cls, backend: Backend, **kw: Any) -> LocalServer:
        """From a catalog backend of kind ``vllm``; its ``base_url`` must point at the launch port."""
        if backend.kind != "vllm" or not backend.launch:
            raise LaunchConfigError(
                f"backend {backend.name!r} (kind {backend.kind!r}) has no 'launch' mapping: only local "
                "backends of kind 'vllm' with 'launch' can be started"
            )
        server = cls(backend.name, backend.launch, backend.served_model_id, **kw)
        url = urlsplit(backend.base_url)
        if url.port != server.port:
            raise LaunchConfigError(
                f"backend {backend.name!r}: base_url {backend.base_url!r} does not use launch port {server.port}"
            )
        return server

    def __repr__(self) -> str:
        return f"LocalServer({self.name!r}, engine={self.engine!r}, port={self.port}, pid={self.pid})"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # ------------------------------------------------------------------------- command

    def _executable(self) -> tuple[list[str], bool]:
        """(interpreter or ``vllm`` executable, whether it is the ``vllm`` CLI)."""
        if self.python:
            path = shutil.which(str(self.python)) or str(self.python)
            if not Path(path).is_file():
                raise EngineNotInstalledError(
                    f"backend {self.name!r}: {self.engine} interpreter {str(self.python)!r} not found; run "
                    f"`bash scripts/setup_local_models.sh` or set launch.python / ${PYTHON_ENV[self.engine]}"
                )
            return [path], False
        if self.engine == "vllm" and shutil.which("vllm"):
            return [shutil.which("vllm") or "vllm"], True
        return [sys.executable], False

    def command(self) -> list[str]:
        """The argv that :meth:`start` runs."""
        exe, is_cli = self._executable()
        model, ident = str(self.model), self.served_model_id
        if self.engine == "vllm":
            head = [*exe, "serve", model] if is_cli else [*exe, "-m", _MODULES["vllm"], "--model", model]
            return [
                *head,
                *_flags({"--served-model-name": ident, "--host": self.host, "--port": self.port}),
                *self.args,
            ]
        flags = {"--model": model, "--model_alias": ident, "--host": self.host, "--port": self.port}
        flags.update(
            {
                k: v
                for k, v in (("--n_ctx", self.n_ctx), ("--n_threads", self.n_threads))
                if k not in self.args
            }
        )
        return [*exe, "-m", _MODULES["llamacpp"], *_flags(flags), *self.args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if self.engine == "vllm":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.update(self.env)
        return env

    def check(self) -> list[str]:
        """Raise the error that would stop :meth:`start` (engine, model, port); return the command."""
        cmd = self.command()
        if self.engine == "vllm" and not (self.model / "config.json").is_file():
            raise ModelNotFoundError(
                f"backend {self.name!r}: vLLM model dir {str(self.model)!r} has no config.json; run "
                "`bash scripts/setup_local_models.sh` (or point launch.model at a local HF-format model)"
            )
        if self.engine == "llamacpp" and not self.model.is_file():
            raise ModelNotFoundError(
                f"backend {self.name!r}: GGUF file {str(self.model)!r} not found; run `bash scripts/setup_local_models.sh`"
            )
        if Path(cmd[0]).name != "vllm":
            probe = f"import importlib.util as u, sys; sys.exit(u.find_spec({_MODULES[self.engine].split('.')[0]!r}) is None)"
            proc = subprocess.run(
                [cmd[0], "-c", probe], env=self.environment(), capture_output=True, check=False
            )
            if proc.returncode != 0:
                raise EngineNotInstalledError(
                    f"backend {self.name!r}: engine {self.engine!r} is not installed for {cmd[0]!r}; run "
                    f"`bash scripts/setup_local_models.sh` or set launch.python / ${PYTHON_ENV[self.engine]}"
                )
        if not port_is_free(self.host, self.port):
            raise PortBusyError(
                f"backend {self.name!r}: port {self.host}:{self.port} is busy (another server listens there)"
            )
        return cmd

    # ------------------------------------------------------------------------- life cycle

    def start(self) -> LocalServer:
        """Check, then start the server in its own process group; output goes to ``log_path``."""
        if self.is_running():
            raise LaunchError(f"backend {self.name!r} is already running as pid {self.pid}")
        cmd = self.check()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n# router-ml: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        self.pid, self.ready_s, self._started_at = self._proc.pid, None, time.monotonic()
        return self

    def is_running(self) -> bool:
        if self.pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(self.pid)

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def is_ready(self, timeout: float = 1.0) -> bool:
        """One GET of ``/v1/models``: True when it answers 200 and lists the served model id."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=timeout) as resp:
                data = json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return any(m.get("id") == self.served_model_id for m in data.get("data") or [])

    def wait_ready(self, timeout: float | None = None, interval: float = 0.25) -> float:
        """Poll ``/v1/models`` until it answers; return the seconds since :meth:`start` (also ``ready_s``)."""
        if self.pid is None:
            raise LaunchError(f"backend {self.name!r} was not started")
        timeout = self.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise ServerExitedError(
                    f"backend {self.name!r}: {self.engine} server (pid {self.pid}) exited with code "
                    f"{self.returncode()} before it was ready; last lines of {str(self.log_path)!r}:\n{_tail(self.log_path)}"
                )
            if self.is_ready():
                self.ready_s = time.monotonic() - (self._started_at or time.monotonic())
                return self.ready_s
            if time.monotonic() > deadline:
                raise ServerNotReadyError(
                    f"backend {self.name!r}: {self.engine} server (pid {self.pid}) did not answer "
                    f"{self.base_url}/models within {timeout:.0f} s; last lines of {str(self.log_path)!r}:\n{_tail(self.log_path)}"
                )
            time.sleep(interval)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL after ``timeout`` s; a stopped server is a no-op."""
        if self.pid is None:
            return
        terminate(self.pid, timeout, alive=self.is_running, group=self._proc is not None, name=self.name)
        if self._proc is not None:
            self._proc.wait(timeout=1)

    def __enter__(self) -> LocalServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self) -> dict[str, Any]:
        """What the PID file stores for this server."""
        return {
            "pid": self.pid, "engine": self.engine, "host": self.host, "port": self.port, "base_url": self.base_url,
            "served_model_id": self.served_model_id, "log": str(self.log_path), "start_ticks": _start_ticks(self.pid or -1),
        }  # fmt: skip


def terminate(
    pid: int,
    timeout: float = 10.0,
    *,
    alive: Callable[[], bool] | None = None,
    group: bool | None = None,
    name: str = "",
) -> None:
    """Stop ``pid`` and, when it leads one, its process group: SIGTERM, then SIGKILL after ``timeout`` s.

    ``group=None`` asks the OS whether ``pid`` leads its group (servers started here do: the group
    holds vLLM's engine workers, which must not outlive a killed API server).
    """
    alive = alive or (lambda: _pid_alive(pid))
    if group is None:
        try:
            group = os.getpgid(pid) == pid
        except ProcessLookupError:
            return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not alive():
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig) if group else os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    if group:  # workers a killed leader left behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    if alive():
        raise LaunchError(f"server {name!r}: pid {pid} survived SIGKILL")


# ----------------------------------------------------------------------------- the pool and its PID file


def _pid_file(directory: str | os.PathLike | None) -> Path:
    return state_dir(directory) / "servers.json"


def _read_pids(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise LaunchError(
            f"PID file {str(path)!r} is not valid JSON ({err}); remove it after stopping the servers"
        ) from None


def _update_pids(
    path: Path, add: Mapping[str, dict[str, Any]] | None = None, drop: Sequence[str] = ()
) -> None:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        pids = {k: v for k, v in _read_pids(path).items() if k not in drop}
        pids.update(add or {})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids, indent=2, sort_keys=True))
        tmp.replace(path)


def local_backends(catalog: Catalog, names: Sequence[str] | None = None) -> list[Backend]:
    """The catalog's startable backends (kind ``vllm`` with ``launch``), or ``names`` checked to be so."""
    if names is None:
        return [b for b in catalog.backends if b.kind == "vllm" and b.launch]
    picked = [catalog.get(n) for n in names]  # UnknownModelError names the known ones
    for b in picked:
        if b.kind != "vllm" or not b.launch:
            raise LaunchConfigError(
                f"backend {b.name!r} (kind {b.kind!r}) has no 'launch' mapping: it cannot be started"
            )
    return picked


def models_up(
    catalog: Catalog,
    names: Sequence[str] | None = None,
    *,
    timeout: float | None = None,
    state: str | os.PathLike | None = None,
) -> list[LocalServer]:
    """Start every local backend (or ``names``), record them in the PID file, wait until all answer.

    On any failure the servers started by this call are stopped again and the error is raised.
    """
    path = _pid_file(state)
    running = {k: v for k, v in _read_pids(path).items() if _pid_alive(int(v["pid"]))}
    servers = []
    for backend in local_backends(catalog, names):
        if backend.name in running:
            raise LaunchError(
                f"backend {backend.name!r} is already running as pid {running[backend.name]['pid']} "
                f"(per {str(path)!r}); run models_down first"
            )
        servers.append(
            LocalServer.from_backend(backend, log_path=state_dir(state) / "logs" / f"{backend.name}.log")
        )
    started: list[LocalServer] = []
    try:
        for server in servers:
            started.append(server.start())
            _update_pids(path, add={server.name: server.record()})
        for server in started:
            server.wait_ready(timeout)
    except BaseException:
        for server in started:
            server.stop()
        _update_pids(path, drop=[s.name for s in started])
        raise
    return started


def models_down(
    names: Sequence[str] | None = None, *, state: str | os.PathLike | None = None, timeout: float = 10.0
) -> list[str]:
    """Stop the servers recorded in the PID file (all, or ``names``), from any process; return their names.

    A PID whose start time no longer matches the recorded one (the server died and the PID was
    reused) is dropped from the file without a signal.
    """
    path = _pid_file(state)
    records = _read_pids(path)
    unknown = sorted(set(names or ()) - set(records))
    if unknown:
        raise LaunchError(
            f"no running server recorded for {unknown} in {str(path)!r}; recorded: {sorted(records)}"
        )
    stopped = []
    for name in names or sorted(records):
        rec = records[name]
        pid = int(rec["pid"])
        ticks = rec.get("start_ticks")
        if _pid_alive(pid) and (ticks is None or _start_ticks(pid) in (None, ticks)):
            terminate(pid, timeout, name=name)
            stopped.append(name)
        _update_pids(path, drop=[name])
    return stopped
