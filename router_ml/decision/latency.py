"""Latency priors from the llmperf measurements, and live estimates per model.

Latency model: ``completion_s = ttft_s + output_tokens / tokens_per_s`` (time to first token, then
single-stream decoding).

**Priors** come from ``llmperf_latency`` (LLMPerf leaderboard, Dec 2023: hosted Llama-2 chat 7B /
13B / 70B at 5 concurrent requests, ~550 input and ~150 output tokens). Per provider run, over its
successful requests: ``ttft_s`` = median time to first token (equal to the summary's p50), and
``tokens_per_s`` = median decode speed ``output_tokens / (end_to_end - ttft)``. The decode speed is
read from the per-request records because the summaries' ``request_output_throughput_token_per_s``
includes the TTFT and contradicts the records for several providers (replicate 7B: p50 0.5 tok/s,
though its requests decode ~97 tok/s). Per size, the prior is the median over providers that
measured **all three sizes** (anyscale, fireworks, lepton, replicate, together), so that the size
effect is not confounded by which providers ran a size (groq, 185 tok/s, ran only 70B; over all
providers the 70B TTFT median comes out below the 7B one).

Between sizes, priors are interpolated linearly in log(size) and clamped outside 7-70B. Speed
follows the *active* parameters: for mixture-of-experts names (``8x7b``) :func:`parse_params_b`
returns the active count (Mixtral 8x7B: 12.9B, 8x22B: 39B). A model whose size is unknown
(closed APIs) gets the 70B prior: an assumption, not a measurement.

**Live estimates**: :class:`LatencyModel` moves each model's TTFT and seconds-per-token by an
exponentially weighted moving average toward observed calls. **Live load**: a local server's
queue (:class:`~router_ml.decision.queue.QueueLoad`, from vLLM's metrics) raises the TTFT of the
models it serves while it is fresh (:meth:`LatencyModel.set_load`), so a saturated server loses
traffic at once instead of after its slow answers have moved the average; a stale or missing load
leaves the static estimate.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from router_ml.paths import source_dir

if TYPE_CHECKING:
    from router_ml.decision.queue import QueueLoad
    from router_ml.decision.spec import ModelPool

LLMPERF_FOLDER = "llmperf_latency"
# Active parameters (billions) of known mixture-of-experts layouts (experts, expert size):
# Mistral's model cards give 12.9B active for Mixtral 8x7B and 39B for 8x22B.
MOE_ACTIVE_B: dict[tuple[int, float], float] = {(8, 7.0): 12.9, (8, 22.0): 39.0}

_SEP = r"(?<![a-z0-9.])"  # the size starts a name token: "qwen2.5-7b" -> 7, not 2.5
_MOE_RE = re.compile(_SEP + r"(\d+)x(\d+(?:\.\d+)?)b(?![a-z])", re.IGNORECASE)
_SIZE_RE = re.compile(_SEP + r"(\d+(?:\.\d+)?)b(?![a-z])", re.IGNORECASE)


def parse_params_b(name: str) -> float | None:
    """Nominal size in billions from a model name; ``None`` when the name gives none.

    ``"llama3-70b-instruct"`` -> 70, ``"qwen2.5-1.5b"`` -> 1.5, ``"gpt-4o"`` -> None.
    Mixture-of-experts names give the **active** parameters, which set the decode speed:
    ``"mixtral-8x7b"`` -> 12.9, ``"8x22b"`` -> 39 (unknown layouts: two experts active, 2 x size).
    """
    moe = _MOE_RE.search(name)
    if moe:
        experts, size = int(moe.group(1)), float(moe.group(2))
        return MOE_ACTIVE_B.get((experts, size), 2.0 * size)
    m = _SIZE_RE.search(name)
    return float(m.group(1)) if m else None


@lru_cache(maxsize=4)
def _runs(root: str) -> pd.DataFrame:
    rows = []
    for path in sorted((Path(root) / "individual").glob("*_*b.json")):
        provider, _, size = path.stem.rpartition("_")
        ttft, decode = [], []
        for r in json.loads(path.read_text()):
            t, e2e, n = r.get("ttft_s"), r.get("end_to_end_latency_s"), r.get("number_output_tokens")
            if r.get("error_code") or not (t and e2e and n) or not 0 < t < e2e:
                continue
            ttft.append(t)
            decode.append(n / (e2e - t))
        if ttft:
            rows.append(
                (provider, float(size[:-1]), float(np.median(ttft)), float(np.median(decode)), len(ttft))
            )
    if not rows:
        raise FileNotFoundError(f"no llmperf runs with successful requests under {root!r}/individual")
    return pd.DataFrame(rows, columns=["provider", "params_b", "ttft_s", "tokens_per_s", "n_requests"])


def llmperf_runs(data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per provider run: provider, params_b, ttft_s, tokens_per_s (decode), n_requests (ok)."""
    return _runs(str(source_dir(LLMPERF_FOLDER, data_dir).resolve())).copy()


