"""Read a vLLM server's Prometheus ``/metrics``: queue depth, KV-cache use, TTFT and decode speed,
and feed them to the latency model so latency-aware policies see the live server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from router_ml.decision.latency import LatencyModel


class MetricsParseError(ValueError):
    """A ``/metrics`` page that is not Prometheus text exposition."""


def parse_prometheus(text: str) -> dict[str, list[float]]:
    """Prometheus text exposition -> sample name (with its suffix, e.g. ``_sum``) -> values over
    label sets, read with ``prometheus_client``'s parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append(float(sample.value))
    except ValueError as e:
        raise MetricsParseError(f"not a Prometheus metrics page: {e}") from e
    return out


def vllm_stats(text: str) -> dict[str, float | None]:
    """The figures the router uses from a vLLM ``/metrics`` page (summed over models/engines).

    Keys: num_requests_waiting, num_requests_running, kv_cache_usage_perc (max over engines, 0-1),
    ttft_sum_s / ttft_count / ttft_mean_s (the TTFT histogram since start), itl_sum_s / itl_count /
    itl_mean_s (seconds per output token). Missing metrics give None.
    """
    m = parse_prometheus(text)

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
    }
    for key, base in (
        ("ttft", ("vllm:time_to_first_token_seconds",)),
        ("itl", ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")),
    ):
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


def apply_vllm_metrics(
    latency_model: LatencyModel,
    name: str,
    current: Mapping[str, float | None],
    previous: Mapping[str, float | None] | None = None,
) -> tuple[float | None, float | None]:
    """Feed ``latency_model`` the mean TTFT and decode speed of the requests vLLM finished between
    two scrapes (``previous`` None: since the server started). Returns (ttft_s, tokens_per_s)
    observed, None where no request finished."""

    def mean(key: str) -> float | None:
        s, c = current.get(f"{key}_sum_s"), current.get(f"{key}_count")
        if s is None or c is None:
            return None
        if previous is not None and previous.get(f"{key}_count") is not None:
            s, c = s - (previous.get(f"{key}_sum_s") or 0.0), c - (previous.get(f"{key}_count") or 0.0)
        return s / c if c > 0 and s > 0 else None

    ttft, itl = mean("ttft"), mean("itl")
    tps = 1.0 / itl if itl else None
    latency_model.observe(name, ttft, tps)
    return ttft, tps
