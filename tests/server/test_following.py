"""Following turns of other processes through their delta logs (server/following.py).

Real ConversationStore on the Redis at 127.0.0.1:6379; the other process is
played by the test, writing the turn's log and record as an owner would, and
the coordinator by a stand-in that records the control messages sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from protocol import frames
from protocol.errors import NotFound, ResumeExpired
from server.following import DistantTurns, end_frame_of
from sessions.keys import KeySpace, glob_escape
from sessions.store import ConversationStore, TurnRecord

REDIS_URL = "redis://127.0.0.1:6379/0"
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "cached_prompt_tokens": 0}
TIMINGS = {"queue_ms": 1.0, "ttft_ms": 20.0, "total_ms": 90.0}


class Recorder:
    """A following connection: keeps what it is sent and the tasks it adopts."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.frames: list[dict[str, Any]] = []
        self.adopted: dict[str, asyncio.Task[None]] = {}

    def push(self, frame: dict[str, Any], *, live: bool = False) -> None:
        self.frames.append(frame)

    def adopt(self, turn_id: str, task: asyncio.Task[None]) -> None:
        self.adopted[turn_id] = task

    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]


class FakeLeases:
    def __init__(self, claimable: bool) -> None:
        self.claimable = claimable

    async def claim(self, user_id: str, turn_id: str) -> bool:
        return self.claimable


class FakeCoordinator:
    """Records control messages; ``listeners`` processes receive each one."""

    def __init__(self, listeners: int = 1, *, claimable: bool = True) -> None:
        self.listeners = listeners
        self.sent: list[tuple[str, str, str, str]] = []
        self.leases = FakeLeases(claimable)

    async def send(self, owner: str, op: str, user_id: str, turn_id: str) -> int:
        self.sent.append((owner, op, user_id, turn_id))
        return self.listeners


class Owner:
    """Plays the process generating a turn: writes its record and delta log."""

    def __init__(self, store: ConversationStore, user_id: str = "alice") -> None:
        self.store = store
        self.user_id = user_id
        self.turn_id = "t_" + uuid4().hex
        self.seq = 0
        self.text = ""

    async def begin(self) -> TurnRecord:
        outcome = await self.store.begin_turn(
            user_id=self.user_id, conversation_id="default", client_turn_id=uuid4().hex, text="hi",
            turn_id=self.turn_id, owner="other-process", now_ms=int(time.time() * 1000))
        assert outcome.kind == "accepted" and outcome.turn is not None
        return outcome.turn

    async def deltas(self, *texts: str) -> None:
        batch = []
        for text in texts:
            self.seq += 1
            self.text += text
            batch.append((self.seq, text))
        await self.store.append_deltas(user_id=self.user_id, turn_id=self.turn_id, deltas=batch)

    def end_frame(self, reason: str = "stop") -> dict[str, Any]:
        return frames.turn_end(turn_id=self.turn_id, seq=self.seq, finish_reason=reason, text=self.text,
                               usage=USAGE, timings=TIMINGS)

    async def finish(self, reason: str = "stop") -> TurnRecord:
        return await self.store.finish_turn(
            user_id=self.user_id, turn_id=self.turn_id, finish_reason=reason, text=self.text, usage=USAGE,
            timings=TIMINGS, end=self.end_frame(reason), now_ms=int(time.time() * 1000))

    async def expire_log(self) -> None:
        await self.store.redis.unlink(self.store.keys.delta_log(self.user_id, self.turn_id))


@pytest.fixture
async def store() -> AsyncIterator[ConversationStore]:
    prefix = f"rapport-test-following:{uuid4().hex}:"
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    blocking = aioredis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=30)
    try:
        yield ConversationStore(redis, KeySpace(prefix), blocking_redis=blocking)
    finally:
        keys = [k async for k in redis.scan_iter(match=glob_escape(prefix) + "*", count=1000)]
        if keys:
            await redis.unlink(*keys)
        await redis.aclose()
        await blocking.aclose()


@pytest.fixture
def distant(store: ConversationStore) -> DistantTurns:
    return DistantTurns(store, block_ms=100)


def deltas_of(follower: Recorder) -> list[tuple[int, str]]:
    return [(f["seq"], f["text"]) for f in follower.frames if f["type"] == "turn.delta"]


# ---------------------------------------------------------------- resume


