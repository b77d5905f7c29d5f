"""``rapport serve --workers N`` end to end: real processes on one port, the simulated engine.

Which worker a socket landed on is read from the ``X-Rapport-Worker`` header
of its upgrade response; a worker's pid from the supervisor's children, named
``rapport-wN`` (``/proc/PID/comm``). Time bounds are correctness bounds with
slack for a loaded machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import ServerProcess, clean_prefix
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from wire import open_ws, recv, send

from server.workers import worker_comm
from sessions.keys import KeySpace
from sessions.store import ConversationStore

pytestmark = pytest.mark.timeout(180)

LEASE_MS = 2000
FLAGS = ["--workers", "2", "--engine", "simulated", "--auth", "dev", "--sim-ttft-ms", "20",
         "--sim-itl-ms", "50", "--sim-reply-tokens", "400", "--turns-per-minute", "100000",
         "--lease-ms", str(LEASE_MS), "--shutdown-drain-s", "3"]


@pytest.fixture
def supervisor(redis_url: str) -> Iterator[ServerProcess]:
    prefix = f"rapport-workers:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=FLAGS, name="rapport-workers")
    try:
        server.start(timeout=90)
        wait_every_worker_ready(server)
        yield server
    finally:
        server.stop()
        clean_prefix(prefix)


def wait_every_worker_ready(server: ServerProcess, timeout: float = 90.0) -> None:
    """/readyz through the port until each worker has answered 200 (each warms its own engine)."""
    ready: set[str] = set()
    deadline = time.monotonic() + timeout
    while ready != {"1", "2"}:
        assert time.monotonic() < deadline, f"only workers {ready} became ready"
        # A new connection each time: a kept-alive one would stay on one worker.
        answer = httpx.get(server.base + "/readyz", timeout=5, headers={"Connection": "close"})
        if answer.status_code == 200:
            ready.add(answer.headers["X-Rapport-Worker"])
        time.sleep(0.05)


def workers_of(server: ServerProcess) -> dict[str, int]:
    """Worker id -> pid, from the supervisor's children."""
    pid = server.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    out: dict[str, int] = {}
    for child in children:
        try:
            with open(f"/proc/{child}/comm") as f:
                comm = f.read().strip()
        except FileNotFoundError:
            continue
        for worker in ("1", "2"):
            if comm == worker_comm(worker):
                out[worker] = child
    return out


def worker_of(ws: ClientConnection) -> str:
    assert ws.response is not None
    return ws.response.headers["X-Rapport-Worker"]


async def open_on(server: ServerProcess, user: str, *, other_than: str | None = None,
                  on: str | None = None) -> ClientConnection:
    """Open sockets through the one port until one lands where asked."""
    for _ in range(60):
        ws = await open_ws(server, user=user)
        worker = worker_of(ws)
        if (other_than is None or worker != other_than) and (on is None or worker == on):
            return ws
        await ws.close()
    raise AssertionError(f"no socket landed on the worker asked for (other than {other_than}, on {on})")


async def next_frame(ws: ClientConnection, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(ws, max(0.05, deadline - time.monotonic()))
        if frame["type"] not in ("ping", "pong"):
            return frame


async def start_turn(ws: ClientConnection, text: str, max_tokens: int) -> dict:
    await send(ws, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": text,
                    "conversation_id": "default", "options": {"max_tokens": max_tokens}})
    accepted = await next_frame(ws)
    assert accepted["type"] == "turn.accepted", accepted
    return accepted


