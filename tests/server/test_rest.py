"""History over REST: listing, paging, deletion, user erasure and isolation, against
a real server process and real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import BOTH_BACKENDS, ServerProcess, clean_prefix, make_token, redis_client
from wire import open_ws, recv, recv_until, send

from sessions.keys import KeySpace, glob_escape
from sessions.store import ConversationStore
from testkit.metrics import parse as parse_metrics

# Replies of 400 simulated tokens at 20 ms a step: a turn runs for 8 s or more,
# long enough to act on it while it runs.
FLAGS = ["--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "20",
         "--sim-reply-tokens", "400", "--turns-per-minute", "100000", "--auth", "jwt"]

# On the single Redis and on a Redis Cluster (tests/conftest.py).
pytestmark = BOTH_BACKENDS


@pytest.fixture(scope="module")
def rest_server(redis_url: str) -> Iterator[ServerProcess]:
    prefix = f"rapport-test-rest:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, redis_url=redis_url, extra=FLAGS).start()
    yield server
    server.stop()
    clean_prefix(prefix, redis_url)


@pytest.fixture
async def store(rest_server: ServerProcess) -> AsyncIterator[ConversationStore]:
    """The server's own store (same Redis, same prefix), for seeding history quickly."""
    r = redis_client(rest_server.redis_url)
    yield ConversationStore(r, KeySpace(rest_server.prefix))
    await r.aclose()


@pytest.fixture
async def http(rest_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=rest_server.base, timeout=30) as client:
        yield client


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user)}"}


def new_user(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


_clock = [int(time.time() * 1000)]


async def seed(store: ConversationStore, user: str, conversation: str, exchanges: int,
               *, now_ms: int | None = None) -> None:
    """Complete exchanges (user message + reply) written the way the server writes them."""
    for i in range(exchanges):
        _clock[0] += 1
        at = now_ms if now_ms is not None else _clock[0]
        turn_id = "t_" + uuid.uuid4().hex
        outcome = await store.begin_turn(user_id=user, conversation_id=conversation,
                                         client_turn_id=uuid.uuid4().hex, text=f"{conversation} q{i}",
                                         turn_id=turn_id, owner="seed", now_ms=at)
        assert outcome.kind == "accepted"
        await store.finish_turn(user_id=user, turn_id=turn_id, finish_reason="stop",
                                text=f"{conversation} a{i}", usage={}, timings={}, end={"type": "turn.end"},
                                now_ms=at)


async def test_auth_is_required(http):
    for method, path in [("GET", "/v1/conversations"), ("GET", "/v1/conversations/default/messages"),
                         ("DELETE", "/v1/conversations/default"), ("DELETE", "/v1/users/me")]:
        r = await http.request(method, path)
        assert r.status_code == 401, (method, path)
        assert r.json() == {"error": {"code": "unauthorized", "message": r.json()["error"]["message"]}}
        r = await http.request(method, path, headers={"Authorization": "Bearer not-a-jwt"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        r = await http.request(method, path, headers={
            "Authorization": f"Bearer {make_token('x', secret='wrong-secret-' + 'z' * 32)}"})
        assert r.status_code == 401


async def test_conversations_are_listed_newest_first(http, store):
    user = new_user("lister")
    r = await http.get("/v1/conversations", headers=auth(user))
    assert r.status_code == 200 and r.json() == {"conversations": []}
    await seed(store, user, "old", 1, now_ms=1_700_000_001_000)
    await seed(store, user, "newest", 1, now_ms=1_700_000_003_000)
    await seed(store, user, "middle", 1, now_ms=1_700_000_002_000)
    r = await http.get("/v1/conversations", headers=auth(user))
    assert r.status_code == 200
    assert r.json()["conversations"] == [
        {"conversation_id": "newest", "last_activity_at": 1_700_000_003_000},
        {"conversation_id": "middle", "last_activity_at": 1_700_000_002_000},
        {"conversation_id": "old", "last_activity_at": 1_700_000_001_000},
    ]


async def test_messages_page_backwards_oldest_first(http, store):
    user = new_user("pager")
    await seed(store, user, "chat", 30)  # 60 messages
    everything = await store.history(user_id=user, conversation_id="chat", limit=100)
    assert len(everything) == 60

    r = await http.get("/v1/conversations/chat/messages", headers=auth(user))
    assert r.status_code == 200
    page = r.json()
    assert page["conversation_id"] == "chat"
    assert len(page["messages"]) == 50  # the default limit
    assert [m["id"] for m in page["messages"]] == [m.id for m in everything[10:]]
    first = page["messages"][0]
    # Addition 19: a user message also names its exchange (its own turn id).
    assert set(first) == {"id", "role", "text", "turn_id", "status", "created_at", "exchange_id"}
    assert first["exchange_id"] == first["turn_id"]
    assert (first["role"], first["text"], first["status"]) == ("user", "chat q5", "complete")
    assert page["messages"][1]["role"] == "assistant" and page["messages"][1]["status"] == "stop"
    assert page["next_before"] == everything[10].id

    collected: list[dict] = []
    before = None
    pages = 0
    while True:
        params = {"limit": 7} | ({"before": before} if before else {})
        r = await http.get("/v1/conversations/chat/messages", params=params, headers=auth(user))
        assert r.status_code == 200
        body = r.json()
        assert len(body["messages"]) <= 7
        collected[:0] = body["messages"]
        pages += 1
        before = body["next_before"]
        if before is None:
            break
    assert pages == 9  # 8 full pages of 7 and one of 4
    assert [m["id"] for m in collected] == [m.id for m in everything]
    assert [m["text"] for m in collected] == [m.text for m in everything]

    # Exactly one page left: no next_before.
    r = await http.get("/v1/conversations/chat/messages", params={"limit": 60}, headers=auth(user))
    assert len(r.json()["messages"]) == 60 and r.json()["next_before"] is None
    # Before the oldest message: an empty page of an existing conversation.
    r = await http.get("/v1/conversations/chat/messages", params={"before": everything[0].id},
                       headers=auth(user))
    assert r.status_code == 200 and r.json()["messages"] == [] and r.json()["next_before"] is None


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "101"}, {"limit": "ten"},
                                    {"before": "yesterday"}, {"before": "1-2-3"}])
