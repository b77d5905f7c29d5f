"""protocol/client_frames.py: every client frame of docs/protocol.md, as the server parses it."""

from __future__ import annotations

import pytest

from protocol import client_frames as cf
from protocol.codec import SUBPROTOCOLS, Codec
from protocol.frames import (
    DEFAULT_CONVERSATION,
    MAX_CLIENT_TURN_ID_CHARS,
    ClientInfo,
    Feedback,
    Hello,
    HistoryClear,
    HistoryGet,
    Ping,
    Pong,
    TurnCancel,
    TurnEdit,
    TurnOptions,
    TurnRegenerate,
    TurnResume,
    TurnSelect,
    TurnStart,
    parse_client_frame,
)


def parse(frame: dict) -> object:
    return parse_client_frame(frame, max_input_chars=4000)


def test_hello_omits_what_was_not_given():
    assert cf.hello() == {"type": "hello"}
    assert parse(cf.hello()) == Hello(token=None, user=None, client=None, coalesce=False)
    frame = cf.hello(token="t", user="u", client={"name": "app", "version": "2"}, coalesce=True)
    assert frame == {"type": "hello", "token": "t", "user": "u", "client": {"name": "app", "version": "2"},
                     "coalesce": True}
    assert parse(frame) == Hello(token="t", user="u", client=ClientInfo("app", "2"), coalesce=True)


def test_turn_start_gets_a_fresh_idempotency_key_unless_given_one():
    a, b = cf.turn_start("hi"), cf.turn_start("hi")
    assert a["type"] == "turn.start" and a["text"] == "hi"
    assert a["client_turn_id"] != b["client_turn_id"]
    assert 0 < len(a["client_turn_id"]) <= MAX_CLIENT_TURN_ID_CHARS
    assert "conversation_id" not in a and "options" not in a
    parsed = parse(a)
    assert isinstance(parsed, TurnStart) and parsed.conversation_id == DEFAULT_CONVERSATION

    again = cf.turn_start("hi", client_turn_id="same", conversation_id="c1",
                          options=cf.turn_options(max_tokens=16, temperature=0.5))
    assert again == {"type": "turn.start", "client_turn_id": "same", "text": "hi", "conversation_id": "c1",
                     "options": {"temperature": 0.5, "max_tokens": 16}}
    assert parse(again) == TurnStart(client_turn_id="same", text="hi", conversation_id="c1",
                                     options=TurnOptions(temperature=0.5, max_tokens=16))


def test_turn_options_carry_every_contract_field():
    options = cf.turn_options(temperature=0.7, top_p=0.9, max_tokens=32, enable_thinking=False)
    assert options == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 32, "enable_thinking": False}
    assert cf.turn_options() == {}
    assert "options" not in cf.turn_start("x", options=cf.turn_options())


def test_turn_start_copies_the_options_it_is_given():
    options = {"max_tokens": 8}
    frame = cf.turn_start("x", options=options)
    options["max_tokens"] = 9
    assert frame["options"] == {"max_tokens": 8}


def test_cancel_resume_history_ping_pong():
    assert parse(cf.turn_cancel("t1")) == TurnCancel("t1")
    assert cf.turn_resume("t1") == {"type": "turn.resume", "turn_id": "t1", "after_seq": 0}
    assert parse(cf.turn_resume("t1", 7)) == TurnResume("t1", 7)
    assert cf.history_get() == {"type": "history.get"}
    assert parse(cf.history_get()) == HistoryGet(DEFAULT_CONVERSATION, 50, None)
    assert parse(cf.history_get("c", limit=10, before="m1")) == HistoryGet("c", 10, "m1")
    assert cf.history_clear() == {"type": "history.clear"}
    assert parse(cf.history_clear("c")) == HistoryClear("c")
    assert cf.ping() == {"type": "ping"} and cf.pong() == {"type": "pong"}
    assert parse(cf.ping(1.5)) == Ping(1.5)
    assert parse(cf.pong(0)) == Pong(0)  # t=0 is a value, not an absence


@pytest.mark.parametrize("subprotocol", SUBPROTOCOLS)
def test_every_builder_survives_both_codecs(subprotocol):
    codec = Codec(subprotocol)
    frames = [cf.hello(user="ü"), cf.turn_start("你好 🙂", conversation_id="c"), cf.turn_cancel("t"),
              cf.turn_resume("t", 3), cf.history_get("c", limit=5), cf.history_clear("c"), cf.ping(1), cf.pong(1)]
    for frame in frames:
        assert codec.decode(codec.encode(frame)) == frame
        parse(frame)


def test_there_is_a_builder_for_every_client_frame_type():
    from protocol.frames import _PARSERS

    built = {f["type"] for f in (cf.hello(), cf.turn_start("x"), cf.turn_cancel("t"), cf.turn_resume("t"),
                                 cf.history_get(), cf.history_clear(), cf.ping(), cf.pong(),
                                 cf.turn_regenerate(), cf.turn_edit("x", exchange_id="t"), cf.turn_select("t"),
                                 cf.feedback("t", 1), cf.memory_add("x"), cf.memory_list(),
                                 cf.memory_delete("f_1"))}
    assert built == set(_PARSERS)


def test_swipe_and_feedback_builders_parse_to_their_frames():
    regen = cf.turn_regenerate(client_turn_id="r1", conversation_id="c", exchange_id="t1",
                               options={"temperature": 0.5})
    assert parse(regen) == TurnRegenerate("r1", "c", TurnOptions(temperature=0.5), "t1")
    assert parse(cf.turn_regenerate(client_turn_id="r2")) == TurnRegenerate("r2", DEFAULT_CONVERSATION,
                                                                            TurnOptions(), None)
    assert parse(cf.turn_edit("new", exchange_id="t1", client_turn_id="e1")) == TurnEdit(
        "e1", DEFAULT_CONVERSATION, "t1", "new", TurnOptions())
    assert parse(cf.turn_select("t2", conversation_id="c")) == TurnSelect("c", "t2")
    assert parse(cf.feedback("t3", -1, reason="")) == Feedback("t3", -1, "")
    assert cf.turn_start("x", character_id="mira")["character_id"] == "mira"
    assert parse(cf.turn_start("x", client_turn_id="s1", character_id="mira")).character_id == "mira"


def test_memory_builders_parse_to_their_frames():
    from protocol.frames import MemoryAdd, MemoryDelete, MemoryList

    assert parse(cf.memory_add("I live in Lyon")) == MemoryAdd("I live in Lyon")
    assert parse(cf.memory_list()) == MemoryList()
    assert parse(cf.memory_delete("f_00ff")) == MemoryDelete("f_00ff")
