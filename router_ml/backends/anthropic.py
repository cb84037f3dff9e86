"""Anthropic's Messages API spoken in OpenAI's words: requests out, answers, streams and usage back.

A backend with ``api: anthropic`` gets ``POST {base_url}/v1/messages``; the proxy's callers keep
speaking Chat Completions. :func:`to_messages` translates a chat request: system (and developer)
messages become ``system``; user and assistant turns keep their order (consecutive turns of one
role merged, as the API wants them alternating); ``image_url`` parts become ``image`` blocks
(``base64`` for ``data:`` URLs, ``url`` otherwise); ``tools`` / ``tool_choice`` become Anthropic's;
an assistant's ``tool_calls`` become ``tool_use`` blocks and ``tool`` messages ``tool_result``
blocks of the next user turn; ``max_tokens`` (required there: the request's, else the catalog's),
``stop``, ``temperature``, ``top_p``, ``stream`` and ``user`` (``metadata.user_id``) are carried;
a ``cache_control`` on a content part or a tool passes through (Anthropic's prompt caching).
Fields whose meaning the API cannot keep (``n`` > 1, ``logprobs``...: :data:`REFUSED`) get a
:class:`TranslationError`; the rest it has no word for (``seed``, penalties, ``response_format``,
``stream_options``...) are left out. Messages left empty are dropped (the API refuses empty text).

:func:`to_chat_completion` translates an answer back (text and ``tool_use`` blocks -> content and
``tool_calls``; :data:`FINISH` maps ``stop_reason``), :class:`StreamTranslator` the SSE events of a
stream into ``chat.completion.chunk`` dicts, and :func:`chat_usage` the usage: ``prompt_tokens``
counts every input token (uncached + ``cache_read_input_tokens`` +
``cache_creation_input_tokens``), ``prompt_tokens_details.cached_tokens`` the ones read from the
cache; both cache counts also stay as Anthropic names them, so the bill can price each
(``prices.cached_input_per_mtok`` / ``cache_write_per_mtok`` of the catalog).

A cut stream resumes on an Anthropic backend by prefill: the partial answer is sent as the final
assistant message, which the Messages API continues (its trailing whitespace is cut, as the API
refuses it, and given back by the continuation). Errors arrive as
``{"type": "error", "error": {"type", "message"}}`` with an HTTP status (529: overloaded), which the
transport reads like OpenAI's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: ``stop_reason`` -> OpenAI ``finish_reason``
FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
#: Chat Completions fields the Messages API cannot honour: refused with a 400 (when set to other than
#: their default), rather than silently answered differently
REFUSED = {"n": 1, "logprobs": False, "top_logprobs": None, "logit_bias": None, "audio": None}


class TranslationError(ValueError):
    """A chat request that cannot be said in the Messages API (the message names the field)."""


def _text_block(text: str, part: Mapping[str, Any] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if part is not None and part.get("cache_control"):
        block["cache_control"] = part["cache_control"]
    return block


def _image_block(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    if not isinstance(url, str):
        raise TranslationError(f"{where}.image_url.url: expected a URL")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        media, _, encoding = head[5:].partition(";")
        if not sep or encoding != "base64" or not media.startswith("image/"):
            raise TranslationError(f"{where}.image_url.url: a data: URL must be data:image/...;base64,...")
        source: dict[str, Any] = {"type": "base64", "media_type": media, "data": data}
    else:
        source = {"type": "url", "url": url}
    block: dict[str, Any] = {"type": "image", "source": source}
    if part.get("cache_control"):
        block["cache_control"] = part["cache_control"]
    return block


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI content (a string or parts) as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_block(content)] if content.strip() else []
    out = []
    for j, part in enumerate(content if isinstance(content, list) else []):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if isinstance(part.get("text"), str) and part["text"].strip():
                out.append(_text_block(part["text"], part))
        elif kind == "image_url":
            out.append(_image_block(part, f"{where}.content[{j}]"))
        else:
            raise TranslationError(f"{where}.content[{j}]: part type {kind!r} has no Messages API form")
    return out


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise TranslationError(f"{where}: a tool call needs function.name")
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        raise TranslationError(f"{where}.function.arguments: not valid JSON") from None
    if not isinstance(args, dict):
        raise TranslationError(f"{where}.function.arguments: must be a JSON object")
    return {"type": "tool_use", "id": call.get("id") or "", "name": fn["name"], "input": args}


def _tool_result(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id") or ""}
    if isinstance(content, str):
        block["content"] = content
    else:
        block["content"] = _blocks(content, where)
    return block


def _system_and_turns(messages: Sequence[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:  # an empty message: the API refuses empty text, and it says nothing
            return
        if turns and turns[-1]["role"] == role:  # the API wants user and assistant alternating
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, Mapping) else None
        if role in ("system", "developer"):
            system.extend(_blocks(m.get("content"), where))
        elif role == "user":
            add("user", _blocks(m.get("content"), where))
        elif role == "assistant":
            blocks = _blocks(m.get("content"), where)
            calls = m.get("tool_calls") or []
            blocks += [_tool_use(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
            add("assistant", blocks)
        elif role == "tool":
            add("user", [_tool_result(m, where)])
        else:
            raise TranslationError(f"{where}.role: {role!r} has no Messages API form")
    last = turns[-1] if turns else None
    if last is not None and last["role"] == "assistant":  # a prefill: no trailing whitespace allowed
        blocks = last["content"]
        if blocks and blocks[-1]["type"] == "text":
            blocks[-1]["text"] = blocks[-1]["text"].rstrip()
            if not blocks[-1]["text"]:
                blocks.pop()
        if not blocks:
            turns.pop()
    return system, turns


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for j, t in enumerate(tools if isinstance(tools, list) else []):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise TranslationError(f"tools[{j}]: expected {{type: function, function: {{name, ...}}}}")
        tool: dict[str, Any] = {
            "name": fn["name"],
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            tool["description"] = fn["description"]
        if t.get("cache_control"):
            tool["cache_control"] = t["cache_control"]
        out.append(tool)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice in ("auto", "none"):
        out = {"type": choice}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise TranslationError(f"tool_choice: {choice!r} has no Messages API form")
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def to_messages(
    payload: Mapping[str, Any], model: str, default_max_tokens: int | None, stream: bool
) -> dict[str, Any]:
    """The Messages API body of a Chat Completions request (see the module docstring)."""
    for key, default in REFUSED.items():
        if payload.get(key) not in (None, default):
            raise TranslationError(f"field {key!r} = {payload[key]!r} is not supported by the Messages API")
    system, turns = _system_and_turns(payload.get("messages") or [])
    if not turns:
        raise TranslationError("messages: the Messages API needs at least one user or assistant message")
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens") or default_max_tokens
    if not max_tokens:
        raise TranslationError("max_tokens: the Messages API requires one")
    body: dict[str, Any] = {"model": model, "messages": turns, "max_tokens": max_tokens}
    if system:
        plain = all(set(b) == {"type", "text"} for b in system)
        body["system"] = "\n\n".join(b["text"] for b in system) if plain else system
    stop = payload.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for key in ("temperature", "top_p", "top_k"):
        if payload.get(key) is not None:
            body[key] = payload[key]
    if payload.get("tools"):
        body["tools"] = _tools(payload["tools"])
    choice = _tool_choice(payload.get("tool_choice"), payload.get("parallel_tool_calls"))
    if choice is not None and (body.get("tools") or choice["type"] == "none"):
        body["tool_choice"] = choice
    if isinstance(payload.get("user"), str):
        body["metadata"] = {"user_id": payload["user"]}
    if stream:
        body["stream"] = True
    return body


def chat_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Anthropic usage as OpenAI usage (``prompt_tokens`` counts cache reads and writes)."""
    usage = usage or {}
    read = int(usage.get("cache_read_input_tokens") or 0)
    write = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + read + write
    completion = int(usage.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read},
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": write,
    }


