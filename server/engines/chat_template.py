"""The model's chat template, applied with its tokenizer: prompt text, token ids, token counts.

Both vLLM engines count a chat's prompt tokens the way vLLM's OpenAI server
builds the prompt (``apply_chat_template`` with ``add_generation_prompt``,
then encoding without special tokens, since the template already wrote
them). The in-process engine also generates from exactly these token ids; the
remote engine only counts, because :meth:`Engine.count_tokens` is synchronous
and cannot ask a server's ``POST /tokenize``.

The tokenizer is any Hugging Face tokenizer (``transformers``), whether vLLM
handed it over or it was loaded from local files here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sessions.messages import ChatMessage

log = logging.getLogger(__name__)

#: Files of a model folder that may hold its chat template, in the order tried.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """The chat as role/content dicts: what chat templates and ``/v1/chat/completions`` take."""
    return [{"role": m.role, "content": m.content} for m in messages]


def template_text(tokenizer: Any, folder: str | None = None) -> str:
    """The source of the tokenizer's chat template ('' when there is none).

    Named templates (a dict) are joined. Some tokenizer wrappers do not
    expose the template; then the model ``folder``'s files are read.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(v) for v in template.values())
    if template:
        return str(template)
    if folder is None:
        return ""
    for name in TEMPLATE_FILES:
        try:
            text = (Path(folder) / name).read_text(encoding="utf-8")
        except OSError:
            continue
        if name != "tokenizer_config.json" or "chat_template" in text:
            return text
    return ""


class ChatTemplate:
    """Renders a chat with the model's template and counts its tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (``apply_chat_template``, ``encode``).
        template: the template's source, as :func:`template_text` returns it.
    """

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer = tokenizer
        #: Whether the template knows Qwen3's ``enable_thinking`` switch; other
        #: templates are never passed it.
        self.thinking_switch = "enable_thinking" in template

    def render(self, messages: Sequence[ChatMessage], enable_thinking: bool = False) -> str:
        """The prompt text vLLM's OpenAI server would build for ``messages``."""
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
        if self.thinking_switch:
            kwargs["enable_thinking"] = enable_thinking
        text: str = self.tokenizer.apply_chat_template(openai_messages(messages), **kwargs)
        return text

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt."""
        # The chat template already wrote every special token (BOS included).
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens of ``messages`` (thinking off, the gateway's default)."""
        return len(self.encode(self.render(messages, enable_thinking=False)))


def load_local_chat_template(names: Iterable[str | None]) -> tuple[ChatTemplate, str] | None:
    """The first of ``names`` whose tokenizer, with a chat template, loads from this machine.

    Existing folders are tried first; the other names only in the local
    Hugging Face cache (``local_files_only``: never over the network).
    Returns the template and the name it loaded from, or None (also when
    ``transformers`` is not installed).
    """
    given = [n for n in dict.fromkeys(names) if n]
    candidates = [(n, False) for n in given if os.path.isdir(n)]
    candidates += [(n, True) for n in given if not os.path.isdir(n)]
    if not candidates:
        return None
    try:
        from transformers import AutoTokenizer
    except Exception as exc:  # noqa: BLE001 - no usable transformers: the caller estimates instead
        log.info("transformers is unavailable (%s); token counts are estimates", exc)
        return None
    for name, cache_only in candidates:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=cache_only)
        except Exception:
            log.debug("no tokenizer at %s", name, exc_info=True)
            continue
        if getattr(tokenizer, "chat_template", None):
            return ChatTemplate(tokenizer, template_text(tokenizer)), name
    return None
