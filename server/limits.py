"""Per-user limits that hold across every gateway process sharing one Redis.

:class:`TurnRateLimiter`
    Turns a user may start per minute (protocol guarantee 8: ``rate_limited``
    with ``retry_after_ms``). A sliding-window log: one sorted set per user
    whose members are the admitted turn starts, scored by Redis' own clock in
    microseconds. One Lua script drops entries older than the window, counts
    what is left and either records the new start or answers how long until
    the oldest entry leaves the window. Exact (no fixed-window burst at a
    minute boundary), at most ``limit`` members per user.

:class:`ConnectionRegistry`
    Open WebSockets a user holds, across processes (over the cap the gateway
    closes with 4429). One sorted set per user: member = connection id,
    score = the time (Redis clock, ms) at which the entry expires unless the
    owning process refreshes it. Entries past their expiry do not count, so the
    connections of a process that crashed stop counting after ``ttl_s`` instead
    of leaking forever. The owning process refreshes all of its live
    connections every ``refresh_s`` in one pipeline (:meth:`refresh`, run by the
    task :meth:`start` creates).

Every key lives under the user's hash tag (:meth:`sessions.keys.KeySpace.user_key`),
so the scripts run on Redis Cluster and ``delete_user`` removes the keys too.
The refresh of many users' entries is one pipeline on a single Redis and
concurrent script calls on a cluster, whose pipelines refuse scripts
(:func:`sessions.cluster.run_scripts`).
Scripts read the time from Redis (``TIME``), so the gateway hosts' clocks need
not agree. When Redis cannot be reached both raise
:class:`protocol.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

from protocol.errors import RapportError, RateLimited, Unavailable
from sessions.cluster import run_scripts
from sessions.keys import KeySpace
from sessions.store import redis_guarded

from .audit import Audit

log = logging.getLogger("rapport.limits")

__all__ = ["ConnectionRegistry", "Permit", "TurnRateLimiter"]

# Failures that mean "Redis cannot be reached right now" (as opposed to a bug).

# Redis connectivity failures become Unavailable, as everywhere else in the project.
_guarded = redis_guarded


# ---------------------------------------------------------------------------
# Turn rate limit
# ---------------------------------------------------------------------------

# KEYS: 1 the user's window zset, 2 an idempotency key (or a placeholder that
#       never exists, see ARGV[4]).
# ARGV: 1 limit, 2 window (microseconds), 3 member to add, 4 "1" to check KEYS[2].
# Returns {1, 0} admitted (member recorded), {2, 0} a replay (KEYS[2] exists:
# nothing recorded, a re-sent turn.start is not a new turn), or
# {0, retry_after_us} refused.
RATE_LUA = """
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  return {2, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  return {1, 0}
end
-- The (count - limit + 1)-th oldest start must leave the window first.
local nth = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
local retry = tonumber(nth[2]) + window - now
if retry < 1000 then retry = 1000 end
return {0, retry}
"""


@dataclass(frozen=True, slots=True)
class Permit:
    """An admitted turn start; :meth:`TurnRateLimiter.refund` gives it back."""

    user_id: str
    member: str
    #: The turn.start re-sent a client_turn_id the user already used: it counts
    #: neither against the rate limit nor against admission control.
    replay: bool = False


class TurnRateLimiter:
    """``limit`` turn starts per ``window_s`` per user, across processes (sliding window)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, *, limit: int, window_s: float = 60.0) -> None:
        if limit < 1:
            raise ValueError("the turn rate limit must be at least 1")
        if window_s <= 0:
            raise ValueError("the rate window must be positive")
        self.redis = redis
        self.keys = keys
        self.limit = int(limit)
        self.window_us = int(window_s * 1_000_000)
        self._script = redis.register_script(RATE_LUA)
        #: Where refusals are recorded (server.audit); None: nowhere.
        self.audit: Audit | None = None

    def key(self, user_id: str) -> str:
        return self.keys.user_key(user_id, "rl:turns")

    @_guarded
    async def check(self, user_id: str, *, client_turn_id: str | None = None) -> Permit:
        """Record a turn start for ``user_id``, or raise :class:`RateLimited`.

        With ``client_turn_id`` a start that re-sends an id the user already
        used (a replay, guarantee 1) is let through without being counted.
        Raises Unavailable when Redis cannot be reached.
        """
        member = uuid.uuid4().hex
        idem = (self.keys.idempotency(user_id, client_turn_id) if client_turn_id
                else self.keys.user_key(user_id, "rl:none"))
        verdict, retry_us = await self._script(
            keys=[self.key(user_id), idem],
            args=[self.limit, self.window_us, member, "1" if client_turn_id else "0"],
        )
        verdict = int(verdict)
        if verdict == 2:
            return Permit(user_id, "", replay=True)
        if verdict == 1:
            return Permit(user_id, member)
        retry_ms = max(1, int(-(-int(retry_us) // 1000)))  # ceil
        if self.audit is not None:
            self.audit.record("rate_limited", user=user_id, limit=self.limit, retry_after_ms=retry_ms)
        raise RateLimited(
            f"more than {self.limit} turns a minute; retry in {retry_ms / 1000:.1f} s",
            retry_after_ms=retry_ms,
        )

    @_guarded
    async def refund(self, permit: Permit) -> None:
        """Forget an admitted start (the turn was refused afterwards, e.g. ``busy``)."""
        if permit.member:
            await self.redis.zrem(self.key(permit.user_id), permit.member)


# ---------------------------------------------------------------------------
# Connections per user
# ---------------------------------------------------------------------------

# KEYS: 1 the user's connection zset.
# ARGV: 1 cap, 2 connection id, 3 ttl (ms).
# Returns 1 admitted (or already present: refreshed), 0 over the cap.
CONN_ADD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS: 1 the user's connection zset. ARGV: 1 connection id, 2 ttl (ms).
# A live connection is (re)recorded even if its entry had already expired:
# it is open, so it counts. The key lives as long as its newest entry.
CONN_REFRESH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""


class ConnectionRegistry:
    """Open connections per user across processes, capped at ``cap``.

    Entries expire ``ttl_s`` after their last refresh; :meth:`start` runs a task
    that refreshes every pair ``pairs()`` returns each ``refresh_s`` seconds.
    ``ttl_s`` should be a few times ``refresh_s`` so one slow refresh does not
    drop live connections.
    """

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, *, cap: int, ttl_s: float = 90.0,
                 refresh_s: float = 30.0, batch: int = 1000) -> None:
        if cap < 1:
            raise ValueError("the connection cap must be at least 1")
        if refresh_s <= 0 or ttl_s <= refresh_s:
            raise ValueError("ttl_s must be larger than refresh_s > 0")
        self.redis = redis
        self.keys = keys
        self.cap = int(cap)
        self.ttl_ms = int(ttl_s * 1000)
        self.refresh_s = float(refresh_s)
        self.batch = max(1, int(batch))
        self._add = redis.register_script(CONN_ADD_LUA)
        self._refresh = redis.register_script(CONN_REFRESH_LUA)
        self._task: asyncio.Task[None] | None = None
        #: Where refusals over the cap are recorded (server.audit); None: nowhere.
        self.audit: Audit | None = None

    def key(self, user_id: str) -> str:
        return self.keys.user_key(user_id, "conns")

    @_guarded
    async def add(self, user_id: str, conn_id: str) -> bool:
        """Record ``conn_id`` for ``user_id`` if the user is under the cap; False when over it."""
        admitted = int(await self._add(keys=[self.key(user_id)], args=[self.cap, conn_id, self.ttl_ms])) == 1
        if not admitted and self.audit is not None:
            self.audit.record("connection_cap", user=user_id, cap=self.cap)
        return admitted

    @_guarded
    async def remove(self, user_id: str, conn_id: str) -> None:
        await self.redis.zrem(self.key(user_id), conn_id)

    @_guarded
    async def count(self, user_id: str) -> int:
        """Live (unexpired) connections of ``user_id``."""
        now_s, now_us = await self.redis.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        return int(await self.redis.zcount(self.key(user_id), f"({now_ms}", "+inf"))

    @_guarded
    async def refresh(self, user_conn_pairs: Iterable[tuple[str, str]]) -> int:
        """Push the expiry of every ``(user_id, conn_id)`` forward, pipelined; how many."""
        n = 0
        pairs = list(user_conn_pairs)
        for i in range(0, len(pairs), self.batch):
            # One pipeline on a single node; concurrent calls on a cluster (sessions.cluster).
            await run_scripts(self.redis, [(self._refresh, [self.key(user_id)], [conn_id, self.ttl_ms])
                                           for user_id, conn_id in pairs[i:i + self.batch]])
            n += len(pairs[i:i + self.batch])
        return n

    @_guarded
    async def remove_many(self, user_conn_pairs: Iterable[tuple[str, str]]) -> None:
        """Forget several connections at once (this process shutting down)."""
        pairs = list(user_conn_pairs)
        for i in range(0, len(pairs), self.batch):
            async with self.redis.pipeline(transaction=False) as pipe:
                for user_id, conn_id in pairs[i:i + self.batch]:
                    pipe.zrem(self.key(user_id), conn_id)
                await pipe.execute()

    # -- the refresh task ----------------------------------------------------

    def start(self, pairs: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Refresh ``pairs()`` every ``refresh_s`` seconds until :meth:`close`."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop(pairs),
                                                                 name="connection registry refresh")

    async def _refresh_loop(self, pairs: Callable[[], Iterable[tuple[str, str]]]) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh(pairs())
            except Unavailable as exc:
                log.warning("could not refresh connection entries: %s", exc)
            except Exception:
                log.exception("refreshing connection entries failed")

    async def close(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        """Stop the refresh task; forget ``pairs`` (this process's connections) if given."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        pairs = list(pairs)
        if pairs:
            try:
                await self.remove_many(pairs)
            except RapportError as exc:
                log.warning("could not remove connection entries on close (they expire): %s", exc)
