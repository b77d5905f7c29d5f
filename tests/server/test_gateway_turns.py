"""Turns end to end: streaming, idempotency, cancel, one turn per conversation,
per-user isolation. A real server process (two where it matters), real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import BOTH_BACKENDS, redis_client
from wire import JSON, MSGPACK, assert_contiguous, expect_error, open_ws, recv, recv_until, send, stream_turn

from sessions.keys import KeySpace
from sessions.store import ConversationStore

# On the single Redis and on a Redis Cluster (tests/conftest.py).
pytestmark = BOTH_BACKENDS


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_a_turn_streams_contiguous_deltas(sim_server, subprotocol):
    ws = await open_ws(sim_server, user=f"stream-{uuid.uuid4().hex[:6]}", subprotocol=subprotocol)
    assert ws.subprotocol == subprotocol
    frames = await stream_turn(ws, "你好，今天怎么样？🙂")
    accepted = frames[0]
    assert accepted["type"] == "turn.accepted" and accepted["replayed"] is False
    assert accepted["conversation_id"] == "default"
    assert_contiguous(frames)
    end = frames[-1]
    assert end["finish_reason"] in ("stop", "length")
    assert set(end["usage"]) == {"prompt_tokens", "completion_tokens", "cached_prompt_tokens"}
    assert end["usage"]["completion_tokens"] >= end["seq"] > 0
    t = end["timings"]
    assert 0 <= t["queue_ms"] <= t["ttft_ms"] <= t["total_ms"]
    await ws.close()


async def test_ping_pong_echoes_t(sim_server):
    ws = await open_ws(sim_server, user="pinger")
    await send(ws, {"type": "ping", "t": 123.5})
    frame = await recv(ws)
    assert frame == {"type": "pong", "t": 123.5}
    await ws.close()


async def read_history(ws, conversation_id: str = "default", **kw) -> list[dict]:
    await send(ws, {"type": "history.get", "conversation_id": conversation_id, **kw})
    frame = await recv(ws)
    while frame["type"] != "history":
        frame = await recv(ws)
    return frame["messages"]


async def test_fifty_users_five_turns_each_keep_exact_histories(sim_server, redis_url):
    async def user_session(i: int) -> tuple[str, list[tuple[str, str]]]:
        user = f"many-{uuid.uuid4().hex[:6]}-{i}"
        ws = await open_ws(sim_server, user=user, subprotocol=MSGPACK if i % 2 else JSON)
        exchanged = []
        for n in range(5):
            text = f"user {i} message {n} ✨"
            frames = await stream_turn(ws, text, options={"max_tokens": 24})
            assert_contiguous(frames)
            exchanged.append((text, frames[-1]["text"]))
        await ws.close()
        return user, exchanged

    results = await asyncio.gather(*(user_session(i) for i in range(50)))
    r = redis_client(redis_url)
    store = ConversationStore(r, KeySpace(sim_server.prefix))
    try:
        for user, exchanged in results:
            messages = await store.history(user_id=user, conversation_id="default", limit=100)
            expected = [(role, text) for u, a in exchanged for role, text in (("user", u), ("assistant", a))]
            assert [(m.role, m.text) for m in messages] == expected
            assert len({m.id for m in messages}) == 10
    finally:
        await r.aclose()


async def test_resending_a_known_client_turn_id_replays(sim_server):
    user = f"idem-{uuid.uuid4().hex[:6]}"
    ws = await open_ws(sim_server, user=user)
    start = {"type": "turn.start", "client_turn_id": "same-id", "text": "only once please"}
    await send(ws, start)
    first = await recv_until(ws, "turn.end")
    turn_id = first[0]["turn_id"]

    # Same socket.
    await send(ws, start)
    again = await recv_until(ws, "turn.end")
    assert again[0] == {**first[0], "replayed": True}
    assert_contiguous(again)
    assert again[-1]["text"] == first[-1]["text"]

    # A new socket.
    ws2 = await open_ws(sim_server, user=user)
    await send(ws2, start)
    third = await recv_until(ws2, "turn.end")
    assert third[0]["turn_id"] == turn_id and third[0]["replayed"] is True
    assert_contiguous(third)

    messages = await read_history(ws2)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    await ws.close()
    await ws2.close()


async def test_resend_while_running_replays_from_seq_1(sim_server):
    user = f"idem-live-{uuid.uuid4().hex[:6]}"
    ws = await open_ws(sim_server, user=user)
    start = {"type": "turn.start", "client_turn_id": "live-id", "text": "long one",
             "options": {"max_tokens": 60}}
    await send(ws, start)
    accepted = await recv(ws)
    await recv(ws)  # at least one delta
    ws2 = await open_ws(sim_server, user=user)
    await send(ws2, start)
    frames = await recv_until(ws2, "turn.end")
    assert frames[0]["turn_id"] == accepted["turn_id"] and frames[0]["replayed"] is True
    assert_contiguous(frames)
    await ws.close()
    await ws2.close()


async def test_cancel_ends_cancelled_and_keeps_the_partial_reply(sim_server):
    user = f"cancel-{uuid.uuid4().hex[:6]}"
    ws = await open_ws(sim_server, user=user)
    await send(ws, {"type": "turn.start", "client_turn_id": "c1", "text": "talk a lot",
                    "options": {"max_tokens": 1000}})
    accepted = await recv(ws)
    seen = [await recv(ws) for _ in range(3)]
    assert all(f["type"] == "turn.delta" for f in seen)
    await send(ws, {"type": "turn.cancel", "turn_id": accepted["turn_id"]})
    frames = await recv_until(ws, "turn.end")
    end = frames[-1]
    assert end["finish_reason"] == "cancelled"
    assert_contiguous([accepted, *seen, *frames])
    messages = await read_history(ws)
    assert messages[-1]["role"] == "assistant"
    assert messages[-1]["status"] == "cancelled"
    assert messages[-1]["text"] == end["text"] and end["text"]
    # The conversation accepts a new turn at once.
    frames = await stream_turn(ws, "next")
    assert frames[-1]["finish_reason"] in ("stop", "length")
    await ws.close()


async def test_second_turn_on_a_busy_conversation_is_refused(sim_server, sim_server_b):
    user = f"busy-{uuid.uuid4().hex[:6]}"
    a = await open_ws(sim_server, user=user)
    await send(a, {"type": "turn.start", "client_turn_id": "first", "text": "long",
                   "options": {"max_tokens": 1000}})
    accepted = await recv(a)
    assert accepted["type"] == "turn.accepted"

    # Same process, other socket.
    a2 = await open_ws(sim_server, user=user)
    await send(a2, {"type": "turn.start", "client_turn_id": "second", "text": "me too"})
    err = await expect_error(a2, "turn_in_progress")
    assert err["client_turn_id"] == "second"

    # Another process sharing the Redis.
    b = await open_ws(sim_server_b, user=user)
    await send(b, {"type": "turn.start", "client_turn_id": "third", "text": "and me"})
    await expect_error(b, "turn_in_progress")

    # Another conversation is free.
    frames = await stream_turn(b, "elsewhere", conversation_id="other")
    assert frames[-1]["type"] == "turn.end"

    await send(a, {"type": "turn.cancel", "turn_id": accepted["turn_id"]})
    await recv_until(a, "turn.end")
    for w in (a, a2, b):
        await w.close()


async def test_users_are_isolated(sim_server, sim_server_b):
    alice = f"alice-{uuid.uuid4().hex[:6]}"
    bob = f"bob-{uuid.uuid4().hex[:6]}"
    a = await open_ws(sim_server, user=alice)
    await send(a, {"type": "turn.start", "client_turn_id": "secret-turn", "text": "my secret",
                   "options": {"max_tokens": 1000}})
    accepted = await recv(a)
    turn_id = accepted["turn_id"]
    await recv(a)

    for server in (sim_server, sim_server_b):
        b = await open_ws(server, user=bob)
        for frame in (
            {"type": "turn.cancel", "turn_id": turn_id},
            {"type": "turn.resume", "turn_id": turn_id, "after_seq": 0},
        ):
            await send(b, frame)
            await expect_error(b, "not_found")
        seen = await read_history(b)
        assert all(m["turn_id"] != turn_id and m["text"] != "my secret" for m in seen)
        # Bob's own turn with Alice's client_turn_id is a new turn, not hers.
        await send(b, {"type": "turn.start", "client_turn_id": "secret-turn", "text": "hi"})
        mine = await recv(b)
        assert mine["type"] == "turn.accepted" and mine["turn_id"] != turn_id
        # The second time round it is Bob's own earlier turn, replayed.
        assert mine["replayed"] is (server is sim_server_b)
        await recv_until(b, "turn.end")
        await b.close()

    # Bob's ready frame never lists Alice's running turn.
    import json

    from websockets.asyncio.client import connect

    raw = await connect(sim_server.ws_url, subprotocols=[JSON])
    await raw.send(json.dumps({"type": "hello", "user": bob}))
    ready = json.loads(await raw.recv())
    assert all(t["turn_id"] != turn_id for t in ready["active_turns"])
    await raw.close()

    await send(a, {"type": "turn.cancel", "turn_id": turn_id})
    await recv_until(a, "turn.end")
    await a.close()


async def test_ready_lists_active_turns_and_history_pages(sim_server):
    user = f"active-{uuid.uuid4().hex[:6]}"
    a = await open_ws(sim_server, user=user)
    for n in range(3):
        await stream_turn(a, f"m{n}", options={"max_tokens": 5})
    await send(a, {"type": "turn.start", "client_turn_id": "running", "text": "go on",
                   "options": {"max_tokens": 1000}})
    accepted = await recv(a)
    await recv(a)
    import json

    from websockets.asyncio.client import connect

    raw = await connect(sim_server.ws_url, subprotocols=[JSON])
    await raw.send(json.dumps({"type": "hello", "user": user}))
    ready = json.loads(await raw.recv())
    assert [t["turn_id"] for t in ready["active_turns"]] == [accepted["turn_id"]]
    assert ready["active_turns"][0]["conversation_id"] == "default"
    await raw.close()

    newest = await read_history(a, limit=2)  # read_history passes over the running turn's deltas
    assert [m["text"] for m in newest][-1] == "go on"
    older = await read_history(a, limit=2, before=newest[0]["id"])
    # newest is [reply to m2, "go on"]; the two before it are [reply to m1, m2].
    assert [m["role"] for m in older] == ["assistant", "user"] and older[-1]["text"] == "m2"
    assert older[-1]["turn_id"] == newest[0]["turn_id"]

    await send(a, {"type": "history.clear"})
    await expect_error(a, "turn_in_progress")
    await send(a, {"type": "turn.cancel", "turn_id": accepted["turn_id"]})
    await recv_until(a, "turn.end")
    await send(a, {"type": "history.clear"})
    cleared = (await recv_until(a, "history.cleared"))[-1]
    assert cleared == {"type": "history.cleared", "conversation_id": "default"}
    assert await read_history(a) == []
    await a.close()
