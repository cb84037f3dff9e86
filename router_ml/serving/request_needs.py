"""What a chat request needs of a model (tools, image input, JSON mode, room in the context window),
and the 400 a request gets when a backend, or every backend, lacks it.

:func:`needs_of` reads the validated request (:mod:`~router_ml.serving.chat_request`) and the body
that goes on to the backend:

- ``tools``: a non-empty ``tools`` or ``functions`` list, or a conversation that already carries
  tool calls or tool results (``role: tool`` / ``function``, an assistant's ``tool_calls``): only a
  model with function calling reads them right. ``tool_choice: "none"`` still needs it (the tools
  are rendered into the prompt all the same);
- ``vision``: an ``image_url`` content part in any message;
- ``json_mode``: ``response_format`` of type ``json_object`` or ``json_schema``;
- the context window: the prompt (message texts and tool definitions) plus ``max_completion_tokens``
  / ``max_tokens`` (else one token) must fit (:func:`~router_ml.backends.capabilities.lacking`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from router_ml.backends.capabilities import CAPABILITIES, CONTEXT, MESSAGE_OVERHEAD, Needs, describe
from router_ml.serving.chat_request import ChatRequest, text_of
from router_ml.serving.openai_errors import ApiError

JSON_FORMATS = ("json_object", "json_schema")
_WORDS = {
    "tools": "function calling (tools)",
    "vision": "image input",
    "json_mode": "JSON mode (response_format)",
    CONTEXT: "a context window this long",
}


def needs_of(req: ChatRequest, body: Mapping[str, Any], window: float | None = None) -> Needs | None:
    """The :class:`~router_ml.backends.capabilities.Needs` of one validated request; ``None`` when
    it needs no capability and surely fits a context window of ``window`` tokens (the smallest
    of the catalog's: then nothing is built, the common case costs a scan of the messages)."""
    features: dict[str, str] = {}  # capability -> the request field that needs it
    texts = []
    for key in ("tools", "functions"):
        defs = body.get(key)
        if defs:
            features.setdefault("tools", key)
            texts.append(orjson.dumps(defs).decode())  # tool definitions are rendered into the prompt
    for m in body["messages"]:  # validated; the body keeps what the schema does not name
        content = m.get("content")
        if isinstance(content, list) and any(p["type"] == "image_url" for p in content):
            features.setdefault("vision", "messages")
        if m["role"] in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            features.setdefault("tools", "messages")
        texts.append(text_of(content))
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") in JSON_FORMATS:
        features["json_mode"] = "response_format"
    out = req.get("max_completion_tokens") or req.get("max_tokens") or 1
    n = len(req["messages"])
    if window is not None and not features:
        chars = sum(map(len, texts))
        if 4 * chars + len(texts) + MESSAGE_OVERHEAD * n + out <= window:
            return None
    return Needs(
        features=frozenset(features),
        params=features,
        texts=tuple(texts),
        chars=sum(map(len, texts)),
        messages=n,
        output_tokens=int(out),
    )


def _param(needs: Needs, cap: str) -> str:
    return "messages" if cap == CONTEXT else needs.params.get(cap, cap)


def _error(needs: Needs, cap: str, message: str) -> ApiError:
    code = "context_length_exceeded" if cap == CONTEXT else "capability_unsupported"
    return ApiError(400, message, param=_param(needs, cap), code=code)


def passthrough_error(backend: str, missing: list[str], needs: Needs, capable: list[str]) -> ApiError:
    """The 400 of a request that names ``backend``, which lacks ``missing`` of its needs."""
    cap = missing[0]
    what = ", ".join(f"{_WORDS[c]} (field {_param(needs, c)!r})" for c in missing)
    others = f"; backends that can serve it: {capable}" if capable else "; no backend in the catalog can"
    return _error(
        needs, cap, f"backend {backend!r} does not support {what}, which this request needs{others}"
    )


def unservable_error(needs: Needs, excluded: dict[str, list[str]]) -> ApiError:
    """The 400 of a routed request that no served backend can take (``excluded``: what each lacks).
    It names the capability no backend has (else the first one missing)."""
    caps = [c for c in (*CAPABILITIES, CONTEXT) if any(c in m for m in excluded.values())]
    nobody = [c for c in caps if all(c in m for m in excluded.values())]
    cap = (nobody or caps)[0]
    asked = ", ".join(f"{_WORDS[c]} (field {_param(needs, c)!r})" for c in (nobody or caps))
    return _error(needs, cap, f"no backend can serve this request: it needs {asked}; {describe(excluded)}")