def llmperf_priors(data_dir: str | os.PathLike | None = None, matched: bool = True) -> pd.DataFrame:
    """Latency prior per size: median over providers of each run's ttft_s and decode tokens_per_s.

    Returns one row per size (7, 13, 70), sorted: params_b, ttft_s, tokens_per_s, n_providers,
    providers. ``matched`` keeps only providers that measured every size (see the module docstring).
    """
    runs = llmperf_runs(data_dir)
    if matched:
        sizes = runs["params_b"].nunique()
        counts = runs.groupby("provider")["params_b"].nunique()
        runs = runs[runs["provider"].isin(counts[counts == sizes].index)]
    out = runs.groupby("params_b").agg(
        ttft_s=("ttft_s", "median"),
        tokens_per_s=("tokens_per_s", "median"),
        n_providers=("provider", "size"),
        providers=("provider", lambda s: ",".join(sorted(s))),
    )
    return out.reset_index().sort_values("params_b", ignore_index=True)


PRIORS_FILE = Path(__file__).with_name("latency_priors.json")


def shipped_priors() -> pd.DataFrame:
    """:func:`llmperf_priors` as shipped with the package (``latency_priors.json``): what a router
    uses without the llmperf folder, e.g. a proxy installed from a wheel."""
    try:
        rows = json.loads(PRIORS_FILE.read_text())["priors"]
        return pd.DataFrame(rows, columns=["params_b", "ttft_s", "tokens_per_s", "n_providers", "providers"])
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"the package's latency priors {str(PRIORS_FILE)!r} cannot be read: {e}") from e


def write_priors(data_dir: str | os.PathLike | None = None) -> Path:
    """Recompute the shipped priors from the llmperf folder (``python -m router_ml.decision.latency``)."""
    rows = llmperf_priors(data_dir).to_dict(orient="records")
    doc = {
        "what": "latency prior per model size: per provider run, the median time to first token and the "
        "median decode speed of its successful requests; per size, the median over the providers that "
        "measured every size (router_ml.decision.latency.llmperf_priors)",
        "source": "LLMPerf leaderboard, Dec 2023: hosted Llama-2 chat 7B / 13B / 70B at 5 concurrent "
        "requests, ~550 input and ~150 output tokens (the llmperf_latency data set)",
        "regenerate": "python -m router_ml.decision.latency  (reads llmperf_latency from ROUTER_ML_DATA_DIR)",
        "priors": rows,
    }
    PRIORS_FILE.write_text(json.dumps(doc, indent=2) + "\n")
    return PRIORS_FILE


def latency_prior(params_b: float | None, data_dir: str | os.PathLike | None = None) -> tuple[float, float]:
    """(ttft_s, tokens_per_s) for a model of ``params_b`` billion (active) parameters.

    Linear in log(size) between the llmperf sizes, clamped outside them; ``None`` (size unknown,
    e.g. a closed API) -> the largest measured size's prior (70B), an assumption. The priors are
    the package's (:func:`shipped_priors`), or computed from the llmperf folder ``data_dir``.
    """
    priors = shipped_priors() if data_dir is None else llmperf_priors(data_dir)
    if params_b is None:
        last = priors.iloc[-1]
        return float(last["ttft_s"]), float(last["tokens_per_s"])
    if not (math.isfinite(params_b) and params_b > 0):
        raise ValueError(f"latency_prior: params_b = {params_b!r} must be a finite number > 0 (or None)")
    x = np.log(priors["params_b"].to_numpy())
    at = math.log(params_b)
    ttft = float(np.interp(at, x, priors["ttft_s"].to_numpy()))
    # interpolate seconds per token (what adds up in a completion), report tokens per second
    spt = float(np.interp(at, x, 1.0 / priors["tokens_per_s"].to_numpy()))
    return ttft, 1.0 / spt


