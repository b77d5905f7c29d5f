"""Resilience end to end: detached grace, process death, shutdown, Redis outages,
heartbeats and expired delta logs (protocol guarantees 1-3 and 7).

Every test starts its own real server process(es) with the flags it needs;
the Redis outage test also runs its own ``redis-server`` (append-only file,
fsync on every write) so it can kill and restart it. Time bounds here are
correctness bounds with generous slack for a loaded machine, never
performance claims.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from conftest import REDIS_URL, ServerProcess, clean_prefix
from websockets.exceptions import ConnectionClosed
from wire import open_ws, recv, send

from sessions.keys import KeySpace
from sessions.store import ConversationStore
from testkit.metrics import scrape_async
from testkit.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)

BASE_FLAGS = ["--engine", "simulated", "--auth", "dev", "--sim-ttft-ms", "20",
              "--turns-per-minute", "100000"]
LONG_REPLY = ["--sim-itl-ms", "50", "--sim-reply-tokens", "400"]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def spawn(redis_url) -> Iterator[Callable[..., list[ServerProcess]]]:
    """Start ``count`` server processes sharing a fresh prefix; all stopped afterwards."""
    started: list[ServerProcess] = []
    prefixes: list[tuple[str, str]] = []

    def make(*flags: str, count: int = 1, redis: str = REDIS_URL) -> list[ServerProcess]:
        prefix = f"rapport-resil:{uuid.uuid4().hex[:10]}:"
        prefixes.append((prefix, redis))
        procs = [ServerProcess(prefix=prefix, extra=[*BASE_FLAGS, *flags], redis_url=redis)
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
    for prefix, url in prefixes:
        try:
            clean_prefix(prefix, url)
        except redis.RedisError:
            pass  # a private Redis that is already gone


def store_for(server: ServerProcess) -> tuple[aioredis.Redis, ConversationStore]:
    r = aioredis.Redis.from_url(server.redis_url, decode_responses=True)
    return r, ConversationStore(r, KeySpace(server.prefix))


def user_name(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


async def next_frame(ws, timeout: float = 10.0, skip: tuple[str, ...] = ("ping", "pong")) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(ws, max(0.05, deadline - time.monotonic()))
        if frame["type"] not in skip:
            return frame


async def until_end(ws, timeout: float = 30.0) -> list[dict]:
    """Frames (heartbeats left out) up to and including the next turn.end."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await next_frame(ws, max(0.05, deadline - time.monotonic()))
        out.append(frame)
        if frame["type"] == "turn.end":
            return out


def deltas_of(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "turn.delta"]


def assert_whole(deltas: list[dict], end: dict) -> None:
    """Guarantee 2 over everything one client received for a turn, across sockets."""
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == end["text"]
    assert end["seq"] == len(deltas)


async def start_turn(ws, text: str, max_tokens: int, conversation_id: str = "default",
                     client_turn_id: str | None = None) -> dict:
    await send(ws, {"type": "turn.start", "client_turn_id": client_turn_id or uuid.uuid4().hex,
                    "text": text, "conversation_id": conversation_id,
                    "options": {"max_tokens": max_tokens}})
    accepted = await next_frame(ws)
    assert accepted["type"] == "turn.accepted", accepted
    return accepted


