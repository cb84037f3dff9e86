"""The loopback server's chat route: deterministic answers, the faults applied, the wire bytes.

Answers are ``"You said: <the last user message>. " +`` :data:`ANSWER_TAIL`, one whitespace-led
word per token (led by ``"I see N images. "`` when that message carries ``image_url`` parts, whose
URLs must be http(s) or ``data:image/`` as OpenAI's are). A request with ``tools`` (and a
``tool_choice`` other than ``"none"``) gets a tool call instead (:func:`tool_call`), in OpenAI's
wire format: ``tool_calls`` with ``finish_reason: tool_calls``, streamed as an index/id/name delta
and argument pieces of 8 characters (the "tokens" a ``cut_stream`` fault counts). A conversation that ends in an assistant message with ``continue_final_message:
true`` (vLLM's prefill), or in a user message starting "Continue" right after an assistant
message, gets only the rest of that answer, as a model that continues its partial answer would.
:func:`serve_chat` answers one ``POST /v1/chat/completions`` for a
:class:`~tests.fakes.loopback.server.LoopbackServer` and logs it in the server's arrival log.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tests.fakes.loopback.faults import Fault

if TYPE_CHECKING:
    from tests.fakes.loopback.server import LoopbackServer

ANSWER_TAIL = "This deterministic answer comes from the router-ml loopback server."
_TOKEN = re.compile(r"\s*\S+")
_REASON = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, Mapping) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def _role(message: Any) -> str | None:
    return message.get("role") if isinstance(message, Mapping) else None


def _images(message: Any) -> list[str]:
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, list):
        return []
    return [p["image_url"]["url"] for p in content if isinstance(p, Mapping) and p.get("type") == "image_url"]


def answer_text(messages: Sequence[Any]) -> str:
    """The full deterministic answer to a conversation (an echo of its last user message, and how
    many images it carried, if any)."""
    last = next((m for m in reversed(messages) if _role(m) == "user"), None)
    words = _text(last).split()[:16] if last is not None else []
    seen = len(_images(last)) if last is not None else 0
    images = f"I see {seen} image{'s' if seen > 1 else ''}. " if seen else ""
    return f"{images}You said: {' '.join(words)}. {ANSWER_TAIL}" if words else images + ANSWER_TAIL


def tool_call(req: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tool call a request with ``tools`` gets (None without tools, or with ``tool_choice:
    "none"``): the function ``tool_choice`` names, else the first, with the arguments
    ``{"query": <the last user message>}``; the id is derived from the conversation."""
    tools, choice = req.get("tools"), req.get("tool_choice")
    if not tools or choice == "none":
        return None
    name = choice["function"]["name"] if isinstance(choice, Mapping) else tools[0]["function"]["name"]
    user = next((_text(m) for m in reversed(req["messages"]) if _role(m) == "user"), "")
    args = json.dumps({"query": " ".join(user.split()[:16])})
    ident = "call_" + format(zlib.crc32(json.dumps(req["messages"]).encode()), "08x")
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": args}}


def _bad_part(messages: Sequence[Any]) -> str | None:
    """What is wrong with an image part, as OpenAI would say it (None: nothing)."""
    for i, m in enumerate(messages):
        content = m.get("content")
        for j, p in enumerate(content if isinstance(content, list) else []):
            if isinstance(p, Mapping) and p.get("type") == "image_url":
                url = (
                    (p.get("image_url") or {}).get("url") if isinstance(p.get("image_url"), Mapping) else None
                )
                if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:image/")):
                    return f"messages[{i}].content[{j}].image_url.url: expected an http(s) or data:image/ URL"
    return None


def answer_rest(messages: Sequence[Any], continue_final: bool) -> str:
    """What the server emits: the answer, or its remainder when the request continues a partial one."""
    if messages and _role(messages[-1]) == "assistant" and continue_final:
        prefix, full = _text(messages[-1]), answer_text(messages[:-1])
    elif (
        len(messages) >= 2
        and _role(messages[-1]) == "user"
        and _text(messages[-1]).lower().startswith("continue")
        and _role(messages[-2]) == "assistant"
    ):
        prefix, full = _text(messages[-2]), answer_text(messages[:-2])
    else:
        return answer_text(messages)
    return full[len(prefix) :] if full.startswith(prefix) else full


