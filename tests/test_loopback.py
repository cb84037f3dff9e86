"""The loopback server's faults, fault windows and arrival log; the launcher/loopback module splits."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from router_ml.backends.local import launch_spec, launcher, local_server
from tests.fakes import loopback
from tests.fakes.loopback import (
    Fault,
    FaultState,
    LoopbackThread,
    answer_text,
    fault_window_figures,
)


class FakeClock:
    """A settable clock (Unix seconds), shared with the server's thread."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _chat(http: httpx.Client, url: str, text: str = "hi there", **extra) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], **extra}
    return http.post(f"{url}/chat/completions", json=body)


# ----------------------------------------------------------------------------- fault_window_figures


def test_dropped_is_the_last_attempt_before_a_quiet_second():
    attempts = [1.0, 1.5, 2.0, 2.1, 2.2, 2.3, 7.4, 7.5, 7.6]  # fault [2, 5); quiet from 2.3 to 7.4
    served = [1.0, 1.5, 7.4, 7.5]
    view = fault_window_figures(attempts, served, onset=2.0, end=5.0)
    assert view["attempts_during_fault"] == 4
    assert view["dropped_after_s"] == pytest.approx(0.3)
    assert view["back_after_s"] == pytest.approx(2.4)


def test_never_dropped_when_attempts_keep_coming_and_zero_when_none_came():
    steady = [2.0 + 0.1 * i for i in range(60)]  # every 0.1 s through and after the fault
    view = fault_window_figures(steady, steady, onset=2.0, end=5.0)
    assert view["dropped_after_s"] is None and view["attempts_during_fault"] == 30
    assert view["back_after_s"] == pytest.approx(0.0, abs=1e-9)
    none = fault_window_figures([1.0, 6.0], [1.0, 6.0], onset=2.0, end=5.0)
    assert none == {
        "attempts_during_fault": 0,
        "dropped_after_s": 0.0,
        "back_after_s": pytest.approx(1.0),
        "back_for_good_s": pytest.approx(1.0),
    }


def test_back_for_good_skips_a_rest_that_starts_after_the_fault_end():
    # fault [2, 5): attempts on through it, one success at 5.1, then a 3 s rest (late failures), back at 8.2
    attempts = [2.0 + 0.1 * i for i in range(33)] + [8.2 + 0.1 * i for i in range(20)]
    served = [5.1, *attempts[33:]]
    view = fault_window_figures(attempts, served, onset=2.0, end=5.0, horizon=10.5)
    assert view["dropped_after_s"] is None
    assert view["back_after_s"] == pytest.approx(0.1) and view["back_for_good_s"] == pytest.approx(3.2)
    quiet_at_the_end = fault_window_figures([4.9, 5.1], [5.1], 2.0, 5.0, horizon=9.0)
    assert (
        quiet_at_the_end["back_after_s"] == pytest.approx(0.1) and quiet_at_the_end["back_for_good_s"] is None
    )


def test_a_quiet_time_may_run_past_the_fault_end_but_not_past_the_horizon():
    attempts = [4.5, 5.2]  # 0.7 s apart: not dropped at 4.5
    assert fault_window_figures(attempts, [], 2.0, 5.0)["dropped_after_s"] is None
    late = [4.5, 6.0]  # quiet 1.5 s, across the fault end
    assert fault_window_figures(late, [], 2.0, 5.0)["dropped_after_s"] == pytest.approx(2.5)
    assert fault_window_figures([4.5], [], 2.0, 5.0, horizon=5.2)["dropped_after_s"] is None
    assert fault_window_figures([4.5], [], 2.0, 5.0, horizon=9.0)["dropped_after_s"] == pytest.approx(2.5)
    assert fault_window_figures([4.5], [], 2.0, 5.0)["back_after_s"] is None


# ----------------------------------------------------------------------------- Fault and FaultState


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"mode": "error500", "duration_s": -1}, "duration_s"),
        ({"mode": "nope"}, "mode"),
        ({"count": 0}, "count"),
    ],
)
def test_fault_validation_names_the_field(body, field):
    with pytest.raises(ValueError, match=field):
        Fault.from_dict(body)


def test_a_fault_window_ends_on_its_own_and_logs_the_end_instant():
    clock = FakeClock(100.0)
    state = FaultState(clock=clock)
    state.set(Fault(mode="error500", duration_s=3.0))
    clock.t = 102.9
    assert state.take().mode == "error500"
    clock.t = 110.0  # the first look after the end: logged at 103, not 110
    assert state.take().mode == "ok"
    assert state.changes == [
        {"t": 100.0, "mode": "ok"},
        {"t": 100.0, "mode": "error500"},
        {"t": 103.0, "mode": "ok"},
    ]