async def test_bad_paging_parameters_are_400(http, store, params):
    user = new_user("badpage")
    await seed(store, user, "c", 1)
    r = await http.get("/v1/conversations/c/messages", params=params, headers=auth(user))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"
    assert r.json()["error"]["message"]


async def test_other_users_conversations_are_not_found(http, store):
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    await seed(store, alice, "secret", 2)
    r = await http.get("/v1/conversations/secret/messages", headers=auth(bob))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    # Exactly what a user who never had anything called "secret" sees.
    r_carol = await http.get("/v1/conversations/secret/messages", headers=auth(carol))
    assert r_carol.status_code == 404 and r_carol.json() == r.json()
    r = await http.delete("/v1/conversations/secret", headers=auth(bob))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await http.get("/v1/conversations", headers=auth(bob))
    assert r.json() == {"conversations": []}
    # Alice's conversation is untouched.
    r = await http.get("/v1/conversations/secret/messages", headers=auth(alice))
    assert r.status_code == 200 and len(r.json()["messages"]) == 4


async def test_deleting_a_conversation(http, store):
    user = new_user("deleter")
    await seed(store, user, "gone", 2)
    await seed(store, user, "kept", 1)
    r = await http.delete("/v1/conversations/gone", headers=auth(user))
    assert r.status_code == 200
    assert r.json() == {"conversation_id": "gone", "deleted": True}
    r = await http.get("/v1/conversations/gone/messages", headers=auth(user))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await http.get("/v1/conversations", headers=auth(user))
    assert [c["conversation_id"] for c in r.json()["conversations"]] == ["kept"]
    r = await http.delete("/v1/conversations/gone", headers=auth(user))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await http.delete("/v1/conversations/never-was", headers=auth(user))
    assert r.status_code == 404


async def test_conversation_ids_with_odd_characters(http, store):
    user = new_user("odd")
    conv = "日记 #1: {tag}*?"
    await seed(store, user, conv, 1)
    path = "/v1/conversations/" + quote(conv, safe="")
    r = await http.get(path + "/messages", headers=auth(user))
    assert r.status_code == 200 and r.json()["conversation_id"] == conv
    assert [m["text"] for m in r.json()["messages"]] == [f"{conv} q0", f"{conv} a0"]
    assert (await http.delete(path, headers=auth(user))).status_code == 200


async def start_long_turn(server: ServerProcess, user: str, conversation: str):
    """A WebSocket turn that is generating (its first delta arrived); returns (ws, turn_id)."""
    ws = await open_ws(server, token=make_token(user))
    await send(ws, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": "tell me a story",
                    "conversation_id": conversation, "options": {"max_tokens": 1000}})
    accepted = await recv(ws, timeout=15)
    assert accepted["type"] == "turn.accepted", accepted
    frame = await recv(ws, timeout=15)
    while frame["type"] != "turn.delta":
        frame = await recv(ws, timeout=15)
    return ws, accepted["turn_id"]


async def test_deleting_a_conversation_with_a_running_turn_is_409(rest_server, http):
    user = new_user("busy")
    ws, turn_id = await start_long_turn(rest_server, user, "live")
    r = await http.delete("/v1/conversations/live", headers=auth(user))
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["code"] == "turn_in_progress" and err["turn_id"] == turn_id and err["message"]
    # Reading works meanwhile: the user's message is stored already.
    r = await http.get("/v1/conversations/live/messages", headers=auth(user))
    assert r.status_code == 200 and [m["role"] for m in r.json()["messages"]] == ["user"]

    await send(ws, {"type": "turn.cancel", "turn_id": turn_id})
    end = (await recv_until(ws, "turn.end", timeout=15))[-1]
    assert end["finish_reason"] == "cancelled"
    await ws.close()
    r = await http.delete("/v1/conversations/live", headers=auth(user))
    assert r.status_code == 200, r.text
    r = await http.get("/v1/conversations/live/messages", headers=auth(user))
    assert r.status_code == 404