class LatencyModel:
    """Per-model TTFT and decode speed: priors from the pool's specs, EWMA updates from live calls.

    ``alpha`` is the weight of a new observation (0 < alpha <= 1); ``data_dir`` is where the
    llmperf priors are read for specs without ``ttft_s`` / ``tokens_per_s``. Decode speed is averaged as
    seconds per token, so the expected completion time is an average of observed times.
    ``load_max_age_s``: how long a server's live load (:meth:`set_load`) counts after its scrape.
    """

    def __init__(
        self,
        pool: ModelPool,
        alpha: float = 0.2,
        data_dir: str | os.PathLike | None = None,
        load_max_age_s: float = 30.0,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ValueError(f"LatencyModel: alpha = {alpha!r} must be in (0, 1]")
        self.pool = pool
        self.alpha = float(alpha)
        self.load_max_age_s = float(load_max_age_s)
        self._loads: dict[int, QueueLoad] = {}  # pool column -> its server's last live load
        ttft, tps = [], []
        for spec in pool:
            prior = None
            if spec.ttft_s is None or spec.tokens_per_s is None:
                prior = latency_prior(spec.params_b, data_dir)
            ttft.append(spec.ttft_s if spec.ttft_s is not None else prior[0])
            tps.append(spec.tokens_per_s if spec.tokens_per_s is not None else prior[1])
        self._ttft = np.array(ttft, dtype="float64")  # (m,), read-only: observe() replaces it
        self._spt = 1.0 / np.array(tps, dtype="float64")  # (m,) seconds per output token, likewise
        self._ttft.flags.writeable = self._spt.flags.writeable = False
        self._n = np.zeros(len(pool), dtype="int64")  # (m,) observations that updated the model
        self._lock = threading.Lock()

    @property
    def ttft(self) -> np.ndarray:
        """(m,) current time-to-first-token estimates, seconds."""
        with self._lock:
            return self._ttft.copy()

    @property
    def tokens_per_s(self) -> np.ndarray:
        """(m,) current decode-speed estimates, tokens per second."""
        with self._lock:
            return 1.0 / self._spt

    def observe(self, model: str, ttft_s: float | None = None, tokens_per_s: float | None = None) -> None:
        """Fold one finished call into ``model``'s estimates; non-finite or non-positive values are ignored."""
        j = self.pool.index(model)  # UnknownModelError
        ok_t = ttft_s is not None and math.isfinite(ttft_s) and ttft_s > 0
        ok_s = tokens_per_s is not None and math.isfinite(tokens_per_s) and tokens_per_s > 0
        if not (ok_t or ok_s):
            return
        a = self.alpha
        with self._lock:  # new arrays, not writes into the old ones: readers hold those without a copy
            if ok_t:
                ttft = self._ttft.copy()
                ttft[j] = (1 - a) * ttft[j] + a * ttft_s
                ttft.flags.writeable = False
                self._ttft = ttft
            if ok_s:
                spt = self._spt.copy()
                spt[j] = (1 - a) * spt[j] + a / tokens_per_s
                spt.flags.writeable = False
                self._spt = spt
            self._n[j] += 1

    def set_load(self, model: str, load: QueueLoad | None) -> None:
        """The live load of the server behind ``model`` (None: forget it, the static estimate
        stands): while fresh, its first-token estimate raises ``model``'s (:meth:`expected`)."""
        j = self.pool.index(model)  # UnknownModelError
        with self._lock:
            loads = dict(self._loads)  # a new dict: readers hold the old one without a lock
            if load is None:
                loads.pop(j, None)
            else:
                loads[j] = load
            self._loads = loads

    def _in_effect(self, ttft: np.ndarray, now: float) -> dict[int, QueueLoad]:
        """Column -> the live load that raises its TTFT: fresh, requests waiting or the KV cache
        full, and slower than the static ``ttft`` (m,)."""
        return {
            j: load
            for j, load in self._loads.items()
            if load.loaded and now - load.at <= self.load_max_age_s and load.ttft_s > ttft[j]
        }

    def loads(self, now: float | None = None) -> dict[str, QueueLoad]:
        """Model -> the live load that raises its first-token estimate now: what a decision's
        reason reports. A server with nobody waiting keeps the static estimate (its finished
        requests' figures feed that)."""
        if not self._loads:
            return {}
        got = self._in_effect(self._ttft, time.monotonic() if now is None else now)
        return {self.pool.names[j]: load for j, load in got.items()}

    def _live_ttft(self, ttft: np.ndarray) -> np.ndarray:
        """``ttft`` (m,) raised by the live loads in effect (a copy when any applies)."""
        if not self._loads:
            return ttft
        got = self._in_effect(ttft, time.monotonic())
        if not got:
            return ttft
        ttft = ttft.copy()
        for j, load in got.items():
            ttft[j] = load.ttft_s
        return ttft

    def expected(self, output_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``output_tokens`` (n, m) -> (ttft (n, m), completion = ttft + out / tokens_per_s (n, m)).

        A model whose server reported a fresh live load (:meth:`set_load`) gets the larger of
        its static TTFT and the queue-aware one."""
        out = np.asarray(output_tokens, dtype="float64")
        if out.ndim != 2 or out.shape[1] != len(self.pool):
            raise ValueError(
                f"LatencyModel.expected: output_tokens has shape {out.shape}; expected (n, {len(self.pool)})"
            )
        with self._lock:
            ttft, spt = self._ttft, self._spt  # read-only: observe() replaces them
        ttft = self._live_ttft(ttft)
        return ttft[None, :].repeat(len(out), axis=0), ttft + out * spt

    def snapshot(self) -> pd.DataFrame:
        """One row per model: model, ttft_s, tokens_per_s, n_observed, source ("prior" | "live"),
        queue_ttft_s (the first-token estimate a fresh live load raised it to; None: none)."""
        with self._lock:
            ttft, spt, n = self._ttft.copy(), self._spt.copy(), self._n.copy()
        loads = self.loads()
        return pd.DataFrame(
            {
                "model": self.pool.names,
                "ttft_s": ttft,
                "tokens_per_s": 1.0 / spt,
                "n_observed": n,
                "source": np.where(n > 0, "live", "prior"),
                "queue_ttft_s": pd.Series(
                    [loads[m].ttft_s if m in loads else None for m in self.pool.names], dtype=object
                ),
            }
        )


if __name__ == "__main__":
    print(f"wrote {write_priors()}")
