"""Typed protocol frames and their validation (docs/protocol.md).

Client frames are parsed from the decoded map into frozen dataclasses; any
missing field, wrong type or unknown ``type`` raises :class:`BadRequest`, which
the gateway answers with an ``error`` frame while the connection stays open.
Unknown fields are ignored, as the contract requires.

Server frames are built by small functions that return plain maps, so the
codec has one shape to encode and tests can compare against the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, RapportError, TooLarge

PROTOCOL_NAME = "rapport.v1"
MAX_CLIENT_TURN_ID_CHARS = 64
MAX_ID_CHARS = 128
DEFAULT_CONVERSATION = "default"


@dataclass(frozen=True, slots=True)
class ClientInfo:
    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Hello:
    token: str | None
    user: str | None
    client: ClientInfo | None
    # Opt-in (an addition to version 1): lagging sockets may get several
    # consecutive deltas merged into one frame carrying seq_start..seq.
    coalesce: bool = False


@dataclass(frozen=True, slots=True)
class TurnOptions:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    enable_thinking: bool | None = None


@dataclass(frozen=True, slots=True)
class TurnStart:
    client_turn_id: str
    text: str
    conversation_id: str
    options: TurnOptions
    # Binds a new conversation to a character (addition 18); checked against
    # the binding on later turns.
    character_id: str | None = None


@dataclass(frozen=True, slots=True)
class TurnRegenerate:
    """Another reply to the newest exchange's user message (addition 19)."""

    client_turn_id: str
    conversation_id: str
    options: TurnOptions
    # The exchange to regenerate; None: the newest (it must be the newest).
    exchange_id: str | None = None


@dataclass(frozen=True, slots=True)
class TurnEdit:
    """Replace the newest user message and answer the new text (addition 19)."""

    client_turn_id: str
    conversation_id: str
    exchange_id: str
    text: str
    options: TurnOptions


@dataclass(frozen=True, slots=True)
class TurnSelect:
    """Pick the alternative the model sees from now on (addition 19)."""

    conversation_id: str
    turn_id: str


@dataclass(frozen=True, slots=True)
class Feedback:
    """A rating of one reply (addition 20)."""

    turn_id: str
    rating: int
    reason: str | None


#: What ``feedback.reason`` may hold.
MAX_FEEDBACK_REASON_CHARS = 1000


@dataclass(frozen=True, slots=True)
class MemoryAdd:
    """Pin a fact the model sees in every conversation of the user (addition 22)."""

    text: str


@dataclass(frozen=True, slots=True)
class MemoryList:
    """Ask for the user's pinned facts (addition 22)."""


@dataclass(frozen=True, slots=True)
class MemoryDelete:
    """Unpin one fact by its id (addition 22)."""

    id: str


#: What one pinned fact may hold (``memory.add.text``).
MAX_FACT_CHARS = 500
#: Fact ids are "f_" and 16 hex digits; anything longer is not one.
MAX_FACT_ID_CHARS = 64


@dataclass(frozen=True, slots=True)
class TurnCancel:
    turn_id: str


@dataclass(frozen=True, slots=True)
class TurnResume:
    turn_id: str
    after_seq: int


@dataclass(frozen=True, slots=True)
class HistoryGet:
    conversation_id: str
    limit: int
    before: str | None


@dataclass(frozen=True, slots=True)
class HistoryClear:
    conversation_id: str


@dataclass(frozen=True, slots=True)
class Ping:
    t: float | int | None


@dataclass(frozen=True, slots=True)
class Pong:
    t: float | int | None


ClientFrame = (Hello | TurnStart | TurnRegenerate | TurnEdit | TurnSelect | Feedback | TurnCancel
               | TurnResume | HistoryGet | HistoryClear | Ping | Pong | MemoryAdd | MemoryList | MemoryDelete)

#: The frames that start a turn; each carries a ``client_turn_id``.
TURN_STARTING_TYPES = frozenset({"turn.start", "turn.regenerate", "turn.edit"})


# ---------------------------------------------------------------- field checks