async def deltas(ws: ClientConnection, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        frame = await next_frame(ws)
        assert frame["type"] == "turn.delta", frame
        out.append(frame)
    return out


async def until_end(ws: ClientConnection, timeout: float = 30.0) -> list[dict]:
    out = []
    deadline = time.monotonic() + timeout
    while True:
        out.append(await next_frame(ws, max(0.05, deadline - time.monotonic())))
        if out[-1]["type"] == "turn.end":
            return out


def assert_whole(got: list[dict], end: dict) -> None:
    assert [d["seq"] for d in got] == list(range(1, len(got) + 1))
    assert "".join(d["text"] for d in got) == end["text"]
    assert end["seq"] == len(got)


async def test_a_turn_started_on_one_worker_is_resumed_on_another_through_the_same_port(
        supervisor: ServerProcess) -> None:
    assert set(workers_of(supervisor)) == {"1", "2"}
    user = f"w-resume-{uuid.uuid4().hex[:6]}"
    first = await open_ws(supervisor, user=user)
    accepted = await start_turn(first, "tell me a story", max_tokens=40)
    got = await deltas(first, 3)
    await first.close()  # dropped, not cancelled: the turn keeps generating on its worker

    second = await open_on(supervisor, user, other_than=worker_of(first))
    await send(second, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": 3})
    rest = await until_end(second)
    end = rest[-1]
    assert end["finish_reason"] in ("stop", "length"), end
    assert_whole(got + [f for f in rest if f["type"] == "turn.delta"], end)
    await second.close()


async def test_sigkill_of_a_worker_ends_its_turns_interrupted_while_the_others_serve(
        supervisor: ServerProcess) -> None:
    user = f"w-kill-{uuid.uuid4().hex[:6]}"
    owner_ws = await open_ws(supervisor, user=user)
    doomed = worker_of(owner_ws)
    accepted = await start_turn(owner_ws, "keep talking", max_tokens=400)
    got = await deltas(owner_ws, 3)
    follower = await open_on(supervisor, user, other_than=doomed)
    await send(follower, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": 3})
    got += await deltas(follower, 2)

    os.kill(workers_of(supervisor)[doomed], signal.SIGKILL)
    killed = time.monotonic()
    rest = await until_end(follower, timeout=20)
    waited = time.monotonic() - killed
    end = rest[-1]
    assert end["finish_reason"] == "interrupted", end
    # A lease, a reap period and slack for a loaded machine.
    assert waited < LEASE_MS / 1000 + 0.5 + 4.0, waited
    assert_whole(got + [f for f in rest if f["type"] == "turn.delta"], end)

    # The surviving worker keeps serving: the freed conversation takes a new turn.
    await start_turn(follower, "still there?", max_tokens=5)
    frames = await until_end(follower)
    assert frames[-1]["finish_reason"] in ("stop", "length")
    await follower.close()
    # And the port keeps answering (the dead worker is restarted after a second).
    async with httpx.AsyncClient() as http:
        for _ in range(5):
            assert (await http.get(supervisor.base + "/healthz", timeout=5)).status_code == 200
    assert supervisor.alive()


async def test_sigterm_of_the_supervisor_drains_every_worker(supervisor: ServerProcess) -> None:
    sockets: dict[str, tuple[ClientConnection, str, dict]] = {}
    for worker in ("1", "2"):
        user = f"w-term-{worker}-{uuid.uuid4().hex[:6]}"
        ws = await open_on(supervisor, user, on=worker)
        accepted = await start_turn(ws, "a long one", max_tokens=400)
        await deltas(ws, 1)
        sockets[worker] = (ws, user, accepted)
    pids = workers_of(supervisor)

    stopping = asyncio.create_task(asyncio.to_thread(supervisor.stop, signal.SIGTERM, 30.0))
    for ws, _user, _accepted in sockets.values():
        with pytest.raises(ConnectionClosed) as info:
            while True:
                json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001, info.value
    await stopping
    assert supervisor.proc is not None and supervisor.proc.returncode == 0
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}/comm") or _is_zombie(pid)
    # Every turn was drained: ended in Redis (finished, or interrupted at the drain's end).
    r = aioredis.Redis.from_url(supervisor.redis_url, decode_responses=True)
    try:
        store = ConversationStore(r, KeySpace(supervisor.prefix))
        for _ws, user, accepted in sockets.values():
            record = await store.get_turn(user_id=user, turn_id=accepted["turn_id"])
            assert record is not None and record.status == "ended", record
    finally:
        await r.aclose()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_worker_failing_at_start_stops_the_supervisor_with_an_error(redis_url: str) -> None:
    # A URL of a known scheme passes the supervisor's checks (an unknown scheme would not:
    # Settings.validate refuses it in one line); only the worker's Runtime, building its
    # connection pool, finds the pool size impossible.
    server = ServerProcess(prefix="rapport-workers-bad:", redis_url="redis://127.0.0.1:6379/0?max_connections=-1",
                           extra=FLAGS, name="rapport-workers-bad")
    try:
        server.start(wait_ready=False)
        assert server.proc is not None
        assert server.proc.wait(90) == 1
        assert "failed at start" in server.log()
    finally:
        server.stop()
