"""Credential scrubbing for the routing log: key-like substrings, ``Bearer``/``api_key=`` values,
the values of credential environment variables and of keys such as ``Authorization``."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[REDACTED]"
_KEY_PATTERNS = re.compile(
    r"\bsk-[A-Za-z0-9_\-]{16,}"  # OpenAI, Anthropic (sk-ant-), DeepSeek, OpenRouter (sk-or-)
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_\-]{35}|\bhf_[A-Za-z0-9]{30,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{20,}|\b(?:xai|gsk|pplx|nvapi)-[A-Za-z0-9_\-]{20,}"
    r"|\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
)
# a credential after "Bearer"/"Basic" has a digit ("basic principles" is kept)
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)(?=[A-Za-z._~+/=\-]*[0-9])[A-Za-z0-9._~+/=\-]{8,}")
_ASSIGN = re.compile(
    r"(?i)\b((?:x-)?api[_-]?key|authorization|access[_-]?token|secret|password|passwd)"
    r"([\"']?\s*[:=]\s*[\"']?)(?!bearer\b|basic\b)[^\s\"',;}&]{6,}"
)
_SECRET_KEYS = re.compile(
    r"(?i)^(authorization|proxy-authorization|x-api-key|api[_-]?key|\w*_api_key|secret|client_secret"
    r"|password|cookie|set-cookie|access_token|refresh_token)$"
)
_SECRET_ENV = re.compile(r"(?i)(api_?key|token|secret|password|passwd)")


def env_secrets() -> set[str]:
    """Values (8+ characters) of environment variables whose names mark them as credentials."""
    return {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}


def scrub(value: Any, secrets: Iterable[str] = ()) -> Any:
    """``value`` with credentials removed: strings lose key-like substrings and the exact
    ``secrets``; mappings lose the values of keys such as ``Authorization``; lists recurse."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        value = _KEY_PATTERNS.sub(REDACTED, value)
        value = _BEARER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, value)
        return _ASSIGN.sub(lambda m: m.group(1) + m.group(2) + REDACTED, value)
    if isinstance(value, Mapping):
        return {
            scrub(str(k), secrets): REDACTED if _SECRET_KEYS.match(str(k)) else scrub(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        return scrub(value.item(), secrets)
    return value