async def test_resuming_an_unknown_turn_is_not_found(distant: DistantTurns) -> None:
    with pytest.raises(NotFound):
        await distant.resume(Recorder("alice"), "t_nope", 0, None)


async def test_another_users_turn_is_not_found(store: ConversationStore, distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    with pytest.raises(NotFound):
        await distant.resume(Recorder("mallory"), owner.turn_id, 0, None)


async def test_a_running_turn_is_followed_backlog_then_live_deltas_then_its_end(
        store: ConversationStore, distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    await owner.deltas("Hel", "lo")
    follower = Recorder("alice")
    task = await distant.resume(follower, owner.turn_id, 0, None)
    assert task is not None
    await owner.deltas(", ", "world")
    await owner.finish()
    await asyncio.wait_for(task, 10)
    assert deltas_of(follower) == [(1, "Hel"), (2, "lo"), (3, ", "), (4, "world")]
    assert follower.frames[-1] == owner.end_frame()
    assert follower.types().count("turn.end") == 1


async def test_resuming_after_a_seq_sends_only_the_missing_deltas(store: ConversationStore,
                                                                  distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    await owner.deltas("a", "b", "c", "d")
    await owner.finish()
    follower = Recorder("alice")
    task = await distant.resume(follower, owner.turn_id, 2, None)
    assert task is not None
    await asyncio.wait_for(task, 10)
    assert deltas_of(follower) == [(3, "c"), (4, "d")]
    assert follower.frames[-1]["type"] == "turn.end"


async def test_resuming_once_the_log_expired_is_resume_expired_with_the_final_text(
        store: ConversationStore, distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    await owner.deltas("the ", "reply")
    await owner.finish("length")
    await owner.expire_log()
    with pytest.raises(ResumeExpired) as info:
        await distant.resume(Recorder("alice"), owner.turn_id, 1, None)
    assert info.value.fields["text"] == "the reply"
    assert info.value.fields["finish_reason"] == "length"


async def test_a_replay_once_the_log_expired_gets_the_end_at_once(store: ConversationStore,
                                                                  distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    await owner.deltas("the ", "reply")
    await owner.finish()
    await owner.expire_log()
    follower = Recorder("alice")
    assert await distant.resume(follower, owner.turn_id, 0, None, replay=True) is None
    assert follower.types() == ["turn.end"]
    assert follower.frames[0]["text"] == "the reply" and follower.frames[0]["seq"] == 2


async def test_a_quiet_log_of_a_turn_that_ended_without_an_end_entry_ends_from_the_record(
        store: ConversationStore, distant: DistantTurns) -> None:
    owner = Owner(store)
    record = await owner.begin()
    await owner.deltas("partial")
    await owner.finish("interrupted")
    await owner.expire_log()  # the end entry went with the log
    follower = Recorder("alice")
    await asyncio.wait_for(distant.follow_log(follower, record, 1), 10)
    ended = await store.get_turn(user_id="alice", turn_id=owner.turn_id)
    assert ended is not None and follower.frames == [end_frame_of(ended)]
    assert follower.frames[0]["finish_reason"] == "interrupted" and follower.frames[0]["text"] == "partial"


async def test_only_end_sends_nothing_but_the_end(store: ConversationStore, distant: DistantTurns) -> None:
    owner = Owner(store)
    record = await owner.begin()
    await owner.deltas("a", "b")
    follower = Recorder("alice")
    task = asyncio.create_task(distant.follow_log(follower, record, 0, only_end=True))
    await owner.deltas("c")
    await owner.finish()
    await asyncio.wait_for(task, 10)
    assert follower.frames == [owner.end_frame()]


# ---------------------------------------------------------------- telling the owner


async def test_a_follower_tells_the_owner_it_reads_and_then_that_it_stopped(store: ConversationStore,
                                                                            distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    coordinator = FakeCoordinator(listeners=1)
    follower = Recorder("alice")
    task = await distant.resume(follower, owner.turn_id, 0, coordinator)  # type: ignore[arg-type]
    assert task is not None
    await owner.deltas("x")
    await owner.finish()
    await asyncio.wait_for(task, 10)
    assert coordinator.sent == [("other-process", "attach", "alice", owner.turn_id),
                                ("other-process", "detach", "alice", owner.turn_id)]


async def test_a_follower_that_leaves_early_still_sends_its_detach(store: ConversationStore,
                                                                   distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    coordinator = FakeCoordinator(listeners=1)
    task = await distant.resume(Recorder("alice"), owner.turn_id, 0, coordinator)  # type: ignore[arg-type]
    assert task is not None
    await asyncio.sleep(0.05)
    task.cancel()  # the socket went away
    await asyncio.gather(task, return_exceptions=True)
    assert [op for _, op, _, _ in coordinator.sent] == ["attach", "detach"]


async def test_no_detach_for_an_attach_nobody_received(store: ConversationStore, distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    coordinator = FakeCoordinator(listeners=0)
    task = await distant.resume(Recorder("alice"), owner.turn_id, 0, coordinator)  # type: ignore[arg-type]
    assert task is not None
    await owner.finish()
    await asyncio.wait_for(task, 10)
    assert [op for _, op, _, _ in coordinator.sent] == ["attach"]


async def test_following_an_ended_turn_tells_nobody(store: ConversationStore, distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    await owner.deltas("done")
    await owner.finish()
    coordinator = FakeCoordinator()
    task = await distant.resume(Recorder("alice"), owner.turn_id, 0, coordinator)  # type: ignore[arg-type]
    assert task is not None
    await asyncio.wait_for(task, 10)
    assert coordinator.sent == []


# ---------------------------------------------------------------- cancel


async def test_cancelling_an_ended_turn_answers_its_end(store: ConversationStore, distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    await owner.deltas("all", " done")
    await owner.finish()
    coordinator = FakeCoordinator()
    follower = Recorder("alice")
    await distant.cancel(follower, owner.turn_id, coordinator)  # type: ignore[arg-type]
    assert follower.types() == ["turn.end"] and follower.frames[0]["finish_reason"] == "stop"
    assert coordinator.sent == []


async def test_cancelling_an_unknown_turn_is_not_found(distant: DistantTurns) -> None:
    with pytest.raises(NotFound):
        await distant.cancel(Recorder("alice"), "t_nope", FakeCoordinator())  # type: ignore[arg-type]


async def test_a_cancel_goes_to_the_owner_and_the_canceller_awaits_the_end(store: ConversationStore,
                                                                           distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    await owner.deltas("some", " words")
    coordinator = FakeCoordinator(listeners=1)
    follower = Recorder("alice")
    await distant.cancel(follower, owner.turn_id, coordinator)  # type: ignore[arg-type]
    assert coordinator.sent == [("other-process", "cancel", "alice", owner.turn_id)]
    task = follower.adopted[owner.turn_id]
    await owner.finish("cancelled")  # the owner does as it is asked
    await asyncio.wait_for(task, 10)
    assert follower.frames == [owner.end_frame("cancelled")]  # no deltas: the canceller holds none


async def test_a_cancel_nobody_receives_ends_the_turn_here(store: ConversationStore,
                                                           distant: DistantTurns) -> None:
    owner = Owner(store)
    await owner.begin()
    await owner.deltas("partial", " reply")
    follower = Recorder("alice")
    await distant.cancel(follower, owner.turn_id, FakeCoordinator(listeners=0))  # type: ignore[arg-type]
    assert follower.types() == ["turn.end"]
    end = follower.frames[0]
    assert end["finish_reason"] == "cancelled" and end["text"] == "partial reply" and end["seq"] == 2
    record = await store.get_turn(user_id="alice", turn_id=owner.turn_id)
    assert record is not None and record.status == "ended" and record.finish_reason == "cancelled"


# ---------------------------------------------------------------- end_frame_of


def test_end_frame_of_a_record_without_usage_or_timings_has_the_contracts_shape() -> None:
    record = TurnRecord(turn_id="t_1", user_id="alice", conversation_id="default", client_turn_id="c",
                        status="ended", finish_reason=None, last_seq=3, text="abc", usage={}, timings={},
                        created_at_ms=0, ended_at_ms=None, owner="p")
    assert end_frame_of(record) == frames.turn_end(
        turn_id="t_1", seq=3, finish_reason="interrupted", text="abc",
        usage={"prompt_tokens": 0, "completion_tokens": 0, "cached_prompt_tokens": 0},
        timings={"queue_ms": None, "ttft_ms": None, "total_ms": None})
