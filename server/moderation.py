"""Moderation in the gateway: loading the policy from the flags, the input check, block records.

The policy comes from two flags, either or both:

* ``--moderation-list PATH``: the built-in filter (:mod:`sessions.moderation`),
  one term a line, ``re:`` for patterns, ``#`` for comments, ``input:`` or
  ``output:`` to limit an entry to one direction;
* ``--moderation module:callable``: a callable taking no arguments and
  returning a :class:`~sessions.moderation.Moderator` (``input_blocked`` and
  ``output_filter``), for example a classifier.

With both, a message is refused if either refuses it, and a reply passes the
list's filter and then the callable's. Both are loaded when the settings are
validated, so a bad list or an unimportable callable stops the server at start
rather than at its first turn.

A blocked message is refused with :class:`ContentFiltered` (``error.code``
``content_filter``) before anything is stored. A blocked reply is ended by the
turn's adapters (``server.turns``, ``server.openai_api``) with the finish
reason ``content_filter``; they call :func:`record_block`, which never sees the
text.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Protocol

from protocol.errors import ContentFiltered, RapportError
from sessions.moderation import ChainModerator, ModerationListError, Moderator, OutputFilter, parse_list

from .audit import Audit


class Settings(Protocol):
    """The two flags of :class:`server.config.Settings` read here (config imports this module)."""

    moderation_list: str
    moderation: str

log = logging.getLogger("rapport.moderation")


class ModerationConfigError(RapportError):
    code = "internal"


def load_callable(spec: str) -> Moderator:
    """``module:callable`` -> the moderator the callable returns."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModerationConfigError(f"--moderation must be module:callable, not {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ModerationConfigError(f"--moderation {spec}: cannot load it ({exc})") from None
    if not callable(target):
        raise ModerationConfigError(f"--moderation {spec}: not callable")
    moderator = target()
    if not (callable(getattr(moderator, "input_blocked", None))
            and callable(getattr(moderator, "output_filter", None))):
        raise ModerationConfigError(
            f"--moderation {spec}: must return an object with input_blocked(text) and output_filter()")
    return moderator


def load_list(path: str) -> Moderator:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModerationConfigError(f"--moderation-list {path}: cannot read it ({exc})") from None
    try:
        return parse_list(text, source=path)
    except ModerationListError as exc:
        raise ModerationConfigError(f"--moderation-list {exc}") from None


def load(settings: Settings) -> Moderator | None:
    """The moderation policy the settings name, or None for none."""
    parts: list[Moderator] = []
    if settings.moderation_list:
        parts.append(load_list(settings.moderation_list))
    if settings.moderation:
        parts.append(load_callable(settings.moderation))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else ChainModerator(tuple(parts))


class Moderation:
    """One process's moderation policy (None: moderation is off) and where its blocks are recorded.

    Held by :class:`server.runtime.Runtime`; the WebSocket gateway, the turn
    manager and the OpenAI endpoint all ask it, so one policy applies everywhere.
    """

    def __init__(self, moderator: Moderator | None, *, audit: Audit | None = None) -> None:
        self.moderator = moderator
        self.audit = audit

    def input_blocked(self, text: str) -> bool:
        return self.moderator is not None and self.moderator.input_blocked(text)

    def check_input(self, text: str, *, user_id: str) -> None:
        """Raise :class:`ContentFiltered` if the policy refuses the message (and record the block)."""
        if self.input_blocked(text):
            self.record_block(user_id=user_id, turn_id=None, direction="input")
            raise ContentFiltered("the message was blocked by the content policy; nothing was stored")

    def output_filter(self) -> OutputFilter | None:
        """A fresh streaming filter for one reply, or None when moderation is off."""
        return self.moderator.output_filter() if self.moderator is not None else None

    def record_block(self, *, user_id: str, turn_id: str | None, direction: str) -> None:
        """A block, for the log and the audit log: who, which turn, which direction; never the text."""
        log.info("moderation blocked %s of user %s (turn %s)", direction, user_id, turn_id)
        if self.audit is not None:
            self.audit.record("moderation_block", user=user_id, turn_id=turn_id, direction=direction)
