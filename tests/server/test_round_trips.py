"""Sequential Redis round trips between ``turn.start`` and ``engine.generate``.

Counted for real: the runtime's Redis traffic goes through a proxy that holds
every client-to-Redis write for ``DELAY_S`` before forwarding it. Commands
sent together (one pipeline, or two connections at once) share one delay;
commands sent one after another each pay their own. So the time from
``turn.start`` to the engine being called, divided by ``DELAY_S``, is the
number of round trips on the critical path, whatever mix of pipelines,
scripts and connections produced them.

Before: four (rate limit, history, lease, begin script), one after the other.
After: two (rate limit alongside one pipeline of history and lease, then the
begin script).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from protocol import frames
from protocol.errors import TooLarge
from server.config import Settings
from server.coordination import lease_member
from server.engines.base import Engine, EngineDelta, EngineEvent, EngineFinish, EngineLoad, EngineRequest
from server.runtime import Runtime
from sessions.keys import glob_escape

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
DELAY_S = 0.15


class LatencyProxy:
    """TCP proxy adding ``delay_s`` to every client-to-server write, in order."""

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        self.writers += [client_w, server_w]
        self._spawn(self._delayed(client_r, server_w))
        self._spawn(self._direct(server_r, client_w))

    async def _delayed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        forwarder = asyncio.get_running_loop().create_task(forward())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            await asyncio.Event().wait()  # keep forwarding what is queued until closed
        finally:
            forwarder.cancel()
            await asyncio.gather(forwarder, return_exceptions=True)

    async def _direct(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


class TimedEngine(Engine):
    """Records when each request reached it; answers two tokens."""

    model_name = "timed"
    max_model_len = 4096

    def __init__(self) -> None:
        self.called: dict[str, float] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:  # type: ignore[override]
        self.called[request.request_id] = time.monotonic()
        yield EngineDelta(text="hi", tokens=1)
        yield EngineFinish(finish_reason="stop", prompt_tokens=3, completion_tokens=1, cached_prompt_tokens=0)

    async def abort(self, request_id: str) -> None:
        pass

    def load(self) -> EngineLoad:
        return EngineLoad(running=0, waiting=0, max_num_seqs=8)


class Recorder:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.frames: list[dict[str, Any]] = []

    def push(self, frame: dict[str, Any], *, live: bool = False) -> None:
        self.frames.append(frame)

    def adopt(self, turn_id: str, task: asyncio.Task[None]) -> None:
        pass

    async def end(self) -> dict[str, Any]:
        async with asyncio.timeout(10):
            while not any(f["type"] == "turn.end" for f in self.frames):
                await asyncio.sleep(0.005)
        return next(f for f in self.frames if f["type"] == "turn.end")


@pytest.fixture
async def runtime() -> AsyncIterator[tuple[Runtime, TimedEngine]]:
    try:
        probe = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        await probe.ping()
        await probe.aclose()
    except (OSError, aioredis.ConnectionError):
        pytest.fail("these tests need the real Redis at 127.0.0.1:6379")
    proxy = LatencyProxy((REDIS_HOST, REDIS_PORT), DELAY_S)
    await proxy.start()
    prefix = f"rapport-test:rt:{uuid.uuid4().hex[:8]}:"
    engine = TimedEngine()
    # The background loops (lease renewal, reaping, heartbeats) are not
    # started: only the turn's own commands cross the proxy.
    rt = Runtime(Settings(engine="simulated", auth="dev", redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                          redis_prefix=prefix, max_model_len=4096, turns_per_minute=1000), engine=engine)
    await rt.store.load_scripts()
    try:
        yield rt, engine
    finally:
        await rt.manager.close(drain_s=1.0)
        await rt.redis.aclose()
        await rt.blocking_redis.aclose()
        await rt.audit_redis.aclose()
        await proxy.close()
        direct = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        keys = [k async for k in direct.scan_iter(match=glob_escape(prefix) + "*")]
        if keys:
            await direct.unlink(*keys)
        await direct.aclose()


def _start(conversation: str, text: str = "hello") -> frames.TurnStart:
    frame = frames.parse_client_frame({"type": "turn.start", "conversation_id": conversation,
                                       "client_turn_id": uuid.uuid4().hex, "text": text},
                                      max_input_chars=4000)
    assert isinstance(frame, frames.TurnStart)
    return frame


async def _round_trips(rt: Runtime, engine: TimedEngine, conversation: str) -> float:
    rec = Recorder("rt-user")
    t0 = time.monotonic()
    frame = _start(conversation)
    # What the gateway does with a turn.start: admission (the rate limit's own
    # round trip), then the turn manager.
    await rt.admit_turn(rec.user_id, client_turn_id=frame.client_turn_id)
    turn_id = await rt.manager.start(rec, frame, time.monotonic() * 1000)
    async with asyncio.timeout(10):
        while turn_id not in engine.called:
            await asyncio.sleep(0.001)
    elapsed = engine.called[turn_id] - t0
    assert (await rec.end())["finish_reason"] == "stop"
    return elapsed / DELAY_S


async def test_turn_start_reaches_the_engine_after_three_round_trips_not_four(
        runtime: tuple[Runtime, TimedEngine]) -> None:
    rt, engine = runtime
    conversation = "c-" + uuid.uuid4().hex[:6]
    # The first turn opens the pool's connections (each pays its handshake).
    await _round_trips(rt, engine, conversation)
    measured = [await _round_trips(rt, engine, conversation) for _ in range(3)]
    # The rate limit, then history + lease in one pipeline, then begin_turn:
    # 3 x DELAY_S plus local work; the fourth (a lease of its own) would add a whole DELAY_S.
    assert min(measured) < 3.5, f"round trips on the critical path: {measured}"
    assert min(measured) >= 2.9, f"the proxy did not delay the traffic: {measured}"


async def test_a_refused_start_releases_its_lease(runtime: tuple[Runtime, TimedEngine]) -> None:
    rt, _ = runtime
    rec = Recorder("rt-refused")
    index = rt.keys.running_index()

    rt.engine.max_model_len = 300  # type: ignore[misc]
    try:
        with pytest.raises(TooLarge):
            await rt.manager.start(rec, _start("c-big", "word " * 700), 0.0)
    finally:
        rt.engine.max_model_len = 4096  # type: ignore[misc]
    assert await rt.redis.zrange(index, 0, -1) == []
    assert rec.frames == []
    # An accepted turn's lease is released at its end.
    turn_id = await rt.manager.start(rec, _start("c-ok"), 0.0)
    assert (await rec.end())["finish_reason"] == "stop"
    async with asyncio.timeout(5):
        while await rt.redis.zscore(index, lease_member("rt-refused", turn_id)) is not None:
            await asyncio.sleep(0.01)
