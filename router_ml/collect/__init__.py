"""Collect answers from a pool of backends: prompts in, one stored call per (prompt, model) out.

:mod:`~router_ml.collect.prompts` reads the prompt set (a user's JSONL / parquet, or a data
adapter), :mod:`~router_ml.collect.store` is the append-only SQLite store a ``kill -9`` cannot
damage, :mod:`~router_ml.collect.pacing` holds the per-backend concurrency and rate limits and the
run's spend cap, and :mod:`~router_ml.collect.runner` sends the calls through the proxy's
:class:`~router_ml.backends.client.BackendClient` (``python -m experiments.collect``,
``router-ml collect``).
"""
