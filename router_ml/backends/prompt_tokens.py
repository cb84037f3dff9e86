"""Prompt tokens of a chat request as the server counts them: through the model's chat template.

A server bills (and prefills) the conversation *rendered by its chat template*: role markers,
separators and any default system prompt the template adds. SmolLM2's template, for one
eight-word user message, makes 38 tokens of it, where the message alone is 9. When a stream ends
without the server's ``usage``, the client counts the prompt here:

- **the template**, where the model's own tokenizer is on disk: the backend's ``tokenizer:
  hf:<dir>``, else the Hugging Face folder its ``launch.model`` serves (vLLM). The messages are
  rendered with ``apply_chat_template`` (``add_generation_prompt``, or ``continue_final_message``
  for a prefilled continuation) and the text counted without adding special tokens again;
- **otherwise an estimate**: the messages' text counted with the backend's tokenizer, plus
  :data:`TOKENS_PER_MESSAGE` per message and :data:`REPLY_PRIMING_TOKENS` for the assistant turn
  (the rule of OpenAI's cookbook for its chat models); a template's default system prompt (as
  SmolLM2's) is not seen, so a GGUF served by llama.cpp is under-counted by its length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: tokens a chat template adds per message (role markers, separators) in the estimate
TOKENS_PER_MESSAGE = 3
#: tokens that open the assistant's reply in the estimate
REPLY_PRIMING_TOKENS = 3


def template_dir(backend: Any) -> str | None:
    """The folder of the backend model's own Hugging Face tokenizer, or None."""
    spec_tok = getattr(backend.spec, "tokenizer", None)
    candidates = [spec_tok[3:]] if isinstance(spec_tok, str) and spec_tok.startswith("hf:") else []
    launch = backend.launch or {}
    if launch.get("engine", "vllm") == "vllm" and isinstance(launch.get("model"), str):
        candidates.append(launch["model"])
    for c in candidates:
        path = Path(c).expanduser()
        if (path / "tokenizer_config.json").is_file():
            return str(path)
    return None


@lru_cache(maxsize=16)
def _template_tokenizer(folder: str) -> Any | None:
    """The tokenizer of ``folder`` when it carries a chat template (loaded once, offline)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers missing, not a tokenizer
        log.warning("no chat template from %r (%s); prompt tokens are estimated", folder, err)
        return None
    return tok if getattr(tok, "chat_template", None) else None


def _plain(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages a template renders: text parts joined, other fields kept."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(
                p.get("text", "") for p in m["content"] if isinstance(p, Mapping) and p.get("type") == "text"
            )
        out.append(m)
    return out


def count_prompt_tokens(
    backend: Any,
    messages: Sequence[Mapping[str, Any]],
    count_text: Callable[[str], int],
    *,
    continue_final_message: bool = False,
) -> int:
    """The prompt tokens of ``messages`` on ``backend``: through its chat template where its
    tokenizer is on disk, else the estimate of the module docstring (``count_text`` counts text
    with the backend's tokenizer)."""
    folder = template_dir(backend)
    tok = _template_tokenizer(folder) if folder is not None else None
    if tok is not None:
        try:
            text = tok.apply_chat_template(
                _plain(messages),
                tokenize=False,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
            )
            return len(tok(text, add_special_tokens=False)["input_ids"])
        except Exception as err:  # a template that rejects these messages: estimate instead
            log.debug("chat template of %r failed (%s); estimating", folder, err)
    texts = [m.get("content") for m in _plain(messages)]
    body = sum(count_text(t) for t in texts if isinstance(t, str) and t)
    return body + TOKENS_PER_MESSAGE * len(messages) + (0 if continue_final_message else REPLY_PRIMING_TOKENS)
