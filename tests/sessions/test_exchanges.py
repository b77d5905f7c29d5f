"""Exchanges and alternatives (sessions/exchanges.py): pure, no Redis."""

from __future__ import annotations

from dataclasses import dataclass

from sessions.exchanges import (
    find_exchange,
    message_annotations,
    model_view,
    newest_exchange,
    selections,
    wire_messages,
)
from sessions.prompt import PastTurn, pair_history


@dataclass(frozen=True)
class Msg:
    role: str
    text: str
    turn_id: str
    status: str = "stop"
    exchange_id: str = ""
    id: str = "0-1"
    created_at: int = 0


def user(turn_id: str, text: str) -> Msg:
    return Msg("user", text, turn_id, "complete", turn_id)


def reply(turn_id: str, text: str, exchange: str | None = None) -> Msg:
    return Msg("assistant", text, turn_id, "stop", exchange or turn_id)


GREETING = Msg("assistant", "Hello, traveller.", "", "greeting", "")

CHAT = [GREETING, user("t1", "q1"), reply("t1", "a1"), user("t2", "q2"), reply("t2", "a2"),
        reply("t3", "a2 again", "t2"), reply("t4", "a2 third", "t2")]


def test_selections_come_from_the_meta_hash_only() -> None:
    assert selections({"character_id": "mira", "sel:t2": "t3"}) == {"t2": "t3"}


def test_the_model_sees_the_newest_reply_unless_another_was_selected() -> None:
    assert model_view(CHAT, {}) == [("greeting", "Hello, traveller.", ""), ("user", "q1", "t1"),
                                    ("assistant", "a1", "t1"), ("user", "q2", "t2"),
                                    ("assistant", "a2 third", "t2")]
    assert model_view(CHAT, {"sel:t2": "t3"})[-1] == ("assistant", "a2 again", "t2")
    # A selection naming a reply that is not in the exchange falls back to the newest.
    assert model_view(CHAT, {"sel:t2": "t1"})[-1] == ("assistant", "a2 third", "t2")


def test_pairing_keeps_the_greeting_as_a_turn_without_user_text() -> None:
    assert pair_history(model_view(CHAT, {"sel:t2": "t2"})) == [
        PastTurn("", "Hello, traveller."), PastTurn("q1", "a1"), PastTurn("q2", "a2")]


def test_history_annotations_number_alternatives_and_mark_the_selected_one() -> None:
    notes = message_annotations(CHAT, {"sel:t2": "t3"})
    assert notes[0] == {}
    assert notes[1] == {"exchange_id": "t1"}
    assert notes[2] == {"exchange_id": "t1", "alternative": 0, "alternatives": 1, "selected": True}
    assert [n["alternative"] for n in notes[4:]] == [0, 1, 2]
    assert [n["selected"] for n in notes[4:]] == [False, True, False]
    wired = wire_messages(CHAT, {})
    assert wired[5]["turn_id"] == "t3" and wired[5]["exchange_id"] == "t2" and wired[6]["selected"] is True
    assert set(wired[0]) == {"id", "role", "text", "turn_id", "status", "created_at"}


def test_find_exchange_splits_what_came_before_from_the_replies() -> None:
    found = find_exchange(CHAT, {"sel:t2": "t4"}, "t2")
    assert found is not None
    assert found.user_text == "q2" and found.selected == "t4"
    assert [r[0] for r in found.replies] == ["t2", "t3", "t4"]
    assert found.before[-1] == ("assistant", "a1", "t1")
    assert find_exchange(CHAT, {}, "t9") is None
    assert newest_exchange(CHAT) == "t2" and newest_exchange([GREETING]) is None
