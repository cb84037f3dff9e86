"""A local server's process group, read from ``/proc``: its members, stopping it, and a watchdog.

A local server starts in a session of its own, so it leads a process group that also holds what it
spawns (vLLM's engine core and workers). When the server itself dies (killed by PID, crashed), those
stay behind as orphans, holding memory and CPU. :func:`group_members` finds them by group id (and
start time, so that a group id a later session reuses is never mistaken for the server's),
:func:`stop_group` stops them (SIGTERM, then SIGKILL), and the **watchdog** (``python -m
router_ml.backends.local.process_group PID TICKS``, started beside each server by
:class:`~router_ml.backends.local.local_server.LocalServer`) stops the group as soon as its leader
is gone, so that orphans do not outlive their server by more than ``--grace`` seconds. Nothing is
ever stopped by name. Standard library only: the watchdog starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path

#: seconds the watchdog gives a dead server's orphans between SIGTERM and SIGKILL
WATCHDOG_GRACE_S = 2.0
#: how often the watchdog looks at the server
WATCHDOG_INTERVAL_S = 0.2


class GroupSurvivedError(RuntimeError):
    """A process of the group survived SIGKILL (a process in uninterruptible sleep, or not ours)."""


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat(pid)  # a zombie has exited even though kill(0) succeeds
    return fields is None or fields[0] != "Z"


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the PID, it names one process for good."""
    fields = _stat(pid)
    with contextlib.suppress(TypeError, IndexError, ValueError):
        return int(fields[19])  # type: ignore[index]
    return None


def group_members(pgid: int, since_ticks: int | None = None) -> list[int]:
    """The live processes of process group ``pgid`` (its leader may be dead), read from ``/proc``.

    ``since_ticks``: keep only processes started at or after that start time (clock ticks since
    boot), so that a group id reused by a later, unrelated session is never taken for the server's.
    """
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry.name)  # state ppid pgrp session ... starttime (index 19)
        with contextlib.suppress(TypeError, IndexError, ValueError):
            alive, started = fields[0] != "Z", int(fields[19])  # type: ignore[index]
            if int(fields[2]) == pgid and alive and (since_ticks is None or started >= since_ticks):  # type: ignore[index]
                out.append(int(entry.name))
    return sorted(out)


def stop_group(
    pgid: int, since_ticks: int | None = None, timeout: float = 10.0, *, name: str = ""
) -> list[int]:
    """Stop every process of group ``pgid``, whether or not its leader still runs: SIGTERM to the
    group, SIGKILL after ``timeout`` s to what is left; returns the PIDs that were found.

    ``since_ticks`` (the leader's recorded start time) skips a group id that a later session reuses.
    Raises :class:`GroupSurvivedError` when a member survives SIGKILL.
    """
    found = group_members(pgid, since_ticks)
    if not found:
        return []
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not group_members(pgid, since_ticks):
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while group_members(pgid, since_ticks) and time.monotonic() < deadline:
            time.sleep(0.05)
    left = group_members(pgid, since_ticks)
    if left:
        raise GroupSurvivedError(f"server {name!r}: processes {left} of group {pgid} survived SIGKILL")
    return found


def watch(
    pid: int, ticks: int | None, grace_s: float = WATCHDOG_GRACE_S, interval_s: float = WATCHDOG_INTERVAL_S
) -> list[int]:
    """Wait until the group leader ``pid`` (started at ``ticks``) is gone, then stop what is left of
    its group; returns the PIDs stopped. The watchdog's own body."""
    while pid_alive(pid) and (ticks is None or start_ticks(pid) in (None, ticks)):
        time.sleep(interval_s)
    return stop_group(pid, ticks, grace_s, name=f"pid {pid}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stop a server's process group once its leader is gone.")
    ap.add_argument("pid", type=int, help="the group leader (the server) and group id")
    ap.add_argument("ticks", type=int, help="the leader's start time (clock ticks since boot)")
    ap.add_argument("--grace", type=float, default=WATCHDOG_GRACE_S)
    args = ap.parse_args(argv)
    stopped = watch(args.pid, args.ticks, args.grace)
    if stopped:
        print(f"router-ml watchdog: server pid {args.pid} is gone; stopped its group {stopped}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
