"""One socket cannot make the server hold unbounded memory or descriptors.

- A socket whose outbox overflows is closed for real: its descriptor and its
  entry in the per-user connection registry are released, it is counted once
  in the metrics and logged once.
- Outboxes are bounded in bytes as well as frames.
- Every client frame goes through a per-socket token bucket; a socket that
  keeps flooding is closed, and no per-connection state grows per frame.

End to end against real server processes and raw sockets, plus one in-process
check of the per-connection state.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import ServerProcess, clean_prefix
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from wire import JSON, recv, send

from protocol import frames
from protocol.codec import codec_for
from protocol.errors import NotFound
from server.config import Settings
from server.gateway import Connection
from server.metrics import Metrics
from sessions.keys import KeySpace
from testkit.metrics import scrape_async

# ---------------------------------------------------------------- helpers


def small_buffer_socket(port: int) -> socket.socket:
    """A client socket that holds little, so a client that stops reading is stuck at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def ready_ws(server: ServerProcess, user: str, **kw: Any):
    """A WebSocket past ``ready``; ConnectionClosed when the server refuses it."""
    ws = await connect(server.ws_url, subprotocols=[JSON], max_size=None, **kw)
    await ws.send(json.dumps({"type": "hello", "user": user}))
    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert frame["type"] == "ready", frame
    return ws


async def stuck_client(server: ServerProcess, user: str):
    """A WebSocket past ``ready`` that reads nothing more unless asked to."""
    return await ready_ws(server, user, sock=small_buffer_socket(server.port), max_queue=1)


async def metric(server: ServerProcess, name: str) -> float:
    return (await scrape_async(server.base)).get(name, 0.0)


def server_log(server: ServerProcess) -> str:
    return server.log_path.read_text(errors="replace")


def server_side_established(server_port: int, client_port: int) -> bool:
    """Whether the server still holds an ESTABLISHED socket to this client port."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, remote, state = parts[1], parts[2], parts[3]
            if (int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port
                    and state == "01"):
                return True
    return False


def rss_bytes(server: ServerProcess) -> int:
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def drain_until_closed(ws, timeout: float) -> int | None:
    """Read everything until the connection ends; the close code received, if any."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


# ---------------------------------------------------------------- outbox overflow


@pytest.fixture(scope="module")
def overflow_server(redis_url):
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "1", "--sim-reply-tokens", "1000",
        "--max-tokens-limit", "1024", "--auth", "dev", "--outbox-max-frames", "50",
        "--socket-send-buffer", "4096", "--max-connections-per-user", "1", "--turns-per-minute", "1000",
        "--stuck-timeout-ms", "2000", "--log-level", "info",
    ]).start()
    yield server
    server.stop()
    clean_prefix(prefix)


async def test_an_overflowing_socket_is_closed_released_counted_and_logged_once(overflow_server):
    server = overflow_server
    before_metric = await metric(server, "rapport_slow_consumer_closes_total")
    before_log = server_log(server).count("stopped reading")
    user = f"overflow-{uuid.uuid4().hex[:6]}"
    stuck = await stuck_client(server, user)
    client_port = stuck.transport.get_extra_info("sockname")[1]
    for i in range(4):
        await stuck.send(json.dumps({"type": "turn.start", "client_turn_id": f"c{i}", "text": "talk",
                                     "conversation_id": f"conv{i}", "options": {"max_tokens": 1000}}))
    # From here on the client reads nothing; thousands of deltas overflow a 50-frame outbox.

    # The registry entry is released: with a cap of one connection the user gets back in.
    deadline = time.monotonic() + 30
    again = None
    while again is None:
        assert time.monotonic() < deadline, "the overflowing socket still counts against the user's cap"
        try:
            again = await ready_ws(server, user)
        except ConnectionClosed:
            await asyncio.sleep(0.5)
    await again.close()

    # The descriptor is released: the server holds no socket to the stuck client any more.
    deadline = time.monotonic() + 30
    while server_side_established(server.port, client_port):
        assert time.monotonic() < deadline, "the server kept the stuck socket ESTABLISHED"
        await asyncio.sleep(0.2)

    # Counted once, logged once, however many frames the turns kept producing meanwhile.
    await asyncio.sleep(1.0)
    assert await metric(server, "rapport_slow_consumer_closes_total") == before_metric + 1
    assert server_log(server).count("stopped reading") == before_log + 1
    stuck.transport.abort()


# ---------------------------------------------------------------- outbox bytes

HISTORY_MESSAGES = 60
MESSAGE_CHARS = 8_000  # 60 x 8 KB: ~490 KB per history answer
OUTBOX_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def bytes_server(redis_url):
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "5", "--auth", "dev",
        "--socket-send-buffer", "16384", "--log-level", "info",
    ], env={"RAPPORT_OUTBOX_MAX_BYTES": str(OUTBOX_BYTES),
            # This test is about memory, not the frame rate.
            "RAPPORT_FRAMES_PER_SECOND": "100000", "RAPPORT_FRAME_BURST": "100000"}).start()
    yield server
    server.stop()
    clean_prefix(prefix)


async def seed_history(server: ServerProcess, user: str, conversation_id: str) -> None:
    r = aioredis.Redis.from_url(server.redis_url, decode_responses=True)
    try:
        key = KeySpace(server.prefix).history(user, conversation_id)
        for i in range(HISTORY_MESSAGES):
            await r.xadd(key, {"role": "user" if i % 2 == 0 else "assistant",
                               "text": f"{i:04d}" + "m" * MESSAGE_CHARS, "turn_id": f"t_seed{i // 2}",
                               "status": "stop", "created_at": str(1_700_000_000_000 + i)})
    finally:
        await r.aclose()


