"""Redis outages of any length keep the protocol's guarantees.

A turn that cannot write its deltas or its end to Redis holds ``turn.end``
until Redis has both, so what a client is told is what history keeps, and a
resume from seq 0 always concatenates to ``turn.end.text`` (guarantee 2).
``unavailable`` says when to retry and never names Redis' address.

The end-to-end tests run their own ``redis-server`` on a free port (never the
shared one) so they can stop and kill it. The long outage test pauses it for
``RAPPORT_TEST_OUTAGE_S`` seconds (default 100) under load from two gateways.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import ServerProcess, make_token
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from wire import JSON, open_ws, recv, send

from protocol.errors import Unavailable
from server import coordination
from server.coordination import Coordinator
from server.rest import error_response
from sessions.keys import KeySpace
from sessions.store import ConversationStore, LogDelta, LogEnd
from testkit.metrics import scrape_async
from testkit.redis_server import RedisServer

OUTAGE_S = float(os.environ.get("RAPPORT_TEST_OUTAGE_S", "100"))
BASE_FLAGS = ["--engine", "simulated", "--auth", "dev", "--sim-ttft-ms", "20", "--turns-per-minute", "100000",
              "--sim-reply-tokens", "1000"]


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    rp = RedisServer(appendfsync="everysec")
    rp.start()
    yield rp
    rp.cleanup()


@pytest.fixture
def gateways(private_redis: RedisServer) -> Iterator[Callable[..., list[ServerProcess]]]:
    started: list[ServerProcess] = []

    def make(*flags: str, count: int = 1) -> list[ServerProcess]:
        prefix = f"rapport-outage:{uuid.uuid4().hex[:10]}:"
        procs = [ServerProcess(prefix=prefix, extra=[*BASE_FLAGS, *flags], redis_url=private_redis.url)
                 for _ in range(count)]
        started.extend(procs)
        for p in procs:
            p.start(wait_ready=False)
        for p in procs:
            p.wait_ready(90)
        return procs

    yield make
    for p in started:
        p.stop()


def assert_says_when_and_not_where(error: dict[str, Any], redis_port: int) -> None:
    """An ``unavailable`` answer: when to retry, and nothing about where Redis is."""
    assert error["code"] == "unavailable", error
    assert isinstance(error.get("retry_after_ms"), int) and error["retry_after_ms"] > 0, error
    text = json.dumps(error)
    assert str(redis_port) not in text and "127.0.0.1" not in text and "Error " not in text, error


async def next_frame(ws, timeout: float, skip: tuple[str, ...] = ("ping", "pong")) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(ws, max(0.05, deadline - time.monotonic()))
        if frame["type"] not in skip:
            return frame


async def keep_alive(ws, every: float = 5.0) -> None:
    """Protocol pings, so the server's heartbeat timeout never closes a waiting client."""
    n = 0
    while True:
        n += 1
        try:
            await send(ws, {"type": "ping", "t": n})
        except ConnectionClosed:
            return
        await asyncio.sleep(every)


# ---------------------------------------------------------------- units


def test_every_503_body_says_when_to_retry() -> None:
    for exc in (Unavailable("the engine is away"), Unavailable("later", retry_after_ms=2500)):
        response = error_response(exc)
        assert response.status_code == 503
        body = json.loads(bytes(response.body))["error"]
        assert body["code"] == "unavailable"
        assert body["retry_after_ms"] == exc.fields.get("retry_after_ms", 1000)
        assert int(response.headers["Retry-After"]) >= 1


def test_a_stalled_redis_counts_as_an_outage_for_reaping(monkeypatch: pytest.MonkeyPatch) -> None:
    # A paused Redis answers a query sent during the pause once it resumes,
    # without any command failing; leases ran out meanwhile, and their owners
    # have not had a chance to renew. The reaper must wait a whole lease again.
    clock = [1000.0]
    monkeypatch.setattr(coordination.time, "monotonic", lambda: clock[0])
    r = aioredis.Redis()
    coordinator = Coordinator(redis=r, pubsub_redis=r, keys=KeySpace("x:"),
                              store=ConversationStore(r, KeySpace("x:")), owner="me", lease_ms=3000,
                              live_turns=list, on_control=lambda op, user, turn: None)

    def reap_answers_at(t: float) -> bool:
        clock[0] = t
        return coordinator._settled()

    assert [reap_answers_at(1000 + 0.75 * k) for k in range(5)] == [False, False, False, False, True]
    # The next answer comes 10 s later (a stall), and no command failed.
    assert [reap_answers_at(1013 + 0.75 * k) for k in range(5)] == [False, False, False, False, True]


# ---------------------------------------------------------------- end to end


