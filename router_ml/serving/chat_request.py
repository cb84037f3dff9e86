"""The chat-completions request the proxy accepts, as a pydantic schema.

:func:`validate_chat` checks a request body (already a ``dict``: the proxy parses the bytes with
``orjson``, the SDK is handed one) against :class:`ChatRequest` and turns the first problem into an
OpenAI-style :class:`~router_ml.serving.openai_errors.ApiError` whose ``param`` names the top-level
field and whose message gives the whole path (``messages[0].role: Input should be 'system', ...``).
The schema is a set of ``TypedDict`` s validated by a pydantic ``TypeAdapter``; the body itself is
what goes on to the backend: fields the schema does not name (``tools``, ``response_format``,
``image_url`` parts...) pass through untouched.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import TypedDict

from router_ml.backends.config_errors import dotted
from router_ml.serving.openai_errors import ApiError

Role = Literal["system", "user", "assistant", "tool", "developer"]
PositiveInt = Annotated[StrictInt, Field(gt=0)]


class TextPart(TypedDict):
    type: Literal["text"]
    text: StrictStr


class OtherPart(TypedDict):
    """Any other content part (``image_url``, ``input_audio``...): passed on, not read."""

    type: StrictStr


def _part_kind(part: Any) -> str | None:
    if not isinstance(part, dict) or "type" not in part:
        return None  # pydantic reports: "Unable to extract tag using discriminator"
    return "text part" if part["type"] == "text" else "other part"


ContentPart = Annotated[
    Annotated[TextPart, Tag("text part")] | Annotated[OtherPart, Tag("other part")],
    Discriminator(_part_kind, custom_error_type="content_part", custom_error_message=(
        "Input should be a content part: an object with a 'type'")),
]  # fmt: skip


class Message(TypedDict):
    role: Role
    content: NotRequired[StrictStr | list[ContentPart] | None]


class ChatRequest(TypedDict):
    """The fields the proxy reads or bounds (``temperature`` and ``top_p``: any number, never a
    bool or a string); the rest of the body passes through to the backend as it came."""

    model: Annotated[StrictStr, Field(pattern=r"\S")]
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: NotRequired[PositiveInt | None]
    max_completion_tokens: NotRequired[PositiveInt | None]
    n: NotRequired[Literal[1] | None]
    stream: NotRequired[StrictBool]
    temperature: NotRequired[StrictFloat | None]
    top_p: NotRequired[StrictFloat | None]


# validated from the parsed body (a dict): pydantic's typed-dict validation runs in Rust, about
# half the time of a BaseModel's, and the body itself goes on to the backend untouched
CHAT_REQUEST = TypeAdapter(ChatRequest)


# a clearer word than pydantic's for the fields people get wrong most
_HINTS = {
    ("model", "missing"): "'model' is required: a backend name, 'router' or 'router:<policy>:<knob>'",
    ("model", "string_pattern_mismatch"): "'model' must not be blank: a backend name, 'router' or "
    "'router:<policy>:<knob>'",
    ("messages", "missing"): "'messages' is required: a non-empty list of messages",
    ("n", "literal_error"): "only n=1 is supported",
}


_FIELDS = {name for td in (ChatRequest, Message, TextPart, OtherPart) for name in td.__annotations__}


def _field_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """``loc`` without pydantic's union-member tags (``str``, ``list[...]``, ``text``...)."""
    return tuple(p for p in loc if isinstance(p, int) or p in _FIELDS)


def _api_error(err: ValidationError) -> ApiError:
    # of a union's failed members, the deepest error is the one that says what is wrong
    errors = err.errors(include_url=False, include_context=False)
    depth = max(len(_field_loc(e["loc"])) for e in errors)
    deepest = [e for e in errors if len(_field_loc(e["loc"])) == depth]
    first = deepest[0]
    loc = _field_loc(first["loc"])
    msg = "; or ".join(dict.fromkeys(e["msg"] for e in deepest if _field_loc(e["loc"]) == loc))
    if not loc:  # the body itself
        return ApiError(400, f"request body must be a JSON object, got {type(first['input']).__name__}")
    hint = _HINTS.get((loc[0], first["type"])) if len(loc) == 1 else None
    got = "" if first["type"] == "missing" else f", got {first['input']!r:.80}"
    message = hint or f"'{dotted(loc)}': {msg}{got}"
    return ApiError(400, message, param=str(loc[0]))


def validate_chat(body: Any, max_prompt_chars: int) -> tuple[ChatRequest, str]:
    """The validated request and its routed prompt (:func:`prompt_of`), or the :class:`ApiError`
    naming the first problem (413 when the messages hold more than ``max_prompt_chars``
    characters, 400 when they carry no text)."""
    try:
        req = CHAT_REQUEST.validate_python(body)
    except ValidationError as e:
        raise _api_error(e) from None
    total = sum(len(text_of(m.get("content"))) for m in req["messages"])
    if total > max_prompt_chars:
        raise ApiError(
            413,
            f"the messages hold {total} characters; the limit is {max_prompt_chars}",
            param="messages",
            code="context_length_exceeded",
        )
    prompt = prompt_of(req["messages"])
    if not prompt:
        raise ApiError(400, "the messages carry no text to answer", param="messages")
    return req, prompt


def text_of(content: str | list[Any] | None) -> str:
    """The text of a validated message's content (its text parts, one per line)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return "\n".join(p["text"] for p in content if p["type"] == "text")


def prompt_of(messages: list[Message]) -> str:
    """The text the router classifies: the last user message (with the system prompt before it, which
    often says what the task is)."""
    system = [text_of(m.get("content")) for m in messages if m["role"] in ("system", "developer")]
    users = [m for m in messages if m["role"] == "user"]
    last = text_of((users[-1] if users else messages[-1]).get("content"))
    return "\n".join([*system[:1], last]).strip()
