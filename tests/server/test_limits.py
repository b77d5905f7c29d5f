"""Per-user limits across processes: the turn rate limit and the connection cap.

Unit tests drive :mod:`server.limits` against the real Redis; the end-to-end
tests run two server processes sharing one Redis and prefix.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import BOTH_BACKENDS, SIM_FLAGS, ServerProcess, clean_prefix, redis_client
from wire import expect_close, expect_error, open_ws, recv, recv_until, send

from protocol.errors import RateLimited, Unavailable
from server.limits import ConnectionRegistry, TurnRateLimiter
from server.redis_clients import async_client
from sessions.keys import KeySpace
from sessions.store import ConversationStore

# On the single Redis and on a Redis Cluster (tests/conftest.py).
pytestmark = BOTH_BACKENDS

# ---------------------------------------------------------------- unit tests


@pytest.fixture
async def unit_redis(redis_url):
    prefix = f"rapport-test-limits:{uuid.uuid4().hex[:8]}:"
    client = redis_client(redis_url)
    yield client, KeySpace(prefix)
    await client.aclose()
    clean_prefix(prefix, redis_url)


async def test_rate_limiter_admits_the_limit_then_refuses_with_retry_after(unit_redis):
    r, keys = unit_redis
    limiter = TurnRateLimiter(r, keys, limit=3, window_s=60)
    for _ in range(3):
        permit = await limiter.check("ann")
        assert not permit.replay and permit.member
    with pytest.raises(RateLimited) as info:
        await limiter.check("ann")
    retry = info.value.fields["retry_after_ms"]
    assert 1000 <= retry <= 60_000
    assert info.value.code == "rate_limited"
    # Another user is not affected.
    await limiter.check("bob")


async def test_rate_window_slides(unit_redis):
    r, keys = unit_redis
    limiter = TurnRateLimiter(r, keys, limit=2, window_s=0.5)
    await limiter.check("ann")
    await limiter.check("ann")
    with pytest.raises(RateLimited) as info:
        await limiter.check("ann")
    # Until the oldest start leaves the window.
    assert 1 <= info.value.fields["retry_after_ms"] <= 500
    await asyncio.sleep(0.6)
    await limiter.check("ann")


async def test_refund_and_replays_do_not_count(unit_redis):
    r, keys = unit_redis
    limiter = TurnRateLimiter(r, keys, limit=1, window_s=60)
    permit = await limiter.check("ann", client_turn_id="c1")
    await limiter.refund(permit)
    await limiter.check("ann", client_turn_id="c1")
    # A client_turn_id the user already used (its idempotency key exists) is a replay.
    await r.set(keys.idempotency("ann", "c1"), "t_1")
    replay = await limiter.check("ann", client_turn_id="c1")
    assert replay.replay
    with pytest.raises(RateLimited):
        await limiter.check("ann", client_turn_id="c2")


async def test_limit_keys_are_the_users_and_go_with_delete_user(unit_redis):
    r, keys = unit_redis
    limiter = TurnRateLimiter(r, keys, limit=5)
    registry = ConnectionRegistry(r, keys, cap=2)
    await limiter.check("ann")
    assert await registry.add("ann", "s_1")
    assert limiter.key("ann").startswith(keys.prefix + keys.user_tag("ann"))
    assert registry.key("ann").startswith(keys.prefix + keys.user_tag("ann"))
    store = ConversationStore(r, keys)
    assert await store.delete_user(user_id="ann") == 2
    assert await registry.count("ann") == 0


async def test_connection_registry_caps_and_frees(unit_redis):
    r, keys = unit_redis
    reg = ConnectionRegistry(r, keys, cap=2)
    assert await reg.add("ann", "s_1")
    assert await reg.add("ann", "s_2")
    assert not await reg.add("ann", "s_3")
    assert await reg.add("ann", "s_2")  # already counted: a refresh, not a new slot
    assert await reg.add("bob", "s_4")
    await reg.remove("ann", "s_1")
    assert await reg.add("ann", "s_3")
    assert await reg.count("ann") == 2


async def test_entries_of_a_crashed_process_expire_and_refresh_keeps_live_ones(unit_redis):
    r, keys = unit_redis
    reg = ConnectionRegistry(r, keys, cap=2, ttl_s=0.6, refresh_s=0.2)
    assert await reg.add("ann", "s_dead")
    assert await reg.add("ann", "s_live")
    reg.start(lambda: [("ann", "s_live")])
    try:
        await asyncio.sleep(1.0)
        # s_dead was never refreshed (its process "crashed"): its slot is free again.
        assert await reg.count("ann") == 1
        assert await reg.add("ann", "s_new")
        assert not await reg.add("ann", "s_more")
    finally:
        await reg.close([("ann", "s_live"), ("ann", "s_new")])
    assert await reg.count("ann") == 0


async def test_refresh_pipelines_many_pairs(unit_redis):
    r, keys = unit_redis
    reg = ConnectionRegistry(r, keys, cap=3, batch=7)
    pairs = [(f"u{i % 10}", f"s_{i}") for i in range(25)]
    assert await reg.refresh(pairs) == 25
    assert await reg.count("u0") == 3  # a live connection counts even past the cap
    await reg.remove_many(pairs)
    assert await reg.count("u0") == 0


async def test_unreachable_redis_is_unavailable(redis_backend):
    # Nothing listens on port 1: a single server, or a cluster none of whose seed nodes answers.
    url = "redis+cluster://127.0.0.1:1" if redis_backend == "cluster" else "redis://127.0.0.1:1/0"
    dead = async_client(url, decode_responses=True, socket_connect_timeout=0.5)
    keys = KeySpace("rapport-test-dead:")
    try:
        with pytest.raises(Unavailable):
            await TurnRateLimiter(dead, keys, limit=1).check("ann")
        with pytest.raises(Unavailable):
            await ConnectionRegistry(dead, keys, cap=1).add("ann", "s_1")
        with pytest.raises(Unavailable):
            await ConnectionRegistry(dead, keys, cap=1).refresh([("ann", "s_1")])
    finally:
        await dead.aclose()


# ---------------------------------------------------------------- two processes

LIMIT_FLAGS = [*SIM_FLAGS, "--auth", "dev", "--turns-per-minute", "5", "--max-connections-per-user", "2"]


@pytest.fixture(scope="module")
def limited_pair(redis_url):
    prefix = f"rapport-test-lim:{uuid.uuid4().hex[:8]}:"
    a = ServerProcess(prefix=prefix, redis_url=redis_url, extra=LIMIT_FLAGS)
    b = ServerProcess(prefix=prefix, redis_url=redis_url, extra=LIMIT_FLAGS)
    a.start(wait_ready=False)
    b.start(wait_ready=False)
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()
        clean_prefix(prefix, redis_url)


async def _turn(ws, conversation: str) -> dict:
    await send(ws, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": "hi",
                    "conversation_id": conversation, "options": {"max_tokens": 4}})
    return (await recv_until(ws, "turn.end"))[-1]


async def test_turn_rate_limit_holds_across_two_processes(limited_pair):
    a, b = limited_pair
    user = f"rl-{uuid.uuid4().hex[:6]}"
    ws_a = await open_ws(a, user=user)
    ws_b = await open_ws(b, user=user)
    try:
        for i in range(5):
            end = await _turn(ws_a if i % 2 == 0 else ws_b, f"c{i}")
            assert end["finish_reason"] in ("stop", "length")
        ctid = uuid.uuid4().hex
        await send(ws_b, {"type": "turn.start", "client_turn_id": ctid, "text": "one more"})
        err = await expect_error(ws_b, "rate_limited")
        assert err["client_turn_id"] == ctid
        assert 0 < err["retry_after_ms"] <= 60_000
        # The same from the other process.
        await send(ws_a, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": "and more"})
        err = await expect_error(ws_a, "rate_limited")
        assert err["retry_after_ms"] > 0
        # Another user is unaffected, on either process.
        other = await open_ws(b, user=f"rl-other-{uuid.uuid4().hex[:6]}")
        assert (await _turn(other, "default"))["finish_reason"] in ("stop", "length")
        await other.close()
    finally:
        await ws_a.close()
        await ws_b.close()


async def test_connection_cap_holds_across_two_processes_and_a_close_frees_a_slot(limited_pair):
    a, b = limited_pair
    user = f"cap-{uuid.uuid4().hex[:6]}"
    first = await open_ws(a, user=user)
    second = await open_ws(b, user=user)
    third = await open_ws(a, hello=False)
    await send(third, {"type": "hello", "user": user})
    await expect_close(third, 4429)
    fourth = await open_ws(b, hello=False)
    await send(fourth, {"type": "hello", "user": user})
    await expect_close(fourth, 4429)
    # Another user is not affected by this one's cap.
    other = await open_ws(a, user=f"cap-other-{uuid.uuid4().hex[:6]}")
    await other.close()
    # Closing a connection frees its slot (on the other process).
    await first.close()
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        again = await open_ws(b, hello=False)
        await send(again, {"type": "hello", "user": user})
        try:
            frame = await recv(again)
        except Exception:  # noqa: BLE001 - closed 4429: the teardown has not run yet
            frame = None
        if frame is not None and frame["type"] == "ready":
            break
        assert asyncio.get_running_loop().time() < deadline, "the closed connection's slot was never freed"
        await asyncio.sleep(0.1)
    await again.close()
    await second.close()