async def test_a_socket_that_never_reads_holds_at_most_the_outbox_byte_bound(bytes_server):
    server = bytes_server
    user = f"hoard-{uuid.uuid4().hex[:6]}"
    await seed_history(server, user, "big")
    calm = await ready_ws(server, f"calm-{uuid.uuid4().hex[:6]}")
    await asyncio.sleep(0.5)
    baseline = rss_bytes(server)
    stuck = await stuck_client(server, user)
    request = json.dumps({"type": "history.get", "conversation_id": "big", "limit": HISTORY_MESSAGES})
    # ~490 MB of answers if the server queued them all.
    sender = asyncio.create_task(_send_many(stuck, request, 1000))
    # The outbox's bound, twice over for what the allocator keeps, plus the process's own
    # churn (Redis replies, the frame being written). Unbounded it was hundreds of MiB.
    bound = 2 * OUTBOX_BYTES + 32 * 1024 * 1024
    peak = baseline
    started = time.monotonic()
    while time.monotonic() - started < 6.0:
        peak = max(peak, rss_bytes(server))
        assert peak - baseline < bound, f"RSS grew by {(peak - baseline) >> 20} MiB"
        await asyncio.sleep(0.1)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    # The hoarder was closed with 1008 (the slow-consumer rule); its last frames are still in flight.
    assert await drain_until_closed(stuck, timeout=30) == 1008
    # Another user was never affected.
    await send(calm, {"type": "ping", "t": 1})
    assert (await recv(calm))["type"] == "pong"
    await calm.close()


async def _send_many(ws, data: str, n: int) -> None:
    for _ in range(n):
        await ws.send(data)


# ---------------------------------------------------------------- frame rate


@pytest.fixture(scope="module")
def rate_server(redis_url):
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "5", "--auth", "dev",
    ], env={"RAPPORT_FRAMES_PER_SECOND": "20", "RAPPORT_FRAME_BURST": "40"}).start()
    yield server
    server.stop()
    clean_prefix(prefix)


async def test_frames_over_the_rate_answer_rate_limited_and_a_flood_is_closed(rate_server):
    ws = await ready_ws(rate_server, f"flood-{uuid.uuid4().hex[:6]}")
    for i in range(500):
        await send(ws, {"type": "turn.cancel", "turn_id": f"t_unknown{i}"})
    seen: dict[str, int] = {}
    limited: dict[str, Any] | None = None
    with pytest.raises(ConnectionClosed) as info:
        while True:
            frame = await recv(ws, timeout=15)
            key = frame.get("code", frame["type"])
            seen[key] = seen.get(key, 0) + 1
            if key == "rate_limited" and limited is None:
                limited = frame
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008, info.value
    assert limited is not None and limited["retry_after_ms"] > 0, seen
    # Each refused frame is answered, up to a burst of them; then the socket is closed.
    assert 1 <= seen["rate_limited"] <= 41, seen
    assert 39 <= seen.get("not_found", 0) < 100, seen  # the burst (less the hello), plus what refilled


async def test_a_client_that_waits_as_told_is_served_again(rate_server):
    ws = await ready_ws(rate_server, f"polite-{uuid.uuid4().hex[:6]}")
    for i in range(70):  # the burst and 31 more: refused, but short of another whole burst
        await send(ws, {"type": "ping", "t": i})
    # Every frame gets exactly one answer: its pong, or rate_limited.
    answers = [await recv(ws) for _ in range(70)]
    pongs = [a for a in answers if a["type"] == "pong"]
    limited = [a for a in answers if a["type"] == "error"]
    assert all(a["code"] == "rate_limited" and a["retry_after_ms"] > 0 for a in limited), limited
    assert len(pongs) >= 39 and limited, answers  # the burst (less the hello), then refusals
    await asyncio.sleep(limited[-1]["retry_after_ms"] / 1000 + 0.2)
    await send(ws, {"type": "ping", "t": 999})
    assert await recv(ws) == {"type": "pong", "t": 999}
    await ws.close()


# ---------------------------------------------------------------- per-connection state


class _RefusingManager:
    """Knows no turns: every cancel and resume is not_found, as for an attacker's made-up ids."""

    async def cancel(self, follower: Any, turn_id: str) -> None:
        raise NotFound(f"no turn '{turn_id}'", turn_id=turn_id)

    async def follow(self, follower: Any, turn_id: str, after_seq: int) -> None:
        raise NotFound(f"no turn '{turn_id}'", turn_id=turn_id)

    def leave(self, follower: Any, turn_id: str) -> None:
        pass


async def test_unknown_turn_ids_leave_no_state_behind():
    runtime = SimpleNamespace(settings=Settings(), manager=_RefusingManager(), metrics=Metrics())
    ws = SimpleNamespace(headers={}, scope={})
    conn = Connection(ws, runtime, codec_for(None))  # type: ignore[arg-type]
    for i in range(5000):
        for frame in (frames.TurnCancel(turn_id=f"t_{i}"), frames.TurnResume(turn_id=f"t_{i}", after_seq=0)):
            with pytest.raises(NotFound):
                await conn._dispatch(frame)
    assert len(conn._touched) == 0
    assert len(conn._remote) == 0