def test_a_count_fault_ends_after_its_requests():
    state = FaultState(clock=FakeClock(5.0))
    state.set(Fault(mode="error503", count=2))
    assert [state.take().mode for _ in range(3)] == ["error503", "error503", "ok"]
    assert [c["mode"] for c in state.changes] == ["ok", "error503", "ok"]


# ----------------------------------------------------------------------------- the server's log over HTTP


def test_arrivals_log_each_request_with_its_fault_and_outcome():
    clock = FakeClock(1000.0)
    with LoopbackThread(clock=clock) as srv, httpx.Client(timeout=10) as http:
        url = srv.server.url
        assert http.post(f"{url}/fault", json={"mode": "error500", "duration_s": 5}).json()["duration_s"] == 5
        clock.t = 1001.0
        assert _chat(http, srv.base_url).status_code == 500
        clock.t = 1006.0  # past the window: healthy again without being told
        ok = _chat(http, srv.base_url, "back again")
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == answer_text(
            [{"role": "user", "content": "back again"}]
        )
        assert _chat(http, srv.base_url, max_tokens=0).status_code == 400
        log = http.get(f"{url}/arrivals").json()
        assert [(e["t"], e["mode"], e["status"], e["outcome"]) for e in log["arrivals"]] == [
            (1001.0, "error500", 500, "error"),
            (1006.0, "ok", 200, "ok"),
            (1006.0, None, 400, "error"),
        ]
        assert [(c["t"], c["mode"]) for c in log["faults"]][-2:] == [(1000.0, "error500"), (1005.0, "ok")]
        assert srv.arrivals()["arrivals"] == log["arrivals"]
        assert http.delete(f"{url}/arrivals").json()["arrivals"] == []
        assert http.put(f"{url}/arrivals").status_code == 405
        assert http.post(f"{url}/fault", json=[1]).status_code == 400


def _wait_outcome(srv: LoopbackThread, n: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        outcomes = [e["outcome"] for e in srv.arrivals()["arrivals"]]
        if len(outcomes) >= n and "pending" not in outcomes:
            return outcomes
        time.sleep(0.02)
    return outcomes


def test_a_hang_given_up_and_a_cut_stream_are_logged_as_such():
    with LoopbackThread() as srv:
        srv.set_fault("hang", count=1)
        with httpx.Client(timeout=0.2) as http, pytest.raises(httpx.ReadTimeout):
            _chat(http, srv.base_url)
        srv.set_fault("cut_stream", after=2, count=1)
        with httpx.Client(timeout=10) as http, pytest.raises(httpx.HTTPError):
            _chat(http, srv.base_url, stream=True).read()
        assert _wait_outcome(srv, 2) == ["abandoned", "cut"]


def test_listen_at_delays_the_listening_socket():
    listen_at = time.time() + 0.5
    cmd = [sys.executable, "-m", "tests.fakes.loopback", "--port", "0", "--listen-at", repr(listen_at)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+) ", line).group(1))
        log = httpx.get(f"http://127.0.0.1:{port}/arrivals", timeout=10).json()
        assert log["started_at"] >= listen_at and log["arrivals"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- the module splits


def test_local_servers_are_launch_specs_and_the_fake_server_exposes_its_parts():
    assert (
        callable(launcher.models_up) and callable(launcher.models_down) and callable(local_server.terminate)
    )
    assert issubclass(local_server.LocalServer, launch_spec.LaunchSpec)
    assert issubclass(launch_spec.LaunchConfigError, (launch_spec.LaunchError, ValueError))
    for name in (
        "LoopbackServer",
        "LoopbackThread",
        "Fault",
        "FAULT_MODES",
        "answer_text",
        "answer_rest",
        "main",
    ):
        assert hasattr(loopback, name)
    spec = launch_spec.LaunchSpec.from_launch("x", {"engine": "llamacpp", "model": "m.gguf", "port": 9})
    assert spec.command()[-6:] == ["--n_ctx", "2048", "--n_threads", "2", "--interrupt_requests", "False"]
    with pytest.raises(launch_spec.LaunchConfigError, match="'port'"):
        local_server.LocalServer.from_launch("x", {"model": "m", "port": 0})