async def test_unavailable_says_when_to_retry_and_never_names_redis(gateways, private_redis) -> None:
    (srv,) = gateways()
    user = f"addr-{uuid.uuid4().hex[:8]}"
    ws = await open_ws(srv, user=user)
    private_redis.kill()  # connections are refused at once: the error text would name host:port
    try:
        await send(ws, {"type": "history.get"})
        assert_says_when_and_not_where(await next_frame(ws, 20), private_redis.port)
        await send(ws, {"type": "turn.start", "client_turn_id": "c1", "text": "hi"})
        frame = await next_frame(ws, 20)
        assert_says_when_and_not_where(frame, private_redis.port)
        assert frame["client_turn_id"] == "c1"
        await send(ws, {"type": "turn.resume", "turn_id": "t_x", "after_seq": 0})
        assert_says_when_and_not_where(await next_frame(ws, 20), private_redis.port)
    finally:
        await ws.close()
    token = make_token(user)
    async with httpx.AsyncClient(base_url=srv.base, headers={"authorization": f"Bearer {token}"}) as http:
        for method, path in (("GET", "/v1/conversations"), ("GET", "/v1/conversations/default/messages"),
                             ("DELETE", "/v1/conversations/default")):
            response = await http.request(method, path, timeout=20)
            assert response.status_code == 503, (path, response.text)
            assert_says_when_and_not_where(response.json()["error"], private_redis.port)
            assert int(response.headers["Retry-After"]) >= 1
    # The outage shows on /metrics (the dashboard's Redis panel reads it).
    samples = await scrape_async(srv.base)
    assert samples['rapport_redis_failures_total{kind="unavailable"}'] >= 4, samples


async def test_a_phone_that_connects_while_redis_is_stalled_still_gets_ready(gateways, private_redis) -> None:
    """A paused Redis answers nothing (no reset, no error); the handshake must not wait on it past
    the deadline before ``ready``: the phone gets ``ready`` with an ``unavailable`` saying when to retry."""
    (srv,) = gateways()
    private_redis.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        ws = await connect(srv.ws_url, subprotocols=[JSON])
        try:
            await send(ws, {"type": "hello", "user": f"stalled-{uuid.uuid4().hex[:8]}"})
            first = await next_frame(ws, 20)
            assert_says_when_and_not_where(first, private_redis.port)
            ready = await next_frame(ws, 20)
            assert ready["type"] == "ready", ready
            assert ready["active_turns"] == []
            # A bound on correctness (inside the hello deadline), not a performance figure.
            assert time.monotonic() - started < 8.0
        finally:
            await ws.close()
    finally:
        private_redis.signal(signal.SIGCONT)


@dataclass
class TurnSeen:
    """One turn as its client saw it."""

    user: str
    gateway: int
    turn_id: str
    accepted_at: float
    replayed: bool
    deltas: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    ended_at: float = 0.0