async def read_deltas(ws, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        frame = await next_frame(ws)
        assert frame["type"] == "turn.delta", frame
        out.append(frame)
    return out


async def keep_alive(ws, every: float = 0.2) -> None:
    """Ping the server so a short heartbeat timeout does not close this socket."""
    n = 0
    while True:
        n += 1
        try:
            await send(ws, {"type": "ping", "t": n})
        except ConnectionClosed:
            return
        await asyncio.sleep(every)


async def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def metric(server: ServerProcess, name: str) -> float:
    samples = await scrape_async(server.base)
    assert name in samples, f"{name} not in /metrics"
    return samples[name]


# ---------------------------------------------------------------- guarantee 3: detached grace


async def test_a_dropped_turn_nobody_resumes_is_interrupted_after_the_grace(spawn):
    (srv,) = spawn("--detached-grace-ms", "1000", *LONG_REPLY)
    user = user_name("grace-drop")
    ws = await open_ws(srv, user=user)
    accepted = await start_turn(ws, "tell me a long story", max_tokens=400)
    got = await read_deltas(ws, 3)
    ws.transport.abort()  # the network drops: no close frame
    dropped_ms = time.time() * 1000
    assert await metric(srv, "rapport_engine_running_requests") == 1

    r, store = store_for(srv)
    try:
        async def ended():
            rec = await store.get_turn(user_id=user, turn_id=accepted["turn_id"])
            return rec if rec is not None and rec.status == "ended" else None

        record = await wait_for(ended, timeout=15)
        assert record.finish_reason == "interrupted"
        # Not before the grace period; long before the 20 s reply would have finished.
        assert record.ended_at_ms - dropped_ms >= 950, record.ended_at_ms - dropped_ms
        assert record.ended_at_ms - dropped_ms < 15_000
        held = "".join(d["text"] for d in got)
        assert record.text.startswith(held) and len(record.text) > len(held)
        history = await store.history(user_id=user, conversation_id="default")
        assert [(m.role, m.status) for m in history] == [("user", "complete"), ("assistant", "interrupted")]
        assert history[-1].text == record.text and history[-1].turn_id == accepted["turn_id"]
    finally:
        await r.aclose()

    # The engine slot is free again.
    async def idle():
        return await metric(srv, "rapport_engine_running_requests") == 0

    await wait_for(idle, timeout=5)

    # The ended turn still resumes exactly: the rest of its deltas, then its end.
    ws2 = await open_ws(srv, user=user)
    await send(ws2, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": 3})
    rest = await until_end(ws2)
    end = rest[-1]
    assert end["finish_reason"] == "interrupted"
    assert_whole(got + deltas_of(rest), end)
    await ws2.close()


async def test_a_turn_resumed_within_the_grace_completes(spawn):
    (srv,) = spawn("--detached-grace-ms", "1000", *LONG_REPLY)
    user = user_name("grace-resume")
    ws = await open_ws(srv, user=user)
    # 60 tokens at 50 ms: about 3 s, well past the 1 s grace.
    accepted = await start_turn(ws, "a medium story please", max_tokens=60)
    got = await read_deltas(ws, 4)
    ws.transport.abort()
    await asyncio.sleep(0.5)
    ws2 = await open_ws(srv, user=user)
    await send(ws2, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": got[-1]["seq"]})
    rest = await until_end(ws2)
    end = rest[-1]
    assert end["finish_reason"] in ("stop", "length"), end
    assert_whole(got + deltas_of(rest), end)
    assert end["seq"] == 60
    await ws2.close()


async def test_the_grace_counts_followers_on_every_process(spawn):
    """A turn followed only from another process is not abandoned; once that
    follower drops too, the owner ends it after the grace period."""
    a, b = spawn("--detached-grace-ms", "1000", *LONG_REPLY, count=2)
    r, store = store_for(a)
    try:
        # 1. Dropped on A, resumed on B inside the grace, followed there to its end (~3 s).
        user = user_name("grace-cross")
        on_a = await open_ws(a, user=user)
        accepted = await start_turn(on_a, "a medium story", max_tokens=60)
        got = await read_deltas(on_a, 3)
        on_a.transport.abort()
        on_b = await open_ws(b, user=user)
        await send(on_b, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": 3})
        rest = await until_end(on_b)
        assert rest[-1]["finish_reason"] == "length", rest[-1]
        assert_whole(got + deltas_of(rest), rest[-1])
        await on_b.close()

        # 2. Dropped on A, resumed on B, then dropped on B as well: interrupted after the grace.
        user = user_name("grace-cross-drop")
        on_a = await open_ws(a, user=user)
        accepted = await start_turn(on_a, "a very long story", max_tokens=400)
        got = await read_deltas(on_a, 3)
        on_a.transport.abort()
        on_b = await open_ws(b, user=user)
        await send(on_b, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": 3})
        got += await read_deltas(on_b, 30)  # 1.5 s: past the first grace period
        on_b.transport.abort()
        dropped_ms = time.time() * 1000

        async def ended():
            rec = await store.get_turn(user_id=user, turn_id=accepted["turn_id"])
            return rec if rec is not None and rec.status == "ended" else None

        record = await wait_for(ended, timeout=15)
        assert record.finish_reason == "interrupted"
        assert 950 <= record.ended_at_ms - dropped_ms < 15_000, record.ended_at_ms - dropped_ms
        assert record.text.startswith("".join(d["text"] for d in got))
    finally:
        await r.aclose()


# ---------------------------------------------------------------- a process dies


async def test_sigkill_of_the_owner_ends_the_turn_interrupted_for_followers_elsewhere(spawn):
    a, b = spawn("--lease-ms", "2000", *LONG_REPLY, count=2)
    user = user_name("sigkill")
    on_a = await open_ws(a, user=user)
    accepted = await start_turn(on_a, "keep talking", max_tokens=400)
    got = await read_deltas(on_a, 3)

    on_b = await open_ws(b, user=user)
    await send(on_b, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": 3})
    got += await read_deltas(on_b, 3)  # B streams the turn from its delta log

    await asyncio.to_thread(a.kill)
    killed = time.monotonic()
    rest = await until_end(on_b, timeout=20)
    waited = time.monotonic() - killed
    end = rest[-1]
    assert end["finish_reason"] == "interrupted", end
    # The lease (2 s) runs out and B's reaper ends the turn: well within the bound.
    assert waited < 2.0 + 0.5 + 4.0, waited  # lease + reap period + slack for a loaded machine
    print(f"\nturn of the killed process ended interrupted {waited:.2f} s after the kill")
    # The partial reply is exactly what the follower received.
    assert_whole(got + deltas_of(rest), end)
    assert end["text"]

    r, store = store_for(b)
    try:
        history = await store.history(user_id=user, conversation_id="default")
        assert history[-1].role == "assistant" and history[-1].status == "interrupted"
        assert history[-1].text == end["text"]
    finally:
        await r.aclose()

    # The conversation is free again: the next turn is accepted and completes.
    await start_turn(on_b, "are you still there?", max_tokens=5)
    frames = await until_end(on_b)
    assert frames[-1]["finish_reason"] in ("stop", "length")
    assert_whole(deltas_of(frames), frames[-1])
    await on_b.close()
    with pytest.raises(ConnectionClosed):  # A's socket died with A
        while True:
            await asyncio.wait_for(on_a.recv(), 10)


async def test_sigterm_closes_1001_and_running_turns_finish_or_are_marked(spawn):
    a, b = spawn("--shutdown-drain-s", "3", *LONG_REPLY, count=2)
    short_user, long_user = user_name("term-short"), user_name("term-long")
    ws_short = await open_ws(a, user=short_user)
    ws_long = await open_ws(a, user=long_user)
    # ~1.5 s of reply finishes inside the 3 s drain; ~20 s does not.
    short = await start_turn(ws_short, "short one", max_tokens=30)
    long = await start_turn(ws_long, "long one", max_tokens=400)
    got_short = await read_deltas(ws_short, 2)
    got_long = await read_deltas(ws_long, 2)

    stopping = asyncio.create_task(asyncio.to_thread(a.stop, signal.SIGTERM, 30.0))
    for ws, got in ((ws_short, got_short), (ws_long, got_long)):
        with pytest.raises(ConnectionClosed) as info:
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] == "turn.delta":
                    got.append(frame)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001, info.value

    # The clients reconnect to the other process and resume there.
    results = {}
    for user, accepted, got in ((short_user, short, got_short), (long_user, long, got_long)):
        ws = await open_ws(b, user=user)
        await send(ws, {"type": "turn.resume", "turn_id": accepted["turn_id"],
                        "after_seq": got[-1]["seq"] if got else 0})
        rest = await until_end(ws, timeout=30)
        assert_whole(got + deltas_of(rest), rest[-1])
        results[user] = rest[-1]
        await ws.close()
    await stopping
    assert a.proc is not None and a.proc.returncode is not None

    assert results[short_user]["finish_reason"] in ("stop", "length")
    assert results[long_user]["finish_reason"] == "interrupted"
    r, store = store_for(b)
    try:
        for user, accepted in ((short_user, short), (long_user, long)):
            record = await store.get_turn(user_id=user, turn_id=accepted["turn_id"])
            assert record is not None and record.status == "ended"
            assert record.finish_reason == results[user]["finish_reason"]
            assert record.text == results[user]["text"]
            history = await store.history(user_id=user, conversation_id="default")
            assert [(m.role, m.turn_id) for m in history] == [("user", accepted["turn_id"]),
                                                              ("assistant", accepted["turn_id"])]
            assert history[-1].status == record.finish_reason and history[-1].text == record.text
        assert not await r.zrange(KeySpace(b.prefix).running_index(), 0, -1)
    finally:
        await r.aclose()


# ---------------------------------------------------------------- Redis goes away


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    rp = RedisServer(appendfsync="always")
    rp.start()
    yield rp
    rp.cleanup()


async def test_redis_outage_answers_unavailable_and_recovers_without_a_restart(spawn, private_redis):
    # A 2 s lease and a longer outage: leases run out while Redis is away, and
    # nobody may take that for a dead process once it is back.
    servers = spawn("--sim-itl-ms", "10", "--sim-reply-tokens", "1000", "--lease-ms", "2000",
                    count=2, redis=private_redis.url)
    users = [user_name(f"outage{i}") for i in range(4)]
    sockets = [await open_ws(servers[i % 2], user=u) for i, u in enumerate(users)]
    # Two more users only ask things while Redis is away, one on each process.
    prober_users = [user_name(f"prober{i}") for i in range(2)]
    probers = [await open_ws(servers[i], user=u) for i, u in enumerate(prober_users)]
    acknowledged: dict[str, list[tuple[str, str, str]]] = {u: [] for u in users}  # (text, reply, turn)
    bound = 20.0  # every request gets its answer within this (correctness bound, generous)

    async def chat(i: int, text: str) -> None:
        ws, user = sockets[i], users[i]
        accepted = await start_turn(ws, text, max_tokens=20)
        frames = await until_end(ws)
        assert_whole(deltas_of(frames), frames[-1])
        acknowledged[user].append((text, frames[-1]["text"], accepted["turn_id"]))

    for n in range(2):
        await asyncio.gather(*(chat(i, f"before the outage {n}") for i in range(len(users))))

    # Two turns are streaming when Redis dies: one ends during the outage (its
    # end must wait for Redis), one still runs when Redis is back.
    in_flight = {}
    for i, tokens in ((0, 150), (1, 150), (2, 700), (3, 700)):  # 10 ms a token: 1.5 s and 7 s
        accepted = await start_turn(sockets[i], "streaming through the outage", max_tokens=tokens)
        in_flight[i] = (accepted, await read_deltas(sockets[i], 2))

    private_redis.kill()
    outage_started = time.monotonic()
    slowest = 0.0

    async def probe(i: int, round_: int) -> None:
        nonlocal slowest
        ws = probers[i]
        client_turn_id = f"during-outage-{i}-{round_}"
        t0 = time.monotonic()
        await send(ws, {"type": "turn.start", "client_turn_id": client_turn_id, "text": "anyone?",
                        "conversation_id": "probe", "options": {"max_tokens": 5}})
        frame = await next_frame(ws, bound, skip=("ping", "pong", "turn.delta"))
        assert frame["type"] == "error" and frame["code"] == "unavailable", frame
        assert frame.get("client_turn_id") == client_turn_id
        await send(ws, {"type": "history.get", "conversation_id": "probe"})
        frame = await next_frame(ws, bound, skip=("ping", "pong", "turn.delta"))
        assert frame["type"] == "error" and frame["code"] == "unavailable", frame
        await send(ws, {"type": "ping", "t": round_})
        frame = await next_frame(ws, bound, skip=("ping", "turn.delta"))
        assert frame == {"type": "pong", "t": round_}
        slowest = max(slowest, time.monotonic() - t0)

    # Keep asking for 4 s of outage: every request is answered, no socket closes.
    round_ = 0
    while time.monotonic() - outage_started < 4.0:
        round_ += 1
        await asyncio.gather(*(probe(i, round_) for i in range(len(probers))))
        await asyncio.sleep(0.2)
    # A new socket during the outage is still served (ready; possibly after an error).
    late = await open_ws(servers[1], user=users[1], hello=False)
    await send(late, {"type": "hello", "user": users[1]})
    frame = await next_frame(late, bound, skip=("ping", "error"))
    assert frame["type"] == "ready"
    await late.close()
    # The streaming turns kept streaming to their sockets while Redis was away.
    for i in in_flight:
        in_flight[i][1].extend(await read_deltas(sockets[i], 3))
    for server in servers:
        assert server.proc is not None and server.proc.poll() is None, server.log()
    print(f"\noutage: {round_} probe rounds over {time.monotonic() - outage_started:.1f} s, "
          f"slowest round {slowest:.2f} s")

    private_redis.start()  # same port, same directory: the append-only file is replayed

    # The streaming turns end normally; their ends are stored (and only then sent).
    for i, (accepted, got) in in_flight.items():
        rest = await until_end(sockets[i], timeout=60)
        end = rest[-1]
        assert end["finish_reason"] == "length", end
        assert_whole(got + deltas_of(rest), end)
        acknowledged[users[i]].append(("streaming through the outage", end["text"], accepted["turn_id"]))

    async def chat_again(i: int) -> None:
        ws, user = sockets[i], users[i]
        client_turn_id = f"after-outage-{i}"
        deadline = time.monotonic() + 30
        while True:  # the same client_turn_id until accepted: at most one turn results
            await send(ws, {"type": "turn.start", "client_turn_id": client_turn_id, "text": "back again",
                            "options": {"max_tokens": 20}})
            frame = await next_frame(ws, bound)
            if frame["type"] == "turn.accepted":
                break
            assert frame["type"] == "error" and frame["code"] == "unavailable", frame
            assert time.monotonic() < deadline, "chat did not recover after Redis came back"
            await asyncio.sleep(0.2)
        frames = await until_end(ws)
        assert_whole(deltas_of(frames), frames[-1])
        acknowledged[user].append(("back again", frames[-1]["text"], frame["turn_id"]))

    await asyncio.gather(*(chat_again(i) for i in range(len(users))))
    for ws in sockets + probers:
        await ws.close()

    r = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    store = ConversationStore(r, KeySpace(servers[0].prefix))
    try:
        for user in users:
            history = await store.history(user_id=user, conversation_id="default", limit=100)
            expected = [(role, body, turn_id) for text, reply, turn_id in acknowledged[user]
                        for role, body in (("user", text), ("assistant", reply))]
            assert [(m.role, m.text, m.turn_id) for m in history] == expected, user
            assert all(m.status in ("stop", "length") for m in history if m.role == "assistant")
        # The refused turn.start frames wrote nothing.
        for user in prober_users:
            assert await store.history(user_id=user, conversation_id="probe") == []
            assert await store.active_turns(user_id=user) == []
    finally:
        await r.aclose()


# ---------------------------------------------------------------- guarantee 7: heartbeats

HEARTBEAT = ["--heartbeat-interval-ms", "300", "--heartbeat-timeout-ms", "900"]


async def test_a_silent_reading_client_is_closed_4408_and_its_turn_stays_resumable(spawn):
    (srv,) = spawn(*HEARTBEAT, *LONG_REPLY)
    user = user_name("silent")
    ws = await open_ws(srv, user=user, ping_interval=None)
    last_sent = time.monotonic()  # the server hears nothing from us after this turn.start
    accepted = await start_turn(ws, "talk to me", max_tokens=100)  # ~5 s of reply
    got: list[dict] = []
    with pytest.raises(ConnectionClosed) as info:
        while True:  # read everything, send nothing
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] == "turn.delta":
                got.append(frame)
    closed_after = time.monotonic() - last_sent
    assert info.value.rcvd is not None and info.value.rcvd.code == 4408, info.value
    assert 0.85 <= closed_after < 6.0, closed_after
    print(f"\nsilent socket closed 4408 after {closed_after:.2f} s")
    assert got, "some deltas arrived before the close"

    ws2 = await open_ws(srv, user=user)
    beat = asyncio.create_task(keep_alive(ws2))
    try:
        await send(ws2, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": got[-1]["seq"]})
        rest = await until_end(ws2)
    finally:
        beat.cancel()
    assert rest[-1]["finish_reason"] in ("stop", "length")
    assert_whole(got + deltas_of(rest), rest[-1])
    await ws2.close()


# A client that does not read at all: raw TCP, a hand-made WebSocket handshake.

def _ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _ws_parse(data: bytes) -> list[tuple[int, bytes]]:
    """Server frames (unmasked, unfragmented) in ``data``; a trailing partial frame is left out."""
    out, i = [], 0
    while i + 2 <= len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            if i + 2 > len(data):
                break
            n, i = struct.unpack("!H", data[i:i + 2])[0], i + 2
        elif n == 127:
            if i + 8 > len(data):
                break
            n, i = struct.unpack("!Q", data[i:i + 8])[0], i + 8
        if i + n > len(data):
            break
        out.append((opcode, data[i:i + n]))
        i += n
    return out


def _raw_connect(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Protocol: rapport.v1.json\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "handshake refused"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


async def test_a_client_that_stops_reading_is_still_closed_and_its_turn_stays_resumable(spawn):
    (srv,) = spawn(*HEARTBEAT, *LONG_REPLY)
    user = user_name("deaf")

    def scenario() -> tuple[list[tuple[int, bytes]], float]:
        sock, pending = _raw_connect(srv.port)
        sock.sendall(_ws_frame(json.dumps({"type": "hello", "user": user}).encode()))
        sock.sendall(_ws_frame(json.dumps({
            "type": "turn.start", "client_turn_id": "deaf-1", "text": "go on",
            "options": {"max_tokens": 100}}).encode()))
        silent_from = time.monotonic()
        time.sleep(3.0)  # not reading a single byte, not answering WebSocket pings either
        sock.settimeout(5)
        data = pending
        try:
            while True:  # now drain what the server sent; it must have ended the stream
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        sock.close()
        return _ws_parse(data), silent_from

    frames, _ = await asyncio.to_thread(scenario)
    closes = [payload for opcode, payload in frames if opcode == 8]
    assert closes, "the server never closed the silent socket"
    code = struct.unpack("!H", closes[0][:2])[0]
    # Our heartbeat (4408) normally fires first; uvicorn's WebSocket keepalive
    # (1011) also watches for a peer that stops answering pings.
    assert code in (4408, 1011), code
    print(f"\nthe socket that stopped reading was closed with {code}")
    app = [json.loads(p) for opcode, p in frames if opcode == 1]
    accepted = next(f for f in app if f["type"] == "turn.accepted")
    got = [f for f in app if f["type"] == "turn.delta"]
    assert [d["seq"] for d in got] == list(range(1, len(got) + 1))

    ws2 = await open_ws(srv, user=user)
    beat = asyncio.create_task(keep_alive(ws2))
    try:
        await send(ws2, {"type": "turn.resume", "turn_id": accepted["turn_id"],
                         "after_seq": got[-1]["seq"] if got else 0})
        rest = await until_end(ws2)
    finally:
        beat.cancel()
    assert rest[-1]["finish_reason"] in ("stop", "length")
    assert_whole(got + deltas_of(rest), rest[-1])
    await ws2.close()


async def test_server_pings_at_the_interval_and_answers_client_pings(spawn):
    (srv,) = spawn(*HEARTBEAT)
    ws = await open_ws(srv, user=user_name("pings"), ping_interval=None)
    pings: list[float] = []
    pongs: list[dict] = []
    n = 0
    next_ping = time.monotonic()
    stop = time.monotonic() + 2.5
    while time.monotonic() < stop:
        if time.monotonic() >= next_ping:
            n += 1
            await send(ws, {"type": "ping", "t": n})
            next_ping += 0.2
        try:
            frame = await recv(ws, max(0.01, min(next_ping, stop) - time.monotonic()))
        except TimeoutError:
            continue
        if frame["type"] == "ping":
            pings.append(time.monotonic())
            assert isinstance(frame.get("t"), (int, float))
        elif frame["type"] == "pong":
            pongs.append(frame)
    await ws.close()
    assert [p["t"] for p in pongs] == list(range(1, len(pongs) + 1))
    assert len(pongs) >= n - 1  # the last one may still be on its way
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 5, pings  # 2.5 s at 300 ms
    gaps.sort()
    median = gaps[len(gaps) // 2]
    assert 0.2 <= median <= 0.6, gaps


# ---------------------------------------------------------------- guarantee 1/2: expired delta logs


async def test_resume_after_the_delta_log_expired_answers_resume_expired_with_the_text(spawn):
    (srv,) = spawn("--delta-log-ttl-s", "1", "--sim-itl-ms", "5", "--sim-reply-tokens", "20")
    user = user_name("expired")
    ws = await open_ws(srv, user=user)
    accepted = await start_turn(ws, "short answer", max_tokens=20, client_turn_id="expiring")
    frames = await until_end(ws)
    end = frames[-1]
    assert_whole(deltas_of(frames), end)

    r, store = store_for(srv)
    try:
        async def gone():
            return not await store.log_exists(user_id=user, turn_id=accepted["turn_id"])

        await wait_for(gone, timeout=10)
    finally:
        await r.aclose()

    await send(ws, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": 5})
    err = await next_frame(ws)
    assert err["type"] == "error" and err["code"] == "resume_expired", err
    assert err["turn_id"] == accepted["turn_id"] and err["text"] == end["text"]

    # Re-sending the start: accepted (replayed), then directly the end with the whole text.
    await send(ws, {"type": "turn.start", "client_turn_id": "expiring", "text": "short answer",
                    "options": {"max_tokens": 20}})
    again = await next_frame(ws)
    assert again["type"] == "turn.accepted" and again["replayed"] is True
    assert again["turn_id"] == accepted["turn_id"]
    final = await next_frame(ws)
    assert final["type"] == "turn.end", final
    assert final["text"] == end["text"] and final["seq"] == end["seq"]
    assert final["finish_reason"] == end["finish_reason"]
    await ws.close()
