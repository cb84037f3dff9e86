"""A loopback server that speaks Anthropic's Messages API wire format, streaming included.

``POST /v1/messages`` as https://docs.anthropic.com/en/api/messages documents it: the
``x-api-key`` (or ``Authorization: Bearer``, which the official Python SDK 2.x sends) and
``anthropic-version`` headers; a body with ``model``, ``max_tokens`` and
``messages`` (user / assistant turns of text, ``image``, ``tool_use`` and ``tool_result`` blocks;
the first turn a user's; every ``tool_use`` answered by a ``tool_result`` in the next turn; a final
assistant turn is a prefill the answer continues, and must not end in whitespace), ``system``,
``tools`` (``name`` + ``input_schema``), ``tool_choice`` (``auto`` / ``any`` / ``tool`` /
``none``), ``stop_sequences``, ``temperature`` (0-1), ``top_p``, ``top_k``, ``metadata``,
``stream``; any other field is refused, as the API refuses extra inputs. Errors are
``{"type": "error", "error": {"type", "message"}}`` (401 ``authentication_error``, 400
``invalid_request_error``, 429 ``rate_limit_error``, 500 ``api_error``, 529 ``overloaded_error``).

Answers are the loopback server's (:func:`~tests.fakes.loopback.answer_text`: an echo of the last
user text, ``"I see N images. "`` first when it carries images), one whitespace-led word per token.
With ``tools`` (and a ``tool_choice`` other than ``none``) the answer is a ``tool_use`` block
(``tool_choice: auto`` puts a short text block first, as Claude often does) and ``stop_reason:
tool_use``; a user turn carrying ``tool_result`` blocks gets ``"The tool said: <result>."``.
``stop_sequences`` cut the answer (``stop_reason: stop_sequence``), ``max_tokens`` too
(``max_tokens``). Prompt caching: the prefix up to the last block marked ``cache_control`` (tools,
then system, then messages) is written to the cache on first sight (``cache_creation_input_tokens``)
and read from it after (``cache_read_input_tokens``); ``input_tokens`` counts the rest. Tokens are
words (+1 per message). A stream is the documented event sequence: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta`` /
``input_json_delta``), ``content_block_stop``, ``message_delta`` (``stop_reason``, output usage),
``message_stop``.

Faults are the loopback server's (``set_fault``): ``error429`` / ``error500`` and ``error503``
(sent as Anthropic's 529 ``overloaded_error``), ``hang``, ``slow``, ``bad_json``, ``cut_stream``
(a stream sends an ``error`` event, ``overloaded_error``, after ``after`` tokens and closes, as
the API does when it is overloaded mid-answer)::

    async with AnthropicServer(api_key="k") as srv:   # srv.url is the base_url of a catalog entry
        ...
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import zlib
from collections.abc import Mapping
from typing import Any

from tests.fakes.loopback.chat import answer_rest, response
from tests.fakes.loopback.server import LoopbackServer

_TOKEN = re.compile(r"\s*\S+")
_FIELDS = {"model", "messages", "max_tokens", "system", "tools", "tool_choice", "stop_sequences",
           "temperature", "top_p", "top_k", "metadata", "stream"}  # fmt: skip
_MEDIA = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}  # fmt: skip


class Invalid(ValueError):
    """A request the real API refuses with 400 invalid_request_error."""


def error_body(status: int, message: str) -> bytes:
    err = {"type": "error", "error": {"type": _ERROR_TYPE.get(status, "api_error"), "message": message}}
    return json.dumps(err).encode()


def _sse(event: str, obj: Mapping[str, Any]) -> bytes:
    data = f"event: {event}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
    return b"%x\r\n%b\r\n" % (len(data), data)


def _words(blocks: Any) -> int:
    if isinstance(blocks, str):
        return len(blocks.split())
    n = 0
    for b in blocks if isinstance(blocks, list) else []:
        if b.get("type") == "text":
            n += len(b["text"].split())
        elif b.get("type") == "tool_result":
            n += _words(b.get("content"))
        elif b.get("type") == "tool_use":
            n += len(json.dumps(b.get("input")).split()) + 1
        elif b.get("type") == "image":
            n += 85  # what a small image costs
    return n


def _check_block(b: Any, where: str, role: str) -> None:
    kind = b.get("type") if isinstance(b, Mapping) else None
    allowed = {"user": ("text", "image", "tool_result"), "assistant": ("text", "tool_use")}[role]
    if kind not in allowed:
        raise Invalid(f"{where}.type: block type {kind!r} is not allowed in a {role} message")
    if kind == "text" and not isinstance(b.get("text"), str):
        raise Invalid(f"{where}.text: Field required")
    if kind == "text" and not b["text"].strip():
        raise Invalid("messages: text content blocks must contain non-whitespace text")
    if kind == "image":
        src = b.get("source") or {}
        if src.get("type") == "base64":
            if src.get("media_type") not in _MEDIA:
                raise Invalid(f"{where}.source.media_type: Input should be one of {sorted(_MEDIA)}")
            if not isinstance(src.get("data"), str) or not src["data"]:
                raise Invalid(f"{where}.source.data: Field required")
        elif src.get("type") == "url":
            if not str(src.get("url", "")).startswith(("http://", "https://")):
                raise Invalid(f"{where}.source.url: must be an http(s) URL")
        else:
            raise Invalid(f"{where}.source.type: Input should be 'base64' or 'url'")
    if kind == "tool_use" and not (isinstance(b.get("input"), dict) and b.get("id") and b.get("name")):
        raise Invalid(f"{where}: tool_use needs id, name and an object input")
    if kind == "tool_result" and not b.get("tool_use_id"):
        raise Invalid(f"{where}.tool_use_id: Field required")


def validate(req: Any) -> None:
    """Raise :class:`Invalid` (the API's words, roughly) for what the real API refuses."""
    if not isinstance(req, dict):
        raise Invalid("body: expected an object")
    extra = sorted(set(req) - _FIELDS)
    if extra:
        raise Invalid(f"{extra[0]}: Extra inputs are not permitted")
    for key in ("model", "max_tokens", "messages"):
        if key not in req:
            raise Invalid(f"{key}: Field required")
    mt = req["max_tokens"]
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise Invalid("max_tokens: Input should be a valid integer greater than or equal to 1")
    t = req.get("temperature")
    if t is not None and not (isinstance(t, (int, float)) and 0 <= t <= 1):
        raise Invalid("temperature: Input should be less than or equal to 1")
    system = req.get("system")
    if system is not None and not isinstance(system, str):
        for j, b in enumerate(system if isinstance(system, list) else [None]):
            if not (isinstance(b, Mapping) and b.get("type") == "text" and isinstance(b.get("text"), str)):
                raise Invalid(f"system.{j}: expected a text block")
    msgs = req["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise Invalid("messages: at least one message is required")
    pending: set[str] = set()  # tool_use ids awaiting their tool_result
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in ("user", "assistant"):
            raise Invalid(f'messages.{i}.role: Input should be "user" or "assistant"')
        if i == 0 and role != "user":
            raise Invalid('messages: first message must use the "user" role')
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or (not blocks and i < len(msgs) - 1):
            raise Invalid(f"messages.{i}.content: must be a string or a non-empty list of blocks")
        for j, b in enumerate(blocks):
            _check_block(b, f"messages.{i}.content.{j}", role)
        results = {b["tool_use_id"] for b in blocks if b.get("type") == "tool_result"}
        if pending - results or results - pending:
            raise Invalid(
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
                f"after, or tool_result ids without a tool_use before: {sorted(pending ^ results)}"
            )
        pending = {b["id"] for b in blocks if b.get("type") == "tool_use"}
        last_text = blocks[-1].get("text") if blocks and blocks[-1].get("type") == "text" else None
        if role == "assistant" and i == len(msgs) - 1 and last_text and last_text != last_text.rstrip():
            raise Invalid("messages: final assistant content cannot end with trailing whitespace")
    tools = req.get("tools") or []
    names = []
    for j, tool in enumerate(tools):
        if not (isinstance(tool, Mapping) and isinstance(tool.get("name"), str)):
            raise Invalid(f"tools.{j}.name: Field required")
        if not isinstance(tool.get("input_schema"), Mapping):
            raise Invalid(f"tools.{j}.input_schema: Field required")
        names.append(tool["name"])
    choice = req.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, Mapping) or choice.get("type") not in ("auto", "any", "tool", "none"):
            raise Invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if choice["type"] == "tool" and choice.get("name") not in names:
            raise Invalid(f"tool_choice.name: no tool named {choice.get('name')!r} in tools")
        if choice["type"] != "none" and not tools:
            raise Invalid("tool_choice: may only be specified while providing tools")


def _as_chat(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic turns as the loopback's OpenAI-style messages (text parts and image_url parts)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for b in content:
            if b["type"] == "text":
                parts.append({"type": "text", "text": b["text"]})
            elif b["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": "https://image"}})
        out.append({"role": m["role"], "content": parts})
    return out