async def snapshot(r: aioredis.Redis, pattern: str) -> dict[str, tuple[str, object]]:
    """Every key matching ``pattern`` with its type and content."""
    out: dict[str, tuple[str, object]] = {}
    async for key in r.scan_iter(match=pattern, count=1000):
        kind = await r.type(key)
        if kind == "hash":
            value: object = await r.hgetall(key)
        elif kind == "stream":
            value = await r.xrange(key)
        elif kind == "zset":
            value = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            value = await r.get(key)
        elif kind == "set":
            value = sorted(await r.smembers(key))
        elif kind == "list":
            value = await r.lrange(key, 0, -1)
        else:
            value = None
        out[key] = (kind, value)
    return out


async def stable_snapshot(r: aioredis.Redis, pattern: str) -> dict[str, tuple[str, object]]:
    """A snapshot that stays the same for a moment (closing sockets settle first)."""
    previous = await snapshot(r, pattern)
    for _ in range(50):
        await asyncio.sleep(0.2)
        current = await snapshot(r, pattern)
        if current == previous:
            return current
        previous = current
    raise AssertionError("the keys kept changing")


def user_keys(keys, user: str, prefix: str) -> set[str]:
    tag = KeySpace(prefix).user_tag(user)
    return {k for k in keys if tag in k}


async def wait_running(server: ServerProcess, want: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    value = None
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            text = (await client.get(f"{server.base}/metrics")).text
            value = parse_metrics(text).get("rapport_engine_running_requests", value)
            if value == want:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"engine running requests stayed {value}, wanted {want}")


async def test_delete_me_forgets_the_user_and_nobody_else(rest_server, http, store):
    """Users "bob" and "bob2" (one id a prefix of the other) in this server's own
    key space: deleting bob removes every key under bob's tag, leaves every key
    of bob2 as it was, and a turn bob still had running is stopped first so it
    writes nothing back."""
    prefix = rest_server.prefix
    r = redis_client(rest_server.redis_url)
    try:
        for user in ("bob", "bob2"):
            await seed(store, user, "default", 3)
            await seed(store, user, "diary", 2)
            # A real turn through the server: idempotency key, turn record, delta log,
            # rate-limit and connection entries.
            ws, turn_id = await start_long_turn(rest_server, user, "stories")
            await send(ws, {"type": "turn.cancel", "turn_id": turn_id})
            await recv_until(ws, "turn.end", timeout=15)
            await ws.close()
        # bob also has a turn generating right now, detached (its socket dropped).
        ws, running_turn = await start_long_turn(rest_server, "bob", "late-night")
        await ws.close()
        await wait_running(rest_server, 1)

        keys = KeySpace(prefix)
        # bob2 has nothing running: wait until their closed sockets have settled.
        bob2_before = await stable_snapshot(r, keys.user_pattern("bob2"))
        bob2_keys = set(bob2_before)
        bob_keys = set(await snapshot(r, keys.user_pattern("bob")))
        assert bob_keys and bob2_keys and not bob_keys & bob2_keys
        assert user_keys(bob_keys, "bob", prefix) == bob_keys
        assert user_keys(bob2_keys, "bob2", prefix) == bob2_keys
        kinds = {k.rsplit("}:", 1)[1].split(":")[0] for k in bob_keys}
        assert {"hist", "convs", "idem", "turn", "log", "active"} <= kinds, kinds
        await wait_running(rest_server, 1)  # bob's turn is still generating

        resp = await http.delete("/v1/users/me", headers=auth("bob"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["user_id"] == "bob"
        # (The running turn's `active` entry goes when the turn is cancelled, just before.)
        assert 0 < resp.json()["deleted_keys"] <= len(bob_keys)
        await wait_running(rest_server, 0, timeout=5)  # bob's running turn was stopped

        everything = await snapshot(r, glob_escape(prefix) + "*")
        assert not user_keys(everything, "bob", prefix), "bob's keys survived"
        await asyncio.sleep(1.0)  # nothing trickles back in afterwards
        everything = await snapshot(r, glob_escape(prefix) + "*")
        assert not user_keys(everything, "bob", prefix), "a key of bob came back"
        assert {k: v for k, v in everything.items() if k in bob2_keys} == bob2_before
        assert user_keys(everything, "bob2", prefix) == bob2_keys

        # Over REST too: bob has nothing, bob2 has everything.
        got = await http.get("/v1/conversations", headers=auth("bob"))
        assert got.json() == {"conversations": []}
        got = await http.get("/v1/conversations", headers=auth("bob2"))
        assert {c["conversation_id"] for c in got.json()["conversations"]} == {"default", "diary", "stories"}
        got = await http.get("/v1/conversations/late-night/messages", headers=auth("bob"))
        assert got.status_code == 404
        assert running_turn
        # Deleting again is harmless.
        again = await http.delete("/v1/users/me", headers=auth("bob"))
        assert again.status_code == 200 and again.json()["deleted_keys"] == 0
    finally:
        await r.aclose()
