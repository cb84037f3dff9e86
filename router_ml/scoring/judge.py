"""LLM-as-judge through any catalog backend: a single-answer rubric, and a pairwise comparison
against a reference model's answer with the two positions swapped.

The judge talks to a backend through anything with ``await client.chat(backend, payload)``
returning an object with ``text`` and ``cost_usd`` (:class:`router_ml.backends.client.BackendClient`
is one: retries, circuit breaker and pricing come with it). Its verdict formats are MT-Bench's:

- :class:`RubricJudge`: ``Rating: [[7]]`` on a 1-10 scale -> value ``(rating - 1) / 9``; with a
  ``reference`` (a gold answer) it is shown to the judge.
- :class:`PairwiseJudge`: ``[[A]]`` / ``[[B]]`` / ``[[C]]`` (tie). The example's ``reference`` is
  the reference model's answer. Both orders are asked (answer first, then reference first), so a
  judge that prefers a position cancels out: per order win 1, tie 0.5, loss 0; value the mean.

``verdict_format`` makes small judges usable: ``"text"`` (the formats above), or the server
constrains the reply to a JSON verdict (``{"rating": 7}``, ``{"verdict": "A"}``) through
``response_format``: ``"json_schema"`` (OpenAI structured outputs, vLLM) or ``"json_object"`` (a
JSON object with a ``schema``, as llama.cpp's servers take it). The parsers read either form.

The judge's own cost (the sum over its calls, from the backend's prices) is in ``cost_usd``; a call
that fails or a reply with no readable verdict gives ``value`` None and ``error`` saying which
backend and why (never cached, so re-scoring retries it); ``detail`` keeps the raw replies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from router_ml.scoring.base import Example, Score, Scorer, ScoringError

RUBRIC_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Consider helpfulness, relevance, accuracy, depth "
    "and level of detail. {reference_note}Be as objective as possible. After a short explanation, you "
    'must rate the response on a scale of 1 to 10 by strictly following this format: "Rating: [[5]]".'
)
PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the responses provided by two AI assistants to the "
    "user question displayed below. Choose the assistant that follows the user's instructions and "
    "answers the question better. Do not let the order of the responses, their length or the "
    "assistants' names influence you. After a short explanation, output your final verdict by "
    'strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is '
    'better, and "[[C]]" for a tie.'
)


class JudgeReply(Protocol):
    text: str
    cost_usd: float | None


class ChatClient(Protocol):
    async def chat(self, name: str, payload: Mapping[str, Any]) -> JudgeReply: ...


VERDICT_FORMATS = ("text", "json_schema", "json_object")
RATING_SCHEMA = {"type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 10}},
                 "required": ["rating"], "additionalProperties": False}  # fmt: skip
PREFERENCE_SCHEMA = {"type": "object", "properties": {"verdict": {"type": "string", "enum": ["A", "B", "C"]}},
                     "required": ["verdict"], "additionalProperties": False}  # fmt: skip
JSON_INSTRUCTION = {
    "rating": ' Reply with only a JSON object {"rating": N}, N an integer from 1 to 10.',
    "verdict": ' Reply with only a JSON object {"verdict": "A"}, "B" or "C" (a tie).',
}


def _json_field(text: str, key: str) -> object:
    """``key`` of the first JSON object in ``text`` (a constrained reply), or None."""
    m = re.search(r"\{.*\}", text, re.DOTALL)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def parse_rating(text: str) -> float | None:
    """The 1-10 rating of a rubric reply (``{"rating": 7}``, ``[[7]]``, ``[[7.5]]``, ``Rating: 7``; the
    last), or None."""
    value = _json_field(text, "rating")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if 1 <= value <= 10 else None
    hits = re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", text) or re.findall(
        r"[Rr]ating\s*:?\s*\[?\s*(\d+(?:\.\d+)?)", text
    )
    if not hits:
        return None
    value = float(hits[-1])
    return value if 1 <= value <= 10 else None


def parse_preference(text: str) -> str | None:
    """``A``, ``B`` or ``C`` (tie) from a pairwise reply (``{"verdict": "A"}`` or its last ``[[A]]``), or None."""
    value = _json_field(text, "verdict")
    if value in ("A", "B", "C"):
        return value
    hits = re.findall(r"\[\[\s*([ABC])\s*\]\]", text)
    return hits[-1] if hits else None


class _Judge(Scorer):
    """Shared plumbing: one backend, bounded concurrency, cost and error bookkeeping."""

    system: str
    field: str  # the JSON verdict's key
    schema: dict[str, Any]

    def __init__(
        self,
        client: ChatClient,
        backend: str,
        *,
        max_tokens: int = 512,
        concurrency: int = 4,
        verdict_format: str = "text",
    ) -> None:
        if verdict_format not in VERDICT_FORMATS:
            raise ScoringError(
                f"scorer {self.name!r}: verdict_format must be one of {VERDICT_FORMATS}, not {verdict_format!r}"
            )
        self.client = client
        self.backend = backend
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.verdict_format = verdict_format

    def get_params(self) -> dict[str, Any]:
        return {"backend": self.backend, "max_tokens": self.max_tokens, "verdict_format": self.verdict_format,
                "prompt": hashlib.sha256(self.system.encode()).hexdigest()[:12]}  # fmt: skip

    def _system(self, **fmt: str) -> str:
        text = self.system.format(**fmt) if fmt else self.system
        return text + (JSON_INSTRUCTION[self.field] if self.verdict_format != "text" else "")

    def _response_format(self) -> dict[str, Any] | None:
        if self.verdict_format == "json_schema":
            return {
                "type": "json_schema",
                "json_schema": {"name": self.field, "schema": self.schema, "strict": True},
            }
        if self.verdict_format == "json_object":
            return {"type": "json_object", "schema": self.schema}
        return None

    async def _ask(self, system: str, user: str) -> tuple[str | None, float, str | None]:
        """(reply text, cost, error)."""
        payload: dict[str, Any] = {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        response_format = self._response_format()
        if response_format is not None:
            payload["response_format"] = response_format
        try:
            reply = await self.client.chat(self.backend, payload)
        except Exception as err:  # a judge failure is recorded on the score, never raised
            return None, 0.0, f"judge backend {self.backend!r}: {type(err).__name__}: {err}"
        return reply.text or "", float(reply.cost_usd or 0.0), None

    async def _one(self, ex: Example) -> Score:
        raise NotImplementedError

    async def ascore(self, examples: Sequence[Example]) -> list[Score]:
        gate = asyncio.Semaphore(self.concurrency)

        async def run(ex: Example) -> Score:
            async with gate:
                return await self._one(ex)

        return list(await asyncio.gather(*(run(ex) for ex in examples)))

    def score(self, examples: Sequence[Example]) -> list[Score]:
        """Blocking form of :meth:`ascore` (not from inside a running event loop: await that instead).
        Every call runs on the same private event loop, so an async client keeps its connections
        from one batch to the next; :meth:`run` runs the caller's own coroutines (closing the client)
        there too."""
        return self.run(self.ascore(examples))

    def run(self, coro: Any) -> Any:
        if getattr(self, "_loop", None) is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)


class RubricJudge(_Judge):
    name = "judge_rubric"
    version = "1"
    system = RUBRIC_SYSTEM
    field = "rating"
    schema = RATING_SCHEMA

    async def _one(self, ex: Example) -> Score:
        note = "A reference answer is given; compare the response with it. " if ex.reference else ""
        user = f"[Question]\n{ex.prompt}\n\n"
        if ex.reference:
            user += f"[The Start of Reference Answer]\n{ex.reference}\n[The End of Reference Answer]\n\n"
        user += f"[The Start of Assistant's Answer]\n{ex.answer}\n[The End of Assistant's Answer]"
        text, cost, error = await self._ask(self._system(reference_note=note), user)
        detail = json.dumps({"reply": text})
        if error:
            return self.make(None, error=error, cost_usd=cost, detail=detail)
        rating = parse_rating(text or "")
        if rating is None:
            return self.make(None, error=f"judge backend {self.backend!r}: no 1-10 rating in its reply",
                             cost_usd=cost, detail=detail)  # fmt: skip
        return self.make((rating - 1) / 9, extracted=f"{rating:g}", cost_usd=cost, detail=detail)


class PairwiseJudge(_Judge):
    name = "judge_pairwise"
    version = "1"
    system = PAIRWISE_SYSTEM
    field = "verdict"
    schema = PREFERENCE_SCHEMA

    @staticmethod
    def _user(question: str, a: str, b: str) -> str:
        return (f"[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n"
                f"[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n"
                "[The End of Assistant B's Answer]")  # fmt: skip

    async def _one(self, ex: Example) -> Score:
        if not ex.reference:
            raise ScoringError(
                "scorer 'judge_pairwise': the example has no 'reference' (the reference model's answer)"
            )
        first = await asyncio.gather(
            self._ask(self._system(), self._user(ex.prompt, ex.answer, ex.reference)),  # answer is A
            self._ask(self._system(), self._user(ex.prompt, ex.reference, ex.answer)),  # answer is B
        )
        cost = sum(c for _, c, _ in first)
        orders, points, errors = [], [], []
        for (text, _, error), answer_pos in zip(first, ("A", "B"), strict=True):
            verdict = parse_preference(text) if text is not None else None
            orders.append({"answer_position": answer_pos, "verdict": verdict, "reply": text})
            if error:
                errors.append(error)
            elif verdict is None:
                errors.append(f"judge backend {self.backend!r}: no [[A]]/[[B]]/[[C]] verdict in its reply")
            else:
                points.append(0.5 if verdict == "C" else float(verdict == answer_pos))
        detail = json.dumps({"orders": orders, "consistent": len(points) == 2 and points[0] == points[1]})
        if errors:
            return self.make(None, error="; ".join(errors), cost_usd=cost, detail=detail)
        return self.make(sum(points) / 2, extracted=",".join(o["verdict"] for o in orders), cost_usd=cost,
                         detail=detail)  # fmt: skip
