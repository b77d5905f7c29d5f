"""Builders for the client frames of docs/protocol.md ("Client → server").

The client-side counterpart of the server builders in :mod:`protocol.frames`:
each function returns the plain map a client encodes with its
:class:`protocol.codec.Codec`. Optional fields left as None are omitted rather
than sent as null, so a frame carries exactly what the caller chose and the
server applies its documented defaults.

These builders do not validate (the server does, and tests send malformed
frames on purpose by editing the returned map); they only spell each frame
the way the contract names its fields.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = [
    "hello",
    "history_clear",
    "history_get",
    "memory_add",
    "memory_delete",
    "memory_list",
    "new_client_turn_id",
    "ping",
    "pong",
    "feedback",
    "turn_cancel",
    "turn_edit",
    "turn_options",
    "turn_regenerate",
    "turn_resume",
    "turn_select",
    "turn_start",
]


def _without_none(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if v is not None}


def new_client_turn_id() -> str:
    """A fresh idempotency key: 32 hex characters, within the contract's 64."""
    return uuid.uuid4().hex


def hello(*, token: str | None = None, user: str | None = None, client: dict[str, str] | None = None,
          coalesce: bool | None = None) -> dict[str, Any]:
    """``hello``: ``token`` where headers cannot carry it, ``user`` in development mode only,
    ``client`` as ``{"name", "version"}``, ``coalesce`` to accept merged deltas (an addition)."""
    return _without_none({"type": "hello", "token": token, "user": user,
                          "client": dict(client) if client is not None else None, "coalesce": coalesce})


def turn_options(*, temperature: float | None = None, top_p: float | None = None,
                 max_tokens: int | None = None, enable_thinking: bool | None = None) -> dict[str, Any]:
    """``turn.start.options``: only the sampling settings given."""
    return _without_none({"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
                          "enable_thinking": enable_thinking})


def turn_start(text: str, *, client_turn_id: str | None = None, conversation_id: str | None = None,
               options: dict[str, Any] | None = None, character_id: str | None = None) -> dict[str, Any]:
    """``turn.start``; a fresh ``client_turn_id`` unless the caller re-sends a known one.

    Re-sending the *same* ``client_turn_id`` is how a client that is unsure
    whether its message arrived asks again without starting a second turn
    (guarantee 1), so callers that may re-send keep the returned frame.
    """
    frame: dict[str, Any] = {"type": "turn.start", "client_turn_id": client_turn_id or new_client_turn_id(),
                             "text": text}
    if conversation_id is not None:
        frame["conversation_id"] = conversation_id
    if options:
        frame["options"] = dict(options)
    if character_id is not None:
        frame["character_id"] = character_id
    return frame


def turn_regenerate(*, client_turn_id: str | None = None, conversation_id: str | None = None,
                    exchange_id: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``turn.regenerate``: another reply to the newest exchange (``exchange_id`` names it; optional)."""
    return _without_none({"type": "turn.regenerate", "client_turn_id": client_turn_id or new_client_turn_id(),
                          "conversation_id": conversation_id, "turn_id": exchange_id,
                          "options": dict(options) if options else None})


def turn_edit(text: str, *, exchange_id: str, client_turn_id: str | None = None,
              conversation_id: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``turn.edit``: replace the newest user message (exchange ``exchange_id``) with ``text``."""
    return _without_none({"type": "turn.edit", "client_turn_id": client_turn_id or new_client_turn_id(),
                          "conversation_id": conversation_id, "turn_id": exchange_id, "text": text,
                          "options": dict(options) if options else None})


def turn_select(turn_id: str, *, conversation_id: str | None = None) -> dict[str, Any]:
    """``turn.select``: the alternative (its own ``turn_id``) the model sees from now on."""
    return _without_none({"type": "turn.select", "turn_id": turn_id, "conversation_id": conversation_id})


def feedback(turn_id: str, rating: int, *, reason: str | None = None) -> dict[str, Any]:
    """``feedback``: rate one reply, 1 or -1."""
    return _without_none({"type": "feedback", "turn_id": turn_id, "rating": rating, "reason": reason})


def memory_add(text: str) -> dict[str, Any]:
    """``memory.add``: pin a fact for every conversation of the user; answered by ``memory``."""
    return {"type": "memory.add", "text": text}


def memory_list() -> dict[str, Any]:
    """``memory.list``: the user's pinned facts; answered by ``memory``."""
    return {"type": "memory.list"}


def memory_delete(fact_id: str) -> dict[str, Any]:
    """``memory.delete``: unpin the fact ``fact_id``; answered by ``memory``."""
    return {"type": "memory.delete", "id": fact_id}


def turn_cancel(turn_id: str) -> dict[str, Any]:
    return {"type": "turn.cancel", "turn_id": turn_id}


def turn_resume(turn_id: str, after_seq: int = 0) -> dict[str, Any]:
    """``turn.resume`` with the last seq the client holds (0 for none)."""
    return {"type": "turn.resume", "turn_id": turn_id, "after_seq": after_seq}


def history_get(conversation_id: str | None = None, *, limit: int | None = None,
                before: str | None = None) -> dict[str, Any]:
    return _without_none({"type": "history.get", "conversation_id": conversation_id, "limit": limit,
                          "before": before})


def history_clear(conversation_id: str | None = None) -> dict[str, Any]:
    return _without_none({"type": "history.clear", "conversation_id": conversation_id})


def ping(t: float | int | None = None) -> dict[str, Any]:
    return _without_none({"type": "ping", "t": t})


def pong(t: float | int | None = None) -> dict[str, Any]:
    """``pong``, echoing the ``t`` of the ping it answers (when it had one)."""
    return _without_none({"type": "pong", "t": t})
