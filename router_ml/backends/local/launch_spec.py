"""How to start a local model server (vLLM or llama.cpp): its launch mapping, checked, as a command.

A backend of kind ``vllm`` carries a ``launch`` mapping (conf/backends/*.yaml)::

    launch: {engine: vllm, model: models/smollm2-135m, port: 8101,
             args: [--max-model-len, "2048", --dtype, bfloat16, --enforce-eager]}

engine ``vllm``      ``<python> -m vllm.entrypoints.openai.api_server --model DIR --served-model-name ID
                     --host H --port P ARGS`` (or ``vllm serve DIR ...`` when only the ``vllm`` executable
                     is found), with ``HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1``;
engine ``llamacpp``  ``<python> -m llama_cpp.server --model GGUF --model_alias ID --host H --port P
                     --n_ctx N --n_threads T --interrupt_requests False ARGS`` (its default, True,
                     ends a running stream whenever another request arrives).

Other keys: ``host`` (default 127.0.0.1), ``python`` (the interpreter; default ``$ROUTER_ML_VLLM_PYTHON``
/ ``$ROUTER_ML_LLAMACPP_PYTHON``, else the venv of scripts/setup_local_models.sh (``.venv-vllm`` /
``.venv-llamacpp``, or ``$ROUTER_ML_VLLM_VENV`` / ``$ROUTER_ML_LLAMACPP_VENV``), else ``vllm`` on PATH
(GPU machines: ``pip install 'router-ml[vllm]'``), else this interpreter), ``env`` (extra environment), ``n_ctx`` / ``n_threads`` (llama.cpp), ``ready_timeout_s``. Models are local paths: nothing
is downloaded from a hub.

:class:`Launch` (pydantic) validates the mapping; :class:`LaunchSpec` builds from it the command,
environment and pre-flight checks;
:class:`~router_ml.backends.local.local_server.LocalServer` runs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from router_ml.backends.config_errors import field_problem

if TYPE_CHECKING:
    from router_ml.backends.catalog import Backend

ENGINES = ("vllm", "llamacpp")
Scalar = StrictStr | StrictInt | StrictFloat  # an argument or environment value, passed on as text


class Launch(BaseModel):
    """A backend's ``launch`` mapping (see the module docstring), checked field by field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["vllm", "llamacpp"] = "vllm"
    model: Annotated[StrictStr, Field(min_length=1, description="model dir (vLLM) or GGUF file")]
    port: Annotated[StrictInt, Field(ge=1, le=65535)]
    host: StrictStr = "127.0.0.1"
    python: StrictStr | None = None
    args: list[Scalar] = []
    env: dict[str, Scalar] = {}
    n_ctx: Annotated[StrictInt, Field(gt=0)] = 2048
    n_threads: Annotated[StrictInt, Field(gt=0)] = 2
    ready_timeout_s: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)] = 300.0


LAUNCH_KEYS = tuple(Launch.model_fields)


def check_launch(name: str, launch: Any) -> Launch:
    """``launch`` validated, or a :class:`LaunchConfigError` naming the backend and the field."""
    try:
        return Launch.model_validate(launch)
    except ValidationError as err:
        problem = field_problem(err, {(): list(LAUNCH_KEYS)}, noun="launch field")
        raise LaunchConfigError(f"backend {name!r}: {problem}") from None


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


def _flags(pairs: Mapping[str, object]) -> list[str]:
    return [str(x) for pair in pairs.items() for x in pair]


_S = TypeVar("_S", bound="LaunchSpec")


class LaunchSpec:
    """A backend's checked ``launch`` mapping: the server's command, environment and pre-flight checks.

    Built from a catalog backend with :meth:`from_backend` or from a bare ``launch`` mapping with
    :meth:`from_launch`. ``base_url`` is the OpenAI root (``http://host:port/v1``). A
    :class:`LaunchConfigError` names the backend and the bad field.
    """

    def __init__(self, name: str, launch: Mapping[str, Any], served_model_id: str | None = None) -> None:
        self.name = name
        self.served_model_id = served_model_id or name
        spec = check_launch(name, launch)
        self.engine: str = spec.engine
        self.model = Path(spec.model).expanduser()
        self.port: int = spec.port
        self.host: str = spec.host
        self.args = [str(a) for a in spec.args]
        self.env = {k: str(v) for k, v in spec.env.items()}
        self.n_ctx, self.n_threads, self.ready_timeout_s = spec.n_ctx, spec.n_threads, spec.ready_timeout_s
        self.python = spec.python or os.environ.get(PYTHON_ENV[self.engine]) or _setup_python(self.engine)

    @classmethod
    def from_launch(
        cls: type[_S], name: str, launch: Mapping[str, Any], served_model_id: str | None = None, **kw: Any
    ) -> _S:
        return cls(name, launch, served_model_id, **kw)

    @classmethod
    def from_backend(cls: type[_S], backend: Backend, **kw: Any) -> _S:
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
        return f"{type(self).__name__}({self.name!r}, engine={self.engine!r}, port={self.port})"

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
                for k, v in (
                    ("--n_ctx", self.n_ctx),
                    ("--n_threads", self.n_threads),
                    # llama-cpp-python cuts a running stream short (an empty answer, then [DONE])
                    # whenever another request arrives, /v1/models included: the proxy's requests
                    # queue instead
                    ("--interrupt_requests", "False"),
                )
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