@pytest.mark.timeout(int(OUTAGE_S) + 300)
async def test_a_long_redis_outage_under_load_keeps_every_turn_whole_and_as_history_has_it(
        gateways, private_redis) -> None:
    itl_s = 0.2
    # A short lease: leases run out early in the outage, so reaping after it is exercised.
    servers = gateways("--sim-itl-ms", str(int(itl_s * 1000)), "--lease-ms", "3000", count=2)
    users = [f"load{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
    # Two users start one turn that streams through the whole outage and past it;
    # the others chat in short turns, which end (and must wait) during the outage.
    long_tokens = int((OUTAGE_S + 15) / itl_s)
    short_tokens = 40
    seen: list[TurnSeen] = []
    errors: list[dict[str, Any]] = []
    outage: dict[str, float] = {}

    async def one_turn(ws, user: str, gateway: int, client_turn_id: str, max_tokens: int) -> TurnSeen:
        while True:
            await send(ws, {"type": "turn.start", "client_turn_id": client_turn_id, "text": f"say {max_tokens}",
                            "options": {"max_tokens": max_tokens}})
            frame = await next_frame(ws, 60)
            if frame["type"] == "error":
                errors.append(frame)
                assert_says_when_and_not_where(frame, private_redis.port)
                await asyncio.sleep(frame["retry_after_ms"] / 1000.0)
                continue  # the same client_turn_id: at most one turn results
            assert frame["type"] == "turn.accepted", frame
            break
        turn = TurnSeen(user=user, gateway=gateway, turn_id=frame["turn_id"], accepted_at=time.monotonic(),
                        replayed=frame["replayed"])
        seen.append(turn)
        while True:
            frame = await next_frame(ws, OUTAGE_S + 120)
            if frame["type"] == "turn.delta":
                turn.deltas.append(frame)
            elif frame["type"] == "turn.end":
                turn.end, turn.ended_at = frame, time.monotonic()
                return turn
            else:
                # Only a turn followed through its log (a replay) can lose its reader to Redis.
                assert frame["type"] == "error", frame
                errors.append(frame)
                assert_says_when_and_not_where(frame, private_redis.port)
                await asyncio.sleep(frame["retry_after_ms"] / 1000.0)
                last = turn.deltas[-1]["seq"] if turn.deltas else 0
                await send(ws, {"type": "turn.resume", "turn_id": turn.turn_id, "after_seq": last})

    async def chat(i: int) -> None:
        user, gateway = users[i], i % 2
        ws = await open_ws(servers[gateway], user=user)
        pinger = asyncio.create_task(keep_alive(ws))
        try:
            n = 0
            while True:
                n += 1
                tokens = long_tokens if i < 2 and n == 1 else short_tokens
                turn = await one_turn(ws, user, gateway, f"{user}-{n}", tokens)
                if "end" in outage and turn.accepted_at > outage["end"]:
                    return  # one whole turn after the outage, then done
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            await ws.close()

    async def probe(ws) -> int:
        """During the outage, new turns and history reads are refused with when to retry."""
        pinger = asyncio.create_task(keep_alive(ws))
        answered = 0
        try:
            while "end" not in outage:
                for frame in ({"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": "hi",
                               "conversation_id": "probe"}, {"type": "history.get", "conversation_id": "probe"}):
                    await send(ws, frame)
                    error = await next_frame(ws, 60)
                    if "end" in outage:
                        return answered  # Redis answered this one
                    errors.append(error)
                    assert_says_when_and_not_where(error, private_redis.port)
                    answered += 1
                    await asyncio.sleep(error["retry_after_ms"] / 1000.0)
            return answered
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            await ws.close()

    # Connected before the outage: a handshake needs Redis (the user's active turns).
    probers = [await open_ws(servers[g], user=f"probe{g}-{uuid.uuid4().hex[:6]}") for g in range(2)]
    chatting = asyncio.gather(*(chat(i) for i in range(len(users))))
    await asyncio.sleep(4.0)  # every user has a turn streaming
    private_redis.signal(signal.SIGSTOP)
    outage["start"] = time.monotonic()
    probing = asyncio.gather(*(probe(ws) for ws in probers))
    await asyncio.sleep(OUTAGE_S)
    private_redis.signal(signal.SIGCONT)
    outage["end"] = time.monotonic()
    await asyncio.wait_for(chatting, 180)
    assert sum(await asyncio.wait_for(probing, 60)) >= 2
    for server in servers:
        assert server.alive(), server.log()

    # Every turn, resumed from seq 0 on the other gateway, and as history holds it.
    r = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    store = ConversationStore(r, KeySpace(servers[0].prefix))
    resumers = {u: await open_ws(servers[1 - i % 2], user=u) for i, u in enumerate(users)}
    try:
        for turn in seen:
            assert turn.end is not None
            told = (turn.end["finish_reason"], turn.end["text"])
            live = [d["seq"] for d in turn.deltas]
            if not turn.replayed:
                assert live == list(range(1, len(live) + 1)), (turn.turn_id, live)
                assert "".join(d["text"] for d in turn.deltas) == turn.end["text"], turn.turn_id
            ws = resumers[turn.user]
            await send(ws, {"type": "turn.resume", "turn_id": turn.turn_id, "after_seq": 0})
            replayed: list[dict[str, Any]] = []
            while True:
                frame = await next_frame(ws, 20)
                assert frame["type"] in ("turn.delta", "turn.end"), frame
                if frame["type"] == "turn.end":
                    break
                replayed.append(frame)
            assert [d["seq"] for d in replayed] == list(range(1, len(replayed) + 1)), turn.turn_id
            assert "".join(d["text"] for d in replayed) == frame["text"] == turn.end["text"], turn.turn_id
            assert frame["seq"] == len(replayed) and frame["finish_reason"] == turn.end["finish_reason"]
            log = await store.read_log(user_id=turn.user, turn_id=turn.turn_id, after_seq=0)
            assert isinstance(log[-1], LogEnd) and all(isinstance(e, LogDelta) for e in log[:-1])
            record = await store.get_turn(user_id=turn.user, turn_id=turn.turn_id)
            assert record is not None and record.status == "ended"
            assert (record.finish_reason, record.text) == told, turn.turn_id
            history = await store.history(user_id=turn.user, conversation_id="default", limit=100)
            kept = [(m.status, m.text) for m in history if m.role == "assistant" and m.turn_id == turn.turn_id]
            assert kept == [told], (turn.turn_id, kept, told)
        for user in users:
            assert await store.active_turns(user_id=user) == []
    finally:
        for ws in resumers.values():
            await ws.close()
        await r.aclose()

    start, end = outage["start"], outage["end"]
    spanning = [t for t in seen if t.accepted_at < start and t.ended_at > end]
    after = [t for t in seen if t.accepted_at > end]
    refused = [e for e in errors if e["code"] == "unavailable"]
    summary = (f"{len(seen)} turns checked (live deltas, resume from 0 on the other gateway, history): "
               f"{len(spanning)} streaming when Redis stopped for {OUTAGE_S:.0f} s and ending after it, "
               f"{len(after)} started after it; {len(refused)} unavailable answers, all with retry_after_ms")
    print("\n" + summary)
    assert len(spanning) >= len(users) and len(after) >= len(users), summary
    # Streaming through the outage cost no turn its reply: each ran its full length.
    assert all(t.end is not None and t.end["finish_reason"] == "length" for t in spanning), summary
