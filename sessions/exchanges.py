"""Exchanges and their alternatives (swipes): which reply the model sees, what history shows.

Pure functions over history messages, no I/O. An *exchange* is one user
message and the replies to it; its id is the turn id of the turn that stored
the user message. ``turn.regenerate`` adds replies to the newest exchange, so
in the history stream an exchange is its user message followed by its
replies, oldest first (docs/protocol.md, addition 19). A character's greeting
is an assistant message with no exchange (status ``greeting``).

The conversation's meta hash records explicit choices as
``sel:<exchange_id>`` -> turn id; without one, the newest reply is the
selected one (the reply a user saw last is the one they continued from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

GREETING_STATUS = "greeting"
SELECTION_PREFIX = "sel:"


class Message(Protocol):
    """What these functions read of a history message (``sessions.store.HistoryMessage``)."""

    @property
    def role(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def turn_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def exchange_id(self) -> str: ...


def selections(meta: Mapping[str, str]) -> dict[str, str]:
    """exchange id -> explicitly selected reply's turn id, from a conversation's meta hash."""
    n = len(SELECTION_PREFIX)
    return {key[n:]: value for key, value in meta.items() if key.startswith(SELECTION_PREFIX)}


def is_greeting(message: Message) -> bool:
    return message.role == "assistant" and message.status == GREETING_STATUS


def _replies(messages: Sequence[Message]) -> dict[str, list[str]]:
    """exchange id -> its replies' turn ids, oldest first."""
    out: dict[str, list[str]] = {}
    for m in messages:
        if m.role == "assistant" and not is_greeting(m):
            out.setdefault(m.exchange_id, []).append(m.turn_id)
    return out


def chosen_reply(replies: Sequence[str], explicit: str | None) -> str | None:
    """The selected reply among ``replies`` (turn ids, oldest first)."""
    if explicit is not None and explicit in replies:
        return explicit
    return replies[-1] if replies else None


def model_view(messages: Sequence[Message], meta: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """The history as the model sees it: (role, text, exchange id), oldest first.

    Each exchange keeps only its selected reply; a greeting has role
    ``greeting``. The result is what :func:`sessions.prompt.pair_history` pairs.
    """
    chosen = selections(meta)
    replies = _replies(messages)
    out: list[tuple[str, str, str]] = []
    for m in messages:
        if is_greeting(m):
            out.append(("greeting", m.text, ""))
        elif m.role == "user":
            out.append(("user", m.text, m.turn_id))
        elif m.role == "assistant":
            if m.turn_id == chosen_reply(replies.get(m.exchange_id, []), chosen.get(m.exchange_id)):
                out.append(("assistant", m.text, m.exchange_id))
    return out


def message_annotations(messages: Sequence[Message], meta: Mapping[str, str]) -> list[dict[str, Any]]:
    """The fields addition 19 adds to each history message, in the order of ``messages``.

    User messages get ``exchange_id``; replies get ``exchange_id``,
    ``alternative`` (their 0-based index), ``alternatives`` (how many the
    exchange has in ``messages``) and ``selected``. A greeting gets nothing.
    """
    chosen = selections(meta)
    replies = _replies(messages)
    out: list[dict[str, Any]] = []
    for m in messages:
        if is_greeting(m):
            out.append({})
        elif m.role == "user":
            out.append({"exchange_id": m.turn_id})
        elif m.role == "assistant":
            group = replies.get(m.exchange_id, [])
            out.append({
                "exchange_id": m.exchange_id,
                "alternative": group.index(m.turn_id) if m.turn_id in group else 0,
                "alternatives": len(group),
                "selected": m.turn_id == chosen_reply(group, chosen.get(m.exchange_id)),
            })
        else:
            out.append({})
    return out


class StoredMessage(Message, Protocol):
    """A history message as the store returns it: with its stream id and time."""

    @property
    def id(self) -> str: ...
    @property
    def created_at(self) -> int: ...


def wire_messages(messages: Sequence[StoredMessage], meta: Mapping[str, str]) -> list[dict[str, Any]]:
    """History messages as the ``history`` frame and REST history carry them (with addition 19's fields)."""
    return [
        {"id": m.id, "role": m.role, "text": m.text, "turn_id": m.turn_id, "status": m.status,
         "created_at": m.created_at, **extra}
        for m, extra in zip(messages, message_annotations(messages, meta), strict=True)
    ]


@dataclass(frozen=True, slots=True)
class ExchangeView:
    """One exchange found in history: what came before it, its user text and its replies."""

    exchange_id: str
    before: list[tuple[str, str, str]]  # the model's view of everything before the exchange
    user_text: str
    replies: list[tuple[str, str, str]]  # (turn_id, text, status), oldest first
    selected: str | None  # the explicitly selected reply, if any


def find_exchange(messages: Sequence[Message], meta: Mapping[str, str], exchange_id: str) -> ExchangeView | None:
    """The exchange ``exchange_id`` within ``messages``, or None when its user message is not there."""
    for index, m in enumerate(messages):
        if m.role == "user" and m.turn_id == exchange_id:
            replies = [(r.turn_id, r.text, r.status) for r in messages[index + 1:]
                       if r.role == "assistant" and not is_greeting(r) and r.exchange_id == exchange_id]
            return ExchangeView(
                exchange_id=exchange_id,
                before=model_view(messages[:index], meta),
                user_text=m.text,
                replies=replies,
                selected=selections(meta).get(exchange_id),
            )
    return None


def newest_exchange(messages: Sequence[Message]) -> str | None:
    """The id of the newest exchange (its user message), or None when there is none."""
    for m in reversed(messages):
        if m.role == "user":
            return m.turn_id
    return None
