"""Read a vLLM server's Prometheus ``/metrics``: queue depth, KV-cache use, TTFT and decode speed,
and feed them to the latency model so latency-aware policies see the live server: the finished
requests' TTFT and decode speed (:func:`apply_vllm_metrics`) and the live queue's first-token
estimate (:func:`vllm_queue_load`, :mod:`router_ml.decision.queue`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import httpx

from router_ml.decision.queue import QueueLoad, queue_load

if TYPE_CHECKING:
    from router_ml.decision.latency import LatencyModel


class MetricsParseError(ValueError):
    """A ``/metrics`` page that is not Prometheus text exposition."""


def _families(text: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return list(text_string_to_metric_families(text))
    except ValueError as e:
        raise MetricsParseError(f"not a Prometheus metrics page: {e}") from e


def parse_prometheus(text: str) -> dict[str, list[float]]:
    """Prometheus text exposition -> sample name (with its suffix, e.g. ``_sum``) -> values over
    label sets, read with ``prometheus_client``'s parser."""
    return _values(_families(text))


def _values(families: list) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for family in families:
        for sample in family.samples:
            out.setdefault(sample.name, []).append(float(sample.value))
    return out


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _kv_cache_tokens(families: list) -> float | None:
    """Tokens the KV cache holds in all, from ``vllm:cache_config_info``'s labels (summed over
    engines): ``kv_cache_size_tokens``, else ``num_gpu_blocks`` x ``block_size``."""
    total = None
    for family in families:
        if family.name != "vllm:cache_config_info":
            continue
        for sample in family.samples:
            lab = sample.labels
            tokens = _number(lab.get("kv_cache_size_tokens"))
            if tokens is None:
                blocks, size = _number(lab.get("num_gpu_blocks")), _number(lab.get("block_size"))
                tokens = blocks * size if blocks is not None and size is not None else None
            if tokens is not None:
                total = (total or 0.0) + tokens
    return total


# The request histograms read (key -> vLLM metric names, the first exported wins): first-token
# time and seconds per output token (the live latency feed), and for the queue-aware estimate the
# time a request runs (prefill + decode), its prefill, its wait in the queue and its tokens.
HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds",),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "inference": ("vllm:request_inference_time_seconds",),
    "prefill": ("vllm:request_prefill_time_seconds",),
    "queue": ("vllm:request_queue_time_seconds",),
    "prompt_tokens": ("vllm:request_prompt_tokens",),
    "generation_tokens": ("vllm:request_generation_tokens",),
}


def vllm_stats(text: str) -> dict[str, float | None]:
    """The figures the router uses from a vLLM ``/metrics`` page (summed over models/engines).

    Keys: num_requests_waiting, num_requests_running, kv_cache_usage_perc (max over engines, 0-1),
    kv_cache_tokens (the cache's size in tokens, from ``vllm:cache_config_info``); per histogram
    of :data:`HISTOGRAMS` (ttft, itl = seconds per output token, inference, prefill, queue,
    prompt_tokens, generation_tokens) its ``<key>_sum_s`` / ``<key>_count`` / ``<key>_mean_s``
    since the server started (``_s`` also on the token counts, for one naming). Missing metrics
    give None.
    """
    families = _families(text)
    m = _values(families)

    def total(*names: str) -> float | None:
        for name in names:
            if name in m:
                return float(sum(m[name]))
        return None

    kv = m.get("vllm:kv_cache_usage_perc") or m.get("vllm:gpu_cache_usage_perc")
    out: dict[str, float | None] = {
        "num_requests_waiting": total("vllm:num_requests_waiting"),
        "num_requests_running": total("vllm:num_requests_running"),
        "kv_cache_usage_perc": max(kv) if kv else None,
        "kv_cache_tokens": _kv_cache_tokens(families),
    }
    for key, base in HISTOGRAMS.items():
        s, c = total(*(b + "_sum" for b in base)), total(*(b + "_count" for b in base))
        out[f"{key}_sum_s"], out[f"{key}_count"] = s, c
        out[f"{key}_mean_s"] = s / c if s is not None and c else None
    return out