def _arguments(value: Any) -> str:
    return json.dumps(value if value is not None else {}, separators=(",", ":"), ensure_ascii=False)


def to_chat_completion(data: Mapping[str, Any]) -> dict[str, Any]:
    """A Messages API answer as a ``chat.completion`` dict (KeyError/TypeError if it is not one)."""
    if data.get("type") != "message":
        raise TypeError("not a Messages API message")
    text, calls = [], []
    for block in data["content"]:
        if block.get("type") == "text":
            text.append(block["text"])
        elif block.get("type") == "tool_use":
            fn = {"name": block["name"], "arguments": _arguments(block.get("input"))}
            calls.append({"id": block["id"], "type": "function", "function": fn})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": FINISH.get(data.get("stop_reason") or "", "stop")}  # fmt: skip
    return {
        "id": data.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model"),
        "choices": [choice],
        "usage": chat_usage(data.get("usage")),
    }


class StreamError(Exception):
    """An ``error`` event in an Anthropic stream (``overloaded_error`` mid-answer, ...)."""


class StreamTranslator:
    """Anthropic SSE events -> ``chat.completion.chunk`` dicts; one per stream.

    :meth:`feed` takes one event's JSON (``message_start``, ``content_block_start`` / ``_delta``
    (``text_delta``, ``input_json_delta``) / ``_stop``, ``message_delta``, ``message_stop``,
    ``ping``; ``error`` raises :class:`StreamError`) and returns the chunks it makes: text deltas as
    ``content``, each ``tool_use`` block as a ``tool_calls`` entry (index, id and name, then
    argument pieces), ``message_delta`` as the finish chunk followed by a usage chunk
    (``choices: []``). ``done`` is set by ``message_stop``.
    """

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.tool_index: dict[int, int] = {}  # content block index -> tool_calls index
        self.done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [choice]}  # fmt: skip

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            msg = event.get("message") or {}
            self.id, self.model = msg.get("id"), msg.get("model")
            self.usage.update(msg.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self.tool_index[event.get("index", 0)] = len(self.tool_index)
                fn = {"name": block.get("name"), "arguments": ""}
                call = {"index": index, "id": block.get("id"), "type": "function", "function": fn}
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                index = self.tool_index.get(event.get("index", 0), 0)
                call = {"index": index, "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [call]})]
            return []  # thinking / signature deltas are not part of the chat answer
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            reason = (event.get("delta") or {}).get("stop_reason")
            usage_chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": [], "usage": chat_usage(self.usage)}  # fmt: skip
            return [self._chunk({}, FINISH.get(reason or "", "stop")), usage_chunk]
        if kind == "message_stop":
            self.done = True
            return []
        if kind == "error":
            err = event.get("error")
            detail = f"{err.get('type')}: {err.get('message')}" if isinstance(err, Mapping) else str(err)
            raise StreamError(detail)
        return []  # ping, content_block_stop, and event types added later
