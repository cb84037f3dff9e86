"""The routing log: one JSON line per routed request, from which new training data is built.

Each line (schema ``v`` 1) holds the request id and time, the prompt (full text, its sha256 only,
or nothing, per ``log_prompts``), the decision (task and its confidence, routed model, policy, knob,
predicted quality per model, expected cost, planned fallbacks), the ``propensity`` (the probability
the policy had of choosing that model: 1.0 for deterministic policies, the mixing probability for
random ones), and what happened (the model that answered, fallbacks tried, latency, TTFT, tokens,
cost, ``outcome`` ``"ok"`` or an error type). Every string is scrubbed of anything that looks like
a credential (``sk-...``, ``Bearer ...``, ``api_key=...``, the values of ``*_API_KEY``/``*TOKEN``/
``*SECRET`` environment variables), and mapping keys such as ``Authorization`` lose their values.

Crash safety: a line is one ``write`` on an ``O_APPEND`` descriptor (optionally ``fsync``-ed), so a
crash leaves at most a torn last line, which :func:`read_routing_log` skips; reopening a log that
ends in a torn line seals it with a newline first. Files rotate by size (``routing.jsonl.1`` is
the newest backup); use one file per proxy process.
"""

from __future__ import annotations

from router_ml.serving.routing_log.conversion import log_files, read_routing_log, to_routing_table
from router_ml.serving.routing_log.redact import REDACTED, env_secrets, scrub
from router_ml.serving.routing_log.writer import (
    FIELDS,
    LOG_PROMPTS,
    NUMERIC,
    RoutingLog,
    RoutingLogError,
    policy_propensity,
)

__all__ = [
    "FIELDS",
    "LOG_PROMPTS",
    "NUMERIC",
    "REDACTED",
    "RoutingLog",
    "RoutingLogError",
    "env_secrets",
    "log_files",
    "policy_propensity",
    "read_routing_log",
    "scrub",
    "to_routing_table",
]
