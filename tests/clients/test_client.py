"""Tests for the reference client (clients/connection.py, clients/resilient.py, clients/turn_stream.py,
imported through clients/client.py as apps do) and a smoke test of clients/chat.py.

There is no Rapport server to test against here, so each test starts a small
SCRIPTED server (``websockets.asyncio.server.serve`` on 127.0.0.1, port 0,
real sockets) speaking just enough of protocol v1: hello -> ready,
turn.start -> accepted + deltas + end, turn.resume from after_seq, ping/pong,
history, and knobs to misbehave (drop the socket mid-turn, go silent, swallow
a turn.start, duplicate or skip seqs, close with 4401/4429).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import socket
import time
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from clients.chat import add_chat_arguments, run_chat
from clients.client import (
    AuthenticationError,
    ClientError,
    ConnectionLost,
    ProtocolViolation,
    RapportConnection,
    ResilientClient,
    ServerError,
    backoff_delay,
)
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, Codec, codec_for

DELTAS = ["Hel", "lo", ", ", "wör", "ld", " 🙂", "!"]
FULL = "".join(DELTAS)


class Dropped(Exception):
    """The scripted server dropped the socket on purpose."""


class Ctx:
    def __init__(self, ws: ServerConnection, index: int) -> None:
        self.ws = ws
        self.index = index
        self.codec: Codec = codec_for(ws.subprotocol)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(self.codec.encode(frame))

    def drop(self) -> None:
        self.ws.transport.abort()
        raise Dropped


class ScriptedServer:
    def __init__(self, *, deltas: list[str] = DELTAS, interval_ms: int = 15000, timeout_ms: int = 45000,
                 tokens: tuple[str, ...] = ("good",)) -> None:
        self.deltas = list(deltas)
        self.interval_ms, self.timeout_ms = interval_ms, timeout_ms
        self.tokens = tokens
        self.connections = 0
        self.generations = 0
        self.turns: dict[str, str] = {}  # client_turn_id -> turn_id
        self.received: list[tuple[int, dict[str, Any]]] = []
        self.hellos: list[tuple[int, str | None, dict[str, Any], str | None]] = []
        self.resumes: list[tuple[str, int]] = []
        self.pongs: list[Any] = []
        # misbehaviour knobs, keyed by connection index (1-based)
        self.drop_after: dict[int, int] = {}  # drop the socket right after sending this seq
        self.silent: set[int] = set()  # after ready: read everything, answer nothing
        self.swallow_start: set[int] = set()  # register the turn, then drop without answering
        self.dup_seqs: dict[int, set[int]] = {}  # send these seqs twice
        self.overlap: dict[int, int] = {}  # resume/replay starts this many seqs early
        self.close_before_ready: dict[int, int] = {}  # close code instead of ready
        self.close_after_ready: dict[int, int] = {}  # close code right after ready
        self.ping_after_ready = False
        self.script: list[dict[str, Any]] | None = None  # raw answer to turn.start
        self.busy = False
        self.active_turns: list[dict[str, Any]] = []
        self.pause_after: dict[int, int] = {}  # after this seq, wait for turn.cancel
        self.expire_resumes = False  # answer turn.resume with resume_expired
        self.expired_text: str | None = None  # ...carrying the final text
        self.history_messages = [{"id": "m1", "role": "user", "text": "hi", "turn_id": "turn-1",
                                  "status": "complete", "created_at": 1}]

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        ctx = Ctx(ws, self.connections)
        try:
            hello = ctx.codec.decode(await ws.recv())
            auth = ws.request.headers.get("Authorization")
            self.hellos.append((ctx.index, auth, hello, ws.subprotocol))
            token = auth.removeprefix("Bearer ") if auth else hello.get("token")
            if (token not in self.tokens and not hello.get("user")) or token == "bad":
                await ws.close(4401, "unauthorized")
                return
            if ctx.index in self.close_before_ready:
                await ws.close(self.close_before_ready[ctx.index], "scripted")
                return
            await ctx.send({
                "type": "ready", "session_id": f"s{ctx.index}", "user_id": hello.get("user") or "u1",
                "protocol": "rapport.v1", "model": "scripted",
                "heartbeat": {"interval_ms": self.interval_ms, "timeout_ms": self.timeout_ms},
                "limits": {"max_frame_bytes": 65536, "max_input_chars": 8000, "turns_per_minute": 30},
                "active_turns": self.active_turns,
            })
            if ctx.index in self.close_after_ready:
                await ws.close(self.close_after_ready[ctx.index], "scripted")
                return
            if self.ping_after_ready:
                await ctx.send({"type": "ping", "t": 42})
            async for raw in ws:
                try:
                    frame = ctx.codec.decode(raw)
                except ValueError:  # BadRequest is not a ValueError; keep both
                    await ctx.send({"type": "error", "code": "bad_request", "message": "undecodable"})
                    continue
                except Exception as exc:  # noqa: BLE001 - scripted server: answer, never crash
                    await ctx.send({"type": "error", "code": "bad_request", "message": str(exc)})
                    continue
                self.received.append((ctx.index, frame))
                if ctx.index in self.silent:
                    if frame.get("type") == "turn.start":
                        self._register(frame["client_turn_id"])
                    continue
                await self.on_frame(ctx, frame)
        except (ConnectionClosed, Dropped):
            pass

    def _register(self, client_turn_id: str) -> tuple[str, bool]:
        if client_turn_id in self.turns:
            return self.turns[client_turn_id], True
        self.generations += 1
        self.turns[client_turn_id] = f"turn-{self.generations}"
        return self.turns[client_turn_id], False

    async def on_frame(self, ctx: Ctx, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "turn.start":
            cid = frame["client_turn_id"]
            if self.busy:
                await ctx.send({"type": "error", "code": "busy", "message": "queue full",
                                "client_turn_id": cid, "retry_after_ms": 250})
                return
            if self.script is not None:
                for item in self.script:
                    await ctx.send(item)
                return
            turn_id, replayed = self._register(cid)
            if ctx.index in self.swallow_start:
                ctx.drop()
            await ctx.send({"type": "turn.accepted", "turn_id": turn_id, "client_turn_id": cid,
                            "conversation_id": frame.get("conversation_id", "default"), "replayed": replayed})
            await self.stream(ctx, turn_id, 0)
        elif kind == "turn.resume":
            self.resumes.append((frame["turn_id"], frame["after_seq"]))
            if self.expire_resumes:
                error = {"type": "error", "code": "resume_expired", "message": "gone", "turn_id": frame["turn_id"]}
                if self.expired_text is not None:
                    error["text"] = self.expired_text
                await ctx.send(error)
                return
            await self.stream(ctx, frame["turn_id"], frame["after_seq"])
        elif kind == "turn.cancel":
            await ctx.send({"type": "turn.end", "turn_id": frame["turn_id"], "seq": 0,
                            "finish_reason": "cancelled", "text": "", "usage": {}, "timings": {}})
        elif kind == "ping":
            await ctx.send({"type": "pong", "t": frame.get("t")})
        elif kind == "pong":
            self.pongs.append(frame.get("t"))
        elif kind == "history.get":
            await ctx.send({"type": "history", "conversation_id": frame.get("conversation_id", "default"),
                            "messages": self.history_messages})
        elif kind == "history.clear":
            await ctx.send({"type": "history.cleared", "conversation_id": frame.get("conversation_id", "default")})
        else:
            await ctx.send({"type": "error", "code": "bad_request", "message": f"unknown type {kind!r}"})

    async def stream(self, ctx: Ctx, turn_id: str, after_seq: int) -> None:
        first = max(1, after_seq + 1 - self.overlap.get(ctx.index, 0))
        for seq in range(first, len(self.deltas) + 1):
            for _ in range(2 if seq in self.dup_seqs.get(ctx.index, ()) else 1):
                await ctx.send({"type": "turn.delta", "turn_id": turn_id, "seq": seq, "text": self.deltas[seq - 1]})
            if self.drop_after.get(ctx.index) == seq:
                ctx.drop()
            if self.pause_after.get(ctx.index) == seq:
                while (frame := ctx.codec.decode(await ctx.ws.recv()))["type"] != "turn.cancel":
                    self.received.append((ctx.index, frame))
                self.received.append((ctx.index, frame))
                await ctx.send({"type": "turn.end", "turn_id": turn_id, "seq": seq, "finish_reason": "cancelled",
                                "text": "".join(self.deltas[:seq]), "usage": {}, "timings": {}})
                return
        await ctx.send({"type": "turn.end", "turn_id": turn_id, "seq": len(self.deltas), "finish_reason": "stop",
                        "text": "".join(self.deltas), "usage": {"prompt_tokens": 3, "completion_tokens": 7,
                                                                "cached_prompt_tokens": 0},
                        "timings": {"queue_ms": 0, "ttft_ms": 1, "total_ms": 2}})


@contextlib.asynccontextmanager
async def running(server: ScriptedServer):
    async with serve(server.handler, "127.0.0.1", 0, subprotocols=[JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL],
                     ping_interval=None) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/ws"


def client_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("rapport:") and not t.done()]


def fast_client(url: str, **kwargs: Any) -> ResilientClient:
    kwargs.setdefault("token", "good")
    kwargs.setdefault("backoff_base", 0.01)
    kwargs.setdefault("backoff_cap", 0.05)
    return ResilientClient(url, **kwargs)


# ---------------------------------------------------------------- RapportConnection


@pytest.mark.parametrize("subprotocol", [JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL])
async def test_turn_stream_in_order_both_subprotocols(subprotocol: str) -> None:
    server = ScriptedServer()
    async with running(server) as url:
        conn = await RapportConnection.open(url, token="good", subprotocol=subprotocol)
        try:
            assert conn.ready["type"] == "ready" and conn.subprotocol == subprotocol
            stream = await conn.start_turn("hi", conversation_id="c1", options={"max_tokens": 16})
            seqs = [d["seq"] async for d in stream]
            assert seqs == list(range(1, len(DELTAS) + 1))
            assert stream.text == FULL == stream.end["text"]
            assert [d["text"] for d in stream.deltas] == DELTAS
            assert stream.accepted["replayed"] is False and stream.turn_id == "turn-1"
            assert (await stream.wait())["finish_reason"] == "stop"  # wait() after iteration is fine
            _, auth, hello, negotiated = server.hellos[0]
            assert negotiated == subprotocol and auth == "Bearer good"
            assert "token" not in hello and hello["client"]["name"] == "rapport-python"
            start = server.received[0][1]
            assert start["type"] == "turn.start" and len(start["client_turn_id"]) == 32
            assert start["options"] == {"max_tokens": 16}
        finally:
            await conn.close()
        assert conn.closed and conn.close_code == 1000
    assert client_tasks() == []


async def test_token_in_hello_user_mode_and_4401() -> None:
    server = ScriptedServer()
    async with running(server) as url:
        conn = await RapportConnection.open(url, token="good", token_in_header=False)
        await conn.close()
        assert server.hellos[-1][1] is None and server.hellos[-1][2]["token"] == "good"
        conn = await RapportConnection.open(url, user="alice")
        assert conn.ready["user_id"] == "alice" and server.hellos[-1][2]["user"] == "alice"
        await conn.close()
        with pytest.raises(AuthenticationError) as info:
            await RapportConnection.open(url, token="bad")
        assert info.value.close_code == 4401 and isinstance(info.value, ConnectionLost)


async def test_ping_history_clear_server_ping_and_bad_input() -> None:
    server = ScriptedServer()
    server.ping_after_ready = True
    async with running(server) as url:
        conn = await RapportConnection.open(url, token="good", subprotocol=MSGPACK_SUBPROTOCOL)
        try:
            rtt = await conn.ping()
            assert 0 <= rtt < 5
            assert server.pongs == [42]  # the server's ping was answered with the same t
            page = await conn.history("c1", limit=10)
            assert page["type"] == "history" and page["messages"][0]["text"] == "hi"
            assert (await conn.clear_history("c1")) == {"type": "history.cleared", "conversation_id": "c1"}
            await conn.send_raw("this is a text frame on msgpack")
            probe = await conn.recv_frame(timeout=2)
            assert probe["type"] == "error" and probe["code"] == "bad_request"
            await conn.send_frame({"type": "no.such.type"})
            assert (await conn.recv_frame(timeout=2))["code"] == "bad_request"
            with pytest.raises(TimeoutError):
                await conn.recv_frame(timeout=0.05)
        finally:
            await conn.close()
        with pytest.raises(ConnectionLost):
            await conn.recv_frame(timeout=1)
        with pytest.raises(ConnectionLost):
            await conn.ping()


async def test_turn_error_keeps_code_and_retry_after() -> None:
    server = ScriptedServer()
    server.busy = True
    async with running(server) as url:
        conn = await RapportConnection.open(url, token="good")
        try:
            stream = await conn.start_turn("hi")
            with pytest.raises(ServerError) as info:
                await stream.wait()
            assert info.value.code == "busy" and info.value.retry_after_ms == 250
            assert info.value.client_turn_id == stream.client_turn_id
            assert not conn.closed  # an error frame does not end the connection
            assert await conn.ping() >= 0
        finally:
            await conn.close()


def _script(*deltas: tuple[int, str], end_seq: int, end_text: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = [{"type": "turn.accepted", "turn_id": "t1", "client_turn_id": "c1",
                                     "conversation_id": "default", "replayed": False}]
    frames += [{"type": "turn.delta", "turn_id": "t1", "seq": s, "text": t} for s, t in deltas]
    frames.append({"type": "turn.end", "turn_id": "t1", "seq": end_seq, "finish_reason": "stop",
                   "text": end_text, "usage": {}, "timings": {}})
    return frames


@pytest.mark.parametrize("script, message", [
    (_script((1, "a"), (3, "c"), end_seq=3, end_text="ac"), "gap"),
    (_script((1, "a"), (2, "b"), (2, "b"), end_seq=2, end_text="ab"), "duplicate"),
    (_script((1, "a"), (2, "b"), end_seq=4, end_text="abcd"), "deltas stop at 2"),
    (_script((1, "a"), (2, "b"), end_seq=2, end_text="xy"), "differs"),
])
async def test_strict_stream_detects_gap_and_duplicate(script: list[dict[str, Any]], message: str) -> None:
    server = ScriptedServer()
    server.script = script
    async with running(server) as url:
        conn = await RapportConnection.open(url, token="good")
        try:
            stream = await conn.start_turn("hi", client_turn_id="c1")
            got = []
            with pytest.raises(ProtocolViolation, match=message):
                async for delta in stream:
                    got.append(delta["seq"])
            assert got == ([1] if message == "gap" else [1, 2])
            assert isinstance(stream.error, ClientError)
        finally:
            await conn.close()


async def test_expired_delta_log_end_only_is_a_catch_up() -> None:
    server = ScriptedServer()
    server.script = _script(end_seq=5, end_text="whole reply")  # accepted, then end directly (guarantee 1)
    async with running(server) as url:
        conn = await RapportConnection.open(url, token="good")
        try:
            stream = await conn.start_turn("hi", client_turn_id="c1")
            deltas = [d async for d in stream]
            assert [d["text"] for d in deltas] == ["whole reply"] and deltas[0]["catch_up"]
            assert stream.text == "whole reply" == stream.end["text"]
        finally:
            await conn.close()


async def test_raw_resume_after_seq_and_connection_lost_mid_turn() -> None:
    server = ScriptedServer()
    server.drop_after = {1: 3}
    async with running(server) as url:
        conn = await RapportConnection.open(url, token="good")
        stream = await conn.start_turn("hi")
        with pytest.raises(ConnectionLost) as info:
            await stream.wait()
        assert info.value.close_code == 1006 and stream.last_seq == 3
        await conn.wait_closed()
        await conn.close()
        conn = await RapportConnection.open(url, token="good")
        try:
            rest = await conn.resume(stream.turn_id, stream.last_seq)
            assert [d["seq"] async for d in rest] == [4, 5, 6, 7]
            assert stream.text + rest.text == FULL and server.resumes == [("turn-1", 3)]
        finally:
            await conn.close()
    assert client_tasks() == []


# ---------------------------------------------------------------- backoff


def test_backoff_full_jitter_bounds_and_cap() -> None:
    rng, twin = random.Random(7), random.Random(7)
    for attempt in range(14):
        bound = min(10.0, 0.5 * 2 ** attempt)
        delay = backoff_delay(attempt, rng=rng)
        assert delay == twin.uniform(0, bound) and 0 <= delay <= bound
    assert min(10.0, 0.5 * 2 ** 13) == 10.0  # the cap was reached
    # full jitter really spans [0, bound]: many samples land near both ends
    samples = [backoff_delay(20, rng=rng) for _ in range(2000)]
    assert max(samples) <= 10.0 and min(samples) < 0.5 and max(samples) > 9.5


async def test_backoff_schedule_against_refused_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0)

    client = ResilientClient(f"ws://127.0.0.1:{port}/v1/ws", token="good", rng=random.Random(3),
                             sleep=fake_sleep, max_attempts=8, open_timeout=2)
    with pytest.raises(ConnectionLost, match="gave up after 8 attempts"):
        await client.connect(timeout=10)
    twin = random.Random(3)
    assert delays == [twin.uniform(0, min(10.0, 0.5 * 2 ** i)) for i in range(7)]
    await client.close()
    assert client.state == "closed" and client_tasks() == []


async def test_backoff_4429_grows_and_resets_after_ready() -> None:
    server = ScriptedServer()
    server.close_before_ready = {1: 4429, 2: 4429, 3: 1008}
    server.close_after_ready = {4: 1001}
    delays: list[float] = []
    states: list[str] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0)

    async with running(server) as url:
        client = ResilientClient(url, token="good", rng=random.Random(11), sleep=fake_sleep, on_state=states.append)
        try:
            await client.connect(timeout=5)
            while server.connections < 5 or client.connection is None:
                await asyncio.sleep(0.01)
        finally:
            await client.close()
    twin = random.Random(11)
    # attempts 0, 1, 2 before the first ready, then attempt 0 again after it
    assert delays == [twin.uniform(0, 0.5), twin.uniform(0, 1.0), twin.uniform(0, 2.0), twin.uniform(0, 0.5)]
    assert client.reconnects == 1 and client.connect_attempts == 5
    assert states[0] == "connecting" and "reconnecting" in states and states[-1] == "closed"


# ---------------------------------------------------------------- ResilientClient


@pytest.mark.parametrize("subprotocol", [JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL])
async def test_resilient_resumes_after_drop_mid_turn(subprotocol: str) -> None:
    server = ScriptedServer()
    server.drop_after = {1: 3}
    async with running(server) as url:
        async with fast_client(url, subprotocol=subprotocol) as client:
            turn = client.send("hi", conversation_id="c1")
            seqs = [d["seq"] async for d in turn]
            assert seqs == list(range(1, len(DELTAS) + 1))  # every delta exactly once, in order
            assert turn.text == FULL and turn.end["finish_reason"] == "stop"
            assert server.resumes == [("turn-1", 3)]
            assert client.reconnects == 1 and client.resumes == 1 and client.duplicates_dropped == 0
            assert server.generations == 1
    assert client_tasks() == []


async def test_resilient_drops_overlapping_resume_duplicates() -> None:
    server = ScriptedServer()
    server.drop_after = {1: 2}
    server.overlap = {2: 2}  # the server's resume re-sends seqs 1 and 2
    async with running(server) as url, fast_client(url) as client:
        turn = await client.start_turn("hi")
        end = await turn.wait()
        assert [d["seq"] for d in turn.deltas] == list(range(1, len(DELTAS) + 1))
        assert turn.text == FULL == end["text"]
        assert server.resumes == [("turn-1", 2)]
        assert client.duplicates_dropped == 2 == turn.duplicates_dropped


async def test_resilient_resends_unaccepted_start_and_dedups_replay() -> None:
    server = ScriptedServer()
    server.swallow_start = {1}  # the turn starts, but its turn.accepted never reaches us
    server.dup_seqs = {2: {2, 5}}  # the replay races log and live: seqs 2 and 5 twice
    async with running(server) as url:
        async with fast_client(url) as client:
            turn = client.send("hi", conversation_id="c9", client_turn_id="my-turn-1")
            texts = [d["text"] async for d in turn]
            assert texts == DELTAS
            starts = [f for _, f in server.received if f["type"] == "turn.start"]
            assert len(starts) == 2 and starts[0] == starts[1]  # the SAME frame, same client_turn_id
            assert starts[0]["client_turn_id"] == "my-turn-1" and starts[0]["conversation_id"] == "c9"
            assert server.generations == 1 and turn.accepted["replayed"] is True
            assert client.resends == 1 and client.resumes == 0 and client.duplicates_dropped == 2


async def test_resilient_cancel_mid_reply() -> None:
    server = ScriptedServer()
    server.pause_after = {1: 2}
    async with running(server) as url:
        async with fast_client(url) as client:
            turn = client.send("hi")
            async for delta in turn:
                if delta["seq"] == 2:
                    turn.cancel()  # sync, as a SIGINT handler or a UI button calls it
            assert turn.end["finish_reason"] == "cancelled" and turn.text == "".join(DELTAS[:2])
            cancels = [f for _, f in server.received if f["type"] == "turn.cancel"]
            assert cancels == [{"type": "turn.cancel", "turn_id": "turn-1"}]


@pytest.mark.parametrize("source", ["error", "history", "none"])
async def test_resume_expired_surfaces_final_text_or_raises(source: str) -> None:
    server = ScriptedServer()
    server.drop_after = {1: 3}
    server.expire_resumes = True
    if source == "error":
        server.expired_text = FULL
    elif source == "history":
        server.history_messages = [{"id": "m2", "role": "assistant", "text": FULL, "turn_id": "turn-1",
                                    "status": "stop", "created_at": 2}]
    async with running(server) as url:
        async with fast_client(url) as client:
            turn = await client.start_turn("hi", conversation_id="c1")
            if source == "none":
                with pytest.raises(ServerError) as info:
                    await turn.wait()
                assert info.value.code == "resume_expired" and turn.text == "".join(DELTAS[:3])
                return
            texts = [d["text"] async for d in turn]
            assert texts == DELTAS[:3] + ["".join(DELTAS[3:])]  # one catch-up delta, nothing twice
            assert turn.text == FULL and turn.end["recovered_from"] == source
            assert turn.end["finish_reason"] == ("stop" if source == "history" else "unknown")


async def test_dead_connection_detected_from_server_silence() -> None:
    server = ScriptedServer(interval_ms=50, timeout_ms=100)  # the client takes these from ready
    server.silent = {1}
    states: list[str] = []
    async with running(server) as url:
        async with fast_client(url, on_state=states.append) as client:
            started = time.monotonic()
            turn = await client.start_turn("hi")
            await asyncio.wait_for(turn.wait(), 5)
            elapsed = time.monotonic() - started
            assert turn.text == FULL and client.dead_connections == 1 and client.reconnects == 1
            assert elapsed >= 0.15 - 0.02  # interval + timeout of silence before giving up
            pings = [f for i, f in server.received if i == 1 and f["type"] == "ping"]
            assert len(pings) >= 2  # the client kept pinging at interval_ms
            assert server.generations == 1 and client.resends == 1
    assert states[:3] == ["connecting", "ready", "reconnecting"] and states[-1] == "closed"


async def test_heartbeat_override_keeps_a_quiet_connection() -> None:
    server = ScriptedServer()  # answers pings: never silent for long
    async with running(server) as url:
        async with fast_client(url, heartbeat_interval=0.03, heartbeat_timeout=0.06) as client:
            await asyncio.sleep(0.3)
            assert client.dead_connections == 0 and client.reconnects == 0
            assert sum(f["type"] == "ping" for _, f in server.received) >= 5
            assert await client.ping() >= 0


async def test_4401_is_not_retried() -> None:
    server = ScriptedServer()
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0)

    async with running(server) as url:
        client = ResilientClient(url, token="bad", sleep=fake_sleep)
        with pytest.raises(AuthenticationError):
            await client.connect(timeout=5)
        await asyncio.sleep(0.05)
        assert server.connections == 1 and delays == [] and client.state == "closed"
        with pytest.raises(AuthenticationError):
            await client.start_turn("hi")
        await client.close()

        # mid-session: the token expires, the server closes 4401; the turn surfaces it
        server.close_after_ready = {2: 4401}
        client = ResilientClient(url, token="good", sleep=fake_sleep)
        turn = client.send("hi")
        with pytest.raises(AuthenticationError):
            await turn.wait()
        await asyncio.sleep(0.05)
        assert server.connections == 2 and delays == []
        await client.close()
    assert client_tasks() == []


async def test_history_cancel_active_turns_and_close_leaves_no_tasks() -> None:
    server = ScriptedServer()
    server.active_turns = [{"turn_id": "elsewhere", "conversation_id": "default", "last_seq": 2}]
    async with running(server) as url:
        client = fast_client(url)
        ready = await client.connect(timeout=5)
        assert ready["model"] == "scripted" and client.state == "ready"
        assert client.active_turns == server.active_turns
        assert (await client.history("c1"))["messages"][0]["role"] == "user"
        assert (await client.clear_history("c1"))["type"] == "history.cleared"
        never_sent = client.send("hi")
        await client.cancel(never_sent)
        assert (await never_sent.wait())["finish_reason"] == "cancelled"
        followed = await client.follow("elsewhere", after_seq=2)
        assert [d["seq"] async for d in followed] == [3, 4, 5, 6, 7]
        assert server.resumes == [("elsewhere", 2)]
        pending = client.send("hello")
        await pending.submit()
        assert client_tasks()  # the supervisor and the reader are running
        await client.close()
        await client.close()  # idempotent
        assert client.closed and client.state == "closed" and client.connection is None
    assert client_tasks() == []


async def test_chat_smoke() -> None:
    server = ScriptedServer()
    out, err = io.StringIO(), io.StringIO()
    async with running(server) as url:
        code = await run_chat(url, user="alice", conversation_id="c1", subprotocol=MSGPACK_SUBPROTOCOL,
                              stdin=io.StringIO("hello\n/history\n/clear\n/bogus\n/quit\nnot sent\n"),
                              stdout=out, stderr=err)
    assert code == 0
    assert out.getvalue().splitlines() == [FULL, "user: hi"]
    assert "history cleared" in err.getvalue() and "unknown command" in err.getvalue()
    sent = [f["type"] for _, f in server.received]
    assert sent == ["turn.start", "history.get", "history.clear"]
    import argparse
    args = add_chat_arguments(argparse.ArgumentParser()).parse_args(["--user", "bob", "--msgpack"])
    assert args.url == "ws://127.0.0.1:8000/v1/ws" and args.msgpack and args.conversation == "default"
    assert client_tasks() == []
