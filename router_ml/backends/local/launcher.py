"""Start and stop the local model servers of a catalog (``router-ml models up`` / ``models down``).

:func:`models_up` starts every local backend of a catalog (kind ``vllm`` with a ``launch``
mapping, see :mod:`router_ml.backends.local.launch_spec`) as a
:class:`~router_ml.backends.local.local_server.LocalServer`, records each in ``.router-ml/servers.json``
(``$ROUTER_ML_STATE_DIR``: PID, process group and start time) and waits until all answer;
:func:`models_down` stops them from any process, as process groups: vLLM's engine and worker
processes are found and stopped also when the API server's own PID is already dead. Nothing is
ever stopped by name. Logs go to ``.router-ml/logs/<name>.log``. The launch block and its errors
live in :mod:`~router_ml.backends.local.launch_spec`, the server process in
:mod:`~router_ml.backends.local.local_server`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router_ml.backends.local.launch_spec import (
    LaunchConfigError,
    LaunchError,
    state_dir,
)
from router_ml.backends.local.local_server import LocalServer
from router_ml.backends.local.process_group import (
    GroupSurvivedError,
    group_members,
    pid_alive,
    start_ticks,
    stop_group,
)

if TYPE_CHECKING:
    from router_ml.backends.catalog import Backend, Catalog

__all__ = ["local_backends", "models_down", "models_up"]


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


def _group_of(rec: Mapping[str, Any]) -> tuple[int, int | None] | None:
    """``(pgid, start ticks)`` of a recorded server whose processes may still run; None when its
    PID now names another process (the server died and the PID was reused: its group, which held
    that number, is then empty, so nothing of it can be left)."""
    pid, ticks = int(rec["pid"]), rec.get("start_ticks")
    if pid_alive(pid) and ticks is not None and start_ticks(pid) not in (None, ticks):
        return None
    if not pid_alive(pid) and ticks is None:
        return None  # no start time to tell the server's survivors from a reused group id
    return int(rec.get("pgid") or pid), ticks


def _running(rec: Mapping[str, Any]) -> bool:
    group = _group_of(rec)
    return group is not None and bool(group_members(*group))


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
    running = {k: v for k, v in _read_pids(path).items() if _running(v)}
    servers = []
    for backend in local_backends(catalog, names):
        if backend.name in running:
            rec = running[backend.name]
            raise LaunchError(
                f"backend {backend.name!r} is already running as process group "
                f"{rec.get('pgid') or rec['pid']} (per {str(path)!r}); run models_down first"
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
    """Stop the servers recorded in the PID file (all, or ``names``), from any process; return the
    names of those that had processes left.

    Each server is stopped as its process group (SIGTERM, then SIGKILL after ``timeout`` s), found
    in ``/proc``: vLLM's engine and workers are stopped also when the API server's PID is dead. A
    PID whose start time no longer matches the recorded one (the server died and the PID was
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
        group = _group_of(records[name])
        try:
            if group is not None and stop_group(*group, timeout, name=name):
                stopped.append(name)
        except GroupSurvivedError as e:
            raise LaunchError(str(e)) from None
        _update_pids(path, drop=[name])
    return stopped
