"""One local model server process: started in its own process group, watched, stopped as a group.

:class:`LocalServer` is a :class:`~router_ml.backends.local.launch_spec.LaunchSpec` (the checked launch
mapping and its command) with a life cycle: ``start()``, ``wait_ready()`` (polls ``/v1/models``),
``stop()`` (SIGTERM, then SIGKILL, to the whole group, found in ``/proc`` even when the server
itself is already dead). Beside each server runs a watchdog that stops the group as soon as the
server is gone (:mod:`~router_ml.backends.local.process_group`). :func:`terminate` stops any PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from router_ml.backends.local.launch_spec import (
    LaunchError,
    LaunchSpec,
    ServerExitedError,
    ServerNotReadyError,
    state_dir,
)
from router_ml.backends.local.process_group import (
    GroupSurvivedError,
    group_members,
    pid_alive,
    start_ticks,
    stop_group,
)

__all__ = ["LocalServer", "group_members", "pid_alive", "start_ticks", "stop_group", "terminate"]


def _tail(path: Path, n: int = 20) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join("    " + line for line in lines)
    return "    (no log)"


class LocalServer(LaunchSpec):
    """One OpenAI-compatible server process: ``start()``, ``wait_ready()``, ``stop()``; a context manager.

    A :class:`LaunchSpec` (built the same ways: :meth:`from_backend`, :meth:`from_launch`) with a
    life cycle; ``log_path`` (default ``<state dir>/logs/<name>.log``) takes the server's output.
    """

    def __init__(
        self,
        name: str,
        launch: Mapping[str, Any],
        served_model_id: str | None = None,
        *,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(name, launch, served_model_id)
        self.log_path = Path(log_path) if log_path else state_dir() / "logs" / f"{name}.log"
        self.pid: int | None = None
        self.ready_s: float | None = None  # seconds from start() to the first answer of /v1/models
        self._proc: subprocess.Popen | None = None
        self._started_at: float | None = None
        self._ticks: int | None = None  # the server's start time (clock ticks): names its group for good
        self._watchdog: subprocess.Popen | None = None  # stops the group when the server dies

    def __repr__(self) -> str:
        return f"LocalServer({self.name!r}, engine={self.engine!r}, port={self.port}, pid={self.pid})"

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
        self._ticks = start_ticks(self.pid)
        self._watchdog = self._start_watchdog()
        return self

    def _start_watchdog(self) -> subprocess.Popen | None:
        """The process that stops this server's group once the server is gone (killed by PID,
        crashed): vLLM's engine and workers would otherwise live on as orphans. In a session of
        its own, so that it outlives the process that started the server (``models up``)."""
        if self.pid is None or self._ticks is None:
            return None
        root = str(Path(__file__).resolve().parents[3])  # where router_ml is imported from
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        }
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "router_ml.backends.local.process_group",
                    str(self.pid),
                    str(self._ticks),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def is_running(self) -> bool:
        if self.pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return pid_alive(self.pid)

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
        """SIGTERM the server's process group, then SIGKILL after ``timeout`` s; a stopped server is a no-op.

        The group is stopped also when the server itself is already dead: vLLM's engine and worker
        processes outlive a killed API server in its group."""
        if self.pid is None:
            return
        if self._proc is not None:
            try:
                stop_group(self.pid, self._ticks, timeout, name=self.name)
            except GroupSurvivedError as e:
                raise LaunchError(str(e)) from None
            self._proc.wait(timeout=1)
        else:
            terminate(self.pid, timeout, alive=self.is_running, group=False, name=self.name)
        if self._watchdog is not None:  # it exits once the group is gone
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)

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
            "served_model_id": self.served_model_id, "log": str(self.log_path), "start_ticks": start_ticks(self.pid or -1),
            "pgid": self.pid,  # start_new_session: the server leads its own group, workers included
            "watchdog_pid": self._watchdog.pid if self._watchdog is not None else None,
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
    alive = alive or (lambda: pid_alive(pid))
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