def _str(obj: dict[str, Any], name: str, *, required: bool = True, max_chars: int = MAX_ID_CHARS,
         min_chars: int = 1, default: str | None = None) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadRequest(f"missing field '{name}'")
        return default
    if not isinstance(value, str):
        raise BadRequest(f"field '{name}' must be a string")
    if len(value) < min_chars:
        raise BadRequest(f"field '{name}' must not be empty")
    if len(value) > max_chars:
        raise TooLongField(name, max_chars)
    return value


class TooLongField(BadRequest):
    def __init__(self, name: str, max_chars: int) -> None:
        super().__init__(f"field '{name}' is longer than {max_chars} characters")


def _number(obj: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    # bool is an int subclass in Python; true/false is not a number on the wire.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"field '{name}' must be a number")
    if not lo <= value <= hi:
        raise BadRequest(f"field '{name}' must be between {lo} and {hi}")
    return float(value)


def _int(obj: dict[str, Any], name: str, lo: int, hi: int, *, required: bool = False,
         default: int | None = None) -> int | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadRequest(f"missing field '{name}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field '{name}' must be an integer")
    if not lo <= value <= hi:
        raise BadRequest(f"field '{name}' must be between {lo} and {hi}")
    return value


def _bool(obj: dict[str, Any], name: str) -> bool | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise BadRequest(f"field '{name}' must be a boolean")
    return value


def _map(obj: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"field '{name}' must be a map")
    return value


def _t(obj: dict[str, Any]) -> float | int | None:
    value = obj.get("t")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest("field 't' must be a number")
    return value


# ---------------------------------------------------------------- parsing


def parse_client_frame(obj: dict[str, Any], *, max_input_chars: int) -> ClientFrame:
    """Validate one decoded client frame. Raises BadRequest or TooLarge."""
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise BadRequest("a frame must have a string field 'type'")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise BadRequest(f"unknown frame type '{kind[:40]}'")
    try:
        return parser(obj, max_input_chars)
    except RapportError as exc:
        # Tell the client which of its pending turns the error is about.
        client_turn_id = obj.get("client_turn_id")
        if kind in TURN_STARTING_TYPES and isinstance(client_turn_id, str) \
                and len(client_turn_id) <= MAX_CLIENT_TURN_ID_CHARS:
            exc.fields.setdefault("client_turn_id", client_turn_id)
        raise


def _hello(obj: dict[str, Any], _: int) -> Hello:
    client = _map(obj, "client")
    info = None
    if client is not None:
        info = ClientInfo(
            name=_str(client, "name", required=False, max_chars=200, default="") or "",
            version=_str(client, "version", required=False, max_chars=200, default="") or "",
        )
    return Hello(
        token=_str(obj, "token", required=False, max_chars=8192),
        user=_str(obj, "user", required=False, max_chars=MAX_ID_CHARS),
        client=info,
        coalesce=bool(_bool(obj, "coalesce")),
    )


def _user_text(obj: dict[str, Any], max_input_chars: int, client_turn_id: str | None) -> str:
    text = obj.get("text")
    if text is None:
        raise BadRequest("missing field 'text'", client_turn_id=client_turn_id)
    if not isinstance(text, str):
        raise BadRequest("field 'text' must be a string", client_turn_id=client_turn_id)
    if not text.strip():
        raise BadRequest("field 'text' must not be empty", client_turn_id=client_turn_id)
    if len(text) > max_input_chars:
        raise TooLarge(f"'text' is longer than {max_input_chars} characters",
                            client_turn_id=client_turn_id)
    return text


def _options(obj: dict[str, Any], client_turn_id: str | None) -> TurnOptions:
    raw_options = _map(obj, "options") or {}
    options = TurnOptions(
        temperature=_number(raw_options, "temperature", 0.0, 2.0),
        top_p=_number(raw_options, "top_p", 0.0, 1.0),
        max_tokens=_int(raw_options, "max_tokens", 1, 1_000_000),
        enable_thinking=_bool(raw_options, "enable_thinking"),
    )
    if options.top_p == 0.0:
        raise BadRequest("field 'top_p' must be greater than 0", client_turn_id=client_turn_id)
    return options


def _conversation(obj: dict[str, Any]) -> str:
    return _str(obj, "conversation_id", required=False, default=DEFAULT_CONVERSATION) or DEFAULT_CONVERSATION


def _turn_start(obj: dict[str, Any], max_input_chars: int) -> TurnStart:
    client_turn_id = _str(obj, "client_turn_id", max_chars=MAX_CLIENT_TURN_ID_CHARS)
    text = _user_text(obj, max_input_chars, client_turn_id)
    return TurnStart(
        client_turn_id=client_turn_id,  # type: ignore[arg-type]
        text=text,
        conversation_id=_conversation(obj),
        options=_options(obj, client_turn_id),
        character_id=_str(obj, "character_id", required=False),
    )


def _turn_regenerate(obj: dict[str, Any], _: int) -> TurnRegenerate:
    client_turn_id = _str(obj, "client_turn_id", max_chars=MAX_CLIENT_TURN_ID_CHARS)
    return TurnRegenerate(
        client_turn_id=client_turn_id,  # type: ignore[arg-type]
        conversation_id=_conversation(obj),
        options=_options(obj, client_turn_id),
        exchange_id=_str(obj, "turn_id", required=False),
    )


def _turn_edit(obj: dict[str, Any], max_input_chars: int) -> TurnEdit:
    client_turn_id = _str(obj, "client_turn_id", max_chars=MAX_CLIENT_TURN_ID_CHARS)
    return TurnEdit(
        client_turn_id=client_turn_id,  # type: ignore[arg-type]
        conversation_id=_conversation(obj),
        exchange_id=_str(obj, "turn_id"),  # type: ignore[arg-type]
        text=_user_text(obj, max_input_chars, client_turn_id),
        options=_options(obj, client_turn_id),
    )


def _turn_select(obj: dict[str, Any], _: int) -> TurnSelect:
    return TurnSelect(conversation_id=_conversation(obj), turn_id=_str(obj, "turn_id"))  # type: ignore[arg-type]


def _feedback(obj: dict[str, Any], _: int) -> Feedback:
    rating = _int(obj, "rating", -1, 1, required=True)
    if rating == 0:
        raise BadRequest("field 'rating' must be -1 or 1")
    return Feedback(
        turn_id=_str(obj, "turn_id"),  # type: ignore[arg-type]
        rating=rating,  # type: ignore[arg-type]
        reason=_str(obj, "reason", required=False, max_chars=MAX_FEEDBACK_REASON_CHARS, min_chars=0),
    )


def _memory_add(obj: dict[str, Any], _: int) -> MemoryAdd:
    text = _str(obj, "text", max_chars=MAX_FACT_CHARS) or ""
    if not text.strip():
        raise BadRequest("field 'text' must not be empty")
    return MemoryAdd(text=text)


def _memory_list(obj: dict[str, Any], _: int) -> MemoryList:
    return MemoryList()


def _memory_delete(obj: dict[str, Any], _: int) -> MemoryDelete:
    return MemoryDelete(id=_str(obj, "id", max_chars=MAX_FACT_ID_CHARS))  # type: ignore[arg-type]


def _turn_cancel(obj: dict[str, Any], _: int) -> TurnCancel:
    return TurnCancel(turn_id=_str(obj, "turn_id"))  # type: ignore[arg-type]


def _turn_resume(obj: dict[str, Any], _: int) -> TurnResume:
    return TurnResume(
        turn_id=_str(obj, "turn_id"),  # type: ignore[arg-type]
        after_seq=_int(obj, "after_seq", 0, 2**53, required=True),  # type: ignore[arg-type]
    )


def _history_get(obj: dict[str, Any], _: int) -> HistoryGet:
    return HistoryGet(
        conversation_id=_str(obj, "conversation_id", required=False,
                             default=DEFAULT_CONVERSATION) or DEFAULT_CONVERSATION,
        limit=_int(obj, "limit", 1, 100, default=50),  # type: ignore[arg-type]
        before=_str(obj, "before", required=False, max_chars=64),
    )


def _history_clear(obj: dict[str, Any], _: int) -> HistoryClear:
    return HistoryClear(
        conversation_id=_str(obj, "conversation_id", required=False,
                             default=DEFAULT_CONVERSATION) or DEFAULT_CONVERSATION,
    )


def _ping(obj: dict[str, Any], _: int) -> Ping:
    return Ping(t=_t(obj))


def _pong(obj: dict[str, Any], _: int) -> Pong:
    return Pong(t=_t(obj))


_PARSERS: dict[str, Callable[[dict[str, Any], int], ClientFrame]] = {
    "hello": _hello,
    "turn.start": _turn_start,
    "turn.regenerate": _turn_regenerate,
    "turn.edit": _turn_edit,
    "turn.select": _turn_select,
    "feedback": _feedback,
    "turn.cancel": _turn_cancel,
    "turn.resume": _turn_resume,
    "history.get": _history_get,
    "history.clear": _history_clear,
    "ping": _ping,
    "pong": _pong,
    "memory.add": _memory_add,
    "memory.list": _memory_list,
    "memory.delete": _memory_delete,
}


# ---------------------------------------------------------------- server frames


def ready(*, session_id: str, user_id: str, model: str, interval_ms: int, timeout_ms: int,
          max_frame_bytes: int, max_input_chars: int, turns_per_minute: int,
          active_turns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "ready",
        "session_id": session_id,
        "user_id": user_id,
        "protocol": PROTOCOL_NAME,
        "model": model,
        "heartbeat": {"interval_ms": interval_ms, "timeout_ms": timeout_ms},
        "limits": {
            "max_frame_bytes": max_frame_bytes,
            "max_input_chars": max_input_chars,
            "turns_per_minute": turns_per_minute,
        },
        "active_turns": active_turns,
    }


def turn_accepted(*, turn_id: str, client_turn_id: str, conversation_id: str,
                  replayed: bool, exchange_id: str | None = None,
                  alternative: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "turn.accepted",
        "turn_id": turn_id,
        "client_turn_id": client_turn_id,
        "conversation_id": conversation_id,
        "replayed": replayed,
    }
    # Additions 19: which exchange the reply belongs to and its place in it.
    if exchange_id is not None:
        frame["exchange_id"] = exchange_id
    if alternative is not None:
        frame["alternative"] = alternative
    return frame


def turn_selected(*, conversation_id: str, exchange_id: str, turn_id: str) -> dict[str, Any]:
    return {"type": "turn.selected", "conversation_id": conversation_id, "exchange_id": exchange_id,
            "turn_id": turn_id}


def feedback_recorded(*, turn_id: str, rating: int) -> dict[str, Any]:
    return {"type": "feedback.recorded", "turn_id": turn_id, "rating": rating}


def memory(facts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``memory``: the user's whole list of pinned facts ({id, text, created_at}), oldest first;
    the answer to every ``memory.*`` frame, after the change it asked for."""
    return {"type": "memory", "facts": [{"id": f["id"], "text": f["text"], "created_at": f["created_at"]}
                                        for f in facts]}


def turn_delta(turn_id: str, seq: int, text: str) -> dict[str, Any]:
    return {"type": "turn.delta", "turn_id": turn_id, "seq": seq, "text": text}


def turn_end(*, turn_id: str, seq: int, finish_reason: str, text: str, usage: dict[str, int],
             timings: dict[str, float | None]) -> dict[str, Any]:
    return {
        "type": "turn.end",
        "turn_id": turn_id,
        "seq": seq,
        "finish_reason": finish_reason,
        "text": text,
        "usage": usage,
        "timings": timings,
    }


def history(conversation_id: str, messages: list[dict[str, Any]],
            character_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "history", "conversation_id": conversation_id, "messages": messages}
    if character_id is not None:
        frame["character_id"] = character_id
    return frame


def history_cleared(conversation_id: str) -> dict[str, Any]:
    return {"type": "history.cleared", "conversation_id": conversation_id}


def error(code: str, message: str, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    frame.update({k: v for k, v in fields.items() if v is not None})
    return frame


def error_from(exc: RapportError) -> dict[str, Any]:
    return error(exc.code, exc.message, **exc.fields)


def ping(t: float | int | None = None) -> dict[str, Any]:
    return {"type": "ping", "t": t} if t is not None else {"type": "ping"}


def pong(t: float | int | None = None) -> dict[str, Any]:
    return {"type": "pong", "t": t} if t is not None else {"type": "pong"}
