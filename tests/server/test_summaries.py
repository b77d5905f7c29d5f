"""Conversation memory (server/summaries.py): trimmed turns folded into a running
summary in the background, and the low priority that keeps it off user turns.

In process, on the real Redis at 127.0.0.1:6379 (a key prefix per test), with a
scripted engine whose requests the tests hold and release, and the simulated
engine for scheduling order and admission. The last test runs a gateway with
the real small model (marked ``vllm``): a summary only after a trim, and the
prefix cache between trims, measured.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import REDIS_URL, ServerProcess, clean_prefix
from wire import open_ws, stream_turn

from protocol.errors import EngineError
from server.admission import AdmissionController
from server.engines.base import (
    BACKGROUND_PRIORITY,
    Engine,
    EngineDelta,
    EngineEvent,
    EngineFinish,
    EngineLoad,
    EngineRequest,
    SamplingOptions,
)
from server.engines.simulated import SimulatedEngine
from server.metrics import Metrics
from server.summaries import Summarizer
from sessions.keys import KeySpace, glob_escape
from sessions.messages import ChatMessage
from sessions.prompt import PastTurn
from sessions.summary import GREETING_MARK, shown_summary

USER = "user-1"
CONV = "c1"


class HeldEngine(Engine):
    """Answers every request with ``text`` once ``gate`` is open; records what ran and what was closed."""

    model_name = "held"

    def __init__(self, text: str = "Sam has a cat named Pixel.", *, fail: bool = False,
                 finish_reason: str = "stop", max_model_len: int = 4096) -> None:
        self.text = text
        self.fail = fail
        self.finish_reason = finish_reason
        self.max_model_len = max_model_len
        self.gate = asyncio.Event()
        self.gate.set()
        self.requests: list[EngineRequest] = []
        self.closed: list[str] = []
        self.entered = asyncio.Event()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:  # type: ignore[override]
        self.requests.append(request)
        self.entered.set()
        try:
            await self.gate.wait()
            if self.fail:
                raise EngineError("injected failure")
            yield EngineDelta(self.text, tokens=len(self.text.split()))
            yield EngineFinish(self.finish_reason, prompt_tokens=50, completion_tokens=6)
        finally:
            self.closed.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        pass

    def load(self) -> EngineLoad:
        return EngineLoad(running=0, waiting=0, max_num_seqs=8)


class Env:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self.summarizers: list[Summarizer] = []

    def summarizer(self, engine: Engine, **kw: object) -> Summarizer:
        kw.setdefault("instructions", "")
        kw.setdefault("max_tokens", 100)
        kw.setdefault("metrics", Metrics())
        s = Summarizer(self.redis, self.keys, engine, **kw)  # type: ignore[arg-type]
        self.summarizers.append(s)
        return s

    @property
    def meta_key(self) -> str:
        return self.keys.conversation_meta(USER, CONV)

    async def meta(self) -> dict[str, str]:
        return await self.redis.hgetall(self.meta_key)

    async def conversation_exists(self) -> None:
        await self.redis.xadd(self.keys.history(USER, CONV), {"role": "user", "text": "hi", "turn_id": "t_x"})
        await self.redis.hset(self.meta_key, "character_id", "mira")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    prefix = f"rapport-test-summaries:{uuid.uuid4().hex}:"
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    e = Env(redis, KeySpace(prefix))
    try:
        yield e
    finally:
        for s in e.summarizers:
            await s.close()
        keys = [k async for k in redis.scan_iter(match=glob_escape(prefix) + "*", count=1000)]
        if keys:
            await redis.unlink(*keys)
        await redis.aclose()


GREETING = PastTurn("", "Hi, I am Mira.")
TURNS = [GREETING] + [PastTurn(f"my message {i}", f"your reply {i}", f"t_{i}") for i in range(1, 9)]


def counts(s: Summarizer) -> dict[str, float]:
    assert s.metrics is not None
    return {outcome: s.metrics.summary_folds.labels(outcome)._value.get()
            for outcome in ("started", "succeeded", "failed", "lost")}


async def test_a_fold_stores_the_summary_and_the_last_folded_turn(env: Env) -> None:
    await env.conversation_exists()
    engine = HeldEngine()
    s = env.summarizer(engine, max_tokens=120, instructions="Summarise ({max_words} words).")
    s.maybe_fold(USER, CONV, TURNS[:5], await env.meta())
    await s.wait_idle()
    meta = await env.meta()
    assert meta["summary"] == "Sam has a cat named Pixel."
    assert meta["summary_upto"] == "t_4"
    assert meta["character_id"] == "mira"  # the rest of the hash is untouched
    [request] = engine.requests
    assert request.request_id.startswith("sum_")
    assert request.priority == BACKGROUND_PRIORITY > 0
    assert request.user_id == USER
    assert request.sampling.temperature == pytest.approx(0.2)
    assert request.sampling.max_tokens == 120
    assert "\nUser:" in request.sampling.stop  # the model may not go on with the transcript
    assert request.messages[0] == ChatMessage("system", "Summarise (72 words).")
    assert "Companion: Hi, I am Mira." in request.messages[1].content
    assert "User: my message 4\nCompanion: your reply 4" in request.messages[1].content
    assert "my message 5" not in request.messages[1].content
    assert counts(s) == {"started": 1, "succeeded": 1, "failed": 0, "lost": 0}
    assert s.metrics is not None and s.metrics.summary_engine._sum.get() > 0


async def test_the_next_trim_folds_only_the_new_turns_into_the_summary(env: Env) -> None:
    await env.conversation_exists()
    await env.redis.hset(env.meta_key, mapping={"summary": "Mira greeted Sam.", "summary_upto": "t_4"})
    engine = HeldEngine("Mira greeted Sam. Sam has a cat.")
    s = env.summarizer(engine)
    s.maybe_fold(USER, CONV, TURNS[:9], await env.meta())
    await s.wait_idle()
    [request] = engine.requests
    assert "Summary so far:\nMira greeted Sam." in request.messages[1].content
    assert "my message 4" not in request.messages[1].content
    assert "User: my message 5" in request.messages[1].content
    assert (await env.meta())["summary_upto"] == "t_8"


async def test_nothing_to_fold_starts_no_engine_request(env: Env) -> None:
    await env.conversation_exists()
    await env.redis.hset(env.meta_key, mapping={"summary": "s", "summary_upto": "t_4"})
    engine = HeldEngine()
    s = env.summarizer(engine)
    s.maybe_fold(USER, CONV, TURNS[:5], await env.meta())  # the same trim again
    s.maybe_fold(USER, CONV, [], await env.meta())  # no trim at all
    assert s.pending() == 0
    await s.wait_idle()
    assert engine.requests == []
    assert counts(s)["started"] == 0


async def test_disabled_does_nothing(env: Env) -> None:
    await env.conversation_exists()
    engine = HeldEngine()
    s = env.summarizer(engine, enabled=False)
    s.maybe_fold(USER, CONV, TURNS[:5], {})
    await s.wait_idle()
    assert engine.requests == [] and await env.meta() == {"character_id": "mira"}


async def test_one_fold_per_conversation_in_a_process(env: Env) -> None:
    await env.conversation_exists()
    engine = HeldEngine()
    engine.gate.clear()
    s = env.summarizer(engine)
    s.maybe_fold(USER, CONV, TURNS[:5], {})
    await asyncio.wait_for(engine.entered.wait(), 5)
    s.maybe_fold(USER, CONV, TURNS[:5], {})  # the next turn, before the fold ended
    s.maybe_fold(USER, CONV, TURNS[:6], {})
    assert s.pending() == 1
    engine.gate.set()
    await s.wait_idle()
    assert len(engine.requests) == 1


async def test_single_flight_across_processes_sharing_redis(env: Env) -> None:
    await env.conversation_exists()
    first, second = HeldEngine("first"), HeldEngine("second")
    first.gate.clear()
    second.gate.clear()
    a, b = env.summarizer(first), env.summarizer(second)
    meta = await env.meta()
    a.maybe_fold(USER, CONV, TURNS[:5], meta)
    await asyncio.wait_for(first.entered.wait(), 5)
    b.maybe_fold(USER, CONV, TURNS[:5], meta)  # another gateway saw the same trim
    await b.wait_idle()
    assert second.requests == []  # the lock was held: no second engine request
    first.gate.set()
    await a.wait_idle()
    assert (await env.meta())["summary"] == "first"
    lock = env.keys.user_key(USER, "sumlock:" + CONV)
    assert await env.redis.exists(lock) == 0  # released once stored
    # The lock sits under the user's hash tag (one Cluster slot with the meta hash).
    assert env.keys.user_tag(USER) in lock
    # Released, the next fold may run anywhere; with the summary stored, nothing is left to fold.
    b.maybe_fold(USER, CONV, TURNS[:5], await env.meta())
    await b.wait_idle()
    assert second.requests == []


async def test_a_fold_that_starts_after_another_stored_does_no_engine_work(env: Env) -> None:
    await env.conversation_exists()
    stale = await env.meta()  # read by a turn before another process's fold stored
    await env.redis.hset(env.meta_key, mapping={"summary": "other", "summary_upto": "t_4"})
    engine = HeldEngine()
    s = env.summarizer(engine)
    s.maybe_fold(USER, CONV, TURNS[:5], stale)
    await s.wait_idle()
    assert engine.requests == []
    assert (await env.meta())["summary"] == "other"
    assert counts(s)["lost"] == 1


async def test_compare_and_set_loses_gracefully(env: Env) -> None:
    await env.conversation_exists()
    engine = HeldEngine("mine")
    engine.gate.clear()
    s = env.summarizer(engine, lock_ms=200)
    s.maybe_fold(USER, CONV, TURNS[:5], await env.meta())
    await asyncio.wait_for(engine.entered.wait(), 5)
    # A fold elsewhere (say, after this one's lock expired) stores first.
    await env.redis.hset(env.meta_key, mapping={"summary": "theirs", "summary_upto": "t_6"})
    engine.gate.set()
    await s.wait_idle()
    meta = await env.meta()
    assert (meta["summary"], meta["summary_upto"]) == ("theirs", "t_6")
    assert counts(s) == {"started": 1, "succeeded": 0, "failed": 0, "lost": 1}


async def test_a_deleted_conversation_is_not_revived(env: Env) -> None:
    await env.conversation_exists()
    engine = HeldEngine()
    engine.gate.clear()
    s = env.summarizer(engine)
    s.maybe_fold(USER, CONV, TURNS[:5], await env.meta())
    await asyncio.wait_for(engine.entered.wait(), 5)
    await env.redis.delete(env.meta_key, env.keys.history(USER, CONV))
    engine.gate.set()
    await s.wait_idle()
    assert await env.redis.exists(env.meta_key) == 0


@pytest.mark.parametrize("engine", [HeldEngine(fail=True), HeldEngine(finish_reason="abort"), HeldEngine("  ")],
                         ids=["engine-error", "aborted", "empty"])
async def test_engine_failure_is_counted_and_nothing_stored(env: Env, engine: HeldEngine) -> None:
    await env.conversation_exists()
    s = env.summarizer(engine)
    s.maybe_fold(USER, CONV, TURNS[:5], await env.meta())
    await s.wait_idle()
    assert await env.meta() == {"character_id": "mira"}
    assert counts(s) == {"started": 1, "succeeded": 0, "failed": 1, "lost": 0}
    assert await env.redis.exists(env.keys.user_key(USER, "sumlock:" + CONV)) == 0
    # The next turn tries again (summary_upto has not moved).
    engine.fail, engine.finish_reason, engine.text = False, "stop", "Second try."
    s.maybe_fold(USER, CONV, TURNS[:5], await env.meta())
    await s.wait_idle()
    assert (await env.meta())["summary"] == "Second try."


async def test_a_reply_cut_by_max_tokens_keeps_whole_sentences(env: Env) -> None:
    await env.conversation_exists()
    engine = HeldEngine("Sam has a cat. Mira promised to", finish_reason="length")
    s = env.summarizer(engine)
    s.maybe_fold(USER, CONV, TURNS[:5], {})
    await s.wait_idle()
    assert (await env.meta())["summary"] == "Sam has a cat."


async def test_a_greeting_only_fold_is_marked(env: Env) -> None:
    await env.conversation_exists()
    s = env.summarizer(HeldEngine())
    s.maybe_fold(USER, CONV, TURNS[:1], {})
    await s.wait_idle()
    assert (await env.meta())["summary_upto"] == GREETING_MARK


async def test_turns_too_long_for_one_prompt_are_folded_in_chunks(env: Env) -> None:
    await env.conversation_exists()
    long_turns = [PastTurn("word " * 300, "reply " * 300, f"t_{i}") for i in range(1, 5)]
    engine = HeldEngine("Short.", max_model_len=1200)
    s = env.summarizer(engine, max_tokens=100)
    s.maybe_fold(USER, CONV, long_turns, {})
    await s.wait_idle()
    assert len(engine.requests) > 1
    for request in engine.requests:
        assert engine.count_tokens(request.messages) <= engine.max_model_len - 100
    assert "Summary so far:\nShort." in engine.requests[-1].messages[1].content
    assert (await env.meta())["summary_upto"] == "t_4"


async def test_close_cancels_pending_folds(env: Env) -> None:
    await env.conversation_exists()
    engine = HeldEngine()
    engine.gate.clear()
    s = env.summarizer(engine)
    s.maybe_fold(USER, CONV, TURNS[:5], await env.meta())
    await asyncio.wait_for(engine.entered.wait(), 5)
    await asyncio.wait_for(s.close(), 5)
    assert engine.closed == [engine.requests[0].request_id]  # the engine request was closed (aborted)
    assert s.pending() == 0
    assert await env.meta() == {"character_id": "mira"}
    assert await env.redis.exists(env.keys.user_key(USER, "sumlock:" + CONV)) == 0
    s.maybe_fold(USER, CONV, TURNS[:5], {})  # closed: nothing new starts
    assert s.pending() == 0 and len(engine.requests) == 1


async def test_maybe_fold_never_raises() -> None:
    # Outside an event loop it cannot schedule; it must still return quietly.
    engine = HeldEngine()
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    s = Summarizer(redis, KeySpace("rapport-test-summaries-none:"), engine, instructions="", max_tokens=10)
    await asyncio.to_thread(s.maybe_fold, USER, CONV, TURNS[:5], {})
    assert engine.requests == []
    await redis.aclose()


# ------------------------------------------------- background priority


def _request(rid: str, priority: int = 0, max_tokens: int = 4) -> EngineRequest:
    return EngineRequest(request_id=rid, messages=(ChatMessage("user", f"hello {rid}"),),
                         sampling=SamplingOptions(max_tokens=max_tokens, ignore_eos=True), priority=priority)


async def _first_token_at(engine: SimulatedEngine, request: EngineRequest, order: list[str]) -> None:
    async for event in engine.generate(request):
        if isinstance(event, EngineDelta) and request.request_id not in order:
            order.append(request.request_id)


async def test_the_simulated_engine_schedules_a_waiting_user_turn_before_background_work() -> None:
    engine = SimulatedEngine(ttft_ms=5, itl_ms=5, max_num_seqs=1)
    await engine.start()
    try:
        order: list[str] = []
        busy = asyncio.create_task(_first_token_at(engine, _request("busy", max_tokens=20), order))
        await asyncio.sleep(0.03)  # "busy" holds the only slot
        background = asyncio.create_task(
            _first_token_at(engine, _request("sum", priority=BACKGROUND_PRIORITY), order))
        await asyncio.sleep(0.01)
        user = asyncio.create_task(_first_token_at(engine, _request("user"), order))
        await asyncio.sleep(0)
        load = engine.load()
        assert (load.waiting, load.background, load.background_waiting) == (2, 1, 1)
        await asyncio.wait_for(asyncio.gather(busy, background, user), 10)
        assert order == ["busy", "user", "sum"]  # submitted before "user", scheduled after it
        assert engine.load().background == 0
    finally:
        await engine.close()


async def test_admission_does_not_count_waiting_background_requests() -> None:
    engine = SimulatedEngine(ttft_ms=5, itl_ms=5, max_num_seqs=1)
    await engine.start()
    try:
        admission = AdmissionController(engine, budget_ms=2000, reply_tokens=20)
        busy = asyncio.create_task(_first_token_at(engine, _request("busy", max_tokens=200), []))
        await asyncio.sleep(0.03)
        alone = admission.predict(50).predicted_ms
        estimate_alone = engine.estimate_ttft_ms(50)
        waiting = [asyncio.create_task(_first_token_at(
            engine, _request(f"sum{i}", priority=BACKGROUND_PRIORITY, max_tokens=200), [])) for i in range(5)]
        await asyncio.sleep(0)
        assert engine.load().background_waiting == 5
        # Five background requests waiting change nothing for a user turn ...
        assert engine.estimate_ttft_ms(50) == pytest.approx(estimate_alone, abs=6.0)
        assert admission.predict(50).predicted_ms == pytest.approx(alone, abs=6.0)
        user = asyncio.create_task(_first_token_at(engine, _request("user", max_tokens=200), []))
        await asyncio.sleep(0)
        # ... while one user request waiting does.
        assert engine.estimate_ttft_ms(50) > estimate_alone + 100
        for task in (busy, user, *waiting):
            task.cancel()
        await asyncio.gather(busy, user, *waiting, return_exceptions=True)
    finally:
        await engine.close()


# ------------------------------------------------- end to end, the real small model


@pytest.fixture(scope="module")
def vllm_summary_server() -> Iterator[ServerProcess]:
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh installs it)")
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "vllm", "--auth", "dev", "--max-history-turns", "4",
        "--default-max-tokens", "12", "--default-temperature", "0", "--summary-max-tokens", "48",
        # This CPU serves a few tokens a second: no first-token budget here.
        "--ttft-budget-ms", "600000", "--hard-deadline-ms", "600000", "--turns-per-minute", "1000",
    ])
    server.start(timeout=600)
    yield server
    server.stop(timeout=60)
    clean_prefix(prefix)


async def _folds_started(server: ServerProcess) -> float:
    async with httpx.AsyncClient() as http:
        body = (await http.get(server.base + "/metrics")).text
    found = re.search(r'^rapport_summary_folds_total\{outcome="started"\} (\S+)$', body, re.M)
    return float(found.group(1)) if found else 0.0


async def _wait_for_summary_upto(redis: aioredis.Redis, key: str, upto: str, timeout: float,
                                 field: str = "summary_upto") -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        meta = await redis.hgetall(key)
        if meta.get(field) == upto:
            return meta
        assert time.monotonic() < deadline, f"no summary up to {upto} after {timeout} s: {meta}"
        await asyncio.sleep(0.5)


@pytest.mark.vllm
@pytest.mark.timeout(1500)
async def test_the_real_model_summarises_only_at_trims_and_keeps_the_prefix_between_them(
        vllm_summary_server: ServerProcess) -> None:
    """--max-history-turns 4 trims in blocks of 4: the turn with 5 past turns keeps 1
    (dropping 4), the next three extend it, the turn with 9 past turns drops 4 more.
    The turns a trim drops are folded ahead, during the turn before it, and the
    summary is shown from the trimming turn on: after a trim, every turn's prompt
    is served from vLLM's prefix cache up to its newest turn."""
    server = vllm_summary_server
    user, conversation = f"memory-{uuid.uuid4().hex[:6]}", "memory"
    keys = KeySpace(server.prefix)
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    ws = await open_ws(server, user=user)
    facts = ["My name is Sam and I live in Oslo.", "I have a cat named Pixel.", "My sister Ana is a doctor.",
             "I promised Ana to visit her in May.", "I feel nervous about my new job.", "I play the cello.",
             "My favourite food is fish soup.", "I am learning Spanish.", "My best friend is called Leo.",
             "I grew up near the sea."]
    padding = " ".join(f"Detail {n}: the weather in Oslo was grey and I walked to the harbour." for n in range(6))
    exchange_ids: list[str] = []
    usages: list[dict[str, int]] = []

    async def turn(n: int) -> dict[str, int]:
        frames = await stream_turn(ws, f"{facts[n]} {padding}", timeout=600, conversation_id=conversation)
        accepted = next(f for f in frames if f["type"] == "turn.accepted")
        end = frames[-1]
        assert end["finish_reason"] in ("stop", "length"), end
        exchange_ids.append(accepted["exchange_id"])
        usages.append(end["usage"])
        return end["usage"]

    meta_key = keys.conversation_meta(user, conversation)
    try:
        for n in range(4):  # 0..3 past turns: nothing is trimmed, nothing folded
            await turn(n)
            assert not {"summary", "summary_next"} & set(await redis.hgetall(meta_key))
        assert await _folds_started(server) == 0
        await turn(4)  # the next turn trims: the turns it drops are folded now, staged, not shown
        staged = await _wait_for_summary_upto(redis, meta_key, exchange_ids[3], timeout=600,
                                              field="summary_next_upto")
        assert "summary" not in staged
        trimming = await turn(5)  # 5 past turns: the window keeps 1, drops 4, and shows the summary
        first = await _wait_for_summary_upto(redis, meta_key, exchange_ids[3], timeout=600)
        print(f"\nsummary after the first trim (turns 1-4): {first['summary']!r}")
        assert first["summary"].strip() and first["summary"] == staged["summary_next"]
        between = [await turn(n) for n in (6, 7)]  # 6, 7 past turns: the same first kept turn
        assert (await redis.hgetall(meta_key))["summary"] == first["summary"]  # unchanged between trims
        between.append(await turn(8))  # the next trim is near: folded ahead again
        await _wait_for_summary_upto(redis, meta_key, exchange_ids[7], timeout=600, field="summary_next_upto")
        assert (await redis.hgetall(meta_key))["summary"] == first["summary"]
        await turn(9)  # 9 past turns: the window drops 4 more
        second = await _wait_for_summary_upto(redis, meta_key, exchange_ids[7], timeout=600)
        print(f"summary after the second trim (turns 1-8): {second['summary']!r}")
        assert await _folds_started(server) == 2
        for n, usage in enumerate(usages, start=1):
            print(f"turn {n:2d}: prompt {usage['prompt_tokens']:5d} tokens, cached "
                  f"{usage['cached_prompt_tokens']:5d} ({usage['cached_prompt_tokens'] / usage['prompt_tokens']:.0%})")
        # Between the trims each prompt extends the one before: vLLM's cache serves all
        # of it but the newest turn (it caches whole blocks, 128 tokens on this backend).
        # The trim's own prompt is the one the next turns extend: a trim costs one uncached prompt.
        kept = [trimming, *between]
        for before, after in zip(kept, kept[1:], strict=False):
            assert after["cached_prompt_tokens"] >= before["prompt_tokens"] - 128, usages
            assert after["cached_prompt_tokens"] < after["prompt_tokens"]
    finally:
        await ws.close()
        await redis.aclose()


