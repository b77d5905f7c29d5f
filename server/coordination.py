"""Cross-process coordination through Redis: turn leases and control messages.

Several gateway processes share one Redis. A turn generates in exactly one of
them (its *owner*), while its followers may sit on any. Two mechanisms keep
that honest:

Leases
    Every running turn has an entry in one sorted set, scored by the time its
    lease runs out. The owner renews all of its entries every third of the
    lease. Any process that finds an entry past its expiry claims it (``ZREM``
    returns 1 to exactly one claimant) and, if the turn record still says
    running, ends the turn ``interrupted`` with the partial reply from its delta
    log (guarantee 3 when a process dies, e.g. SIGKILL). Its followers, reading
    the delta log from anywhere, then see the end entry.

Control messages
    Each process subscribes to its own pub/sub channel. Another process that
    receives ``turn.cancel`` for a turn it does not own publishes
    ``cancel`` there; ``attach``/``detach`` tell the owner that a follower on
    another process started or stopped reading, so a turn followed only from
    elsewhere is not mistaken for an abandoned one. If nobody receives a
    cancel (the owner is gone), the sender ends the turn itself, as a reaper
    would.

On Redis Cluster
    The lease index is one key (one slot, one node); it is read and written
    with single-key commands only, never together with a user's keys in a
    script, so the reaper needs no scan across nodes: every process asks the
    node that holds the index. Control messages use sharded pub/sub
    (``SPUBLISH``/``SSUBSCRIBE``, Redis 7) instead of ``PUBLISH``/``SUBSCRIBE``.
    Classic ``PUBLISH`` on a cluster is broadcast to every node over the
    cluster bus, and its reply counts only the subscribers connected to the
    node that took the command; "nobody received the cancel" (the reply 0)
    would then be wrong whenever the owner happens to listen on another node,
    and the sender would end a turn its owner is still generating. A sharded
    channel lives in the slot of its name, so publisher and subscriber meet on
    the same primary and the count is exact; each message also travels to
    that shard only, not to the whole cluster. redis-py's cluster pub/sub
    follows a channel's slot to its new primary after a failover. On one
    Redis server the classic commands stay (they work on Redis before 7 too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from protocol import frames
from protocol.errors import RapportError, Unavailable
from sessions.cluster import is_cluster
from sessions.keys import KeySpace
from sessions.store import ConversationStore, LogDelta, TurnRecord, redis_guarded

log = logging.getLogger("rapport.coordination")

SEPARATOR = "\x00"


def lease_member(user_id: str, turn_id: str) -> str:
    return f"{user_id}{SEPARATOR}{turn_id}"


def parse_member(member: str) -> tuple[str, str]:
    user_id, _, turn_id = member.partition(SEPARATOR)
    return user_id, turn_id


def wall_ms() -> int:
    return int(time.time() * 1000)


class Leases:
    """The running-turn lease index (one sorted set for the whole deployment)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, lease_ms: int) -> None:
        # Any: redis-py types replies as bytes | str; this client decodes (decode_responses=True).
        self.redis: Any = redis
        self.key = keys.running_index()
        self.lease_ms = lease_ms

    @redis_guarded
    async def take(self, user_id: str, turn_id: str) -> None:
        await self.redis.zadd(self.key, {lease_member(user_id, turn_id): wall_ms() + self.lease_ms})

    def queue_take(self, pipe: Any, user_id: str, turn_id: str) -> None:
        """:meth:`take` queued on the caller's pipeline (sent with its other commands)."""
        pipe.zadd(self.key, {lease_member(user_id, turn_id): wall_ms() + self.lease_ms})

    @redis_guarded
    async def renew(self, members: list[tuple[str, str]]) -> None:
        if not members:
            return
        expiry = wall_ms() + self.lease_ms
        # XX: renew only what is still there; a lease already reaped stays reaped.
        await self.redis.zadd(self.key, {lease_member(u, t): expiry for u, t in members}, xx=True)

    @redis_guarded
    async def release(self, user_id: str, turn_id: str) -> None:
        await self.redis.zrem(self.key, lease_member(user_id, turn_id))

    @redis_guarded
    async def expired(self, limit: int = 100) -> list[tuple[str, str]]:
        members = await self.redis.zrangebyscore(self.key, "-inf", wall_ms(), start=0, num=limit)
        return [parse_member(m) for m in members]

    @redis_guarded
    async def claim(self, user_id: str, turn_id: str) -> bool:
        """True for exactly one caller: the one whose ZREM removed the entry."""
        return bool(await self.redis.zrem(self.key, lease_member(user_id, turn_id)))


