"""The audit log: security-relevant events in one append-only Redis Stream per deployment.

Every gateway process sharing the key prefix appends to the same stream
(:meth:`sessions.keys.KeySpace.audit`); ``rapport audit tail`` and
``GET /v1/admin/audit`` read it. Each entry is a flat map of short strings:
``kind``, ``at`` (milliseconds since the epoch), ``node`` (the writing
process) and the fields of that kind, for example::

    auth_failure      reason, peer, transport
    connection_cap    user, peer, cap
    rate_limited      user, peer, limit, retry_after_ms
    user_erased       actor, target, deleted_keys
    admin_action      actor, role, action, target, status
    moderation_block  user, conversation_id, category, ... (the moderation filter's fields)

It never holds message text nor credentials: :meth:`Audit.record` refuses
field names that would carry them (``text``, ``token``, ...), callers pass
reason *codes*, and every value is cut to :data:`MAX_VALUE_CHARS`.

Writing never waits on Redis: :meth:`Audit.record` queues the entry and one
writer task (owned here: :meth:`start` / :meth:`close`) appends queued entries
in pipelined batches. Each append trims entries older than the retention with
``XADD ... MINID`` (Redis 6.2), so the stream is bounded by age. A flood of one
kind (a botnet sending bad tokens) is bounded per process by a token bucket
per kind; entries over it are counted and the next entry of that kind carries
``suppressed``. When Redis cannot be reached the queue (bounded) waits and
retries; what overflows is counted the same way.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sessions.keys import KeySpace

log = logging.getLogger("rapport.audit")

__all__ = ["FORBIDDEN_FIELDS", "KINDS", "Audit", "AuditValue", "entry_from", "peer_address"]

AuditValue = str | int | float | bool | None

#: The kinds of entry the gateway writes. Other kinds are accepted (a plug-in
#: may add its own) but must be short identifiers.
KINDS = frozenset({"auth_failure", "connection_cap", "rate_limited", "user_erased", "admin_action",
                   "moderation_block"})
#: Field names that would carry what the audit log must never hold.
FORBIDDEN_FIELDS = frozenset({"text", "token", "jwt", "authorization", "content", "message", "messages",
                              "prompt", "reply", "secret", "password", "cookie"})
RESERVED_FIELDS = frozenset({"kind", "at", "node", "suppressed"})
MAX_VALUE_CHARS = 200
MAX_FIELDS = 16
DAY_MS = 86_400_000

#: The peer address of the request or WebSocket being served (``host:port``),
#: set by the application for each connection; auth failures and limit trips read it.
peer_address: contextvars.ContextVar[str] = contextvars.ContextVar("rapport_peer", default="")


def bind_peer(scope: Mapping[str, Any]) -> None:
    """Remember the ASGI ``scope``'s client address for what this connection records."""
    client = scope.get("client")
    if client:
        host, port = client[0], client[1]
        peer_address.set(f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    suppressed: int = 0


class Audit:
    """Appends audit entries to ``keys.audit()``; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, *, retention_days: float = 90.0,
                 rate_per_kind: float = 20.0, burst_per_kind: int = 100, max_pending: int = 10_000,
                 batch: int = 200, retry_s: float = 1.0) -> None:
        if retention_days <= 0:
            raise ValueError("the audit retention must be positive")
        self.redis = redis
        self.key = keys.audit()
        self.retention_ms = int(retention_days * DAY_MS)
        self.rate = float(rate_per_kind)
        self.burst = int(burst_per_kind)
        self.max_pending = int(max_pending)
        self.batch = int(batch)
        self.retry_s = float(retry_s)
        self.node = f"{socket.gethostname()}:{os.getpid()}"
        self._pending: deque[tuple[int, dict[str, str]]] = deque()
        self._buckets: dict[str, _Bucket] = {}
        self._dropped = 0
        self._enqueued = 0
        self._written = 0
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Condition()
        self._writer: asyncio.Task[None] | None = None

    # -- recording -------------------------------------------------------------

    def record(self, kind: str, /, **fields: AuditValue) -> None:
        """Queue one entry of ``kind`` with ``fields``; never blocks, never raises on Redis trouble.

        ``fields`` are short identifiers and codes (user ids, reason codes,
        counts). A name in :data:`FORBIDDEN_FIELDS` or :data:`RESERVED_FIELDS`
        raises ValueError (a programming error, not a runtime condition);
        ``None`` values are left out.
        """
        if not kind or not kind.replace("_", "").replace(".", "").isalnum() or len(kind) > 40:
            raise ValueError(f"an audit kind is a short identifier, not {kind!r}")
        bad = {name for name in fields if name.lower() in FORBIDDEN_FIELDS or name in RESERVED_FIELDS}
        if bad:
            raise ValueError(f"audit entries never carry {sorted(bad)}")
        if len(fields) > MAX_FIELDS:
            raise ValueError(f"an audit entry has at most {MAX_FIELDS} fields")
        now = time.monotonic()
        bucket = self._buckets.get(kind)
        if bucket is None:
            bucket = self._buckets[kind] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            return
        bucket.tokens -= 1.0
        entry = {"kind": kind, "node": self.node}
        peer = peer_address.get()
        if peer and "peer" not in fields:
            entry["peer"] = peer
        for name, value in fields.items():
            if value is None:
                continue
            entry[name] = _value(value)
        if bucket.suppressed:
            entry["suppressed"] = str(bucket.suppressed)
            bucket.suppressed = 0
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self._dropped += 1
            self._written += 1  # it will never be written: flush() must not wait for it
        self._pending.append((int(time.time() * 1000), entry))
        self._enqueued += 1
        self._wakeup.set()

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until what was recorded so far is in Redis; False if that took longer than ``timeout_s``."""
        target = self._enqueued
        if self._writer is None:
            await self._write_pending()
            return self._written >= target
        try:
            async with asyncio.timeout(timeout_s):
                async with self._progress:
                    await self._progress.wait_for(lambda: self._written >= target)
        except TimeoutError:
            return False
        return True

    # -- the writer task ---------------------------------------------------------

    def start(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="audit writer")

    async def close(self, drain_s: float = 2.0) -> None:
        """Write what is queued (for up to ``drain_s``), then stop the writer."""
        if self._writer is not None and self._pending:
            await self.flush(drain_s)
        task, self._writer = self._writer, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._pending:
            log.warning("audit: %d entries not written at shutdown (Redis unreachable)", len(self._pending))

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                try:
                    await self._write_pending()
                except (RedisError, OSError) as exc:
                    log.warning("audit: cannot append to Redis (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(self.retry_s)

    async def _write_pending(self) -> None:
        while self._pending:
            batch = [self._pending[i] for i in range(min(self.batch, len(self._pending)))]
            if self._dropped:
                batch[-1][1]["dropped"] = str(self._dropped)
            minid = max(0, int(time.time() * 1000) - self.retention_ms)
            async with self.redis.pipeline(transaction=False) as pipe:
                for at_ms, entry in batch:
                    # MINID drops every entry older than the retention (stream ids begin
                    # with the Redis clock in ms). Exact trimming, not "~": the stream is
                    # small, and an audit log should not keep what its retention promises to drop.
                    fields: dict[Any, Any] = {"at": str(at_ms), **entry}
                    pipe.xadd(self.key, fields, minid=minid, approximate=False)
                await pipe.execute()
            self._dropped = 0
            for _ in batch:
                self._pending.popleft()
            self._written += len(batch)
            async with self._progress:
                self._progress.notify_all()


def _value(value: AuditValue) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "…"
    return text


def entry_from(entry_id: str | bytes, fields: Mapping[Any, Any]) -> dict[str, str]:
    """One stream entry as a flat dict with its ``id`` (for the admin endpoint and the CLI)."""
    def s(v: Any) -> str:
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)

    return {"id": s(entry_id), **{s(k): s(v) for k, v in fields.items()}}
