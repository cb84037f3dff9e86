"""Run untrusted Python in a throwaway child process: time, memory and file-size limits, no network.

Each run gets a fresh temporary directory (its working directory, removed afterwards), a fresh
interpreter started isolated (``python -I``: no user site, no ``PYTHONPATH``, no current directory
on ``sys.path``) in its own process group, and these limits (POSIX rlimits the runner sets before
the program starts; no ``preexec_fn``, so scoring from threads is safe): address space
``memory_mb``, CPU seconds ``timeout_s + 1``, files written ``16 MiB``, no core dumps. Wall time is ``timeout_s``; past it the whole group is killed.

No network, twice over: where unprivileged user namespaces work (``unshare -rn``, probed once),
the child runs in a network namespace of its own with no interface but loopback; and in every case
the runner makes ``socket.socket`` / ``socket.create_connection`` raise before the program starts, so a
program that tries to connect gets ``PermissionError``. This is a guard against accidents and
careless code, not a jail for hostile code: run untrusted answers at scale inside a container.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_RUNNER = r"""
import resource, runpy, socket, sys
_mem, _cpu = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the scoring sandbox")
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()
socket.socket = _NoSocket
socket.create_connection = _no_network
socket.socketpair = _no_network
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""

OUTPUT_LIMIT = 4000  # characters of stdout / stderr kept


@dataclass(frozen=True)
class RunResult:
    """How the child ended. ``returncode`` None when it was killed for overrunning ``timeout_s``."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    network_namespace: bool

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@cache
def network_namespace_available() -> bool:
    """True when ``unshare -rn`` (a user + network namespace, no privileges) works here."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512) -> RunResult:
    """Run ``code`` as ``program.py`` in a fresh sandboxed interpreter; see the module docstring."""
    netns = network_namespace_available()
    with tempfile.TemporaryDirectory(prefix="router-ml-sandbox-") as tmp:
        Path(tmp, "program.py").write_text(code, encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", "-c", _RUNNER, str(memory_mb << 20), str(int(timeout_s) + 1)]
        if netns:
            cmd = ["unshare", "-rn", *cmd]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "HOME": tmp,
               "TMPDIR": tmp, "LANG": "C.UTF-8"}  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills everything it started
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        seconds = time.perf_counter() - t0
    return RunResult(
        returncode=None if timed_out else proc.returncode,
        stdout=out.decode("utf-8", "replace")[-OUTPUT_LIMIT:],
        stderr=err.decode("utf-8", "replace")[-OUTPUT_LIMIT:],
        timed_out=timed_out,
        seconds=seconds,
        network_namespace=netns,
    )