async def scrape_vllm_metrics(
    base_url_root: str, http: httpx.AsyncClient | None = None, timeout_s: float = 2.0
) -> dict[str, float | None]:
    """GET ``<root>/metrics`` of a vLLM server and return :func:`vllm_stats` (a ``/v1`` suffix is dropped)."""
    root = base_url_root.rstrip("/")
    root = root[:-3] if root.endswith("/v1") else root
    if http is None:
        async with httpx.AsyncClient(trust_env=False) as own:
            resp = await own.get(f"{root}/metrics", timeout=timeout_s)
    else:
        resp = await http.get(f"{root}/metrics", timeout=timeout_s)
    resp.raise_for_status()
    return vllm_stats(resp.text)


def window_mean(
    key: str, current: Mapping[str, float | None], previous: Mapping[str, float | None] | None = None
) -> float | None:
    """Mean of histogram ``key`` over the requests vLLM finished between two scrapes (``previous``
    None: since the server started); None where none finished."""
    s, c = current.get(f"{key}_sum_s"), current.get(f"{key}_count")
    if s is None or c is None:
        return None
    if previous is not None and previous.get(f"{key}_count") is not None:
        s, c = s - (previous.get(f"{key}_sum_s") or 0.0), c - (previous.get(f"{key}_count") or 0.0)
    return s / c if c > 0 and s >= 0 else None


def recent_mean(
    key: str, current: Mapping[str, float | None], previous: Mapping[str, float | None] | None = None
) -> float | None:
    """:func:`window_mean` between the scrapes, or since the start when none finished in between."""
    got = window_mean(key, current, previous)
    return got if got is not None or previous is None else window_mean(key, current)


def vllm_queue_load(
    name: str,
    current: Mapping[str, float | None],
    previous: Mapping[str, float | None] | None = None,
    at: float | None = None,
) -> QueueLoad | None:
    """The queue-aware first-token estimate of backend ``name`` from a scrape (:func:`vllm_stats`):
    its waiting and running requests, KV-cache use, and the run / prefill times and token counts
    of its recent requests (:func:`~router_ml.decision.queue.queue_load`); None when the page
    lacks what it needs (the static estimate stands)."""
    usage, size = current.get("kv_cache_usage_perc"), current.get("kv_cache_tokens")
    prompt, generated = (
        recent_mean("prompt_tokens", current, previous),
        recent_mean("generation_tokens", current, previous),
    )
    return queue_load(
        name,
        time.monotonic() if at is None else at,
        waiting=current.get("num_requests_waiting"),
        running=current.get("num_requests_running"),
        inference_s=recent_mean("inference", current, previous),
        prefill_s=recent_mean("prefill", current, previous),
        kv_usage=usage,
        kv_free_tokens=(1.0 - usage) * size if usage is not None and size is not None else None,
        request_tokens=prompt + generated if prompt is not None and generated is not None else None,
    )


def apply_vllm_metrics(
    latency_model: LatencyModel,
    name: str,
    current: Mapping[str, float | None],
    previous: Mapping[str, float | None] | None = None,
    net_of_queue: bool = True,
) -> tuple[float | None, float | None]:
    """Feed ``latency_model`` the mean TTFT and decode speed of the requests vLLM finished between
    two scrapes (``previous`` None: since the server started). With ``net_of_queue`` the TTFT fed
    is the unqueued one where vLLM exports it: the mean prefill time of those requests (from their
    scheduling to their first token), because the live queue is counted by
    :func:`vllm_queue_load`, and counting past queueing in the static estimate too would count it
    twice. Returns (ttft_s, tokens_per_s) observed, None where no request finished."""
    itl = window_mean("itl", current, previous)
    unqueued = net_of_queue and current.get("prefill_count") is not None
    ttft = window_mean("prefill" if unqueued else "ttft", current, previous)
    ttft = ttft if ttft else None
    tps = 1.0 / itl if itl else None
    latency_model.observe(name, ttft, tps)
    return ttft, tps
