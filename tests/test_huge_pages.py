"""``router-ml serve`` re-executes itself once with glibc's huge-page tunable (same PID, same args)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router_ml.serving.huge_pages import TUNABLE, _thp_mode, huge_page_env

REPO = Path(__file__).resolve().parents[1]
GLIBC = ("glibc", "2.36")


def test_env_adds_the_tunable_where_glibc_and_thp_allow() -> None:
    env = huge_page_env({"PATH": "/bin"}, "madvise", GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    assert huge_page_env({}, "always", GLIBC)["GLIBC_TUNABLES"] == TUNABLE
    kept = huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"  # the user's own stay


@pytest.mark.parametrize(
    ("environ", "thp", "libc"),
    [
        ({"GLIBC_TUNABLES": TUNABLE}, "madvise", GLIBC),  # set already: no second exec (no loop)
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user said no
        ({"ROUTER_ML_HUGEPAGES": "0"}, "madvise", GLIBC),  # our opt-out
        ({"ROUTER_ML_HUGEPAGES": "off"}, "always", GLIBC),
        ({}, "never", GLIBC),  # the kernel offers none
        ({}, None, GLIBC),  # unknown kernel setting
        ({}, "madvise", ("glibc", "2.31")),  # tunable unknown before glibc 2.35
        ({}, "madvise", ("", "")),  # musl and others
        ({}, "madvise", ("glibc", "weird")),
    ],
)
def test_env_is_left_alone(environ: dict, thp: str | None, libc: tuple[str, str]) -> None:
    assert huge_page_env(environ, thp, libc) is None


@pytest.mark.skipif(
    sys.platform != "linux" or huge_page_env({}, _thp_mode(), __import__("platform").libc_ver()) is None,
    reason="needs Linux, glibc >= 2.35 and transparent huge pages",
)
def test_serve_reexecutes_under_the_same_pid_with_the_tunable(tmp_path: Path) -> None:
    # a missing checkpoint: the re-executed process fails with our message, so the exec kept the args
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ROUTER_ML_HUGEPAGES")}
    probe = (
        "import os, runpy, sys; "
        "print('tunables', os.environ.get('GLIBC_TUNABLES'), 'pid', os.getpid(), flush=True); "
        "sys.argv = ['router-ml', *sys.argv[1:]]; runpy.run_module('router_ml.cli', run_name='__main__')"
    )
    cmd = [sys.executable, "-c", probe, "serve", "--ckpt", str(tmp_path / "none"), "--backends", "x.yaml"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("tunables")]
    assert [ln[1] for ln in lines] == ["None", TUNABLE], (out.stdout, out.stderr)
    assert lines[0][3] == lines[1][3], "exec keeps the PID (pid files and stop-by-PID stay valid)"
    assert out.returncode != 0 and "none" in out.stderr, out.stderr
