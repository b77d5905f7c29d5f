"""Cross-process coordination end to end, on the single Redis and on a Redis Cluster:
a cancel sent to the owning process over its control channel (PUBLISH, or
SPUBLISH on a cluster), a turn resumed on another process, and the lease
reaper ending the turn of a SIGKILLed process.

Two real server processes share one prefix; replies are long (400 simulated
tokens, 20 ms apart: 8 s or more) so that there is time to act while they run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from conftest import BOTH_BACKENDS, SIM_FLAGS, ServerProcess, clean_prefix, redis_client
from wire import open_ws, recv, recv_until, send

from server.coordination import Leases
from sessions.keys import KeySpace
from testkit.metrics import parse as parse_metrics

pytestmark = BOTH_BACKENDS

LEASE_MS = 1500
FLAGS = [*SIM_FLAGS, "--sim-itl-ms", "20", "--sim-reply-tokens", "400", "--auth", "dev",
         "--lease-ms", str(LEASE_MS), "--turns-per-minute", "100000"]


def _pair(redis_url: str) -> tuple[ServerProcess, ServerProcess]:
    prefix = f"rapport-test-coord:{uuid.uuid4().hex[:8]}:"
    a = ServerProcess(prefix=prefix, redis_url=redis_url, extra=FLAGS)
    b = ServerProcess(prefix=prefix, redis_url=redis_url, extra=FLAGS)
    a.start(wait_ready=False)
    b.start(wait_ready=False)
    a.wait_ready()
    b.wait_ready()
    return a, b


@pytest.fixture
def pair(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two processes on one prefix, for this test alone (one of them may be killed)."""
    a, b = _pair(redis_url)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
        clean_prefix(a.prefix, redis_url)


async def _running_requests(server: ServerProcess) -> float | None:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{server.base}/metrics")).text
    return parse_metrics(text).get("rapport_engine_running_requests")


async def _start_long_turn(server: ServerProcess, user: str) -> tuple[object, str, list[dict]]:
    ws = await open_ws(server, user=user)
    await send(ws, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": "tell me a long story",
                    "options": {"max_tokens": 400}})
    accepted = await recv(ws)
    assert accepted["type"] == "turn.accepted", accepted
    deltas: list[dict] = []
    while len(deltas) < 3:
        frame = await recv(ws)
        if frame["type"] == "turn.delta":
            deltas.append(frame)
    return ws, accepted["turn_id"], deltas


def _deltas(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "turn.delta"]


async def test_a_cancel_on_another_process_reaches_the_owner(pair):
    """B does not own the turn: it tells A over A's control channel, A cancels it
    (had nobody received the message, B would have ended the record itself) and
    stops generating."""
    a, b = pair
    user = f"coord-cancel-{uuid.uuid4().hex[:6]}"
    on_a, turn_id, _ = await _start_long_turn(a, user)
    on_b = await open_ws(b, user=user)
    await send(on_b, {"type": "turn.cancel", "turn_id": turn_id})
    end = (await recv_until(on_b, "turn.end", timeout=10))[-1]
    assert end["finish_reason"] == "cancelled", end
    # The owner ended it: its end carries the engine's timings. (B's fallback for an owner
    # nobody hears, end_orphaned_turn, ends the record without them.)
    assert end["timings"]["ttft_ms"] is not None and end["usage"]["prompt_tokens"] > 0, end
    end_a = (await recv_until(on_a, "turn.end", timeout=10))[-1]
    assert end_a["finish_reason"] == "cancelled" and end_a["text"] == end["text"]
    deadline = time.monotonic() + 3.0
    while await _running_requests(a) != 0:
        assert time.monotonic() < deadline, "the owner kept generating: the cancel never reached it"
        await asyncio.sleep(0.1)
    await on_a.close()
    await on_b.close()


async def test_a_turn_resumes_on_another_process_with_every_delta_once(pair):
    a, b = pair
    user = f"coord-resume-{uuid.uuid4().hex[:6]}"
    on_a, turn_id, held = await _start_long_turn(a, user)
    on_a.transport.abort()  # the socket dies mid-reply: not a cancel
    on_b = await open_ws(b, user=user)
    await send(on_b, {"type": "turn.resume", "turn_id": turn_id, "after_seq": held[-1]["seq"]})
    rest = await recv_until(on_b, "turn.end", timeout=30)
    deltas = held + _deltas(rest)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == rest[-1]["text"]
    assert rest[-1]["finish_reason"] in ("stop", "length")
    await on_b.close()


async def test_the_turn_of_a_killed_process_is_reaped_by_another(pair):
    a, b = pair
    user = f"coord-reap-{uuid.uuid4().hex[:6]}"
    on_a, turn_id, held = await _start_long_turn(a, user)
    on_b = await open_ws(b, user=user)
    await send(on_b, {"type": "turn.resume", "turn_id": turn_id, "after_seq": held[-1]["seq"]})
    await asyncio.to_thread(a.kill)
    killed = time.monotonic()
    rest = await recv_until(on_b, "turn.end", timeout=30)
    waited = time.monotonic() - killed
    end = rest[-1]
    assert end["finish_reason"] == "interrupted", end
    assert waited < LEASE_MS / 1000 + 1.0 + 5.0, waited  # lease + reap period + slack for a loaded machine
    deltas = held + _deltas(rest)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == end["text"]
    # The lease is gone from the deployment's index (one key, in its own slot on a cluster).
    r = redis_client(b.redis_url)
    try:
        leases = Leases(r, KeySpace(b.prefix), LEASE_MS)
        assert (user, turn_id) not in await leases.expired(limit=1000)
        assert await r.zscore(KeySpace(b.prefix).running_index(), f"{user}\x00{turn_id}") is None
    finally:
        await r.aclose()
    await on_b.close()