async def test_a_fold_ahead_is_staged_then_shown_and_promoted_by_the_trim_that_drops_its_turns(env: Env) -> None:
    await env.conversation_exists()
    await env.redis.hset(env.meta_key, mapping={"summary": "Mira greeted Sam.", "summary_upto": "t_4"})
    s = env.summarizer(HeldEngine("Mira greeted Sam. Sam has a cat."))
    # The next turn's window will drop up to t_8: fold it now, but do not show it yet.
    s.maybe_fold(USER, CONV, TURNS[:9], await env.meta(), ahead=True)
    await s.wait_idle()
    meta = await env.meta()
    assert meta["summary"] == "Mira greeted Sam." and meta["summary_upto"] == "t_4"
    assert meta["summary_next"] == "Mira greeted Sam. Sam has a cat." and meta["summary_next_upto"] == "t_8"
    # A window that still holds t_8 shows the stored summary; one that dropped it, the staged one.
    assert shown_summary(meta, TURNS[:5]) == ("Mira greeted Sam.", "t_4", False)
    assert shown_summary(meta, TURNS[:9]) == ("Mira greeted Sam. Sam has a cat.", "t_8", True)
    # Nothing is left to fold for that window; promotion makes the staged summary the stored one.
    s.maybe_fold(USER, CONV, TURNS[:9], meta)
    s.promote(USER, CONV, "t_8")
    await s.wait_idle()
    meta = await env.meta()
    assert meta["summary"] == "Mira greeted Sam. Sam has a cat." and meta["summary_upto"] == "t_8"
    assert "summary_next" not in meta and "summary_next_upto" not in meta
    assert counts(s)["started"] == 1
    # A promotion that no longer matches changes nothing.
    s.promote(USER, CONV, "t_2")
    await s.wait_idle()
    assert (await env.meta())["summary_upto"] == "t_8"
