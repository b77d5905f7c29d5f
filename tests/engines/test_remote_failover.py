"""The remote engine against local servers that answer like vLLM's and fail on cue.

The real-vLLM tests (``test_remote.py``) take minutes and can only kill a
server; these script the failures the engine tells apart (5xx before any
output, a stream cut after some, vLLM giving a request up) in a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
from fake_vllm_server import FakeVllmServer, running

from protocol.errors import EngineError, Unavailable
from server.engines.base import EngineDelta, EngineEvent, EngineFinish, EngineRequest, SamplingOptions
from server.engines.remote import RemoteEngine
from sessions.messages import ChatMessage

INTERVAL_S = 0.05
_ids = iter(range(10**9))


@pytest_asyncio.fixture
async def servers() -> AsyncIterator[list[FakeVllmServer]]:
    async with running(FakeVllmServer(model="smol", max_model_len=4096),
                       FakeVllmServer(model="smol", max_model_len=2048)) as pair:
        yield pair


@pytest_asyncio.fixture
async def engine(servers: list[FakeVllmServer]) -> AsyncIterator[RemoteEngine]:
    eng = RemoteEngine([s.url for s in servers], health_interval_s=INTERVAL_S)
    await asyncio.wait_for(eng.start(), 60)
    await until(lambda: all(r.routable for r in eng.replicas), "both replicas routable")
    yield eng
    await eng.close()


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


def request_for(user: str, **sampling: object) -> EngineRequest:
    return EngineRequest(request_id=f"fake-{next(_ids)}", messages=(ChatMessage("user", "Hello!"),),
                         sampling=SamplingOptions(**sampling), user_id=user)  # type: ignore[arg-type]


def user_preferring(engine: RemoteEngine, url: str) -> str:
    return next(u for u in (f"user-{i}" for i in range(1000)) if engine.preference(u)[0] == url)


def by_url(servers: list[FakeVllmServer], url: str | None) -> FakeVllmServer:
    return next(s for s in servers if s.url == url)


async def collect(engine: RemoteEngine, request: EngineRequest) -> tuple[list[EngineDelta], list[EngineEvent]]:
    deltas: list[EngineDelta] = []
    events: list[EngineEvent] = []
    async for event in engine.generate(request):
        events.append(event)
        if isinstance(event, EngineDelta):
            deltas.append(event)
    return deltas, events


async def test_start_discovers_and_warms_every_replica(engine: RemoteEngine, servers):
    assert engine.ready and engine.model_name == "smol"
    assert engine.max_model_len == 2048  # the smaller card
    for s in servers:  # one short warm-up each, not counted as a routed request
        assert [r["max_tokens"] for r in s.requests] == [2]
    assert engine.request_counts() == {s.url: 0 for s in servers}
    assert engine.tokenizer_source is None  # nothing local to count with: estimates


async def test_a_turn_streams_from_the_users_replica(engine: RemoteEngine, servers):
    user = user_preferring(engine, servers[1].url)
    servers[1].cached_tokens = 4
    request = request_for(user, max_tokens=8)
    deltas, events = await collect(engine, request)
    assert "".join(d.text for d in deltas) == "Hello there!"
    finish = events[-1]
    assert isinstance(finish, EngineFinish)
    assert (finish.finish_reason, finish.prompt_tokens, finish.completion_tokens,
            finish.cached_prompt_tokens) == ("stop", 11, 3, 4)
    assert finish.engine_ttft_ms is not None and finish.engine_ttft_ms >= 0
    assert engine.served_by(request.request_id) == servers[1].url
    assert engine.request_counts() == {servers[0].url: 0, servers[1].url: 1}
    assert engine.load().recent_ttft_ms is not None and engine.inflight() == 0


async def test_a_5xx_before_any_output_moves_the_turn_to_the_next_replica(engine: RemoteEngine, servers):
    first, second = servers
    user = user_preferring(engine, first.url)
    first.completion_status = 500
    first.health_status = 503  # keeps it down until told otherwise
    request = request_for(user)
    deltas, events = await collect(engine, request)
    assert deltas and isinstance(events[-1], EngineFinish)
    assert engine.served_by(request.request_id) == second.url
    failed = next(r for r in engine.replicas if r.url == first.url)
    assert failed.failures == 1 and not failed.routable
    assert engine.replica_for(user) == second.url

    # The next passing health check brings the replica, and its users, back.
    first.completion_status = first.health_status = 200
    await until(lambda: engine.replica_for(user) == first.url, "the user back on the recovered replica")
    request = request_for(user)
    await collect(engine, request)
    assert engine.served_by(request.request_id) == first.url


async def test_a_stream_cut_after_output_fails_the_turn_and_the_replica(engine: RemoteEngine, servers):
    user = user_preferring(engine, servers[0].url)
    servers[0].cut_after_tokens = 2
    servers[0].health_status = 503
    received: list[EngineEvent] = []
    with pytest.raises(EngineError, match="ended before the reply finished"):
        async for event in engine.generate(request_for(user)):
            received.append(event)
    # What came before the failure reached the caller; no retry elsewhere.
    assert "".join(e.text for e in received if isinstance(e, EngineDelta)) == "Hello there"
    assert not any(isinstance(e, EngineFinish) for e in received)
    assert len(servers[1].requests) == 1  # its warm-up only
    assert engine.replica_for(user) == servers[1].url


async def test_vllm_giving_a_request_up_fails_the_turn_but_not_the_replica(engine: RemoteEngine, servers):
    user = user_preferring(engine, servers[0].url)
    servers[0].finish_reason = "abort"
    with pytest.raises(EngineError, match=r"ended the request \(abort\)"):
        await collect(engine, request_for(user))
    replica = next(r for r in engine.replicas if r.url == servers[0].url)
    assert replica.routable and replica.failures == 0


async def test_abort_and_close_stop_the_upstream_streams(servers):
    for s in servers:
        s.tokens = ("word ",) * 200
    engine = RemoteEngine([s.url for s in servers], health_interval_s=INTERVAL_S)
    try:
        await asyncio.wait_for(engine.start(), 60)
        for s in servers:
            s.token_delay_s = 0.02

        # abort(request_id): the generator returns without a finish.
        request = request_for("abort-user")
        server = by_url(servers, engine.replica_for("abort-user"))
        events: list[EngineEvent] = []
        async for event in engine.generate(request):
            events.append(event)
            if len(events) == 2:
                await engine.abort(request.request_id)
        assert len(events) >= 2 and not any(isinstance(e, EngineFinish) for e in events)
        assert engine.inflight() == 0
        await until(lambda: server.open_streams == 0, "the server's stream closed")

        # close(): a turn still streaming fails with EngineError.
        started = asyncio.Event()

        async def stream_until_closed() -> None:
            async for _event in engine.generate(request_for("close-user")):
                started.set()

        task = asyncio.create_task(stream_until_closed())
        await asyncio.wait_for(started.wait(), 10)
        await engine.close()
        with pytest.raises(EngineError, match="closing"):
            await task
        assert not engine.ready and engine.inflight() == 0
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("remote-engine")]
        await until(lambda: all(s.open_streams == 0 for s in servers), "every server stream closed")
    finally:
        await engine.close()


async def test_no_routable_replica_fails_the_turn_at_once(engine: RemoteEngine, servers):
    for s in servers:
        s.health_status = 503
    await until(lambda: not any(r.routable for r in engine.replicas), "both replicas down")
    with pytest.raises(EngineError, match="no upstream can take the request"):
        await collect(engine, request_for("anyone"))


async def test_load_counts_open_streams_and_other_clients_requests(engine: RemoteEngine, servers):
    servers[0].running, servers[0].waiting = 2, 1
    await until(lambda: engine.load().running == 2, "the scrape of the first replica")
    load = engine.load()
    assert (load.waiting, load.max_num_seqs) == (1, 2 * 256)


async def test_start_gives_up_when_no_replica_comes_up(servers):
    for s in servers:
        s.health_status = 503
    engine = RemoteEngine([s.url for s in servers], health_interval_s=INTERVAL_S, start_timeout_s=0.3)
    try:
        with pytest.raises(Unavailable, match="no upstream became ready"):
            await engine.start()
    finally:
        await engine.close()
