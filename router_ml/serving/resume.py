"""Resuming a broken stream on the next backend: the continuation request and the repeated text to cut."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router_ml.serving.catalog import Backend

CONTINUE_PROMPT = (
    "Continue your previous answer exactly where it stopped, without repeating any of it "
    "and without any preamble."
)
MIN_OVERLAP = 8  # shortest repeated text cut from a continuation (shorter matches may be genuine)
_HOLD_LIMIT = 2048  # characters of a continuation held back at most while looking for repeated text


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def prompt_text(messages: Any) -> str:
    """The text of a conversation that counts as prompt tokens (contents, one message per line)."""
    if not isinstance(messages, list):
        return ""
    return "\n".join(_content_text(m.get("content")) for m in messages if isinstance(m, Mapping))


def overlap_to_strip(partial: str, new: str, final: bool = False) -> int | None:
    """How many leading characters of a continuation ``new`` repeat the end of ``partial``.

    ``None`` while it cannot tell yet (``new`` still reads like a repetition of part of ``partial``
    and ``final`` is False): hold the text and ask again when more arrives. A restart of the whole
    answer strips all of ``partial``; a repeated tail is stripped when at least :data:`MIN_OVERLAP`
    characters long (or all of ``partial``).
    """
    if not new or not partial:
        return 0 if final or not partial else None
    if not final and len(new) < _HOLD_LIMIT and new in partial and not new.endswith(partial):
        return None
    for k in range(min(len(partial), len(new)), 0, -1):
        if (k >= MIN_OVERLAP or k == len(partial)) and partial.endswith(new[:k]):
            return k
    return 0


def _drop_prefix(chunks: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``chunks`` with the first ``n`` characters of content removed (emptied content chunks dropped)."""
    out = []
    for chunk in chunks:
        delta = _delta(chunk)
        if n > 0 and delta is not None and delta.get("content"):
            k = min(n, len(delta["content"]))
            delta["content"], n = delta["content"][k:], n - k
            if not delta["content"] and len(delta) == 1 and not chunk["choices"][0].get("finish_reason"):
                continue
        out.append(chunk)
    return out


def _delta(chunk: Mapping[str, Any]) -> dict[str, Any] | None:
    choices = chunk.get("choices")
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        return delta if isinstance(delta, dict) else None
    return None


def continuation_payload(
    payload: Mapping[str, Any], partial: str, prefill: bool, tokens_done: int = 0
) -> dict:
    """The request that makes a backend continue ``partial`` (the answer sent so far).

    ``prefill`` (vLLM): ``partial`` becomes the final assistant message, continued by the chat
    template (``continue_final_message``). Otherwise a user turn asks to continue. ``max_tokens``
    shrinks by ``tokens_done``.
    """
    body = dict(payload)
    messages = [*payload.get("messages", []), {"role": "assistant", "content": partial}]
    if prefill:
        body["continue_final_message"], body["add_generation_prompt"] = True, False
    else:
        messages.append({"role": "user", "content": CONTINUE_PROMPT})
    body["messages"] = messages
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            body[key] = max(1, body[key] - tokens_done)
    return body


def _uses_prefill(backend: Backend) -> bool:
    """vLLM servers continue a final assistant message; llama.cpp and API backends are asked to."""
    return backend.kind == "vllm" and (backend.launch or {}).get("engine", "vllm") == "vllm"
