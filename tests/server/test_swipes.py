"""Characters bound to conversations, and swipes (regenerate, select, edit), end to end.

Two real server processes sharing one Redis and prefix, both subprotocols:
docs/protocol.md additions 18 and 19. Characters are written through the
character store (the REST surface has tests of its own).
"""

from __future__ import annotations

import json
import uuid

import pytest
from conftest import BOTH_BACKENDS, ROOT, redis_client
from wire import JSON, MSGPACK, assert_contiguous, expect_error, open_ws, recv, recv_until, send

from clients.client import ResilientClient
from protocol import client_frames
from sessions.character_store import CharacterStore
from sessions.characters import parse_card, parse_card_bytes
from sessions.keys import KeySpace

CARDS = ROOT / "tests" / "fixtures" / "cards"

# On the single Redis and on a Redis Cluster (tests/conftest.py).
pytestmark = BOTH_BACKENDS


async def _put_character(prefix: str, redis_url: str, card: dict | bytes, character_id: str,
                         content_type: str | None = None) -> None:
    r = redis_client(redis_url)
    try:
        character = parse_card_bytes(card, content_type, character_id=character_id) \
            if isinstance(card, bytes) else parse_card(card, character_id=character_id)
        await CharacterStore(r, KeySpace(prefix)).put(character, create=False)
    finally:
        await r.aclose()


def _v3_card() -> dict:
    return json.loads((CARDS / "v3_card.json").read_text(encoding="utf-8"))


async def _history(ws, conversation_id: str) -> dict:
    await send(ws, {"type": "history.get", "conversation_id": conversation_id, "limit": 100})
    while True:
        frame = await recv(ws)
        if frame["type"] == "history":
            return frame


