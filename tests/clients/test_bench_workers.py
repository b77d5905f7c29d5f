"""clients/bench_workers.py: one worker's users against a small scripted server (real sockets).

The end-to-end runs against the real server are in test_bench.py; here the
server misbehaves on purpose (busy answers, refused credentials, 4429) so the
retry paths are exercised quickly and exactly.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from clients.bench_workers import BenchConfig, Worker
from protocol.codec import JSON_SUBPROTOCOL, codec_for

DELTAS = ["Hi", " there", "!"]


class Script:
    def __init__(self, *, busy: int = 0, close_first: dict[int, int] | None = None) -> None:
        self.busy = busy  # answer this many turn.start frames with busy
        self.close_first = close_first or {}  # connection index -> close code instead of ready
        self.connections = 0
        self.starts: list[dict[str, Any]] = []
        self.hellos: list[dict[str, Any]] = []

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        index = self.connections
        codec = codec_for(ws.subprotocol)
        async for raw in ws:
            frame = codec.decode(raw)
            kind = frame["type"]
            if kind == "hello":
                self.hellos.append(frame)
                if index in self.close_first:
                    await ws.close(self.close_first[index])
                    return
                await ws.send(codec.encode({"type": "ready", "active_turns": []}))
                # A heartbeat right away: the worker must answer it and go on.
                await ws.send(codec.encode({"type": "ping", "t": 42}))
            elif kind == "turn.start":
                self.starts.append(frame)
                ctid = frame["client_turn_id"]
                if self.busy:
                    self.busy -= 1
                    await ws.send(codec.encode({"type": "error", "code": "busy", "message": "full",
                                                "client_turn_id": ctid, "retry_after_ms": 20}))
                    continue
                await ws.send(codec.encode({"type": "turn.accepted", "turn_id": "t1", "client_turn_id": ctid,
                                            "conversation_id": "bench", "replayed": False}))
                for seq, text in enumerate(DELTAS, 1):
                    await ws.send(codec.encode({"type": "turn.delta", "turn_id": "t1", "seq": seq, "text": text}))
                await ws.send(codec.encode({"type": "turn.end", "turn_id": "t1", "seq": len(DELTAS),
                                            "finish_reason": "stop", "text": "".join(DELTAS),
                                            "usage": {}, "timings": {"queue_ms": 1, "ttft_ms": 2, "total_ms": 3}}))


@contextlib.asynccontextmanager
async def running(script: Script) -> AsyncIterator[str]:
    async with serve(script.handler, "127.0.0.1", 0, subprotocols=[JSON_SUBPROTOCOL]) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/ws"


def worker(url: str, **cfg: Any) -> Worker:
    return Worker(BenchConfig(url=url, dev_users=True, user_prefix="w-", progress=False, **cfg), 0)


async def test_busy_answers_are_retried_with_the_same_client_turn_id():
    script = Script(busy=2)
    async with running(script) as url:
        w = worker(url)
        conn = await w.connect_with_retry("w-0", random.Random(1))
        assert conn is not None
        assert script.hellos[0]["user"] == "w-0" and "coalesce" not in script.hellos[0]
        kept = await w.run_turn(conn, "w-0", "bench", random.Random(2), 0)
        assert kept is conn
        await conn.close()
    c = w.stats.counts
    assert c["busy"] == 2 and c["turns_completed"] == 1 and c["gave_up"] == 0 and c["turns_failed"] == 0
    assert len({s["client_turn_id"] for s in script.starts}) == 1 and len(script.starts) == 3
    assert c["pings_answered"] == 1 and c["deltas_received"] == c["end_seq_total"] == len(DELTAS)
    assert c["seq_gaps"] == c["seq_duplicates"] == c["text_mismatches"] == 0
    assert w.stats.series["ttft_with_retries"][0] >= w.stats.series["ttft"][0] + 2 * 20 * 0.9


async def test_a_turn_gives_up_after_max_retries():
    script = Script(busy=100)
    async with running(script) as url:
        w = worker(url, max_retries=2)
        conn = await w.connect_with_retry("w-0", random.Random(1))
        assert conn is not None
        assert await w.run_turn(conn, "w-0", "bench", random.Random(2), 0) is conn
        await conn.close()
    c = w.stats.counts
    assert c["busy"] == 3 and c["gave_up"] == 1 and c["turns_failed"] == 1 and c["turns_completed"] == 0
    assert len(script.starts) == 3


async def test_refused_credentials_are_not_retried():
    script = Script(close_first={1: 4401})
    async with running(script) as url:
        w = worker(url)
        assert await w.connect_with_retry("w-0", random.Random(1)) is None
    assert script.connections == 1
    assert w.stats.counts["connect_failures"] == 1 and w.stats.errors == {"unauthorized": 1}


async def test_4429_is_counted_and_retried_with_backoff():
    script = Script(close_first={1: 4429})
    async with running(script) as url:
        w = worker(url)
        conn = await w.connect_with_retry("w-0", random.Random(1))
        assert conn is not None
        await conn.close()
    c = w.stats.counts
    assert script.connections == 2 and c["closed_4429"] == 1 and c["connect_failures"] == 1 and c["connects"] == 1
    assert w.stats.errors == {}


class Unavailable(Script):
    """Says `unavailable` before ready, as the gateway does when it cannot list the active turns."""

    async def handler(self, ws: ServerConnection) -> None:
        codec = codec_for(ws.subprotocol)
        await ws.recv()
        await ws.send(codec.encode({"type": "error", "code": "unavailable", "message": "no turns list"}))
        await ws.send(codec.encode({"type": "ready", "active_turns": []}))
        await ws.wait_closed()


async def test_an_error_before_ready_is_counted_not_fatal():
    async with running(Unavailable()) as url:
        w = worker(url)
        conn = await w.open("w-0")
        await conn.close()
    assert w.stats.counts["hello_errors"] == 1 and w.stats.errors == {"hello:unavailable": 1}
    assert w.stats.counts["errors"] == 0 and w.stats.counts["connects"] == 1


async def test_a_completed_turn_is_one_row_with_the_servers_timings():
    async with running(Script(busy=1)) as url:
        w = worker(url)
        conn = await w.connect_with_retry("w-0", random.Random(1))
        assert conn is not None
        await w.run_turn(conn, "w-0", "bench", random.Random(2), 0)
        await conn.close()
    rows, series = w.stats.turns, w.stats.series
    assert all(len(col) == 1 for col in rows.values())
    assert rows["server_queue"][0] == 1 and rows["server_ttft"][0] == 2 and rows["server_total"][0] == 3
    assert rows["end_seq"][0] == rows["received"][0] == len(DELTAS)
    assert rows["ttft_with_retries"][0] > rows["ttft"][0] > 0
    # No engine_ttft_ms from this server: the overhead falls back to ttft_ms - queue_ms as the engine's share.
    assert series["overhead"][0] == rows["ttft"][0] - (2 - 1)
    assert len(series["busy_latency"]) == len(w.stats.moments["busy_latency"]) == 1
    assert len(series["gap"]) == len(w.stats.moments["gap"]) == len(DELTAS) - 1


async def test_the_open_loop_sends_new_conversations_and_never_retries_a_refusal():
    script = Script(busy=2)
    async with running(script) as url:
        w = worker(url, users=2, open_loop_rate=200.0, duration_s=0.3, max_retries=5)
        pool = await w._open_pool([0, 1])
        assert len(pool) == 2
        start = time.monotonic()
        w.stop_at = start + 0.3
        await w.run_open_loop(pool, start)
        for _, conn in pool:
            await conn.close()
    c = w.stats.counts
    assert c["arrivals"] > 5  # ~60 expected
    assert c["turns_planned"] + c["no_free_connection"] == c["arrivals"]
    assert c["busy"] == 2 and c["gave_up"] == 2 and len(script.starts) == c["turns_planned"]
    assert c["turns_completed"] == c["turns_planned"] - 2 and c["unfinished"] == 0
    conversations = [s["conversation_id"] for s in script.starts]
    assert len(set(conversations)) == len(conversations)
