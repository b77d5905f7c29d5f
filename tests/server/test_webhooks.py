"""server/webhooks.py and server/webhook_api.py: push when a reply finishes in the
background (docs/protocol.md addition 23).

Deliveries go to a real HTTP receiver in this process (``asyncio.start_server``
with a small HTTP/1.1 parser) that checks every signature with the secret.
End to end: two real gateway processes sharing a Redis prefix, the simulated
engine, sockets dropped mid-reply so turns end while detached. In process:
:class:`WebhookSender` on the real Redis for what needs short retry windows
(a receiver that is down, refusals, the claim between two senders, a full queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import REDIS_URL, ServerProcess, clean_prefix, make_token
from wire import open_ws, recv, send

from protocol import client_frames
from protocol.errors import BadRequest
from protocol.webhook_signature import DEVELOPMENT_SECRET, EVENT_ID_HEADER, SIGNATURE_HEADER, verify
from server.config import ConfigError, Settings
from server.metrics import Metrics
from server.turns import TurnEnded
from server.webhooks import PREVIEW_CHARS, WebhookSender, check_user_url
from sessions.keys import KeySpace
from testkit.metrics import scrape_async
from testkit.servers import running

pytestmark = pytest.mark.timeout(180)

SECRET = "webhook-test-secret-" + "w" * 32


# ---------------------------------------------------------------- a real receiver


@dataclass
class Attempt:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 that records every POST and checks its signature.

    Each event (by its id header) is answered 500 for its first ``fail_first``
    attempts, then ``status``; a request whose signature does not verify is
    answered 400 (and recorded as unverified).
    """

    fail_first: int = 2
    status: int = 200
    attempts: list[Attempt] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> Receiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def for_turn(self, turn_id: str) -> list[Attempt]:
        return [a for a in self.attempts if a.verified and a.event.get("turn_id") == turn_id]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on the connection
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                ok = verify(SECRET, headers.get(SIGNATURE_HEADER.lower()), body, tolerance_s=60, now=time.time())
                event_id = headers.get(EVENT_ID_HEADER.lower(), "")
                earlier = sum(1 for a in self.attempts if a.headers.get(EVENT_ID_HEADER.lower()) == event_id)
                status = 400 if not ok or method != "POST" else 500 if earlier < self.fail_first else self.status
                self.attempts.append(Attempt(path, headers, body, ok, status))
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