def _part_tokens(part: Any) -> int:
    if part is None:
        return 1  # a message boundary
    if "input_schema" in part:  # a tool definition
        return len(json.dumps(part).split())
    return _words([part])


def _user_text(message: Mapping[str, Any]) -> str:
    c = message["content"]
    return c if isinstance(c, str) else " ".join(b["text"] for b in c if b.get("type") == "text")


def _result_text(block: Mapping[str, Any]) -> str:
    c = block.get("content")
    if isinstance(c, str):
        return c
    return " ".join(b.get("text", "") for b in c or [] if isinstance(b, Mapping))


class AnthropicServer(LoopbackServer):
    """The Messages API on loopback: ``url`` is the ``base_url`` (the server root) of a catalog
    entry with ``api: anthropic``; ``api_key`` (if set) must come as ``x-api-key`` (or a bearer token). ``cache`` holds
    the prompt-cache prefixes seen; ``last_request`` / ``last_headers`` the last body and headers."""

    def __init__(self, port: int = 0, **kwargs: Any) -> None:
        super().__init__(port, **kwargs)
        self.cache: set[str] = set()

    def new_id(self) -> str:
        self._ids += 1
        return f"msg_loopback{self._ids:06d}"

    async def _dispatch(self, method, path, headers, body, reader, writer, query=""):
        if path != "/v1/messages":
            if path in ("/fault", "/arrivals"):
                return await super()._dispatch(method, path, headers, body, reader, writer, query)
            writer.write(response(404, error_body(404, f"Not found: {path}")))
            return True
        if method != "POST":
            writer.write(response(405, error_body(400, "/v1/messages takes POST")))
            return True
        return await self._messages(headers, body, reader, writer)

    def _usage(self, req: dict[str, Any]) -> dict[str, int]:
        """input / cache_creation / cache_read token counts of a request (see the module docstring)."""
        parts: list[Any] = [*(req.get("tools") or [])]
        system = req.get("system")
        parts += [{"type": "text", "text": system}] if isinstance(system, str) else list(system or [])
        for m in req["messages"]:
            c = m["content"]
            parts += [{"type": "text", "text": c}] if isinstance(c, str) else c
            parts.append(None)  # one token per message
        counts = [_part_tokens(p) for p in parts]
        usage = {"input_tokens": sum(counts), "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        marked = [i for i, p in enumerate(parts) if p is not None and p.get("cache_control")]
        if marked:
            prefix = parts[: marked[-1] + 1]
            key = hashlib.sha256(json.dumps(prefix, sort_keys=True).encode()).hexdigest()
            n = sum(counts[: marked[-1] + 1])
            usage["cache_read_input_tokens" if key in self.cache else "cache_creation_input_tokens"] = n
            usage["input_tokens"] -= n
            self.cache.add(key)
        return usage

    def _answer(self, req: dict[str, Any]) -> tuple[list[dict[str, Any]], list[list[str]], str, str | None]:
        """(content blocks, the tokens of each, stop_reason, stop_sequence)."""
        msgs = req["messages"]
        last_user = next(m for m in reversed(msgs) if m["role"] == "user")
        results = [b for b in last_user["content"] if isinstance(last_user["content"], list)
                   and b.get("type") == "tool_result"]  # fmt: skip
        tools, choice = req.get("tools") or [], req.get("tool_choice") or {"type": "auto"}
        if tools and choice["type"] != "none" and not results:
            name = choice.get("name") if choice["type"] == "tool" else tools[0]["name"]
            args = json.dumps({"query": " ".join(_user_text(last_user).split()[:16])})
            ident = "toolu_" + format(zlib.crc32(json.dumps(msgs).encode()), "08x")
            blocks: list[dict[str, Any]] = []
            tokens: list[list[str]] = []
            if choice["type"] == "auto":
                text = f"I will call {name}."
                blocks.append({"type": "text", "text": text})
                tokens.append(_TOKEN.findall(text))
            blocks.append({"type": "tool_use", "id": ident, "name": name, "input": json.loads(args)})
            tokens.append([args[i : i + 8] for i in range(0, len(args), 8)])
            return blocks, tokens, "tool_use", None
        if results:
            text = "The tool said: " + " ".join(_result_text(b) for b in results) + "."
        else:
            chat = _as_chat(msgs)
            text = answer_rest(chat, True) if msgs[-1]["role"] == "assistant" else answer_rest(chat, False)
        reason, seq = "end_turn", None
        for s in req.get("stop_sequences") or []:
            at = text.find(s)
            if at >= 0 and (seq is None or at < text.find(seq)):
                seq = s
        if seq is not None:
            text, reason = text[: text.find(seq)], "stop_sequence"
        pieces = _TOKEN.findall(text)
        tail = text[len("".join(pieces)) :]  # whitespace before a stop sequence stays in the answer
        if tail:
            pieces = [*pieces[:-1], pieces[-1] + tail] if pieces else [tail]
        if len(pieces) > req["max_tokens"]:
            pieces, reason, seq = pieces[: req["max_tokens"]], "max_tokens", None
        return [{"type": "text", "text": "".join(pieces)}], [pieces], reason, seq

    async def _messages(self, headers, body, reader, writer) -> bool:
        t0 = time.perf_counter()
        self.stats["chat"] += 1
        entry = self.arrivals.arrive()

        def reject(status: int, message: str, extra: str = "") -> bool:
            entry.update(status=status, outcome="error")
            writer.write(response(status, error_body(status, message), headers=extra))
            return True

        if self.api_key is not None and self.api_key not in (
            headers.get("x-api-key"),
            headers.get("authorization", "").removeprefix("Bearer "),
        ):  # the documented x-api-key, or the bearer form the official SDK 2.x sends
            return reject(401, "invalid x-api-key")
        if not headers.get("anthropic-version"):
            return reject(400, "anthropic-version: header is required")
        try:
            req = json.loads(body)
            validate(req)
        except ValueError as err:  # Invalid, or not JSON
            return reject(400, str(err) if isinstance(err, Invalid) else "The request body is not valid JSON")
        if self.model_id is not None and req["model"] != self.model_id:
            return reject(404, f"model: {req['model']}")
        self.last_request, self.last_headers = req, headers
        fault = self.faults.take()
        mode = entry["mode"] = fault.mode
        if mode != "ok":
            self.stats["fault:" + mode] += 1
        if mode in ("error500", "error503", "error429"):
            status = {"error500": 500, "error503": 529, "error429": 429}[mode]
            extra = (
                f"retry-after: {fault.retry_after:g}\r\n"
                if fault.retry_after is not None and status == 429
                else ""
            )
            return reject(status, "Overloaded" if status == 529 else f"injected fault {mode}", extra)
        if mode == "hang":
            while await reader.read(65536):
                pass
            entry["outcome"] = "abandoned"
            return False
        blocks, tokens, reason, seq = self._answer(req)
        usage = self._usage(req)
        usage["output_tokens"] = sum(map(len, tokens))
        msg = {"id": self.new_id(), "type": "message", "role": "assistant", "model": req["model"],
               "content": blocks, "stop_reason": reason, "stop_sequence": seq, "usage": usage}  # fmt: skip
        delay = fault.delay_s if mode == "slow" else 0.0
        self.running += 1
        try:
            if req.get("stream"):
                return await self._stream(entry, reader, writer, fault, msg, tokens, delay, t0)
            if delay:
                await asyncio.sleep(delay * (1 + usage["output_tokens"]))
            self.ttft[0] += time.perf_counter() - t0
            self.ttft[1] += 1
            entry["status"] = 200
            if mode == "bad_json":
                entry["outcome"] = "bad_json"
                writer.write(response(200, b'{"id": "msg_broken", "type": "message", "content": ['))
                return True
            data = response(200, json.dumps(msg).encode(), headers=f"request-id: req_{msg['id']}\r\n")
            if mode == "cut_stream":
                entry["outcome"] = "cut"
                writer.write(data[: len(data) - len(data) // 4])
                return False
            entry["outcome"] = "ok"
            writer.write(data)
            return True
        finally:
            self.running -= 1
            if entry["outcome"] == "pending":
                entry["outcome"] = "abandoned"

    async def _stream(self, entry, reader, writer, fault, msg, tokens, delay, t0) -> bool:
        entry["status"] = 200
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        usage = msg["usage"]
        start = {**msg, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**usage, "output_tokens": 1}}  # fmt: skip
        writer.write(_sse("message_start", {"type": "message_start", "message": start}))
        if fault.mode == "bad_json":
            entry["outcome"] = "bad_json"
            broken = b"event: ping\ndata: {broken\n\n"
            writer.write(b"%x\r\n%b\r\n" % (len(broken), broken))
            writer.write(b"0\r\n\r\n")
            return True
        cut_at = fault.after if fault.mode == "cut_stream" else -1
        sent = 0
        for index, (block, pieces) in enumerate(zip(msg["content"], tokens, strict=True)):
            first = {"type": "text", "text": ""} if block["type"] == "text" else {**block, "input": {}}
            writer.write(_sse("content_block_start", {"type": "content_block_start", "index": index,
                                                      "content_block": first}))  # fmt: skip
            if index == 0:
                writer.write(_sse("ping", {"type": "ping"}))
            for piece in pieces:
                if sent == cut_at:
                    err = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
                    writer.write(_sse("error", err))
                    await writer.drain()
                    entry["outcome"] = "cut"
                    return False
                if delay:
                    await writer.drain()
                    await asyncio.sleep(delay)
                    if reader.at_eof():
                        entry["outcome"] = "abandoned"
                        return False
                delta = ({"type": "text_delta", "text": piece} if block["type"] == "text"
                         else {"type": "input_json_delta", "partial_json": piece})  # fmt: skip
                writer.write(_sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                          "delta": delta}))  # fmt: skip
                if sent == 0:
                    self.ttft[0] += time.perf_counter() - t0
                    self.ttft[1] += 1
                sent += 1
            writer.write(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        delta = {"stop_reason": msg["stop_reason"], "stop_sequence": msg["stop_sequence"]}
        out_usage = {"output_tokens": usage["output_tokens"]}
        writer.write(_sse("message_delta", {"type": "message_delta", "delta": delta, "usage": out_usage}))
        writer.write(_sse("message_stop", {"type": "message_stop"}) + b"0\r\n\r\n")
        entry["outcome"] = "ok"
        return True
