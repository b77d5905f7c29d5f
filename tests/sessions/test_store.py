"""ConversationStore against the real Redis at 127.0.0.1:6379 (no mocks).

Each test runs under its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from protocol.errors import BadRequest, NotFound, RapportError, TurnInProgress, Unavailable
from server.redis_clients import async_client, discover
from sessions.keys import KeySpace, glob_escape
from sessions.store import (
    MAX_ALTERNATIVES,
    BeginOutcome,
    ConversationStore,
    HistoryMessage,
    LogDelta,
    LogEnd,
    TurnRecord,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
UNICODE = "你好，世界！「测试」😀👍🏽 ｆｕｌｌ－ｗｉｄｔｈ\u200d\n\ttabs \"quotes\" \\ émoji 🇯🇵"


def _now() -> int:
    return int(time.time() * 1000)


class Env:
    def __init__(self, redis: aioredis.Redis, blocking: aioredis.Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.store = ConversationStore(redis, keys, blocking_redis=blocking)
        #: The URL both clients were made from (for more clients standing for other processes).
        self.url = REDIS_URL

    async def begin(
        self, user: str = "alice", conv: str = "default", client: str | None = None, text: str = "hi",
        turn_id: str | None = None, owner: str = "proc-1",
    ) -> BeginOutcome:
        return await self.store.begin_turn(
            user_id=user, conversation_id=conv, client_turn_id=client or uuid4().hex, text=text,
            turn_id=turn_id or uuid4().hex, owner=owner, now_ms=_now(),
        )

    async def finish(
        self, user: str, turn_id: str, text: str = "", reason: str = "stop", end: dict | None = None
    ) -> TurnRecord:
        return await self.store.finish_turn(
            user_id=user, turn_id=turn_id, finish_reason=reason, text=text,
            usage={"prompt_tokens": 3, "completion_tokens": 2, "cached_prompt_tokens": 0},
            timings={"queue_ms": 1, "ttft_ms": 2, "total_ms": 3},
            end=end if end is not None else {"turn_id": turn_id, "finish_reason": reason, "text": text},
            now_ms=_now(),
        )

    async def all_keys(self) -> list[str]:
        return sorted([k async for k in self.redis.scan_iter(match=glob_escape(self.keys.prefix) + "*")])


@pytest.fixture(params=["single", "cluster"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    """The store on the single Redis, and on a Redis Cluster (tests/conftest.py ``redis_cluster``)."""
    url = request.getfixturevalue("redis_cluster").url if request.param == "cluster" else REDIS_URL
    prefix = f"rapport-test:{uuid4().hex}:"
    redis = async_client(url, decode_responses=True)
    blocking = async_client(url, decode_responses=True, socket_timeout=30)
    await discover(redis, blocking)  # as a server does at start (server.runtime)
    e = Env(redis, blocking, KeySpace(prefix))
    e.url = url
    try:
        yield e
    finally:
        keys = [k async for k in redis.scan_iter(match=glob_escape(prefix) + "*", count=1000)]
        if keys:
            await redis.unlink(*keys)
        await redis.aclose()
        await blocking.aclose()


# ---------------------------------------------------------------------------
# begin_turn
# ---------------------------------------------------------------------------


async def test_ping(env: Env) -> None:
    await env.store.ping()


async def test_begin_accepted_writes_everything(env: Env) -> None:
    now = _now()
    out = await env.store.begin_turn(
        user_id="alice", conversation_id="c1", client_turn_id="ct1", text="hello",
        turn_id="t1", owner="proc-A", now_ms=now,
    )
    assert out.kind == "accepted" and out.running_turn_id is None
    assert out.turn == TurnRecord(
        turn_id="t1", user_id="alice", conversation_id="c1", client_turn_id="ct1", status="running",
        finish_reason=None, last_seq=0, text="", usage={}, timings={}, created_at_ms=now,
        ended_at_ms=None, owner="proc-A", exchange_id="t1",
    )
    assert await env.store.get_turn(user_id="alice", turn_id="t1") == out.turn
    k = env.keys
    assert await env.redis.get(k.idempotency("alice", "ct1")) == "t1"
    assert 86000 < await env.redis.ttl(k.idempotency("alice", "ct1")) <= 86400
    assert 86000 < await env.redis.ttl(k.turn("alice", "t1")) <= 86400
    assert await env.redis.hgetall(k.active("alice")) == {"c1": "t1"}
    assert await env.store.list_conversations(user_id="alice") == [("c1", now)]
    hist = await env.store.history(user_id="alice", conversation_id="c1")
    assert [(m.role, m.text, m.turn_id, m.status, m.created_at) for m in hist] == [
        ("user", "hello", "t1", "complete", now)
    ]
    assert [t.turn_id for t in await env.store.active_turns(user_id="alice")] == ["t1"]
    for key in await env.all_keys():
        assert key.startswith(k.prefix + k.user_tag("alice") + ":")


async def test_begin_replayed_writes_nothing(env: Env) -> None:
    first = await env.begin(client="same", text="one")
    assert first.kind == "accepted"
    before_keys = await env.all_keys()
    again = await env.begin(client="same", text="different text", conv="other-conv")
    assert again.kind == "replayed"
    assert again.turn == first.turn
    assert await env.all_keys() == before_keys
    hist = await env.store.history(user_id="alice", conversation_id="default")
    assert [m.text for m in hist] == ["one"]
    # Still replayed after the turn ended, with the final record.
    assert first.turn is not None
    ended = await env.finish("alice", first.turn.turn_id, text="reply")
    again = await env.begin(client="same")
    assert again.kind == "replayed" and again.turn == ended and again.turn.text == "reply"


async def test_begin_same_turn_id_retry_counts_as_accepted(env: Env) -> None:
    a = await env.begin(client="c", turn_id="t-retry")
    b = await env.begin(client="c", turn_id="t-retry")
    assert a.kind == b.kind == "accepted" and b.turn == a.turn
    assert len(await env.store.history(user_id="alice", conversation_id="default")) == 1


async def test_begin_in_progress_writes_nothing(env: Env) -> None:
    first = await env.begin(client="a")
    assert first.turn is not None
    before_keys = await env.all_keys()
    second = await env.begin(client="b")
    assert second == BeginOutcome("in_progress", None, first.turn.turn_id)
    assert await env.all_keys() == before_keys
    assert await env.redis.exists(env.keys.idempotency("alice", "b")) == 0
    # Another conversation is free.
    assert (await env.begin(client="b", conv="c2")).kind == "accepted"


async def test_begin_overrides_stale_active_entry(env: Env) -> None:
    first = await env.begin(client="a")
    assert first.turn is not None
    await env.redis.delete(env.keys.turn("alice", first.turn.turn_id))  # the record expired
    assert await env.store.active_turns(user_id="alice") == []
    second = await env.begin(client="b")
    assert second.kind == "accepted"
    assert second.turn is not None
    assert await env.redis.hget(env.keys.active("alice"), "default") == second.turn.turn_id


async def test_concurrent_begins_same_client_turn_id(env: Env) -> None:
    # Two clients stand for two server processes sharing Redis.
    other = async_client(env.url, decode_responses=True)
    await discover(other)  # as a server does at start (server.runtime)
    try:
        stores = [env.store, ConversationStore(other, env.keys)]
        outs = await asyncio.gather(*(
            stores[i % 2].begin_turn(
                user_id="alice", conversation_id="default", client_turn_id="dup", text="once",
                turn_id=f"t{i}", owner=f"p{i % 2}", now_ms=_now(),
            )
            for i in range(20)
        ))
    finally:
        await other.aclose()
    kinds = sorted(o.kind for o in outs)
    assert kinds.count("accepted") == 1 and kinds.count("replayed") == 19
    winner = next(o for o in outs if o.kind == "accepted")
    assert winner.turn is not None
    assert {o.turn.turn_id for o in outs if o.turn} == {winner.turn.turn_id}
    hist = await env.store.history(user_id="alice", conversation_id="default")
    assert len(hist) == 1 and hist[0].turn_id == winner.turn.turn_id
    turn_keys = [k async for k in env.redis.scan_iter(match=glob_escape(env.keys.prefix) + "*:turn:*")]
    assert len(turn_keys) == 1


async def test_concurrent_begins_one_conversation(env: Env) -> None:
    other = async_client(env.url, decode_responses=True)
    await discover(other)  # as a server does at start (server.runtime)
    try:
        stores = [env.store, ConversationStore(other, env.keys)]
        outs = await asyncio.gather(*(
            stores[i % 2].begin_turn(
                user_id="alice", conversation_id="default", client_turn_id=f"c{i}", text=f"m{i}",
                turn_id=f"t{i}", owner="p", now_ms=_now(),
            )
            for i in range(20)
        ))
    finally:
        await other.aclose()
    accepted = [o for o in outs if o.kind == "accepted"]
    busy = [o for o in outs if o.kind == "in_progress"]
    assert len(accepted) == 1 and len(busy) == 19
    assert accepted[0].turn is not None
    assert {o.running_turn_id for o in busy} == {accepted[0].turn.turn_id}
    assert len(await env.store.history(user_id="alice", conversation_id="default")) == 1
    idem_keys = [k async for k in env.redis.scan_iter(match=glob_escape(env.keys.prefix) + "*:idem:*")]
    assert len(idem_keys) == 1


# ---------------------------------------------------------------------------
# delta log
# ---------------------------------------------------------------------------


async def _running(env: Env, user: str = "alice", conv: str = "default") -> str:
    out = await env.begin(user=user, conv=conv)
    assert out.kind == "accepted" and out.turn is not None
    return out.turn.turn_id


async def test_append_and_read_log(env: Env) -> None:
    tid = await _running(env)
    s = env.store
    assert await s.log_exists(user_id="alice", turn_id=tid) is False
    assert await s.read_log(user_id="alice", turn_id=tid, after_seq=0) == []
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(1, "a"), (2, "b"), (3, "c")])
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(4, "d")])
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[])
    assert await s.log_exists(user_id="alice", turn_id=tid) is True
    rec = await s.get_turn(user_id="alice", turn_id=tid)
    assert rec is not None and rec.last_seq == 4
    assert await s.read_log(user_id="alice", turn_id=tid, after_seq=0) == [
        LogDelta(1, "a"), LogDelta(2, "b"), LogDelta(3, "c"), LogDelta(4, "d")
    ]
    assert await s.read_log(user_id="alice", turn_id=tid, after_seq=2) == [LogDelta(3, "c"), LogDelta(4, "d")]
    assert await s.read_log(user_id="alice", turn_id=tid, after_seq=4) == []
    assert await s.read_log(user_id="alice", turn_id=tid, after_seq=0, count=2) == [LogDelta(1, "a"), LogDelta(2, "b")]
    log_ttl = await env.redis.ttl(env.keys.delta_log("alice", tid))
    assert 86000 < log_ttl <= 86400


async def test_append_retry_is_idempotent_and_gaps_are_refused(env: Env) -> None:
    tid = await _running(env)
    s = env.store
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(1, "a"), (2, "b")])
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(1, "a"), (2, "b")])  # retried
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(2, "b"), (3, "c")])  # overlapping
    assert await s.read_log(user_id="alice", turn_id=tid, after_seq=0) == [
        LogDelta(1, "a"), LogDelta(2, "b"), LogDelta(3, "c")
    ]
    with pytest.raises(RapportError):
        await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(5, "e")])
    with pytest.raises(ValueError):
        await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(4, "d"), (6, "f")])
    rec = await s.get_turn(user_id="alice", turn_id=tid)
    assert rec is not None and rec.last_seq == 3
    with pytest.raises(NotFound):
        await s.append_deltas(user_id="alice", turn_id="no-such-turn", deltas=[(1, "x")])
    assert await s.log_exists(user_id="alice", turn_id="no-such-turn") is False


async def test_follow_log_wakes_on_append(env: Env) -> None:
    tid = await _running(env)
    s = env.store
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(1, "a"), (2, "b")])
    # Entries already there are returned at once.
    assert await s.follow_log(user_id="alice", turn_id=tid, after_seq=1, block_ms=5000) == [LogDelta(2, "b")]
    waiter = asyncio.create_task(s.follow_log(user_id="alice", turn_id=tid, after_seq=2, block_ms=10000))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    started = time.monotonic()
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(3, "c"), (4, "d")])
    got = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - started < 2
    assert got == [LogDelta(3, "c"), LogDelta(4, "d")]
    # The end entry wakes a follower too.
    waiter = asyncio.create_task(s.follow_log(user_id="alice", turn_id=tid, after_seq=4, block_ms=10000))
    await asyncio.sleep(0.2)
    await env.finish("alice", tid, text="abcd", end={"seq": 4, "text": "abcd"})
    assert await asyncio.wait_for(waiter, 5) == [LogEnd({"seq": 4, "text": "abcd"})]


async def test_follow_log_times_out_empty(env: Env) -> None:
    tid = await _running(env)
    await env.store.append_deltas(user_id="alice", turn_id=tid, deltas=[(1, "a")])
    started = time.monotonic()
    assert await env.store.follow_log(user_id="alice", turn_id=tid, after_seq=1, block_ms=150) == []
    assert 0.1 <= time.monotonic() - started < 2
    # A log that does not exist yet times out the same way.
    assert await env.store.follow_log(user_id="alice", turn_id="nope", after_seq=0, block_ms=100) == []


# ---------------------------------------------------------------------------
# finish_turn
# ---------------------------------------------------------------------------


async def test_finish_is_idempotent_and_frees_the_conversation(env: Env) -> None:
    tid = await _running(env)
    s = env.store
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(1, "he"), (2, "llo")])
    end = {"type": "turn.end", "turn_id": tid, "seq": 2, "finish_reason": "stop", "text": "hello"}
    first = await env.finish("alice", tid, text="hello", end=end)
    assert first.status == "ended" and first.finish_reason == "stop" and first.text == "hello"
    assert first.last_seq == 2 and first.ended_at_ms is not None
    assert first.usage == {"prompt_tokens": 3, "completion_tokens": 2, "cached_prompt_tokens": 0}
    assert first.timings == {"queue_ms": 1, "ttft_ms": 2, "total_ms": 3}
    second = await env.finish("alice", tid, text="other", reason="cancelled", end={"x": 1})
    assert second == first
    assert await s.get_turn(user_id="alice", turn_id=tid) == first
    log = await s.read_log(user_id="alice", turn_id=tid, after_seq=0)
    assert log == [LogDelta(1, "he"), LogDelta(2, "llo"), LogEnd(end)]
    assert await s.read_log(user_id="alice", turn_id=tid, after_seq=2) == [LogEnd(end)]
    assert await env.redis.xlen(env.keys.delta_log("alice", tid)) == 3
    assert 0 < await env.redis.ttl(env.keys.delta_log("alice", tid)) <= 600
    assert 86000 < await env.redis.ttl(env.keys.turn("alice", tid)) <= 86400
    hist = await s.history(user_id="alice", conversation_id="default")
    assert [(m.role, m.status) for m in hist] == [("user", "complete"), ("assistant", "stop")]
    assert hist[1].text == "hello" and hist[1].turn_id == tid
    assert await env.redis.hgetall(env.keys.active("alice")) == {}
    assert await s.active_turns(user_id="alice") == []
    # Deltas arriving after the end are ignored.
    await s.append_deltas(user_id="alice", turn_id=tid, deltas=[(3, "late")])
    assert await s.read_log(user_id="alice", turn_id=tid, after_seq=2) == [LogEnd(end)]
    # The conversation takes a new turn.
    assert (await env.begin(client="next")).kind == "accepted"


async def test_finish_without_deltas(env: Env) -> None:
    tid = await _running(env)
    rec = await env.finish("alice", tid, text="", reason="cancelled", end={"seq": 0})
    assert rec.last_seq == 0 and rec.text == "" and rec.finish_reason == "cancelled"
    assert await env.store.read_log(user_id="alice", turn_id=tid, after_seq=0) == [LogEnd({"seq": 0})]
    hist = await env.store.history(user_id="alice", conversation_id="default")
    assert hist[-1].role == "assistant" and hist[-1].text == "" and hist[-1].status == "cancelled"


async def test_concurrent_finishes_end_once(env: Env) -> None:
    tid = await _running(env)
    await env.store.append_deltas(user_id="alice", turn_id=tid, deltas=[(1, "x")])
    recs = await asyncio.gather(*(env.finish("alice", tid, text="x", reason=r) for r in ["stop", "cancelled"] * 5))
    assert len({(r.finish_reason, r.ended_at_ms) for r in recs}) == 1
    hist = await env.store.history(user_id="alice", conversation_id="default")
    assert [m.role for m in hist] == ["user", "assistant"]
    assert await env.redis.xlen(env.keys.delta_log("alice", tid)) == 2


async def test_finish_keeps_someone_elses_active_entry(env: Env) -> None:
    tid = await _running(env)
    await env.redis.hset(env.keys.active("alice"), "default", "another-turn")
    await env.finish("alice", tid, text="r")
    assert await env.redis.hget(env.keys.active("alice"), "default") == "another-turn"


async def test_finish_missing_turn(env: Env) -> None:
    with pytest.raises(NotFound):
        await env.finish("alice", "gone", text="x")
    assert await env.store.get_turn(user_id="alice", turn_id="gone") is None
    assert await env.all_keys() == []


# ---------------------------------------------------------------------------
# history, conversations
# ---------------------------------------------------------------------------


async def _complete_turn(env: Env, n: int, conv: str = "default", user: str = "alice") -> None:
    out = await env.begin(user=user, conv=conv, client=f"{conv}-{n}", text=f"q{n}")
    assert out.turn is not None
    await env.finish(user, out.turn.turn_id, text=f"a{n}")


async def test_history_order_and_paging(env: Env) -> None:
    for n in range(3):
        await _complete_turn(env, n)
    s = env.store
    hist = await s.history(user_id="alice", conversation_id="default")
    assert [m.text for m in hist] == ["q0", "a0", "q1", "a1", "q2", "a2"]
    assert [m.role for m in hist] == ["user", "assistant"] * 3
    assert all(isinstance(m, HistoryMessage) for m in hist)
    ids = [m.id for m in hist]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert [m.text for m in await s.history(user_id="alice", conversation_id="default", limit=2)] == ["q2", "a2"]
    page = await s.history(user_id="alice", conversation_id="default", limit=2, before=ids[4])
    assert [m.text for m in page] == ["q1", "a1"]
    page = await s.history(user_id="alice", conversation_id="default", limit=10, before=ids[2])
    assert [m.text for m in page] == ["q0", "a0"]
    assert await s.history(user_id="alice", conversation_id="default", before=ids[0]) == []
    assert await s.history(user_id="alice", conversation_id="default", before="0-0") == []
    assert await s.history(user_id="alice", conversation_id="nope") == []
    for bad in ["abc", "1-", "-1", "1-2-3", "(1-0", "+", "-", "", "99999999999999999999999-0", " 1-0", "1-0\n"]:
        with pytest.raises(BadRequest):
            await s.history(user_id="alice", conversation_id="default", before=bad)
    with pytest.raises(BadRequest):
        await s.history(user_id="alice", conversation_id="default", limit=0)


async def test_history_with_sends_the_callers_commands_in_the_same_round_trip(env: Env) -> None:
    for n in range(2):
        await _complete_turn(env, n)
    marker = env.keys.user_key("alice", "marker")
    queued: list[object] = []

    def also(pipe: object) -> None:
        queued.append(pipe)
        pipe.set(marker, "1")  # type: ignore[attr-defined]

    hist, meta, extra = await env.store.history_with(user_id="alice", conversation_id="default", limit=3,
                                                     also=also)
    assert [m.text for m in hist] == ["a0", "q1", "a1"] and meta == {"turns": "2"} and extra == [True]
    assert hist == await env.store.history(user_id="alice", conversation_id="default", limit=3)
    assert len(queued) == 1 and await env.redis.get(marker) == "1"
    with pytest.raises(BadRequest):
        await env.store.history_with(user_id="alice", conversation_id="default", limit=0, also=also)


async def test_history_is_bounded(env: Env) -> None:
    store = ConversationStore(env.redis, env.keys, history_max_messages=10)
    for n in range(150):
        out = await store.begin_turn(
            user_id="alice", conversation_id="c", client_turn_id=f"k{n}", text=f"q{n}",
            turn_id=f"t{n}", owner="p", now_ms=_now(),
        )
        assert out.turn is not None
        await store.finish_turn(
            user_id="alice", turn_id=f"t{n}", finish_reason="stop", text=f"a{n}", usage={}, timings={},
            end={}, now_ms=_now(),
        )
    length = await env.redis.xlen(env.keys.history("alice", "c"))
    assert 10 <= length < 300  # approximate trimming (~) keeps whole macro nodes
    hist = await store.history(user_id="alice", conversation_id="c", limit=2)
    assert [m.text for m in hist] == ["q149", "a149"]


async def test_clear_and_delete_refuse_while_running(env: Env) -> None:
    s = env.store
    await _complete_turn(env, 0)
    tid = await _running(env)
    with pytest.raises(TurnInProgress) as ei:
        await s.clear_history(user_id="alice", conversation_id="default")
    assert ei.value.fields.get("turn_id") == tid
    with pytest.raises(TurnInProgress):
        await s.delete_conversation(user_id="alice", conversation_id="default")
    assert len(await s.history(user_id="alice", conversation_id="default")) == 3
    await env.finish("alice", tid, text="r")
    await s.clear_history(user_id="alice", conversation_id="default")
    assert await s.history(user_id="alice", conversation_id="default") == []
    assert await s.list_conversations(user_id="alice") == []
    await s.clear_history(user_id="alice", conversation_id="default")  # nothing there: fine


async def test_clear_ignores_stale_active_entry(env: Env) -> None:
    tid = await _running(env)
    await env.redis.delete(env.keys.turn("alice", tid))
    await env.store.clear_history(user_id="alice", conversation_id="default")
    assert await env.redis.hgetall(env.keys.active("alice")) == {}
    assert await env.store.history(user_id="alice", conversation_id="default") == []


async def test_delete_conversation_and_list(env: Env) -> None:
    s = env.store
    await _complete_turn(env, 0, conv="old")
    await asyncio.sleep(0.005)
    await _complete_turn(env, 0, conv="new")
    convs = await s.list_conversations(user_id="alice")
    assert [c for c, _ in convs] == ["new", "old"]
    assert all(isinstance(ms, int) and ms > 0 for _, ms in convs)
    assert await s.delete_conversation(user_id="alice", conversation_id="old") is True
    assert await s.delete_conversation(user_id="alice", conversation_id="old") is False
    assert await s.delete_conversation(user_id="alice", conversation_id="never") is False
    assert [c for c, _ in await s.list_conversations(user_id="alice")] == ["new"]
    assert len(await s.history(user_id="alice", conversation_id="new")) == 2


async def test_active_turns(env: Env) -> None:
    t1 = await _running(env, conv="a")
    t2 = await _running(env, conv="b")
    t3 = await _running(env, conv="c")
    await env.finish("alice", t2, text="")
    await env.redis.delete(env.keys.turn("alice", t3))  # stale entry
    assert [t.turn_id for t in await env.store.active_turns(user_id="alice")] == [t1]
    assert await env.store.active_turns(user_id="bob") == []


# ---------------------------------------------------------------------------
# delete_user
# ---------------------------------------------------------------------------


async def test_delete_user_removes_only_that_user(env: Env) -> None:
    users = ["bob", "bob2", "bo", "b*", "b?b", "{bob}", "bob}", "bob:x", "b[o]b", "b\\", "%62ob", "用户"]
    for u in users:
        await _complete_turn(env, 0, user=u)
        tid = await _running(env, user=u, conv="c2")
        await env.store.append_deltas(user_id=u, turn_id=tid, deltas=[(1, "x")])
        await env.redis.set(env.keys.user_key(u, "ratelimit"), "1")
    before = await env.all_keys()
    per_user = {u: [k for k in before if k.startswith(env.keys.prefix + env.keys.user_tag(u) + ":")] for u in users}
    assert sum(len(v) for v in per_user.values()) == len(before)
    for victim in ["b*", "bob", "{bob}"]:
        n = await env.store.delete_user(user_id=victim)
        assert n == len(per_user[victim]) > 0
        after = set(await env.all_keys())
        assert not after & set(per_user[victim])
        for u in users:
            if u not in ("b*", "bob", "{bob}"):
                assert set(per_user[u]) <= after, u
    assert await env.store.delete_user(user_id="bob") == 0
    assert await env.store.history(user_id="bob2", conversation_id="default") != []
    assert await env.store.history(user_id="bob", conversation_id="default") == []


# ---------------------------------------------------------------------------
# Unicode, ids with odd characters
# ---------------------------------------------------------------------------


async def test_unicode_round_trip(env: Env) -> None:
    user, conv, client = "ユーザー{1}*", "会话：一", "客户端-😀"
    out = await env.store.begin_turn(
        user_id=user, conversation_id=conv, client_turn_id=client, text=UNICODE, turn_id="t-ü",
        owner="节点-1", now_ms=_now(),
    )
    assert out.turn is not None and out.turn.owner == "节点-1"
    deltas = [(1, "你"), (2, ""), (3, "好！😀"), (4, "ｆｕｌｌ，")]
    await env.store.append_deltas(user_id=user, turn_id="t-ü", deltas=deltas)
    full = "".join(t for _, t in deltas)
    end = {"text": full, "note": UNICODE}
    rec = await env.finish(user, "t-ü", text=full, end=end)
    assert rec.text == full and rec.conversation_id == conv and rec.client_turn_id == client
    log = await env.store.read_log(user_id=user, turn_id="t-ü", after_seq=0)
    assert log == [LogDelta(s, t) for s, t in deltas] + [LogEnd(end)]
    hist = await env.store.history(user_id=user, conversation_id=conv)
    assert [m.text for m in hist] == [UNICODE, full]
    assert hist[0].text.encode() == UNICODE.encode()
    assert [c for c, _ in await env.store.list_conversations(user_id=user)] == [conv]
    replay = await env.store.begin_turn(
        user_id=user, conversation_id=conv, client_turn_id=client, text="x", turn_id="t2",
        owner="n", now_ms=_now(),
    )
    assert replay.kind == "replayed" and replay.turn == rec


# ---------------------------------------------------------------------------
# Redis unreachable
# ---------------------------------------------------------------------------


async def test_unavailable_when_redis_is_unreachable() -> None:
    dead = aioredis.Redis(
        host="127.0.0.1", port=1, decode_responses=True, socket_timeout=0.2, socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),  # fail fast; the default retries with backoff for seconds
    )
    store = ConversationStore(dead, KeySpace(f"rapport-test:{uuid4().hex}:"))
    calls = [
        store.ping(),
        store.begin_turn(user_id="u", conversation_id="c", client_turn_id="k", text="t", turn_id="t",
                         owner="o", now_ms=1),
        store.append_deltas(user_id="u", turn_id="t", deltas=[(1, "a")]),
        store.finish_turn(user_id="u", turn_id="t", finish_reason="stop", text="", usage={}, timings={},
                          end={}, now_ms=1),
        store.get_turn(user_id="u", turn_id="t"),
        store.read_log(user_id="u", turn_id="t", after_seq=0),
        store.follow_log(user_id="u", turn_id="t", after_seq=0, block_ms=10),
        store.log_exists(user_id="u", turn_id="t"),
        store.history(user_id="u", conversation_id="c"),
        store.clear_history(user_id="u", conversation_id="c"),
        store.delete_conversation(user_id="u", conversation_id="c"),
        store.active_turns(user_id="u"),
        store.list_conversations(user_id="u"),
        store.delete_user(user_id="u"),
    ]
    try:
        for call in calls:
            with pytest.raises(Unavailable) as ei:
                await asyncio.wait_for(call, 10)
            assert ei.value.code == "unavailable"
    finally:
        await dead.aclose()


async def test_unavailable_when_redis_does_not_answer() -> None:
    # A listener that accepts connections and never replies: the read times out.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hung = aioredis.Redis(
        host="127.0.0.1", port=port, decode_responses=True, socket_timeout=0.2, socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(ConversationStore(hung, KeySpace("x:")).ping(), 10)
    finally:
        await hung.aclose()
        server.close()
        await server.wait_closed()


async def test_append_deltas_many_writes_several_turns_in_one_round_trip(env: Env) -> None:
    alice = await _running(env)
    bob = (await env.begin(user="bob")).turn.turn_id
    s = env.store
    failed = await s.append_deltas_many([
        ("alice", alice, [(1, "a1"), (2, "a2")]),
        ("bob", bob, [(1, "b1")]),
        ("carol", "no-such-turn", [(1, "x")]),
    ])
    assert failed == {"no-such-turn": "missing"}
    assert await s.read_log(user_id="alice", turn_id=alice, after_seq=0) == [LogDelta(1, "a1"), LogDelta(2, "a2")]
    assert await s.read_log(user_id="bob", turn_id=bob, after_seq=0) == [LogDelta(1, "b1")]
    # A gap is reported for that turn only; the others still land.
    failed = await s.append_deltas_many([("alice", alice, [(5, "gap")]), ("bob", bob, [(2, "b2")])])
    assert failed == {alice: "gap after 2"}
    assert (await s.get_turn(user_id="bob", turn_id=bob)).last_seq == 2


async def test_unavailable_names_no_address_and_says_when_to_retry() -> None:
    # The exception text of a refused connection names the host and port; that
    # is for the server's log, never for the client's error frame or 503 body.
    dead = aioredis.Redis(
        host="127.0.0.1", port=1, decode_responses=True, socket_timeout=0.2, socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    store = ConversationStore(dead, KeySpace(f"rapport-test:{uuid4().hex}:"))
    try:
        for call in (store.ping, lambda: store.history(user_id="u", conversation_id="c"),
                     lambda: store.append_deltas_many([("u", "t", [(1, "a")])])):
            with pytest.raises(Unavailable) as ei:
                await asyncio.wait_for(call(), 10)
            message = ei.value.message
            assert "127.0.0.1" not in message and ":1" not in message and "Error" not in message, message
            assert isinstance(ei.value.fields.get("retry_after_ms"), int)
            assert ei.value.fields["retry_after_ms"] > 0
    finally:
        await dead.aclose()


# ---------------------------------------------------------------------------
# characters and swipes (docs/protocol.md additions 18 and 19)
# ---------------------------------------------------------------------------


async def _regenerate(env: Env, exchange: str, *, conv: str = "default", client: str | None = None) -> BeginOutcome:
    return await env.store.begin_turn(
        user_id="alice", conversation_id=conv, client_turn_id=client or uuid4().hex, text="",
        turn_id="t_" + uuid4().hex, owner="proc-1", now_ms=_now(), mode="regenerate", exchange_id=exchange)


async def test_binding_stores_the_greeting_once_and_never_changes(env: Env) -> None:
    s = env.store
    out = await s.begin_turn(user_id="alice", conversation_id="c", client_turn_id="b1", text="hi", turn_id="t1",
                             owner="p", now_ms=_now(), character_id="mira", greeting="Evening.")
    assert out.kind == "accepted" and out.alternative == 0
    await env.finish("alice", "t1", text="hello")
    hist, meta = await s.history_and_meta(user_id="alice", conversation_id="c")
    assert [(m.role, m.text, m.status) for m in hist] == [
        ("assistant", "Evening.", "greeting"), ("user", "hi", "complete"), ("assistant", "hello", "stop")]
    assert meta == {"character_id": "mira", "turns": "2"}  # the greeting and one user message
    # The same character again writes no second greeting; another is refused, nothing written.
    out = await s.begin_turn(user_id="alice", conversation_id="c", client_turn_id="b2", text="more", turn_id="t2",
                             owner="p", now_ms=_now(), character_id="mira", greeting="Evening.")
    await env.finish("alice", "t2", text="sure")
    with pytest.raises(BadRequest, match="bound to character 'mira'"):
        await s.begin_turn(user_id="alice", conversation_id="c", client_turn_id="b3", text="x", turn_id="t3",
                           owner="p", now_ms=_now(), character_id="other")
    assert len(await s.history(user_id="alice", conversation_id="c")) == 5
    assert await s.get_turn(user_id="alice", turn_id="t3") is None
    # A conversation with plain history cannot be bound.
    await _complete_turn(env, 0, conv="plain")
    with pytest.raises(BadRequest, match="already has history"):
        await s.bind_conversation(user_id="alice", conversation_id="plain", character_id="mira", greeting="g",
                                  now_ms=_now())
    assert await s.bind_conversation(user_id="alice", conversation_id="new", character_id="mira", greeting="g",
                                     now_ms=_now()) is True
    assert await s.bind_conversation(user_id="alice", conversation_id="new", character_id="mira", greeting="g",
                                     now_ms=_now()) is False
    assert [m.text for m in await s.history(user_id="alice", conversation_id="new")] == ["g"]
    # Clearing the conversation forgets its binding too.
    await s.clear_history(user_id="alice", conversation_id="new")
    assert await s.conversation_meta(user_id="alice", conversation_id="new") == {}


async def test_regenerate_adds_alternatives_to_the_newest_exchange_only(env: Env) -> None:
    await _complete_turn(env, 0)
    await _complete_turn(env, 1)
    hist = await env.store.history(user_id="alice", conversation_id="default")
    old, newest = hist[0].turn_id, hist[2].turn_id
    with pytest.raises(BadRequest, match="newest exchange"):
        await _regenerate(env, old)
    out = await _regenerate(env, newest, client="regen-1")
    assert out.kind == "accepted" and out.alternative == 1
    assert out.turn is not None and out.turn.exchange_id == newest
    replay = await _regenerate(env, newest, client="regen-1")
    assert replay.kind == "replayed" and replay.turn is not None and replay.turn.turn_id == out.turn.turn_id
    # One running turn per conversation holds for regenerations too.
    assert (await _regenerate(env, newest)).kind == "in_progress"
    await env.finish("alice", out.turn.turn_id, text="a1 again")
    hist = await env.store.history(user_id="alice", conversation_id="default")
    assert [(m.role, m.text, m.exchange_id) for m in hist[2:]] == [
        ("user", "q1", newest), ("assistant", "a1", newest), ("assistant", "a1 again", newest)]
    # Selection by the reply's turn id, on the exchange it belongs to.
    assert await env.store.select_alternative(user_id="alice", conversation_id="default",
                                              turn_id=newest) == newest
    # Regenerations add no turn: the conversation still counts two.
    assert (await env.store.conversation_meta(user_id="alice", conversation_id="default")) == {
        f"sel:{newest}": newest, "turns": "2"}
    with pytest.raises(NotFound):
        await env.store.select_alternative(user_id="alice", conversation_id="default", turn_id="t_missing")


async def test_an_exchange_keeps_a_bounded_number_of_alternatives(env: Env) -> None:
    await _complete_turn(env, 0)
    exchange = (await env.store.history(user_id="alice", conversation_id="default"))[0].turn_id
    for _ in range(MAX_ALTERNATIVES - 1):
        out = await _regenerate(env, exchange)
        assert out.turn is not None
        await env.finish("alice", out.turn.turn_id, text="again")
    with pytest.raises(BadRequest, match=f"at most {MAX_ALTERNATIVES}"):
        await _regenerate(env, exchange)


async def test_edit_replaces_the_newest_message_its_replies_and_selection(env: Env) -> None:
    await _complete_turn(env, 0)
    await _complete_turn(env, 1)
    newest = (await env.store.history(user_id="alice", conversation_id="default"))[2].turn_id
    regen = await _regenerate(env, newest)
    assert regen.turn is not None
    await env.finish("alice", regen.turn.turn_id, text="other")
    await env.store.select_alternative(user_id="alice", conversation_id="default", turn_id=newest)
    out = await env.store.begin_turn(user_id="alice", conversation_id="default", client_turn_id="edit-1",
                                     text="q1 edited", turn_id="t_edit", owner="p", now_ms=_now(), mode="edit",
                                     exchange_id=newest)
    assert out.kind == "accepted" and out.turn is not None and out.turn.exchange_id == "t_edit"
    hist = await env.store.history(user_id="alice", conversation_id="default")
    assert [m.text for m in hist] == ["q0", "a0", "q1 edited"]
    # The selection went with the replaced exchange; the edit replaced a turn, it added none.
    assert await env.store.conversation_meta(user_id="alice", conversation_id="default") == {"turns": "2"}
