"""Push when a reply finishes in the background (docs/protocol.md addition 23).

A phone that locks its screen mid-reply drops its socket; the turn keeps
generating for the detached grace period and, if it ends normally while no
socket anywhere follows it, the app's backend hears about it here: one POST of
a small signed JSON event, so it can send a push notification.

- :meth:`WebhookSender.observe` is one of ``TurnManager.end_observers``: called
  without awaiting once a turn's end is stored, it only puts the notice on a
  bounded queue (full: dropped and counted), so a turn never waits for a
  webhook. Only this process observes the ends of the turns it generated.
- The sender's own task takes events off the queue and delivers each in its
  own task (at most ``max_in_flight`` at once), so a receiver that is down
  delays only its own events.
- The URL is the user's own registration (``PUT /v1/users/me/webhook``,
  :mod:`server.webhook_api`) or else ``--webhook-url``; reading it costs one
  Redis read per detached end, never anything on the streaming path.
- At most once per turn across processes: before its first attempt a delivery
  claims ``hook:<turn>`` under the user's hash tag with ``SET NX`` (kept a day);
  whoever does not win the claim sends nothing. A delivery the receiver got
  but whose answer was lost is sent again by the same process's retries: the
  event id (the same on every attempt) is what receivers dedupe on.
- Retries: network errors, timeouts, 408, 429 and 5xx are retried with
  exponential backoff and full jitter (the delay a uniform draw in
  ``[0, min(cap, base * 2**n)]``, as in AWS's "Exponential Backoff and
  Jitter"), honouring a longer ``Retry-After``, until ``max_age_s`` (10 minutes)
  after the turn ended. Any other answer outside 2xx (a 4xx, a redirect, which
  is not followed) is permanent. The backoff lives here rather than reusing
  ``clients.retry`` because the server may not import ``clients`` (layers).
- Pending deliveries live in memory only; :meth:`WebhookSender.close` gives
  them up (and logs how many) rather than hold shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from protocol.errors import BadRequest
from protocol.webhook_signature import EVENT_ID_HEADER, SIGNATURE_HEADER, signature_header
from sessions.keys import KeySpace, escape_id

from .config import is_loopback
from .metrics import Metrics
from .turns import TurnEnded

__all__ = ["EVENT_TYPE", "MAX_URL_CHARS", "PREVIEW_CHARS", "WebhookRegistrations", "WebhookSender",
           "check_user_url", "event_body"]

log = logging.getLogger("rapport.webhooks")

EVENT_TYPE = "turn.completed"
#: The reply's first characters carried by the event (for the notification's text).
PREVIEW_CHARS = 200
MAX_URL_CHARS = 2048
#: How long the at-most-once claim of a turn is kept: far past the 10-minute retry window.
CLAIM_TTL_S = 86_400


def check_user_url(url: str, *, server_host: str) -> str:
    """A URL a user may register for their webhook, or BadRequest saying why not.

    ``https`` only, except ``http`` to a loopback host while the server itself
    listens on loopback (development), the rule ``--jwks-url`` follows. Off
    loopback the URL may not name this machine or a private network by address
    or as ``localhost``: a user must not aim the server at its own neighbours.
    (A public name that resolves to a private address is not caught here.)
    """
    if len(url) > MAX_URL_CHARS:
        raise BadRequest(f"field 'url' is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        raise BadRequest("field 'url' is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequest("field 'url' must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise BadRequest("field 'url' must not carry credentials; the signature authenticates the server")
    development = is_loopback(server_host)
    if parts.scheme == "http" and not (development and is_loopback(host)):
        raise BadRequest("field 'url' must be an https:// URL (http:// only to loopback on a loopback server)")
    if not development and _internal_host(host):
        raise BadRequest("field 'url' must name a public host, not this machine or a private network")
    return url


def _internal_host(host: str) -> bool:
    if is_loopback(host) or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return not address.is_global


class WebhookRegistrations:
    """Each user's own webhook URL, one string under their hash tag (so erasing
    the user erases it)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys

    def key(self, user_id: str) -> str:
        return self.keys.user_key(user_id, "webhook")

    async def get(self, user_id: str) -> str | None:
        value = await self.redis.get(self.key(user_id))
        return value if isinstance(value, str) and value else None

    async def put(self, user_id: str, url: str) -> None:
        await self.redis.set(self.key(user_id), url)

    async def delete(self, user_id: str) -> bool:
        return bool(await self.redis.delete(self.key(user_id)))