async def _turn(ws, frame: dict) -> list[dict]:
    await send(ws, frame)
    frames = await recv_until(ws, "turn.end", timeout=15)
    frames = [f for f in frames if f["type"] != "ping"]
    assert frames[0]["type"] == "turn.accepted", frames[0]
    assert_contiguous(frames)
    return frames


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_character_binding_greeting_and_macros(sim_server, sim_prefix, redis_url, subprotocol):
    char_id = f"v3-{uuid.uuid4().hex[:6]}"
    card = _v3_card()
    await _put_character(sim_prefix, redis_url, card, char_id)
    user = f"bind-{uuid.uuid4().hex[:6]}"
    conv = "with-character"
    ws = await open_ws(sim_server, user=user, subprotocol=subprotocol)
    frames = await _turn(ws, client_frames.turn_start("hello there", conversation_id=conv, character_id=char_id))
    assert frames[0]["exchange_id"] == frames[0]["turn_id"] and frames[0]["alternative"] == 0
    history = await _history(ws, conv)
    assert history["character_id"] == char_id
    greeting, question, reply = history["messages"]
    assert greeting["role"] == "assistant" and greeting["status"] == "greeting" and greeting["turn_id"] == ""
    name = card["data"]["name"]
    # The greeting is stored with its macros applied ({{char}} / {{user}}).
    assert "{{" not in greeting["text"] and greeting["text"]
    if "{{char}}" in card["data"]["first_mes"]:
        assert name in greeting["text"]
    assert question["text"] == "hello there" and question["exchange_id"] == frames[0]["turn_id"]
    assert reply["selected"] is True and reply["alternatives"] == 1 and reply["alternative"] == 0
    # Later turns may omit character_id; a different one is refused, nothing stored.
    await _turn(ws, client_frames.turn_start("and now?", conversation_id=conv))
    await send(ws, client_frames.turn_start("other", conversation_id=conv, character_id="someone-else"))
    err = await expect_error(ws, "bad_request")
    assert "bound to character" in err["message"] and err["client_turn_id"]
    # A conversation with plain history cannot be bound afterwards.
    await _turn(ws, client_frames.turn_start("plain", conversation_id="plain"))
    await send(ws, client_frames.turn_start("bind me", conversation_id="plain", character_id=char_id))
    assert "already has history" in (await expect_error(ws, "bad_request"))["message"]
    # An unknown character is not_found and binds nothing.
    await send(ws, client_frames.turn_start("hi", conversation_id="ghost", character_id="no-such-character"))
    await expect_error(ws, "not_found")
    assert (await _history(ws, "ghost"))["messages"] == []
    assert len((await _history(ws, conv))["messages"]) == 5
    await ws.close()


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_regenerate_select_edit_across_two_processes(sim_server, sim_server_b, subprotocol):
    user = f"swipe-{uuid.uuid4().hex[:6]}"
    conv = "swipes"
    a = await open_ws(sim_server, user=user, subprotocol=subprotocol)
    b = await open_ws(sim_server_b, user=user, subprotocol=subprotocol)
    first = await _turn(a, client_frames.turn_start("tell me a story", conversation_id=conv))
    exchange = first[0]["turn_id"]
    # Regenerate on the other process: a new turn of the same exchange.
    regen_frame = client_frames.turn_regenerate(conversation_id=conv, exchange_id=exchange)
    second = await _turn(b, regen_frame)
    assert second[0]["turn_id"] != exchange
    assert second[0]["exchange_id"] == exchange and second[0]["alternative"] == 1
    # Another reply, not the same one again (the server's default temperature is above 0).
    assert second[-1]["text"] != first[-1]["text"]
    # Replay by client_turn_id: the same turn, no third alternative.
    await send(a, regen_frame)
    replay = await recv_until(a, "turn.end", timeout=15)
    assert replay[0] == {**second[0], "replayed": True}
    assert "".join(f["text"] for f in replay if f["type"] == "turn.delta") == second[-1]["text"]
    # Default exchange: the newest.
    third = await _turn(a, client_frames.turn_regenerate(conversation_id=conv))
    assert third[0]["exchange_id"] == exchange and third[0]["alternative"] == 2
    msgs = (await _history(b, conv))["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "assistant", "assistant"]
    replies = msgs[1:]
    assert [m["turn_id"] for m in replies] == [exchange, second[0]["turn_id"], third[0]["turn_id"]]
    assert [m["alternative"] for m in replies] == [0, 1, 2]
    assert all(m["alternatives"] == 3 and m["exchange_id"] == exchange for m in replies)
    assert [m["selected"] for m in replies] == [False, False, True]  # the newest by default
    # Select the first reply (on process B), seen in history on A.
    await send(b, client_frames.turn_select(exchange, conversation_id=conv))
    selected = await recv(b)
    assert selected == {"type": "turn.selected", "conversation_id": conv, "exchange_id": exchange,
                        "turn_id": exchange}
    assert [m["selected"] for m in (await _history(a, conv))["messages"][1:]] == [True, False, False]
    # The next turn builds on the selected reply, and a regenerate of an old exchange is refused.
    await _turn(a, client_frames.turn_start("go on", conversation_id=conv))
    await send(a, client_frames.turn_regenerate(conversation_id=conv, exchange_id=exchange))
    assert "newest exchange" in (await expect_error(a, "bad_request"))["message"]
    # Edit the newest user message: the old message and its reply go, a new exchange begins.
    msgs = (await _history(a, conv))["messages"]
    newest = msgs[-2]
    assert newest["role"] == "user" and newest["text"] == "go on"
    edited = await _turn(b, client_frames.turn_edit("go on, but shorter", exchange_id=newest["exchange_id"],
                                                    conversation_id=conv))
    assert edited[0]["exchange_id"] == edited[0]["turn_id"] != newest["exchange_id"]
    msgs = (await _history(a, conv))["messages"]
    assert [m["text"] for m in msgs if m["role"] == "user"] == ["tell me a story", "go on, but shorter"]
    assert msgs[-1]["turn_id"] == edited[0]["turn_id"] and msgs[-1]["selected"] is True
    # Selecting an unknown reply is not_found.
    await send(a, client_frames.turn_select("t_nope", conversation_id=conv))
    await expect_error(a, "not_found")
    await a.close()
    await b.close()


async def test_a_regenerated_turn_resumes_on_another_process(sim_server, sim_server_b):
    user = f"swipe-resume-{uuid.uuid4().hex[:6]}"
    conv = "resume"
    a = await open_ws(sim_server, user=user)
    await _turn(a, client_frames.turn_start("first", conversation_id=conv,
                                            options={"max_tokens": 16}))
    await send(a, client_frames.turn_regenerate(conversation_id=conv, options={"max_tokens": 200}))
    accepted = await recv(a)
    assert accepted["type"] == "turn.accepted" and accepted["alternative"] == 1
    held = []
    while len(held) < 3:
        frame = await recv(a)
        if frame["type"] == "turn.delta":
            held.append(frame)
    a.transport.abort()  # the socket dies mid-reply: no close frame, not a cancel
    b = await open_ws(sim_server_b, user=user)
    await send(b, client_frames.turn_resume(accepted["turn_id"], held[-1]["seq"]))
    rest = [f for f in await recv_until(b, "turn.end", timeout=20) if f["type"] != "ping"]
    deltas = held + [f for f in rest if f["type"] == "turn.delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == rest[-1]["text"]
    await b.close()


async def test_swipe_frames_refuse_bad_input_and_keep_the_connection(sim_server):
    ws = await open_ws(sim_server, user=f"swipe-bad-{uuid.uuid4().hex[:6]}")
    await send(ws, client_frames.turn_regenerate(conversation_id="empty"))
    err = await expect_error(ws, "bad_request")
    assert "none" in err["message"] and err["client_turn_id"]
    await send(ws, {"type": "turn.edit", "client_turn_id": "x1", "turn_id": "t_1"})
    assert "text" in (await expect_error(ws, "bad_request"))["message"]
    await send(ws, {"type": "turn.select"})
    assert "turn_id" in (await expect_error(ws, "bad_request"))["message"]
    await send(ws, {"type": "feedback", "turn_id": "t_1", "rating": 0})
    assert "rating" in (await expect_error(ws, "bad_request"))["message"]
    await send(ws, {"type": "feedback", "turn_id": "t_1", "rating": True})
    await expect_error(ws, "bad_request")
    await send(ws, client_frames.feedback("t_unknown", 1))
    await expect_error(ws, "not_found")
    # Still usable.
    await _turn(ws, client_frames.turn_start("still here?"))
    await ws.close()


async def test_feedback_is_recorded_for_a_reply(sim_server):
    ws = await open_ws(sim_server, user=f"rater-{uuid.uuid4().hex[:6]}")
    frames = await _turn(ws, client_frames.turn_start("rate me", conversation_id="rated"))
    await send(ws, client_frames.feedback(frames[0]["turn_id"], -1, reason="too long"))
    assert await recv(ws) == {"type": "feedback.recorded", "turn_id": frames[0]["turn_id"], "rating": -1}
    await ws.close()


async def test_the_python_client_regenerates_selects_edits_and_rates(sim_server):
    user = f"client-swipe-{uuid.uuid4().hex[:6]}"
    async with ResilientClient(sim_server.ws_url, user=user) as client:
        first = client.send("hello", conversation_id="py")
        await first.wait()
        again = client.regenerate(conversation_id="py")
        end = await again.wait()
        assert again.accepted is not None and again.accepted["exchange_id"] == first.turn_id
        assert again.accepted["alternative"] == 1 and end["text"] == again.text
        chosen = await client.select(first.turn_id, "py")
        assert chosen["exchange_id"] == first.turn_id and chosen["turn_id"] == first.turn_id
        assert await client.feedback(again.turn_id, -1, "off topic") == {
            "type": "feedback.recorded", "turn_id": again.turn_id, "rating": -1}
        edited = client.edit("hello again", exchange_id=first.turn_id, conversation_id="py")
        await edited.wait()
        page = await client.history("py")
        assert [m["text"] for m in page["messages"] if m["role"] == "user"] == ["hello again"]
