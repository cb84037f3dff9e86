"""BackendClient against real loopback servers (in-process and a subprocess) on free local ports.

Covers answers and streams (TTFT, usage, cost), retries with Retry-After, the circuit breaker, the
fallback chain (500, hang, nothing listening, killed process), BadRequest, a stream cut mid-answer
and resumed on the fallback as one coherent text, the bearer key (never logged) and vLLM /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from router_ml.backends.breaker import CircuitBreaker
from router_ml.backends.catalog import Catalog
from router_ml.backends.client import BackendClient
from router_ml.backends.prompt_tokens import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE
from router_ml.backends.results import (
    AllBackendsFailed,
    BackendError,
    BackendTimeout,
    BadRequest,
    CircuitOpen,
    StreamInterrupted,
    parse_retry_after,
)
from router_ml.backends.streams import CONTINUE_PROMPT, overlap_to_strip
from router_ml.backends.vllm_metrics import MetricsParseError, apply_vllm_metrics, vllm_stats
from router_ml.decision.latency import LatencyModel
from tests.fakes.loopback import LoopbackServer, LoopbackThread, answer_text

MESSAGES = [{"role": "user", "content": "What is the capital of France and why is it famous?"}]
PAYLOAD = {"messages": MESSAGES, "max_tokens": 64}
EXPECTED = answer_text(MESSAGES)
PRICES = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}


def _catalog(ports, kinds=None, **kw) -> Catalog:
    kinds = kinds or ["vllm"] * len(ports)
    return Catalog.from_entries(
        [
            {
                "name": f"b{i}",
                "kind": kind,
                "base_url": f"http://127.0.0.1:{port}/v1",
                "served_model_id": f"served-{i}",
                "prices": PRICES,
                "latency": {"ttft_s": 0.01, "tokens_per_s": 1000},
                "tokenizer": "approx",
                "first_token_timeout_s": 0.3,
                **kw,
            }
            for i, (port, kind) in enumerate(zip(ports, kinds, strict=True))
        ],
        source="test",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _content(chunks) -> str:
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])


def test_chat_non_stream_reports_usage_cost_and_sends_the_served_id():
    async def main():
        async with LoopbackServer() as srv, BackendClient(_catalog([srv.port])) as client:
            full = await client.chat("b0", PAYLOAD)
            short = await client.chat("b0", {"messages": MESSAGES, "max_tokens": 3})
            return full, short, srv.last_request

    full, short, last = run(main())
    assert full.text == EXPECTED and full.finish_reason == "stop" and full.backend == "b0"
    assert full.raw["model"] == "served-0" and full.usage_source == "upstream"
    assert full.prompt_tokens == full.raw["usage"]["prompt_tokens"] > 0
    assert full.completion_tokens == len(EXPECTED.split())
    assert math.isclose(full.cost_usd, (full.prompt_tokens * 1.0 + full.completion_tokens * 2.0) / 1e6)
    assert full.attempts == 1 and full.tried == ["b0"] and full.ttft_s is None and full.latency_s > 0
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert last["stream"] is False and "stream_options" not in last


def test_stream_measures_ttft_and_usage_and_feeds_the_latency_model():
    async def main():
        async with LoopbackServer() as srv:
            cat = _catalog([srv.port])
            lat = LatencyModel(cat.pool())
            async with BackendClient(cat, latency_model=lat) as client:
                srv.set_fault("slow", delay_s=0.05, count=1)
                stream = await client.stream("b0", {"messages": MESSAGES, "max_tokens": 4})
                chunks = [c async for c in stream]
                plain = await client.stream("b0", {**PAYLOAD, "stream_options": {"include_usage": True}})
                plain_chunks = [c async for c in plain]
                return stream.result, chunks, plain.result, plain_chunks, srv.last_request, lat.snapshot()

    res, chunks, plain, plain_chunks, last, snap = run(main())
    assert _content(chunks) == res.text == " ".join(EXPECTED.split()[:4]) and res.finish_reason == "length"
    assert (
        0.05 <= res.ttft_s < res.latency_s and res.latency_s >= 0.2
    )  # first token after one delay, 4 delays
    assert res.completion_tokens == 4 and res.usage_source == "upstream"
    assert not any(c.get("usage") for c in chunks)  # the caller did not ask for usage
    assert all(c["model"] == "b0" for c in chunks)
    assert last["stream_options"] == {"include_usage": True}  # the client always asks upstream
    assert _content(plain_chunks) == EXPECTED and 0 < plain.ttft_s <= plain.latency_s
    usage = plain_chunks[-1]["usage"]
    assert plain_chunks[-1]["choices"] == [] and usage["completion_tokens"] == plain.completion_tokens
    assert snap.loc[0, "n_observed"] == 2 and snap.loc[0, "ttft_s"] != 0.01


def test_a_stream_without_usage_is_counted_with_the_tokenizer():
    async def main():
        async with LoopbackServer(stream_usage=False) as srv, BackendClient(_catalog([srv.port])) as client:
            stream = await client.stream("b0", {**PAYLOAD, "stream_options": {"include_usage": True}})
            return [c async for c in stream], stream.result

    chunks, res = run(main())
    assert res.usage_source == "counted"
    assert res.completion_tokens == math.ceil(len(EXPECTED) / 4)  # tokenizer "approx": ceil(chars / 4)
    # no chat template on disk for this backend: the text, plus the template's documented estimate
    assert (
        res.prompt_tokens
        == math.ceil(len(MESSAGES[0]["content"]) / 4) + TOKENS_PER_MESSAGE + REPLY_PRIMING_TOKENS
    )
    assert chunks[-1]["usage"]["completion_tokens"] == res.completion_tokens
    assert math.isclose(res.cost_usd, (res.prompt_tokens + 2 * res.completion_tokens) / 1e6)


def _smollm2_dir() -> Path:
    folder = Path(os.environ.get("ROUTER_ML_MODELS_DIR") or Path(__file__).resolve().parents[1] / "models")
    folder = folder / "smollm2-135m"
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"SmolLM2's tokenizer is not on disk ({folder}): bash scripts/setup_local_models.sh")
    return folder


def test_a_stream_without_usage_counts_its_prompt_through_the_chat_template():
    """A local vLLM model's tokenizer is on disk: the prompt is counted as the server counts it,
    with the template's role markers and SmolLM2's default system prompt (38 tokens for a message
    of 9), and a prefilled continuation without a new assistant header."""
    folder = _smollm2_dir()
    messages = [{"role": "user", "content": "Write three short sentences about the sea."}]

    async def main():
        async with LoopbackServer(stream_usage=False) as srv:
            cat = _catalog([srv.port], tokenizer=f"hf:{folder}")
            async with BackendClient(cat) as client:
                stream = await client.stream("b0", {"messages": messages, "max_tokens": 8})
                [c async for c in stream]
                cont = {"messages": [*messages, {"role": "assistant", "content": "The sea"}],
                        "continue_final_message": True}  # fmt: skip
                return stream.result, client.count_prompt(cat.get("b0"), cont), cat.get("b0")

    res, cont_tokens, backend = run(main(), timeout=60)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert res.usage_source == "counted"
    assert res.prompt_tokens == len(tok(ids, add_special_tokens=False)["input_ids"]) == 38
    assert res.prompt_tokens > 3 * count_tokens_of(backend, messages[0]["content"])
    cont = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": "The sea"}], continue_final_message=True, tokenize=False
    )
    assert cont.endswith("assistant\nThe sea")  # continued in place, no second assistant header
    assert cont_tokens == len(tok(cont, add_special_tokens=False)["input_ids"]) == 38 + 2


def count_tokens_of(backend, text: str) -> int:
    return BackendClient(Catalog([backend])).count_tokens(backend, text)


def test_retry_after_is_honoured_and_a_long_one_trips_the_circuit():
    async def main():
        async with (
            LoopbackServer() as srv,
            BackendClient(_catalog([srv.port]), retry_after_cap_s=0.8) as client,
        ):
            srv.set_fault("error429", retry_after=0.4, count=1)
            t = time.perf_counter()
            ok = await client.chat("b0", PAYLOAD)
            waited = time.perf_counter() - t
            srv.set_fault("error503", retry_after=3, count=1)
            with pytest.raises(BackendError) as info:
                await client.chat("b0", PAYLOAD)
            return ok, waited, info.value, client.breaker.state("b0"), srv.stats["chat"]

    ok, waited, err, state, calls = run(main())
    assert ok.text == EXPECTED and ok.attempts == 2 and waited >= 0.4  # it waited as told
    assert err.status == 503 and err.retry_after == 3  # over the cap (0.8 s): given up, not retried,
    assert state == "open" and calls == 3  # and Retry-After: 3 opened the circuit for 3 s


def test_503_is_retried_until_it_succeeds():
    async def main():
        async with LoopbackServer() as srv, BackendClient(_catalog([srv.port])) as client:
            srv.set_fault("error503", retry_after=None, count=2)
            res = await client.chat("b0", PAYLOAD)
            srv.set_fault("bad_json", count=1)
            stream = await client.stream("b0", PAYLOAD)
            chunks = [c async for c in stream]
            srv.set_fault("cut_stream", count=1)
            cut = await client.chat("b0", PAYLOAD)
            return res, chunks, stream.result, cut, srv.stats

    res, chunks, sres, cut, stats = run(main())
    assert res.text == EXPECTED and res.attempts == 3 and stats["fault:error503"] == 2
    assert _content(chunks) == EXPECTED and sres.attempts == 2  # invalid JSON before content: retried
    assert cut.text == EXPECTED and cut.attempts == 2  # a body cut mid-way: retried


def test_circuit_opens_after_three_failures_and_closes_after_the_cooldown():
    async def main():
        async with LoopbackServer() as srv:
            breaker = CircuitBreaker(fail_threshold=3, cooldown_s=0.3)
            async with BackendClient(_catalog([srv.port], max_retries=0), breaker=breaker) as client:
                srv.set_fault("error500")
                for _ in range(3):
                    with pytest.raises(BackendError, match="HTTP 500"):
                        await client.chat("b0", PAYLOAD)
                with pytest.raises(CircuitOpen):
                    await client.chat("b0", PAYLOAD)
                sent_while_open = srv.stats["chat"]
                states = [breaker.state("b0")]
                await asyncio.sleep(0.35)
                states.append(breaker.state("b0"))
                srv.set_fault("ok")
                res = await client.chat("b0", PAYLOAD)  # the half-open trial
                states.append(breaker.state("b0"))
                return sent_while_open, states, res

    sent, states, res = run(main())
    assert sent == 3 and states == ["open", "half_open", "closed"] and res.text == EXPECTED


def test_breaker_half_open_allows_one_trial_with_an_injected_clock():
    now = [0.0]
    br = CircuitBreaker(fail_threshold=2, cooldown_s=10, clock=lambda: now[0])
    br.record("a", False)
    assert not br.is_open("a") and br.allow("a")
    br.record("a", False)
    assert br.is_open("a") and not br.allow("a") and br.state("a") == "open"
    now[0] = 10.5
    assert br.state("a") == "half_open" and not br.is_open("a")
    assert br.allow("a") and not br.allow("a") and br.is_open("a")  # one trial only
    br.record("a", False)  # the trial failed: open again at once
    assert br.state("a") == "open"
    now[0] = 21.0
    assert br.allow("a")
    br.record("a", True)
    assert br.state("a") == "closed" and br.allow("a") and br.allow("a")
    now[0] = 40.0
    br.trip("a", 5)  # a Retry-After: open whatever the failure count
    assert br.state("a") == "open" and not br.allow("a")
    now[0] = 45.5
    assert br.allow("a")
    assert br.snapshot()["a"]["state"] == "half_open"


@pytest.mark.parametrize("stream", [False, True])
def test_fallback_when_the_first_backend_returns_500(stream):
    async def main():
        async with (
            LoopbackServer() as a,
            LoopbackServer() as b,
            BackendClient(_catalog([a.port, b.port])) as client,
        ):
            a.set_fault("error500")
            out = await client.chat_with_fallback(["b0", "b1"], PAYLOAD, stream=stream)
            text = _content([c async for c in out]) if stream else out.text
            res = out.result if stream else out
            return text, res, a.stats["chat"], b.stats["chat"]

    text, res, a_calls, b_calls = run(main())
    assert text == EXPECTED and res.backend == "b1" and res.tried == ["b0", "b1"]
    assert a_calls == 2 and b_calls == 1 and res.attempts == 3  # one retry before falling back
    assert "HTTP 500" in res.errors[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_hang_costs_only_the_first_token_deadline(stream):
    async def main():
        async with (
            LoopbackServer() as a,
            LoopbackServer() as b,
            BackendClient(_catalog([a.port, b.port])) as client,
        ):
            a.set_fault("hang")
            t = time.perf_counter()
            out = await client.chat_with_fallback(
                ["b0", "b1"], {"messages": MESSAGES, "max_tokens": 16}, stream
            )
            text = _content([c async for c in out]) if stream else out.text
            return text, (out.result if stream else out), time.perf_counter() - t, a.stats["chat"]

    text, res, elapsed, a_calls = run(main())  # run()'s 20 s guard fails a deadline that never fires
    assert text == " ".join(EXPECTED.split()[:16]) and res.backend == "b1"
    assert elapsed >= 0.3 and a_calls == 1  # it waited for the first-token deadline, then no retry
    # the deadline that fired: the first token's (stream), or the answer's = that plus max_tokens
    # decoded at half the expected speed (non-stream); not timeout_s (120 s)
    assert ("no first token within 0.3 s" if stream else "no answer within 0.33 s") in res.errors[0]


def test_a_hang_without_fallback_raises_a_timeout():
    async def main():
        async with LoopbackServer() as srv, BackendClient(_catalog([srv.port], max_retries=1)) as client:
            srv.set_fault("hang")
            t = time.perf_counter()
            with pytest.raises(BackendTimeout) as info:
                await client.stream("b0", PAYLOAD)
            return info.value, time.perf_counter() - t, srv.stats["chat"]

    err, elapsed, calls = run(main())
    assert err.retryable and calls == 2 and elapsed >= 0.6  # two attempts of 0.3 s each
    assert "no first token within 0.3 s" in str(err)  # the first-token deadline, not timeout_s (120 s)


def test_fallback_when_nothing_listens_and_when_all_fail():
    async def main():
        async with LoopbackServer() as b:
            cat = _catalog([_free_port(), b.port])
            async with BackendClient(cat) as client:
                res = await client.chat_with_fallback(["b0", "b1"], PAYLOAD)
                b.set_fault("error500")
                with pytest.raises(AllBackendsFailed) as info:
                    await client.chat_with_fallback(["b0", "b1"], PAYLOAD, stream=True)
                return res, info.value

    res, err = run(main())
    assert res.backend == "b1" and res.text == EXPECTED and "ConnectError" in res.errors[0]
    assert err.status == 500 and len(err.errors) == 2 and "HTTP 500" in err.errors[1]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_request_is_neither_retried_nor_sent_to_the_fallback(stream):
    async def main():
        async with (
            LoopbackServer() as a,
            LoopbackServer() as b,
            BackendClient(_catalog([a.port, b.port])) as client,
        ):
            with pytest.raises(BadRequest) as info:
                await client.chat_with_fallback(["b0", "b1"], {"messages": []}, stream=stream)
            return info.value, a.stats["chat"], b.stats["chat"], client.breaker.state("b0")

    err, a_calls, b_calls, state = run(main())
    assert err.status == 400 and not err.retryable and "messages" in err.message
    assert (a_calls, b_calls, state) == (1, 0, "closed")


@pytest.mark.parametrize("second_kind", ["vllm", "api"])
def test_a_stream_cut_mid_answer_resumes_on_the_fallback_as_one_text(second_kind):
    async def main():
        async with LoopbackServer() as a, LoopbackServer() as b:
            cat = _catalog([a.port, b.port], kinds=["vllm", second_kind])
            async with BackendClient(cat) as client:
                a.set_fault("cut_stream", after=5)
                payload = {**PAYLOAD, "stream_options": {"include_usage": True}}
                stream = await client.chat_with_fallback(["b0", "b1"], payload, stream=True)
                chunks = [c async for c in stream]
                return chunks, stream.result, b.last_request

    chunks, res, cont = run(main())
    assert _content(chunks) == EXPECTED == res.text  # nothing lost, nothing repeated
    assert res.tried == ["b0", "b1"] and res.backend == "b1" and "incomplete chunked read" in res.errors[0]
    assert [c["model"] for c in chunks if c["choices"]][:5] == ["b0"] * 5 and chunks[-2]["model"] == "b1"
    assert len({c["id"] for c in chunks}) == 1  # one stream for the caller
    assert sum(1 for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]) == 1
    partial = "".join(EXPECTED.split(" ")[:5]).strip()
    assert cont["messages"][1]["role"] == "assistant" and cont["messages"][1]["content"].startswith(
        "You said:"
    )
    if second_kind == "vllm":
        assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
        assert len(cont["messages"]) == 2
    else:
        assert cont["messages"][-1] == {"role": "user", "content": CONTINUE_PROMPT}
        assert "continue_final_message" not in cont
    assert cont["max_tokens"] < 64 and partial
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == res.completion_tokens >= len(EXPECTED.split())
    assert usage["prompt_tokens"] == res.prompt_tokens


def test_a_resume_skips_a_backend_that_rejects_the_continuation():
    async def main():
        async with (
            LoopbackServer() as a,
            LoopbackServer(api_key="k") as b,
            LoopbackServer() as c,
            BackendClient(_catalog([a.port, b.port, c.port])) as client,
        ):
            a.set_fault("cut_stream", after=2)
            stream = await client.chat_with_fallback(["b0", "b1", "b2"], PAYLOAD, stream=True)
            return _content([x async for x in stream]), stream.result

    text, res = run(main())
    assert text == EXPECTED and res.tried == ["b0", "b1", "b2"] and "HTTP 401" in res.errors[1]


def test_a_cut_without_a_fallback_raises_stream_interrupted_with_the_partial_text():
    async def main():
        async with LoopbackServer() as srv, BackendClient(_catalog([srv.port])) as client:
            srv.set_fault("cut_stream", after=3)
            stream = await client.stream("b0", PAYLOAD)
            got = []
            with pytest.raises(StreamInterrupted) as info:
                async for chunk in stream:
                    got.append(chunk)
            return info.value, _content(got), client.breaker.snapshot()["b0"]

    err, text, breaker = run(main())
    assert err.partial == text and EXPECTED.startswith(text) and len(text.split()) == 3
    assert breaker["failures"] == 1


def test_overlap_to_strip_cuts_repeated_text_only():
    partial = "The capital of France is Paris, a city"
    assert overlap_to_strip(partial, " famous for art.") == 0
    assert overlap_to_strip(partial, "The capital") is None  # might be a restart: hold it
    assert overlap_to_strip(partial, partial + " famous") == len(partial)  # a restart
    assert overlap_to_strip(partial, "Paris, a city famous") == len("Paris, a city")  # a repeated tail
    assert overlap_to_strip(partial, " city", final=True) == 0  # too short to call a repetition
    assert overlap_to_strip(partial, "", final=True) == 0


def test_the_api_key_goes_as_bearer_and_never_into_logs(monkeypatch, caplog):
    secret = "sk-test-0123456789abcdefSECRET"
    caplog.set_level(logging.DEBUG)

    async def main():
        async with LoopbackServer(api_key=secret) as srv:
            cat = _catalog([srv.port], api_key_env="ROUTER_ML_TEST_KEY")
            async with BackendClient(cat) as client:
                monkeypatch.delenv("ROUTER_ML_TEST_KEY", raising=False)
                with pytest.raises(BadRequest) as info:
                    await client.chat("b0", PAYLOAD)
                monkeypatch.setenv("ROUTER_ML_TEST_KEY", secret)
                res = await client.chat("b0", PAYLOAD)
                stream = await client.stream("b0", PAYLOAD)
                text = _content([c async for c in stream])
                srv.set_fault("error500", count=1)
                await client.chat("b0", PAYLOAD)  # a retry logs the failure
                return info.value, res, text

    err, res, text = run(main())
    assert err.status == 401 and res.text == EXPECTED == text
    assert any("attempt 1 failed" in r.getMessage() for r in caplog.records)
    assert secret not in caplog.text
    assert all(secret not in r.getMessage() and secret not in str(r.args) for r in caplog.records)


def test_vllm_metrics_are_scraped_and_fed_to_the_latency_model():
    async def main():
        async with LoopbackServer() as srv:
            cat = _catalog([srv.port])
            lat = LatencyModel(cat.pool())
            async with BackendClient(cat) as client:
                before = await client.scrape_metrics("b0")
                for _ in range(2):
                    stream = await client.stream("b0", PAYLOAD)
                    [c async for c in stream]
                after = await client.scrape_metrics("b0")
                return before, after, apply_vllm_metrics(lat, "b0", after, before), lat.snapshot()

    before, after, (ttft, tps), snap = run(main())
    assert before["ttft_count"] == 0 and after["ttft_count"] == 2 and after["num_requests_running"] == 0
    assert after["num_requests_waiting"] == 0 and after["kv_cache_usage_perc"] == 0.0
    assert ttft == after["ttft_sum_s"] / 2 > 0 and tps is None
    assert snap.loc[0, "n_observed"] == 1 and math.isclose(snap.loc[0, "ttft_s"], 0.8 * 0.01 + 0.2 * ttft)


def test_vllm_stats_parse_a_real_metrics_page():
    page = "\n".join(
        [
            "# HELP vllm:num_requests_waiting Number of requests waiting.",
            "# TYPE vllm:num_requests_waiting gauge",
            'vllm:num_requests_waiting{engine="0",model_name="smollm2-135m"} 3.0',
            'vllm:num_requests_waiting{engine="1",model_name="smollm2-135m"} 1.0',
            'vllm:num_requests_running{engine="0",model_name="smollm2-135m"} 4.0',
            'vllm:gpu_cache_usage_perc{engine="0",model_name="smollm2-135m"} 0.25',
            'vllm:time_to_first_token_seconds_bucket{le="0.05",model_name="smollm2-135m"} 7.0',
            'vllm:time_to_first_token_seconds_sum{model_name="smollm2-135m"} 0.9',
            'vllm:time_to_first_token_seconds_count{model_name="smollm2-135m"} 10.0',
            'vllm:time_per_output_token_seconds_sum{model_name="smollm2-135m"} 1.5',
            'vllm:time_per_output_token_seconds_count{model_name="smollm2-135m"} 100.0',
        ]
    )
    s = vllm_stats(page)
    assert (s["num_requests_waiting"], s["num_requests_running"], s["kv_cache_usage_perc"]) == (
        4.0,
        4.0,
        0.25,
    )
    assert math.isclose(s["ttft_mean_s"], 0.09) and math.isclose(s["itl_mean_s"], 0.015)
    assert vllm_stats("# HELP nothing here\n")["num_requests_waiting"] is None
    with pytest.raises(MetricsParseError, match="not a Prometheus metrics page"):
        vllm_stats("<html><body>502 Bad Gateway</body></html>")
    assert parse_retry_after("2") == 2.0 and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1  # a past date: retry now


def test_many_concurrent_streams_share_one_connection_pool():
    async def main():
        async with LoopbackServer() as srv, BackendClient(_catalog([srv.port])) as client:

            async def one(i: int) -> str:
                msgs = [{"role": "user", "content": f"request number {i}"}]
                stream = await client.stream("b0", {"messages": msgs})
                return _content([c async for c in stream])

            texts = await asyncio.gather(*(one(i) for i in range(64)))
            opened = srv.stats["connections"]
            for i in range(5):  # finished streams hand their connection back to the pool
                await one(i)
                await client.chat("b0", PAYLOAD)
            return texts, srv.stats["chat"], opened, srv.stats["connections"]

    texts, calls, opened, after = run(main())
    assert calls == 74 and opened <= 64 and after == opened  # keep-alive: no new connection
    assert texts == [answer_text([{"role": "user", "content": f"request number {i}"}]) for i in range(64)]


def test_a_killed_subprocess_backend_falls_back_to_the_next():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.loopback", "--port", "0", "--model-id", "served-0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=Path(__file__).resolve().parents[1],  # tests.fakes is importable from the repository root
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        port = int(line.split("127.0.0.1:")[1].split()[0])

        async def main():
            async with LoopbackServer() as b, BackendClient(_catalog([port, b.port])) as client:
                first = await client.chat_with_fallback(["b0", "b1"], PAYLOAD)
                httpx.post(
                    f"http://127.0.0.1:{port}/fault",
                    json={"mode": "error503", "count": 1, "retry_after": 0.1},
                )
                retried = await client.chat("b0", PAYLOAD)
                proc.terminate()  # by handle, mid-test
                await asyncio.to_thread(proc.wait, 10)
                after = await client.chat_with_fallback(["b0", "b1"], PAYLOAD, stream=True)
                text = _content([c async for c in after])
                return first, retried, after.result, text

        first, retried, after, text = run(main())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert first.backend == "b0" and first.raw["model"] == "served-0"
    assert retried.attempts == 2 and retried.text == EXPECTED
    assert after.backend == "b1" and text == EXPECTED and after.tried == ["b0", "b1"]


def test_the_official_openai_client_speaks_to_the_loopback_server():
    openai = pytest.importorskip("openai")
    with LoopbackThread(model_id="loop") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
        done = client.chat.completions.create(model="loop", messages=MESSAGES)
        chunks = list(
            client.chat.completions.create(
                model="loop", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        srv.set_fault("error429", retry_after=0.1, count=1)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="loop", messages=MESSAGES)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=MESSAGES)
        models = client.models.list()
    assert done.choices[0].message.content == EXPECTED and done.usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == EXPECTED
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [m.id for m in models] == ["loop"]


@pytest.mark.parametrize("stream", [False, True])
def test_the_fallback_chain_skips_a_second_name_for_a_server_already_tried(stream):
    """b0 and b1 are two catalog names for one server: when it fails, b1 is not tried (it would
    fail the same way), b2 on another server answers."""

    async def main():
        async with LoopbackServer() as a, LoopbackServer() as c:
            cat = _catalog([a.port, a.port, c.port])
            a.set_fault("error500")
            async with BackendClient(cat) as client:
                got = await client.chat_with_fallback(["b0", "b1", "b2"], PAYLOAD, stream=stream)
                if stream:
                    [x async for x in got]
                    got = got.result
                return got, a.stats["chat"], c.stats["chat"]

    res, a_calls, c_calls = run(main())
    assert res.backend == "b2" and res.tried == ["b0", "b2"]
    assert a_calls == 2 and c_calls == 1  # b0 once plus its one retry; b1 never
    assert any("'b1': skipped, its server" in e for e in res.errors)


@pytest.mark.parametrize("prefill_rate, resumes", [(1e9, False), (20.0, True)])
def test_a_resumed_streams_first_token_deadline_grows_with_its_prefill(prefill_rate, resumes):
    """The fallback takes 0.5 s to its first token, over its 0.3 s first-token deadline: the
    continuation (prompt + answer so far, ~40 tokens) at 20 prefill tokens/s buys it ~2 s more;
    at a rate that adds nothing it misses the deadline and the stream fails."""

    async def main():
        async with LoopbackServer() as a, LoopbackServer() as b:
            cat = _catalog([a.port, b.port], prefill_tokens_per_s=prefill_rate)
            a.set_fault("cut_stream", after=5)
            b.set_fault("slow", delay_s=0.5)
            async with BackendClient(cat) as client:
                stream = await client.chat_with_fallback(["b0", "b1"], PAYLOAD, stream=True)
                chunks = []
                try:
                    async for x in stream:
                        chunks.append(x)
                except AllBackendsFailed as err:
                    return None, err, stream.result
                return _content(chunks), None, stream.result

    text, err, res = run(main(), timeout=60)
    if resumes:
        assert text == EXPECTED and res.backend == "b1" and res.finish_reason == "stop"
    else:
        assert text is None and "no first token within 0.3 s" in str(err)


def test_a_stream_that_fails_mid_answer_is_settled_with_the_tokens_generated():
    """Every backend fails after the first one broke: the stream raises, and its result still
    counts the tokens the first backend generated (counted from the text: no usage came) and
    their cost, with no finish_reason."""

    async def main():
        async with LoopbackServer(stream_usage=False) as a:
            cat = _catalog([a.port, _free_port()])
            a.set_fault("cut_stream", after=6)
            async with BackendClient(cat) as client:
                stream = await client.chat_with_fallback(["b0", "b1"], PAYLOAD, stream=True)
                chunks = []
                with pytest.raises(AllBackendsFailed):
                    async for x in stream:
                        chunks.append(x)
                await stream.aclose()
                return _content(chunks), stream.result

    text, res = run(main())
    assert res is not None and res.finish_reason is None and res.text == text
    assert len(text.split()) == 6 and res.completion_tokens == math.ceil(len(text) / 4) > 0
    assert res.cost_usd > 0
    assert res.cost_usd == pytest.approx((res.prompt_tokens + 2 * res.completion_tokens) / 1e6)


def test_an_abandoned_stream_is_settled_with_what_it_generated():
    async def main():
        async with LoopbackServer(stream_usage=False) as a, BackendClient(_catalog([a.port])) as client:
            a.set_fault("slow", delay_s=0.02)
            stream = await client.stream("b0", PAYLOAD)
            got = [await stream.__anext__() for _ in range(4)]
            await stream.aclose()  # the caller went away
            return _content(got), stream.result

    text, res = run(main())
    assert text and res is not None and res.finish_reason is None
    assert res.completion_tokens >= math.ceil(len(text) / 4) and res.cost_usd > 0
