"""The delta log writer (server/delta_log.py): batching, order, outages.

The batching and retry tests use a store that records calls; one test writes
through the real ConversationStore to the Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from protocol.errors import Unavailable
from server.delta_log import DeltaLogWriter
from sessions.keys import KeySpace, glob_escape
from sessions.store import ConversationStore, LogDelta

REDIS_URL = "redis://127.0.0.1:6379/0"

Batch = Sequence[tuple[str, str, Sequence[tuple[int, str]]]]


class RecordingStore:
    """Stands in for ConversationStore.append_deltas_many; can hold a write or fail some."""

    def __init__(self, *, failures: int = 0) -> None:
        self.calls: list[list[tuple[str, str, list[tuple[int, str]]]]] = []
        self.failures = failures  # this many calls raise Unavailable first (-1: all of them)
        self.gate: asyncio.Event | None = None  # when set up, each write waits for it

    async def append_deltas_many(self, batches: Batch) -> dict[str, str]:
        if self.failures != 0:
            self.failures -= 1
            raise Unavailable("redis is away")
        self.calls.append([(u, t, list(d)) for u, t, d in batches])
        if self.gate is not None:
            await self.gate.wait()
        return {}

    def written(self, turn_id: str) -> list[tuple[int, str]]:
        return [d for call in self.calls for _, t, deltas in call if t == turn_id for d in deltas]


async def test_one_write_per_cycle_for_all_turns_whatever_piled_up_meanwhile() -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    writer = DeltaLogWriter(store, retry_s=5.0)  # type: ignore[arg-type]
    writer.add("u", "t1", 1, "a")
    await asyncio.sleep(0)  # the first write goes out and is held in flight
    assert store.calls == [[("u", "t1", [(1, "a")])]]
    writer.add("u", "t1", 2, "b")
    writer.add("v", "t2", 1, "x")
    writer.add("u", "t1", 3, "c")
    store.gate.set()
    await writer.drain("u", "t1")
    await writer.drain("v", "t2")
    # Three adds while the first write was in flight: one more round trip, both turns in it.
    assert store.calls[1] == [("u", "t1", [(2, "b"), (3, "c")]), ("v", "t2", [(1, "x")])]
    assert len(store.calls) == 2
    await writer.close()


async def test_drain_waits_for_the_turns_deltas_only_while_they_are_pending_or_in_flight() -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    writer = DeltaLogWriter(store, retry_s=5.0)  # type: ignore[arg-type]
    await asyncio.wait_for(writer.drain("u", "nothing-yet"), 1.0)  # nothing pending: at once
    writer.add("u", "t1", 1, "a")
    drained = asyncio.create_task(writer.drain("u", "t1"))
    await asyncio.sleep(0.05)
    assert not drained.done()  # the write is still in flight
    store.gate.set()
    await asyncio.wait_for(drained, 1.0)
    assert store.written("t1") == [(1, "a")]
    await writer.close()


async def test_a_short_outage_is_retried_and_loses_no_delta() -> None:
    store = RecordingStore(failures=3)
    writer = DeltaLogWriter(store, retry_s=5.0)  # type: ignore[arg-type]
    for seq in range(1, 6):
        writer.add("u", "t1", seq, f"w{seq} ")
    await asyncio.wait_for(writer.drain("u", "t1"), 5.0)
    assert store.failures == 0
    assert store.written("t1") == [(seq, f"w{seq} ") for seq in range(1, 6)]
    await writer.close()


async def test_an_outage_of_any_length_is_retried_and_later_deltas_never_overtake_earlier_ones() -> None:
    # The retry time is short, the outage long: the old writer gave the first
    # batch up and then wrote the second one, leaving a hole in the log.
    store = RecordingStore(failures=-1)
    writer = DeltaLogWriter(store, retry_s=0.1)  # type: ignore[arg-type]
    writer.add("u", "t1", 1, "first ")
    await asyncio.sleep(0.4)
    writer.add("u", "t1", 2, "second ")
    writer.add("v", "t2", 1, "other ")
    await asyncio.sleep(0.4)
    assert store.calls == []
    store.failures = 0  # Redis is back
    assert await asyncio.wait_for(writer.drain("u", "t1"), 5.0)
    assert await asyncio.wait_for(writer.drain("v", "t2"), 5.0)
    assert store.written("t1") == [(1, "first "), (2, "second ")]
    assert store.written("t2") == [(1, "other ")]
    await writer.close()


async def test_close_during_an_outage_gives_up_after_the_retry_time_and_reports_the_turn_unwritten() -> None:
    store = RecordingStore(failures=-1)
    writer = DeltaLogWriter(store, retry_s=0.2)  # type: ignore[arg-type]
    writer.add("u", "t1", 1, "lost")
    drained = asyncio.create_task(writer.drain("u", "t1"))
    started = time.monotonic()
    await asyncio.wait_for(writer.close(), 5.0)
    assert 0.2 <= time.monotonic() - started < 3.0
    assert await asyncio.wait_for(drained, 1.0) is False
    # Nothing written after a write given up: a later delta would follow a hole.
    store.failures = 0
    writer.add("u", "t1", 2, "after")
    await asyncio.sleep(0.05)
    assert store.calls == []
    assert await writer.drain("u", "t1") is False


async def test_close_waits_for_the_last_write() -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    writer = DeltaLogWriter(store, retry_s=5.0)  # type: ignore[arg-type]
    writer.add("u", "t1", 1, "a")
    closing = asyncio.create_task(writer.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    store.gate.set()
    await asyncio.wait_for(closing, 1.0)
    assert store.written("t1") == [(1, "a")]


@pytest.fixture
async def store() -> AsyncIterator[ConversationStore]:
    prefix = f"rapport-test-delta-log:{uuid4().hex}:"
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield ConversationStore(redis, KeySpace(prefix))
    finally:
        keys = [k async for k in redis.scan_iter(match=glob_escape(prefix) + "*", count=1000)]
        if keys:
            await redis.unlink(*keys)
        await redis.aclose()


async def test_deltas_of_many_turns_land_in_their_own_logs_in_order(store: ConversationStore) -> None:
    turns = {}
    for user in ("alice", "bob", "carol"):
        turn_id = "t_" + uuid4().hex
        outcome = await store.begin_turn(user_id=user, conversation_id="default", client_turn_id=uuid4().hex,
                                         text="hi", turn_id=turn_id, owner="proc", now_ms=int(time.time() * 1000))
        assert outcome.kind == "accepted"
        turns[user] = turn_id
    writer = DeltaLogWriter(store, retry_s=5.0)
    for seq in range(1, 31):
        for user, turn_id in turns.items():
            writer.add(user, turn_id, seq, f"{user}{seq} ")
        if seq % 7 == 0:
            await asyncio.sleep(0)  # let some writes go out mid-way
    for user, turn_id in turns.items():
        await writer.drain(user, turn_id)
    for user, turn_id in turns.items():
        log = await store.read_log(user_id=user, turn_id=turn_id, after_seq=0)
        assert log == [LogDelta(seq, f"{user}{seq} ") for seq in range(1, 31)]
        record = await store.get_turn(user_id=user, turn_id=turn_id)
        assert record is not None and record.last_seq == 30
    await writer.close()
