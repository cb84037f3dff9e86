"""What a request needs of a model, and which backends lack it.

A request's :class:`Needs` (derived from the chat body by
:func:`~router_ml.serving.request_needs.needs_of`) are matched against a catalog
:class:`~router_ml.backends.catalog.Backend`: its ``capabilities`` (``tools``, ``vision``,
``json_mode``) and its ``context_window``. :func:`lacking` names what a backend misses, so that the
engine routes and falls back only among backends that have everything, and says which capability
excluded which backend.

The context check counts the prompt with the backend's tokenizer only when a cheap bound cannot
settle it: a byte-level tokenizer makes at most one token per UTF-8 byte, so a prompt of ``b`` bytes
plus :data:`MESSAGE_OVERHEAD` tokens per message and the requested output fits any window of at
least that many tokens. Image parts are not counted (their token cost depends on the model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from router_ml.backends.catalog import Backend

CAPABILITIES = ("tools", "vision", "json_mode")
CONTEXT = "context_window"
MESSAGE_OVERHEAD = 8  # tokens a chat template adds per message, at most (role markers, separators)


@dataclass(eq=False)  # not frozen: a frozen dataclass takes ~4 us to build, on every request
class Needs:
    """What one request needs: ``features`` (a subset of :data:`CAPABILITIES`), each with the
    request field that needs it (``params``, for the error's ``param``); the texts of its prompt
    (messages, tool definitions), their length in characters, the message count and the output
    tokens asked for (``max_tokens``, else 1), for the context window."""

    features: frozenset[str] = frozenset()
    params: dict[str, str] = field(default_factory=dict)
    texts: tuple[str, ...] = field(default=(), repr=False)
    chars: int = 0
    messages: int = 0
    output_tokens: int = 1

    @cached_property
    def prompt_text(self) -> str:
        return "\n".join(self.texts)

    @cached_property
    def prompt_bytes(self) -> int:
        return len(self.prompt_text.encode("utf-8", "surrogatepass"))

    def bound(self) -> int:
        """An upper bound on the tokens the request occupies in any model's context window."""
        return self.prompt_bytes + MESSAGE_OVERHEAD * self.messages + self.output_tokens

    def fits(self, window: float) -> bool:
        """Whether the request surely fits a window of ``window`` tokens (four bytes per character
        at most decides without encoding the prompt)."""
        rest = MESSAGE_OVERHEAD * self.messages + self.output_tokens
        return 4 * self.chars + len(self.texts) + rest <= window or self.bound() <= window


TokenCounter = Callable[[Backend, str], int]


def lacking(backend: Backend, needs: Needs, count_tokens: TokenCounter | None = None) -> list[str]:
    """What ``backend`` lacks of ``needs``, in :data:`CAPABILITIES` order, then
    ``"context_window"`` when the prompt and output do not fit (``count_tokens(backend, text)``
    counts the prompt when the byte bound does not settle it; without one the bound decides)."""
    out = [c for c in CAPABILITIES if c in needs.features and c not in backend.capabilities]
    window = backend.spec.context_window
    if window is not None and not needs.fits(window):
        tokens = needs.bound()
        if count_tokens is not None:
            tokens = (
                count_tokens(backend, needs.prompt_text)
                + MESSAGE_OVERHEAD * needs.messages
                + needs.output_tokens
            )
        if tokens > window:
            out.append(CONTEXT)
    return out


def exclusions(
    backends: Sequence[Backend], needs: Needs, count_tokens: TokenCounter | None = None
) -> dict[str, list[str]]:
    """``{backend name: what it lacks}`` for the backends that cannot serve ``needs``."""
    out = {}
    for b in backends:
        missing = lacking(b, needs, count_tokens)
        if missing:
            out[b.name] = missing
    return out


def describe(excluded: dict[str, list[str]]) -> str:
    """``"tools excluded big, fast; context_window excluded fast"``: which capability excluded
    which backends."""
    by_cap: dict[str, list[str]] = {}
    for name, missing in excluded.items():
        for cap in missing:
            by_cap.setdefault(cap, []).append(name)
    order = [*CAPABILITIES, CONTEXT]
    return "; ".join(f"{cap} excluded {', '.join(by_cap[cap])}" for cap in order if cap in by_cap)