async def end_orphaned_turn(store: ConversationStore, record: TurnRecord, finish_reason: str) -> TurnRecord:
    """End a turn whose owner is gone, keeping the partial reply from its delta log."""
    entries = await store.read_log(user_id=record.user_id, turn_id=record.turn_id, after_seq=0)
    deltas = [e for e in entries if isinstance(e, LogDelta)]
    text = "".join(d.text for d in deltas)
    seq = deltas[-1].seq if deltas else 0
    usage = {"prompt_tokens": 0, "completion_tokens": seq, "cached_prompt_tokens": 0}
    total = max(0, wall_ms() - record.created_at_ms)
    timings = {"queue_ms": None, "ttft_ms": None, "total_ms": float(total)}
    end = frames.turn_end(turn_id=record.turn_id, seq=seq, finish_reason=finish_reason, text=text,
                          usage=usage, timings=timings)
    return await store.finish_turn(user_id=record.user_id, turn_id=record.turn_id, finish_reason=finish_reason,
                                   text=text, usage=usage, timings=timings, end=end, now_ms=wall_ms())


ControlHandler = Callable[[str, str, str], Awaitable[None] | None]


class Coordinator:
    """Owns this process's lease renewal, reaping and control-channel tasks."""

    def __init__(self, *, redis: aioredis.Redis, pubsub_redis: aioredis.Redis, keys: KeySpace,
                 store: ConversationStore, owner: str, lease_ms: int,
                 live_turns: Callable[[], list[tuple[str, str]]], on_control: ControlHandler) -> None:
        self.redis = redis
        self.pubsub_redis = pubsub_redis
        self.keys = keys
        self.store = store
        self.owner = owner
        self.leases = Leases(redis, keys, lease_ms)
        self._live_turns = live_turns
        self._on_control = on_control
        self._tasks: list[asyncio.Task[None]] = []
        self.reaped = 0
        # Since when (monotonic s) this process has reached Redis without a
        # failure; None while it is failing (see reap_once).
        self._healthy_since: float | None = None
        # When (monotonic s) this process last got an answer while reaping.
        self._last_answer: float | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._renew_loop(), name="lease renew"),
            loop.create_task(self._reap_loop(), name="lease reap"),
            loop.create_task(self._listen_loop(), name="control listen"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # ------------------------------------------------------------ leases

    async def _renew_loop(self) -> None:
        period = self.leases.lease_ms / 3000.0
        while True:
            await asyncio.sleep(period)
            try:
                await self.leases.renew(self._live_turns())
            except Unavailable as exc:
                self._healthy_since = None
                log.warning("lease renewal failed: %s", exc)

    async def _reap_loop(self) -> None:
        period = min(1.0, self.leases.lease_ms / 4000.0)
        while True:
            await asyncio.sleep(period)
            try:
                await self.reap_once()
            except Unavailable as exc:
                self._healthy_since = None
                log.warning("lease reaping failed: %s", exc)

    def _settled(self) -> bool:
        """True once this process has reached Redis without a failure for a whole lease.

        While Redis is away nobody can renew, so every lease runs out; when it
        comes back (or when this process has just started) the expired entries
        say nothing about whether their owners are alive. Each live owner
        renews within a third of a lease of reaching Redis again, so only
        leases still expired after a full lease of good health are reaped.
        """
        now = time.monotonic()
        lease_s = self.leases.lease_ms / 1000.0
        # A Redis that stops answering without failing (a stalled server, a
        # paused process: commands wait instead of being refused) lets leases
        # run out just the same, and when it resumes, a query sent during the
        # stall answers as if nothing happened. So a silence longer than a
        # renewal period (a third of a lease; reaping asks more often) counts
        # as an outage too, whether or not a command failed.
        if self._healthy_since is None or self._last_answer is None or now - self._last_answer > lease_s / 3:
            self._healthy_since = now
        self._last_answer = now
        return now - self._healthy_since >= lease_s

    async def reap_once(self) -> int:
        ended = 0
        mine = set(self._live_turns())
        expired = await self.leases.expired()
        settled = self._settled()
        for user_id, turn_id in expired:
            if (user_id, turn_id) in mine:
                # Our own lease ran out (a stalled loop, or Redis was away): renew, don't reap.
                await self.leases.take(user_id, turn_id)
                continue
            if not settled:
                continue  # its owner may simply not have reached Redis again yet
            if not await self.leases.claim(user_id, turn_id):
                continue  # another process got there first
            record = await self.store.get_turn(user_id=user_id, turn_id=turn_id)
            if record is None or record.status != "running":
                continue
            log.warning("turn %s: its process (%s) stopped renewing the lease; ending it interrupted",
                        turn_id, record.owner)
            await end_orphaned_turn(self.store, record, "interrupted")
            ended += 1
        self.reaped += ended
        return ended

    # ------------------------------------------------------------ control messages

    @redis_guarded
    async def send(self, owner: str, op: str, user_id: str, turn_id: str) -> int:
        """Publish a control message to ``owner``; the number of processes that got it."""
        message = json.dumps({"op": op, "user": user_id, "turn": turn_id})
        channel = self.keys.control_channel(owner)
        if is_cluster(self.redis):
            return int(await self.redis.spublish(channel, message))
        return int(await self.redis.publish(channel, message))

    async def _listen_loop(self) -> None:
        channel = self.keys.control_channel(self.owner)
        sharded = is_cluster(self.pubsub_redis)
        delay = 0.1
        lost = False
        while True:
            pubsub: Any = self.pubsub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                if sharded:
                    # The cluster pub/sub finds a channel's node in the client's slot map,
                    # which a client fills on its first command only: fill it first.
                    await self.pubsub_redis.initialize()
                    if lost:
                        # The channel's primary may have failed over; this client sends no
                        # command that a MOVED reply would correct, so re-read the slot map.
                        cluster: Any = self.pubsub_redis
                        await cluster.nodes_manager.initialize()
                    await pubsub.ssubscribe(channel)
                else:
                    await pubsub.subscribe(channel)
                delay = 0.1
                while True:
                    if sharded:
                        if not pubsub.node_pubsub_mapping:
                            # redis-py dropped the node's subscription (its node left): subscribe again.
                            raise rexc.ConnectionError("the sharded control subscription was dropped")
                        message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=30.0)
                    else:
                        message = await pubsub.get_message(timeout=30.0)
                    if message is None or message.get("type") not in ("message", "smessage"):
                        continue
                    await self._dispatch(message.get("data"))
            except (rexc.ConnectionError, rexc.TimeoutError, rexc.RedisClusterException, OSError) as exc:
                log.warning("control channel lost (%s); resubscribing", exc)
                lost = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(rexc.RedisError, OSError, RuntimeError):
                    await pubsub.aclose()

    async def _dispatch(self, data: Any) -> None:
        try:
            message = json.loads(data)
            op, user_id, turn_id = message["op"], message["user"], message["turn"]
        except (TypeError, ValueError, KeyError):
            log.warning("ignoring a malformed control message: %r", data)
            return
        try:
            result = self._on_control(op, user_id, turn_id)
            if result is not None:
                await result
        except RapportError as exc:
            log.warning("control message %s for %s failed: %s", op, turn_id, exc)