def response(status: int, body: bytes, ctype: str = "application/json", headers: str = "") -> bytes:
    """A whole HTTP/1.1 response with a Content-Length body."""
    head = (
        f"HTTP/1.1 {status} {_REASON.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    )
    return head.encode() + body


def error(status: int, message: str, etype: str, code: str | None = None, headers: str = "") -> bytes:
    """An OpenAI-style error response."""
    body = {"error": {"message": message, "type": etype, "param": None, "code": code or status}}
    return response(status, json.dumps(body).encode(), headers=headers)


def _event(obj: Any) -> bytes:
    data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode())
    data += b"\n\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


def _reject(entry: dict[str, Any], writer: asyncio.StreamWriter, status: int, *args: str) -> bool:
    entry.update(status=status, outcome="error")
    writer.write(error(status, *args))
    return True


async def serve_chat(
    srv: LoopbackServer,
    headers: dict[str, str],
    body: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Answer one chat request (validation, fault, answer); False closes the connection."""
    t0 = time.perf_counter()
    srv.stats["chat"] += 1
    entry = srv.arrivals.arrive()
    if srv.api_key is not None and headers.get("authorization") != f"Bearer {srv.api_key}":
        msg = "invalid or missing API key"
        return _reject(entry, writer, 401, msg, "authentication_error", "invalid_api_key")
    try:
        req = json.loads(body)
    except ValueError:
        return _reject(entry, writer, 400, "request body is not valid JSON", "invalid_request_error")
    messages = req.get("messages") if isinstance(req, dict) else None
    if not isinstance(messages, list) or not messages or not all(_role(m) for m in messages):
        msg = "'messages' must be a non-empty list of messages"
        return _reject(entry, writer, 400, msg, "invalid_request_error")
    model = req.get("model")
    if srv.model_id is not None and model != srv.model_id:
        msg = f"The model {model!r} does not exist; this server serves {srv.model_id!r}"
        return _reject(entry, writer, 404, msg, "invalid_request_error", "model_not_found")
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        return _reject(entry, writer, 400, "'max_tokens' must be a positive integer", "invalid_request_error")
    bad = _bad_part(messages)
    if bad is not None:
        return _reject(entry, writer, 400, bad, "invalid_request_error", "invalid_image_url")
    srv.last_request, srv.last_headers = req, headers
    fault = srv.faults.take()
    mode = entry["mode"] = fault.mode
    if mode != "ok":
        srv.stats["fault:" + mode] += 1
    if mode in ("error500", "error503", "error429"):
        status = int(mode[5:])
        extra = (
            f"Retry-After: {fault.retry_after:g}\r\n"
            if fault.retry_after is not None and status != 500
            else ""
        )
        entry.update(status=status, outcome="error")
        writer.write(error(status, f"injected fault {mode}", "server_error", headers=extra))
        return True
    if mode == "hang":  # never answer; return when the client gives up
        while await reader.read(65536):
            pass
        entry["outcome"] = "abandoned"
        return False
    call = tool_call(req)
    if call is not None:  # the arguments, in pieces of 8 characters, are the tokens
        args = call["function"]["arguments"]
        pieces, finish = [args[i : i + 8] for i in range(0, len(args), 8)], "tool_calls"
    else:
        pieces = _TOKEN.findall(answer_rest(messages, bool(req.get("continue_final_message"))))
        finish = "stop"
    if max_tokens is not None and len(pieces) > max_tokens:
        pieces, finish = pieces[:max_tokens], "length"
    usage = {
        "prompt_tokens": sum(len(_text(m).split()) + 1 for m in messages),
        "completion_tokens": len(pieces),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    ident = (srv.new_id(), int(time.time()), model or "loopback")
    srv.running += 1
    try:
        if req.get("stream"):
            opts = req.get("stream_options") or {}
            want_usage = srv.stream_usage and isinstance(opts, dict) and bool(opts.get("include_usage"))
            return await _stream(
                srv,
                entry,
                reader,
                writer,
                fault,
                pieces,
                finish,
                usage if want_usage else None,
                ident,
                t0,
                call,
            )
        return await _whole(srv, entry, reader, writer, fault, pieces, finish, usage, ident, t0, call)
    finally:
        srv.running -= 1
        if entry["outcome"] == "pending":  # cancelled (server stopping) or the connection broke
            entry["outcome"] = "abandoned"


async def _whole(
    srv: LoopbackServer,
    entry: dict[str, Any],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    fault: Fault,
    pieces: list[str],
    finish: str,
    usage: dict[str, int],
    ident: tuple[str, int, str],
    t0: float,
    call: dict[str, Any] | None = None,
) -> bool:
    """A non-stream answer (``slow``: all the token delays before it; ``cut_stream``: cut mid-body)."""
    cid, created, model = ident
    if fault.mode == "slow":
        await asyncio.sleep(fault.delay_s * (1 + len(pieces)))
        if reader.at_eof():  # the client gave up while we were slow
            entry["outcome"] = "abandoned"
            return False
    srv.ttft[0] += time.perf_counter() - t0
    srv.ttft[1] += 1
    entry["status"] = 200
    if fault.mode == "bad_json":
        entry["outcome"] = "bad_json"
        writer.write(response(200, b'{"id": "chatcmpl-broken", "choices": ['))
        return True
    message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
    if call is not None:  # OpenAI's shape: no content, the call with its whole arguments
        fn = {**call["function"], "arguments": "".join(pieces)}
        message = {"role": "assistant", "content": None, "tool_calls": [{**call, "function": fn}]}
    choice = {"index": 0, "message": message}
    choice.update(logprobs=None, finish_reason=finish)
    out = {"id": cid, "object": "chat.completion", "created": created, "model": model}
    out.update(choices=[choice], usage=usage)
    data = response(200, json.dumps(out).encode())
    if fault.mode == "cut_stream":  # the whole header, half of the body, then the connection closes
        entry["outcome"] = "cut"
        writer.write(data[: len(data) - len(data) // 4])
        return False
    entry["outcome"] = "ok"
    writer.write(data)
    return True


async def _stream(
    srv: LoopbackServer,
    entry: dict[str, Any],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    fault: Fault,
    pieces: list[str],
    finish: str,
    usage: dict[str, int] | None,
    ident: tuple[str, int, str],
    t0: float,
    call: dict[str, Any] | None = None,
) -> bool:
    """An SSE answer, chunked (``slow``: a delay before each token; ``cut_stream``: closed after ``after``)."""
    cid, created, model = ident
    entry["status"] = 200
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    for obj in srv.stream_preamble:  # e.g. Azure's prompt_filter_results chunk (choices: [])
        writer.write(_event(obj))

    # every chunk shares its envelope: format it once, json-encode only the delta (fast path)
    head = (
        f'{{"id":{json.dumps(cid)},"object":"chat.completion.chunk","created":{created},'
        f'"model":{json.dumps(model)},"choices":[{{"index":0,"delta":'
    )

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        tail = f',"logprobs":null,"finish_reason":{json.dumps(finish_reason)}}}]}}'
        return _event((head + json.dumps(delta, separators=(",", ":")) + tail).encode())

    mode, delay = fault.mode, fault.delay_s if fault.mode == "slow" else 0.0

    def delta(i: int, piece: str) -> dict[str, Any]:
        """The delta of token ``i``: content, or (a tool call, OpenAI's wire format) the call's
        index, id, type and name with the first piece of its arguments, then more arguments."""
        if call is None:
            return {"content": piece}
        if i == 0:
            fn = {"name": call["function"]["name"], "arguments": piece}
            return {"tool_calls": [{"index": 0, "id": call["id"], "type": "function", "function": fn}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}

    writer.write(chunk({"role": "assistant", "content": "" if call is None else None}))
    if mode == "bad_json":
        entry["outcome"] = "bad_json"
        writer.write(_event(b'{"id": "chatcmpl-broken", "choices": [{"delta": {"content": "x"'))
        writer.write(b"0\r\n\r\n")
        return True
    cut_at = min(fault.after, max(len(pieces) - 1, 0)) if mode == "cut_stream" else -1
    if not delay and cut_at < 0:  # all tokens at once, one write
        writer.write(b"".join(chunk(delta(i, piece)) for i, piece in enumerate(pieces)))
        pieces = []
        srv.ttft[0] += time.perf_counter() - t0
        srv.ttft[1] += 1
    for i, piece in enumerate(pieces):
        if i == cut_at:
            await writer.drain()
            entry["outcome"] = "cut"
            return False  # the caller closes the connection mid-stream
        if delay:
            await writer.drain()
            await asyncio.sleep(delay)
            if reader.at_eof():  # the client gave up on a slow stream
                entry["outcome"] = "abandoned"
                return False
        writer.write(chunk(delta(i, piece)))
        if i == 0:
            srv.ttft[0] += time.perf_counter() - t0
            srv.ttft[1] += 1
    writer.write(chunk({}, finish))
    if usage is not None:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        writer.write(_event({**obj, "choices": [], "usage": usage}))
    writer.write(_event(b"[DONE]") + b"0\r\n\r\n")
    entry["outcome"] = "ok"
    return True