def event_id(user_id: str, turn_id: str) -> str:
    """The same id for the same turn on every attempt and in every process."""
    return "evt_" + hashlib.sha256(f"{user_id}\x00{turn_id}".encode()).hexdigest()[:32]


def event_body(notice: TurnEnded, created_at_ms: int) -> bytes:
    """The event as sent: compact UTF-8 JSON, signed byte for byte."""
    return json.dumps({
        "type": EVENT_TYPE,
        "id": event_id(notice.user_id, notice.turn_id),
        "user_id": notice.user_id,
        "conversation_id": notice.conversation_id,
        "turn_id": notice.turn_id,
        "finish_reason": notice.finish_reason,
        "text_preview": notice.text[:PREVIEW_CHARS],
        "created_at": created_at_ms,
    }, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True, slots=True)
class _Pending:
    notice: TurnEnded
    ended_monotonic: float
    created_at_ms: int


class _Retry(Exception):
    """One attempt failed in a way worth trying again; ``after_s`` is the receiver's Retry-After."""

    def __init__(self, why: str, after_s: float = 0.0) -> None:
        super().__init__(why)
        self.why = why
        self.after_s = after_s


class _Permanent(Exception):
    """The receiver answered in a way retrying cannot change (a 4xx, a redirect)."""


class WebhookSender:
    """Delivers ``turn.completed`` events for turns that ended with nobody following."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, *, default_url: str | None, secret: str,
                 http: httpx.AsyncClient | None = None, metrics: Metrics | None = None,
                 timeout_s: float = 5.0, max_age_s: float = 600.0, queue_size: int = 1000,
                 max_in_flight: int = 32, first_retry_s: float = 1.0, max_retry_s: float = 60.0) -> None:
        self.redis = redis
        self.keys = keys
        self.default_url = default_url or None
        self.secret = secret
        self.registrations = WebhookRegistrations(redis, keys)
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self.first_retry_s = first_retry_s
        self.max_retry_s = max_retry_s
        self._http = http
        self._owns_http = http is None
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._dispatcher: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        # Events accepted and not yet settled (queued, waiting for a slot, or being delivered).
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @property
    def enabled(self) -> bool:
        """Webhooks need a secret to sign with; without one nothing is ever sent."""
        return bool(self.secret)

    @property
    def pending(self) -> int:
        """Events queued or being delivered."""
        return self._outstanding

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._http is None:
            # Redirects are not followed: a receiver answers where it was registered.
            self._http = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False,
                                           headers={"User-Agent": "rapport"})
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="webhooks")

    async def close(self, flush_s: float = 1.0) -> None:
        """Stop: wait up to ``flush_s`` for what is pending, then give it up (logged)."""
        self._closed = True
        try:
            async with asyncio.timeout(flush_s):
                await self._idle.wait()
        except TimeoutError:
            pass
        abandoned = self.pending
        if abandoned:
            log.warning("shutting down with %d webhook event(s) undelivered; giving them up", abandoned)
        tasks = [*self._deliveries, *([self._dispatcher] if self._dispatcher is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._deliveries.clear()
        self._dispatcher = None
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None
        self._gauge()

    # ------------------------------------------------------------ the observer

    def observe(self, notice: TurnEnded) -> None:
        """``TurnManager.end_observers`` hook: queue a detached end; never blocks."""
        if notice.followed or not self.enabled or self._closed:
            return
        try:
            self._queue.put_nowait(_Pending(notice, time.monotonic(), int(time.time() * 1000)))
        except asyncio.QueueFull:
            self._count("dropped")
            log.warning("webhook queue full; dropped the event of turn %s", notice.turn_id)
        else:
            self._outstanding += 1
            self._idle.clear()
        self._gauge()

    # ------------------------------------------------------------ delivery

    async def _dispatch(self) -> None:
        while True:
            event = await self._queue.get()
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(self._deliver_in_slot(event),
                                                          name=f"webhook {event.notice.turn_id}")
            self._deliveries.add(task)
            task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._outstanding -= 1
        if self._outstanding == 0:
            self._idle.set()
        self._gauge()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery failed unexpectedly", exc_info=task.exception())

    async def _deliver_in_slot(self, event: _Pending) -> None:
        try:
            await self.deliver(event.notice, ended_monotonic=event.ended_monotonic,
                               created_at_ms=event.created_at_ms)
        finally:
            self._slots.release()

    async def deliver(self, notice: TurnEnded, *, ended_monotonic: float, created_at_ms: int) -> str:
        """Deliver one event with retries; the outcome (``delivered``, ``failed``,
        ``duplicate``, ``no_url``) is returned and, except ``no_url``, counted."""
        deadline = ended_monotonic + self.max_age_s
        body = event_body(notice, created_at_ms)
        eid = event_id(notice.user_id, notice.turn_id)
        attempt = 0
        url: str | None = None
        claimed = False
        while True:
            try:
                if url is None:
                    url = await self.registrations.get(notice.user_id) or self.default_url
                    if url is None:
                        return "no_url"
                if not claimed:
                    if not await self._claim(notice, eid):
                        self._count("duplicate")
                        log.info("turn %s: its webhook was already claimed", notice.turn_id)
                        return "duplicate"
                    claimed = True
                await self._attempt(url, body, eid)
                self._count("delivered")
                return "delivered"
            except _Retry as retry:
                why, after_s = retry.why, retry.after_s
            except (RedisError, OSError) as exc:
                # Redis away before the claim: the same backoff, the same deadline.
                why, after_s = f"redis: {exc!r}", 0.0
            except _Permanent as exc:
                self._count("failed")
                log.warning("turn %s: webhook refused by %s: %s; not retried", notice.turn_id, url, exc)
                return "failed"
            delay = max(random.uniform(0.0, min(self.max_retry_s, self.first_retry_s * 2 ** attempt)),
                        min(after_s, self.max_retry_s))
            attempt += 1
            if time.monotonic() + delay > deadline:
                self._count("failed")
                log.warning("turn %s: webhook to %s given up after %d attempt(s) (%s)", notice.turn_id, url,
                            attempt, why)
                return "failed"
            self._count("retried")
            log.info("turn %s: webhook attempt %d failed (%s); retrying in %.1fs", notice.turn_id, attempt,
                     why, delay)
            await asyncio.sleep(delay)

    async def _claim(self, notice: TurnEnded, eid: str) -> bool:
        key = self.keys.user_key(notice.user_id, "hook:" + escape_id(notice.turn_id))
        return bool(await self.redis.set(key, eid, nx=True, ex=CLAIM_TTL_S))

    async def _attempt(self, url: str, body: bytes, eid: str) -> None:
        """One POST; returns when delivered (2xx), else _Retry or _Permanent."""
        assert self._http is not None, "start() creates the client"
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "rapport",
            EVENT_ID_HEADER: eid,
            # A fresh timestamp per attempt, as Stripe does: a receiver's tolerance
            # then bounds replays of one attempt, not the whole retry window.
            SIGNATURE_HEADER: signature_header(self.secret, int(time.time()), body),
        }
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self._http.post(url, content=body, headers=headers)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status}", _retry_after_s(response.headers.get("retry-after")))
        raise _Permanent(f"HTTP {status}")

    # ------------------------------------------------------------ metrics

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook(outcome)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.webhook_pending.set(self.pending)


def _retry_after_s(value: str | None) -> float:
    """``Retry-After`` in seconds (RFC 9110 section 10.2.3); dates and junk count as none."""
    if value is None:
        return 0.0
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return 0.0
