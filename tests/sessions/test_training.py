"""TrainingLog against the real Redis at 127.0.0.1:6379 (no mocks).

Each test runs under its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from protocol.errors import BadRequest, Unavailable
from sessions.keys import KeySpace
from sessions.messages import ChatMessage
from sessions.store import ConversationStore
from sessions.training import (
    MAX_RATINGS_PER_EXCHANGE,
    MAX_REASON_CHARS,
    Alternative,
    ExchangeSnapshot,
    Rating,
    TrainingLog,
    TrainingRecord,
    record_from_hash,
    snapshot_from_json,
    snapshot_to_json,
)
from testkit.redis_prefix import clean_prefix

REDIS_URL = "redis://127.0.0.1:6379/0"
UNICODE = "你好「测试」😀👍🏽 \u200d\n\t\"quotes\" \\ \0 émoji"


def snapshot(user: str = "alice", exchange: str = "x1", *, alternatives: int = 2, selected: str | None = None,
             character: str | None = "luna", conversation: str = "c1") -> ExchangeSnapshot:
    return ExchangeSnapshot(
        user_id=user, conversation_id=conversation, exchange_id=exchange, character_id=character,
        prompt=(ChatMessage("system", "You are Luna."), ChatMessage("user", f"hello from {user}")),
        alternatives=tuple(Alternative(turn_id=f"{exchange}-t{i}", text=f"reply {i}", finish_reason="stop")
                           for i in range(alternatives)),
        selected=selected,
    )


class Env:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self.log = TrainingLog(redis, keys)

    async def records(self, **filters: object) -> list[TrainingRecord]:
        return [r async for r in self.log.iter_records(**filters)]  # type: ignore[arg-type]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    prefix = f"rapport-test:{uuid4().hex}:"
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield Env(redis, KeySpace(prefix))
    finally:
        await redis.aclose()
        clean_prefix(prefix, REDIS_URL)


def test_snapshot_json_round_trips_every_character() -> None:
    snap = ExchangeSnapshot(
        user_id=UNICODE, conversation_id=UNICODE, exchange_id="x", character_id=None,
        prompt=(ChatMessage("user", UNICODE),), alternatives=(Alternative("t", UNICODE, "length"),), selected="t")
    assert snapshot_from_json(snapshot_to_json(snap)) == snap


@pytest.mark.parametrize("raw", [
    "[]", "{}", '{"prompt": [], "alternatives": {}}',
    '{"user_id": "u", "conversation_id": "c", "exchange_id": "x", "prompt": [1], "alternatives": []}',
    '{"user_id": 5, "conversation_id": "c", "exchange_id": "x", "prompt": [], "alternatives": []}',
])
def test_a_malformed_snapshot_is_a_value_error(raw: str) -> None:
    with pytest.raises(ValueError):
        snapshot_from_json(raw)


def test_record_from_hash_reads_ratings_and_refuses_malformed_ones() -> None:
    fields = {"snapshot": snapshot_to_json(snapshot()), "created_at": "5", "updated_at": "9",
              "rating:x1-t0": '{"rating": -1, "reason": null, "at": 7}'}
    record = record_from_hash(fields)
    assert record is not None
    assert record.ratings == {"x1-t0": Rating(rating=-1, reason=None, at_ms=7)}
    assert (record.created_at_ms, record.updated_at_ms) == (5, 9)
    assert record_from_hash({}) is None
    for bad in ('{"rating": 0, "at": 1}', '{"rating": true, "at": 1}', '{"rating": 1, "at": "x"}', "[]"):
        with pytest.raises(ValueError):
            record_from_hash({**fields, "rating:x1-t0": bad})


async def test_a_rating_keeps_the_snapshot_and_indexes_it(env: Env) -> None:
    snap = snapshot()
    await env.log.record_rating(snap, "x1-t1", -1, "too long", 1_000)
    record = await env.log.get("alice", "x1")
    assert record is not None
    assert record.snapshot == snap
    assert record.ratings == {"x1-t1": Rating(rating=-1, reason="too long", at_ms=1_000)}
    assert (record.created_at_ms, record.updated_at_ms) == (1_000, 1_000)
    assert await env.redis.zrange(env.keys.training_index(), 0, -1, withscores=True) == [("alice\0x1", 1000.0)]
    # The hash lives under the user's tag, so erasing the user removes it.
    assert env.keys.training("alice", "x1").startswith(env.keys.prefix + env.keys.user_tag("alice"))


async def test_a_new_rating_replaces_the_old_and_a_newer_snapshot_replaces_the_old(env: Env) -> None:
    await env.log.record_rating(snapshot(), "x1-t0", -1, "meh", 1_000)
    grown = snapshot(alternatives=3)
    await env.log.record_rating(grown, "x1-t0", 1, None, 2_000)
    await env.log.record_rating(grown, "x1-t2", -1, UNICODE, 3_000)
    chosen = snapshot(alternatives=3, selected="x1-t0")
    await env.log.record_selection(chosen, 4_000)
    record = await env.log.get("alice", "x1")
    assert record is not None
    assert record.snapshot == chosen
    assert record.ratings == {"x1-t0": Rating(1, None, 2_000), "x1-t2": Rating(-1, UNICODE, 3_000)}
    assert (record.created_at_ms, record.updated_at_ms) == (1_000, 4_000)
    assert await env.redis.zscore(env.keys.training_index(), "alice\0x1") == 4_000


async def test_a_selection_alone_makes_a_record(env: Env) -> None:
    chosen = snapshot(selected="x1-t1")
    await env.log.record_selection(chosen, 500)
    assert await env.records() == [TrainingRecord(snapshot=chosen, ratings={}, created_at_ms=500, updated_at_ms=500)]


@pytest.mark.parametrize("rating, reason, turn_id, message", [
    (0, None, "x1-t0", "-1 or 1"),
    (2, None, "x1-t0", "-1 or 1"),
    (True, None, "x1-t0", "-1 or 1"),
    (1, "r" * (MAX_REASON_CHARS + 1), "x1-t0", "longer than"),
    (1, None, "someone-else", "not a reply"),
])
async def test_bad_ratings_are_refused_and_write_nothing(env: Env, rating: int, reason: str | None, turn_id: str,
                                                         message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        await env.log.record_rating(snapshot(), turn_id, rating, reason, 1_000)
    assert await env.log.get("alice", "x1") is None
    assert await env.redis.exists(env.keys.training_index()) == 0


async def test_a_reason_of_exactly_the_limit_is_kept(env: Env) -> None:
    reason = "é" * MAX_REASON_CHARS
    await env.log.record_rating(snapshot(), "x1-t0", 1, reason, 1)
    record = await env.log.get("alice", "x1")
    assert record is not None and record.ratings["x1-t0"].reason == reason


async def test_ratings_per_exchange_are_capped(env: Env) -> None:
    many = snapshot(alternatives=MAX_RATINGS_PER_EXCHANGE + 1)
    for i in range(MAX_RATINGS_PER_EXCHANGE):
        await env.log.record_rating(many, f"x1-t{i}", 1, None, i)
    with pytest.raises(BadRequest, match="already holds"):
        await env.log.record_rating(many, f"x1-t{MAX_RATINGS_PER_EXCHANGE}", 1, None, 999)
    # Re-rating an alternative already rated is still allowed at the cap.
    await env.log.record_rating(many, "x1-t0", -1, None, 1_000)
    record = await env.log.get("alice", "x1")
    assert record is not None
    assert len(record.ratings) == MAX_RATINGS_PER_EXCHANGE
    assert record.ratings["x1-t0"].rating == -1


async def test_iteration_is_in_update_order_and_filters_by_time_and_character(env: Env) -> None:
    await env.log.record_rating(snapshot("alice", "a1", character="luna"), "a1-t0", 1, None, 3_000)
    await env.log.record_rating(snapshot("bob", "b1", character="max"), "b1-t0", 1, None, 1_000)
    await env.log.record_selection(snapshot("carol", "c1", character=None, selected="c1-t1"), 2_000)
    await env.log.record_rating(snapshot("bob", "b2", character="luna"), "b2-t1", -1, None, 5_000)

    def ids(records: list[TrainingRecord]) -> list[str]:
        return [r.snapshot.exchange_id for r in records]

    assert ids(await env.records()) == ["b1", "c1", "a1", "b2"]
    assert ids(await env.records(since_ms=2_000)) == ["c1", "a1", "b2"]
    assert ids(await env.records(since_ms=2_001)) == ["a1", "b2"]
    assert ids(await env.records(character_id="luna")) == ["a1", "b2"]
    assert ids(await env.records(since_ms=4_000, character_id="luna")) == ["b2"]
    assert ids(await env.records(character_id="nobody")) == []
    # Updating a record moves it to the end.
    await env.log.record_rating(snapshot("bob", "b1", character="max"), "b1-t1", -1, None, 6_000)
    assert ids(await env.records()) == ["c1", "a1", "b2", "b1"]


async def test_iteration_pages_through_many_records_with_equal_times(env: Env,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sessions.training as training

    monkeypatch.setattr(training, "EXPORT_BATCH", 3)
    for i in range(8):
        await env.log.record_selection(snapshot("alice", f"x{i}", selected=f"x{i}-t0"), 1_000 + i // 5)
    got = [r.snapshot.exchange_id for r in await env.records()]
    assert sorted(got) == sorted(f"x{i}" for i in range(8)) and len(got) == 8


async def test_an_erased_users_index_members_dangle_and_are_skipped(env: Env) -> None:
    await env.log.record_rating(snapshot("alice", "a1"), "a1-t0", 1, None, 1_000)
    await env.log.record_rating(snapshot("bob", "b1"), "b1-t0", -1, None, 2_000)
    await env.log.record_selection(snapshot("alice", "a2", selected="a2-t1"), 3_000)
    # DELETE /v1/users/me: every key under the user's tag goes; the index has no tag.
    deleted = await ConversationStore(env.redis, env.keys).delete_user(user_id="alice")
    assert deleted == 2
    assert await env.redis.zcard(env.keys.training_index()) == 3
    assert [r.snapshot.user_id for r in await env.records()] == ["bob"]


async def test_malformed_hashes_and_members_are_skipped(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    await env.log.record_rating(snapshot("alice", "a1"), "a1-t0", 1, None, 1_000)
    await env.redis.hset(env.keys.training("bob", "b1"), mapping={"snapshot": "{not json"})
    await env.redis.zadd(env.keys.training_index(), {"bob\0b1": 2_000, "no-separator": 2_500})
    # A hash holding another exchange's snapshot (never written by TrainingLog) is not trusted.
    await env.redis.hset(env.keys.training("carol", "c1"), mapping={"snapshot": snapshot_to_json(snapshot("dave"))})
    await env.redis.zadd(env.keys.training_index(), {"carol\0c1": 3_000})
    assert [r.snapshot.exchange_id for r in await env.records()] == ["a1"]
    assert "malformed" in caplog.text


async def test_user_ids_with_separators_and_unicode_round_trip(env: Env) -> None:
    user = "we\0ird:{u:x}*" + UNICODE
    await env.log.record_rating(snapshot(user, "x1"), "x1-t0", 1, None, 1_000)
    records = await env.records()
    assert [r.snapshot.user_id for r in records] == [user]


async def test_redis_unreachable_is_unavailable() -> None:
    redis = aioredis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True, socket_connect_timeout=0.5)
    log = TrainingLog(redis, KeySpace("rapport-test:nowhere:"))
    try:
        with pytest.raises(Unavailable):
            await log.record_selection(snapshot(selected="x1-t0"), 1)
        with pytest.raises(Unavailable):
            [r async for r in log.iter_records()]
    finally:
        await redis.aclose()


def test_the_stored_rating_is_plain_json() -> None:
    """What an operator sees with HGETALL: readable JSON, not a pickle."""
    assert json.loads(snapshot_to_json(snapshot()))["alternatives"][0] == {
        "turn_id": "x1-t0", "text": "reply 0", "finish_reason": "stop"}