def unused_port() -> int:
    """A port nobody listens on (bound, then released): connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(predicate, timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- end to end: two gateways


GATEWAY_FLAGS = ["--engine", "simulated", "--auth", "dev", "--sim-ttft-ms", "20", "--sim-itl-ms", "20",
                 "--sim-reply-tokens", "400", "--detached-grace-ms", "30000", "--turns-per-minute", "100000"]


@contextlib.contextmanager
def gateways(count: int, *flags: str) -> Iterator[list[ServerProcess]]:
    prefix = f"rapport-hook:{uuid.uuid4().hex[:10]}:"
    procs = [ServerProcess(prefix=prefix, extra=[*GATEWAY_FLAGS, *flags]) for _ in range(count)]
    try:
        with running(*procs):
            yield procs
    finally:
        clean_prefix(prefix)


async def detached_turn(server: ServerProcess, user: str, max_tokens: int = 60) -> str:
    """Start a turn, read its first delta, drop the socket: the turn goes on, detached, to its end."""
    ws = await open_ws(server, user=user)
    await send(ws, client_frames.turn_start("tell me a story", options={"max_tokens": max_tokens}))
    turn_id = None
    while True:
        frame = await recv(ws, 10)
        if frame["type"] == "turn.accepted":
            turn_id = frame["turn_id"]
        elif frame["type"] == "turn.delta":
            break
        else:
            assert frame["type"] in ("ping", "pong", "history"), frame
    ws.transport.abort()  # the network drops: no close frame
    assert turn_id is not None
    return turn_id


async def followed_turn(server: ServerProcess, user: str) -> str:
    ws = await open_ws(server, user=user)
    await send(ws, client_frames.turn_start("short one", options={"max_tokens": 5}))
    turn_id = None
    while True:
        frame = await recv(ws, 10)
        if frame["type"] == "turn.accepted":
            turn_id = frame["turn_id"]
        elif frame["type"] == "turn.end":
            break
    await ws.close()
    assert turn_id is not None
    return turn_id


def rest(server: ServerProcess, user: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base, timeout=10,
                             headers={"Authorization": f"Bearer {make_token(user)}"})


async def webhook_counts(*servers: ServerProcess) -> dict[str, float]:
    totals: dict[str, float] = {}
    for server in servers:
        for key, value in (await scrape_async(server.base)).items():
            if key.startswith("rapport_webhook_deliveries_total{"):
                outcome = key.split('"')[1]
                totals[outcome] = totals.get(outcome, 0.0) + value
    return totals


async def test_detached_turns_on_two_gateways_are_each_delivered_once_after_two_failures(receiver):
    run = uuid.uuid4().hex[:6]
    with gateways(2, "--webhook-url", receiver.url("/hook"), "--webhook-secret", SECRET) as (a, b):
        # One user registers their own URL; it takes precedence over --webhook-url.
        own = f"hook-own-{run}"
        async with rest(a, own) as http:
            resp = await http.put("/v1/users/me/webhook", json={"url": receiver.url("/own")})
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"url": receiver.url("/own")}

        followed = await followed_turn(a, f"hook-followed-{run}")
        started = await asyncio.gather(
            detached_turn(a, f"hook-a1-{run}"), detached_turn(a, f"hook-a2-{run}"),
            detached_turn(b, f"hook-b1-{run}"), detached_turn(b, f"hook-b2-{run}"),
            detached_turn(b, own))
        # 60 tokens at 20 ms (~1.2 s), then three attempts with backoff of at most 1 s + 2 s.
        await wait_until(lambda: all(any(x.status == 200 for x in receiver.for_turn(t)) for t in started), 30)
        await asyncio.sleep(2.0)  # time for any duplicate to show up

        assert all(x.verified for x in receiver.attempts), [x for x in receiver.attempts if not x.verified]
        for turn_id in started:
            attempts = receiver.for_turn(turn_id)
            assert [x.status for x in attempts] == [500, 500, 200], (turn_id, attempts)
            # One event: the same id and body on every attempt.
            assert len({x.body for x in attempts}) == 1
            event = attempts[0].event
            assert {x.headers[EVENT_ID_HEADER.lower()] for x in attempts} == {event["id"]}
            assert event["type"] == "turn.completed" and event["turn_id"] == turn_id
            assert event["conversation_id"] == "default"
            assert event["finish_reason"] == "length"
            assert 0 < len(event["text_preview"]) <= PREVIEW_CHARS
            assert isinstance(event["created_at"], int)
            assert attempts[0].headers["content-type"] == "application/json"
            assert attempts[0].headers["user-agent"] == "rapport"
            assert attempts[0].path == ("/own" if event["user_id"] == own else "/hook")
        assert sorted(receiver.for_turn(t)[0].event["user_id"] for t in started) == sorted(
            [f"hook-a1-{run}", f"hook-a2-{run}", f"hook-b1-{run}", f"hook-b2-{run}", own])
        # A turn followed to its end sends nothing.
        assert receiver.for_turn(followed) == []
        assert len(receiver.attempts) == 3 * len(started)

        # The stored reply starts with the preview.
        async with rest(a, f"hook-a1-{run}") as http:
            history = (await http.get("/v1/conversations/default/messages")).json()["messages"]
        assert history[-1]["text"].startswith(receiver.for_turn(started[0])[0].event["text_preview"])

        counts = await webhook_counts(a, b)
        assert counts == {"delivered": 5, "retried": 10, "failed": 0, "dropped": 0, "duplicate": 0}


async def test_registration_over_rest(receiver):
    run = uuid.uuid4().hex[:6]
    with gateways(1) as (server,):
        user = f"hook-rest-{run}"
        async with rest(server, user) as http:
            assert (await http.get("/v1/users/me/webhook")).status_code == 404
            for bad in ["ftp://127.0.0.1/x", "http://example.com/hook", "https://user:pw@example.com/hook",
                        "not a url", "https://", "", 42, "https://example.com/" + "x" * 3000]:
                resp = await http.put("/v1/users/me/webhook", json={"url": bad})
                assert resp.status_code == 400, (bad, resp.text)
                assert resp.json()["error"]["code"] == "bad_request"
            assert (await http.put("/v1/users/me/webhook", content=b"[]")).status_code == 400
            assert (await http.get("/v1/users/me/webhook")).status_code == 404

            url = "https://push.example.com/rapport?app=1"
            resp = await http.put("/v1/users/me/webhook", json={"url": url})
            assert resp.status_code == 200 and resp.json() == {"url": url}
            assert (await http.get("/v1/users/me/webhook")).json() == {"url": url}
            resp = await http.delete("/v1/users/me/webhook")
            assert resp.status_code == 204 and resp.content == b""
            assert (await http.get("/v1/users/me/webhook")).status_code == 404
            assert (await http.delete("/v1/users/me/webhook")).status_code == 204

            # Erasing the user erases their registration.
            assert (await http.put("/v1/users/me/webhook", json={"url": url})).status_code == 200
            assert (await http.delete("/v1/users/me")).status_code == 200
            assert (await http.get("/v1/users/me/webhook")).status_code == 404
        async with httpx.AsyncClient(base_url=server.base) as anonymous:
            assert (await anonymous.get("/v1/users/me/webhook")).status_code == 401


# ---------------------------------------------------------------- in process: the sender on real Redis


@pytest.fixture
async def redis_keys(redis_url) -> AsyncIterator[tuple[aioredis.Redis, KeySpace]]:
    prefix = f"rapport-hook-unit:{uuid.uuid4().hex[:10]}:"
    r = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield r, KeySpace(prefix)
    await r.aclose()
    clean_prefix(prefix)


def notice(turn_id: str | None = None, *, followed: bool = False, text: str = "x" * 500) -> TurnEnded:
    return TurnEnded(user_id="u-" + uuid.uuid4().hex[:6], conversation_id="c1",
                     turn_id=turn_id or "t_" + uuid.uuid4().hex[:12], finish_reason="stop", text=text,
                     followed=followed)


def sender(redis_keys, url: str | None, **kw) -> WebhookSender:
    r, keys = redis_keys
    kw.setdefault("first_retry_s", 0.05)
    kw.setdefault("max_retry_s", 0.2)
    kw.setdefault("timeout_s", 2.0)
    return WebhookSender(r, keys, default_url=url, secret=SECRET, metrics=Metrics(), **kw)


def count(s: WebhookSender, outcome: str) -> float:
    assert s.metrics is not None
    return s.metrics.webhook_deliveries.labels(outcome)._value.get()


async def test_a_receiver_that_is_down_is_retried_then_given_up(redis_keys):
    s = sender(redis_keys, f"http://127.0.0.1:{unused_port()}/hook", max_age_s=1.0)
    s.start()
    try:
        began = time.monotonic()
        s.observe(notice())
        assert s.pending == 1
        await wait_until(lambda: count(s, "failed") == 1, 10)
        # Given up once the next wait would pass the age limit: not before it, not long after.
        assert 0.5 < time.monotonic() - began < 5
        assert count(s, "retried") >= 2
        assert count(s, "delivered") == 0
        await wait_until(lambda: s.pending == 0, 2)
    finally:
        await s.close()


@pytest.mark.parametrize("status, attempts", [(400, 1), (410, 1), (302, 1)])
async def test_a_refusal_is_permanent(redis_keys, receiver, status, attempts):
    receiver.fail_first, receiver.status = 0, status
    s = sender(redis_keys, receiver.url())
    s.start()
    try:
        s.observe(notice())
        await wait_until(lambda: count(s, "failed") == 1, 10)
        await asyncio.sleep(0.3)
        assert len(receiver.attempts) == attempts and count(s, "retried") == 0
    finally:
        await s.close()


@pytest.mark.parametrize("status", [408, 429, 503])
async def test_timeouts_throttling_and_server_errors_are_retried(redis_keys, receiver, status):
    receiver.fail_first, receiver.status = 0, status
    s = sender(redis_keys, receiver.url(), max_age_s=0.8)
    s.start()
    try:
        s.observe(notice())
        await wait_until(lambda: count(s, "failed") == 1, 10)
        assert len(receiver.attempts) >= 2 and count(s, "retried") == len(receiver.attempts) - 1
        assert {a.status for a in receiver.attempts} == {status}
    finally:
        await s.close()


async def test_two_senders_deliver_one_turn_once(redis_keys, receiver):
    """Two processes that both saw the end (a retry after a crash, say): the Redis claim lets one send."""
    receiver.fail_first = 0
    first, second = sender(redis_keys, receiver.url()), sender(redis_keys, receiver.url())
    first.start()
    second.start()
    try:
        ended = notice()
        first.observe(ended)
        second.observe(ended)
        await wait_until(lambda: first.pending == 0 and second.pending == 0, 10)
        assert len(receiver.attempts) == 1 and receiver.attempts[0].verified
        assert count(first, "delivered") + count(second, "delivered") == 1
        assert count(first, "duplicate") + count(second, "duplicate") == 1
        assert receiver.attempts[0].event["text_preview"] == "x" * PREVIEW_CHARS
    finally:
        await first.close()
        await second.close()


async def test_followed_turns_and_turns_without_a_url_send_nothing(redis_keys, receiver):
    receiver.fail_first = 0
    s = sender(redis_keys, None)
    s.start()
    try:
        s.observe(notice(followed=True))
        assert s.pending == 0
        s.observe(notice())  # no --webhook-url and no registration
        await wait_until(lambda: s.pending == 0, 5)
        # A registration applies to that user only.
        registered = notice()
        await s.registrations.put(registered.user_id, receiver.url("/mine"))
        s.observe(registered)
        await wait_until(lambda: s.pending == 0, 5)
        assert [(a.path, a.event["user_id"]) for a in receiver.attempts] == [("/mine", registered.user_id)]
        assert count(s, "delivered") == 1
    finally:
        await s.close()


async def test_a_full_queue_drops_and_counts(redis_keys):
    s = sender(redis_keys, "http://127.0.0.1:1/never", queue_size=2)  # not started: nothing drains the queue
    for _ in range(5):
        s.observe(notice())
    assert s.pending == 2 and count(s, "dropped") == 3
    began = time.monotonic()
    await s.close(flush_s=0.1)
    assert time.monotonic() - began < 2


async def test_close_gives_up_pending_deliveries_without_waiting_for_them(redis_keys):
    s = sender(redis_keys, f"http://127.0.0.1:{unused_port()}/hook", max_age_s=600, first_retry_s=5)
    s.start()
    s.observe(notice())
    await asyncio.sleep(0.2)  # the first attempt failed; the delivery now waits to retry
    began = time.monotonic()
    await s.close(flush_s=0.2)
    assert time.monotonic() - began < 2
    assert count(s, "delivered") == 0 and count(s, "failed") == 0


async def test_a_missing_secret_disables_the_sender(redis_keys):
    r, keys = redis_keys
    s = WebhookSender(r, keys, default_url="https://example.com/hook", secret="", metrics=Metrics())
    s.observe(notice())
    assert not s.enabled and s.pending == 0


# ---------------------------------------------------------------- URL rules and flags


@pytest.mark.parametrize("url, server_host, ok", [
    ("https://push.example.com/hook", "0.0.0.0", True),
    ("https://push.example.com:8443/hook?x=1", "10.0.0.5", True),
    ("http://push.example.com/hook", "0.0.0.0", False),
    ("http://127.0.0.1:9000/hook", "127.0.0.1", True),
    ("http://localhost:9000/hook", "127.0.0.1", True),
    ("http://127.0.0.1:9000/hook", "0.0.0.0", False),
    ("https://127.0.0.1/hook", "0.0.0.0", False),
    ("https://localhost/hook", "0.0.0.0", False),
    ("https://10.1.2.3/hook", "0.0.0.0", False),
    ("https://169.254.169.254/latest", "0.0.0.0", False),
    ("https://[::1]/hook", "0.0.0.0", False),
    ("https://user:secret@push.example.com/hook", "127.0.0.1", False),
    ("https://token@push.example.com/hook", "127.0.0.1", False),
    ("ftp://push.example.com/hook", "127.0.0.1", False),
    ("https:///hook", "127.0.0.1", False),
    ("https://push.example.com:notaport/", "127.0.0.1", False),
])
def test_user_urls(url: str, server_host: str, ok: bool) -> None:
    if ok:
        assert check_user_url(url, server_host=server_host) == url
    else:
        with pytest.raises(BadRequest):
            check_user_url(url, server_host=server_host)


def settings(**kw) -> Settings:
    kw.setdefault("jwt_secret", "j" * 48)
    s = Settings(**kw)
    s.validate()
    return s


def test_flags() -> None:
    # On loopback a development secret stands in; off loopback webhooks need a real one.
    assert settings(webhook_url="http://127.0.0.1:9/hook").webhook_signing_secret() == DEVELOPMENT_SECRET
    assert settings(host="0.0.0.0").webhook_signing_secret() == ""
    assert settings(host="0.0.0.0", webhook_secret=SECRET).webhook_signing_secret() == SECRET
    with pytest.raises(ConfigError, match="--webhook-secret"):
        settings(host="0.0.0.0", webhook_url="https://push.example.com/hook")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        settings(host="0.0.0.0", webhook_secret="short")
    with pytest.raises(ConfigError, match="public"):
        settings(host="0.0.0.0", webhook_secret=DEVELOPMENT_SECRET)
    assert settings(host="0.0.0.0", webhook_secret=SECRET, webhook_url="https://push.example.com/h").webhook_url
    for bad in ["http://push.example.com/hook", "https://u:p@push.example.com/hook", "push.example.com",
                "ftp://push.example.com/"]:
        with pytest.raises(ConfigError, match="--webhook-url"):
            settings(webhook_url=bad)
    with pytest.raises(ConfigError, match="--webhook-timeout-s"):
        settings(webhook_timeout_s=0)
