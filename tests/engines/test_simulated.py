"""Tests of the simulated engine (a timing simulation, not a model)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import pytest

from protocol.errors import EngineError, TooLarge
from server.engines.base import (
    ChatMessage,
    EngineDelta,
    EngineFinish,
    EngineRequest,
    SamplingOptions,
)
from server.engines.simulated import SimulatedEngine, tokenize

_ids = itertools.count()

# Fast defaults so the whole file stays quick.
FAST = dict(ttft_ms=4.0, itl_ms=2.0)


def make_request(
    text: str = "hello there, how are you today?",
    *,
    history: tuple[ChatMessage, ...] = (),
    rid: str | None = None,
    **sampling: object,
) -> EngineRequest:
    messages = (ChatMessage("system", "You are a kind companion."), *history, ChatMessage("user", text))
    return EngineRequest(
        request_id=rid or f"req-{next(_ids)}",
        messages=messages,
        sampling=SamplingOptions(**sampling),  # type: ignore[arg-type]
    )


async def collect(engine: SimulatedEngine, request: EngineRequest):
    deltas: list[EngineDelta] = []
    finish: EngineFinish | None = None
    async for event in engine.generate(request):
        if isinstance(event, EngineDelta):
            assert finish is None
            deltas.append(event)
        else:
            assert finish is None
            finish = event
    assert finish is not None
    return "".join(d.text for d in deltas), deltas, finish


@contextlib.asynccontextmanager
async def engine_running(**kwargs):
    engine = SimulatedEngine(**kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def cancel_all(tasks) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------- basics


async def test_named_as_simulation_and_ready_after_start():
    engine = SimulatedEngine(**FAST)
    assert engine.model_name == "simulated:simulated-companion"
    assert SimulatedEngine(label="x").model_name == "simulated:x"
    assert not engine.ready
    await engine.start()
    try:
        assert engine.ready
        assert "not a model" in (SimulatedEngine.__doc__ or "").lower()
    finally:
        await engine.close()
    assert not engine.ready


async def test_count_tokens_matches_prompt_tokens():
    async with engine_running(**FAST, reply_tokens=3) as engine:
        request = make_request("one two three, four")
        _, _, finish = await collect(engine, request)
        assert finish.prompt_tokens == engine.count_tokens(request.messages)
        # content tokens + 3 per message + 2 for the generation prompt
        expected = sum(len(tokenize(m.content)) + 3 for m in request.messages) + 2
        assert finish.prompt_tokens == expected


async def test_deterministic_text():
    async with engine_running(**FAST) as engine:
        a, deltas, _ = await collect(engine, make_request("same prompt", seed=7))
        b, _, _ = await collect(engine, make_request("same prompt", seed=7))
        c, _, _ = await collect(engine, make_request("same prompt", seed=8))
        d, _, _ = await collect(engine, make_request("other prompt", seed=7))
    assert a == b
    assert a != c
    assert a != d
    assert all(delta.tokens == 1 for delta in deltas)
    # Emitted text re-tokenises to one token per delta.
    assert len(tokenize(a)) == len(deltas)
    async with engine_running(**FAST, seed=1) as other:
        e, _, _ = await collect(other, make_request("same prompt", seed=7))
    assert e != a


async def test_reply_length_and_finish_reasons():
    async with engine_running(**FAST, reply_tokens=10) as engine:
        text, deltas, finish = await collect(engine, make_request(max_tokens=100))
        assert (finish.finish_reason, finish.completion_tokens) == ("stop", 10)
        assert sum(d.tokens for d in deltas) == 10

        short, _, finish = await collect(engine, make_request(max_tokens=4))
        assert (finish.finish_reason, finish.completion_tokens) == ("length", 4)
        assert text.startswith(short)  # capping never changes the prefix

        _, _, finish = await collect(engine, make_request(max_tokens=25, ignore_eos=True))
        assert (finish.finish_reason, finish.completion_tokens) == ("length", 25)

    async with engine_running(**FAST, min_reply_tokens=8) as engine:
        for i in range(5):
            _, _, finish = await collect(engine, make_request(f"prompt {i}"))
            assert finish.finish_reason == "stop"
            assert 8 <= finish.completion_tokens <= 60


async def test_context_window_caps_and_rejects():
    async with engine_running(**FAST, max_model_len=40, reply_tokens=30) as engine:
        request = make_request("a b c")
        prompt = engine.count_tokens(request.messages)
        _, _, finish = await collect(engine, request)
        assert finish.finish_reason == "length"
        assert finish.completion_tokens == 40 - prompt
        with pytest.raises(TooLarge):
            await collect(engine, make_request("word " * 50))


async def test_echo_repeats_last_user_message():
    async with engine_running(**FAST, echo=True, reply_tokens=5) as engine:
        text, _, finish = await collect(engine, make_request("Remember the blue kite, please"))
    assert text.startswith("Remember the blue kite, please ")
    assert finish.completion_tokens == len(tokenize("Remember the blue kite, please")) + 5


async def test_stop_strings_end_the_reply():
    async with engine_running(**FAST, reply_tokens=40) as engine:
        text, _, _ = await collect(engine, make_request("stop test", seed=3))
        words = [t for t in tokenize(text) if t.isalpha()]
        stop_word = words[5]
        cut, _, finish = await collect(engine, make_request("stop test", seed=3, stop=(stop_word,)))
    assert finish.finish_reason == "stop"
    assert stop_word not in tokenize(cut)
    assert text.startswith(cut)


async def test_slow_consumer_gets_merged_deltas():
    async with engine_running(ttft_ms=2.0, itl_ms=2.0, reply_tokens=30) as engine:
        gen = engine.generate(make_request())
        first = await gen.__anext__()
        assert isinstance(first, EngineDelta)
        await asyncio.sleep(0.03)
        second = await gen.__anext__()
        assert isinstance(second, EngineDelta) and second.tokens > 1
        total = first.tokens + second.tokens
        async for event in gen:
            if isinstance(event, EngineDelta):
                total += event.tokens
            else:
                assert event.completion_tokens == total == 30


# --------------------------------------------------------------------- timing


def test_step_time_formula():
    engine = SimulatedEngine(
        ttft_ms=40.0, itl_ms=20.0, batch_slowdown=0.01, prefill_ms_per_token=0.5
    )
    assert engine.step_time_ms(1) == pytest.approx(20.0)
    assert engine.step_time_ms(0) == pytest.approx(20.0)
    assert engine.step_time_ms(11) == pytest.approx(20.0 * 1.1)
    assert engine.step_time_ms(101) > engine.step_time_ms(11) > engine.step_time_ms(1)
    # A lone admission costs ttft_ms (+ prefill of the uncached prompt).
    assert engine.step_time_ms(1, admitted=1) == pytest.approx(40.0)
    assert engine.step_time_ms(1, admitted=1, prefill_tokens=100) == pytest.approx(90.0)
    assert engine.step_time_ms(11, admitted=2, prefill_tokens=10) == pytest.approx(22.0 + 20.0 + 5.0)


async def test_ttft_alone_close_to_configured():
    async with engine_running(ttft_ms=100.0, itl_ms=10.0, reply_tokens=3) as engine:
        t0 = time.monotonic()
        gen = engine.generate(make_request())
        first = await gen.__anext__()
        wall_ms = (time.monotonic() - t0) * 1000
        assert isinstance(first, EngineDelta)
        finish = None
        async for event in gen:
            if isinstance(event, EngineFinish):
                finish = event
    assert 80.0 <= wall_ms <= 300.0
    assert finish is not None and 80.0 <= finish.engine_ttft_ms <= 300.0
    load = engine.load()
    assert load.recent_ttft_ms is not None and 80.0 <= load.recent_ttft_ms <= 300.0
    assert load.recent_itl_ms is not None and load.recent_itl_ms >= 8.0


async def test_schedule_does_not_drift_when_loop_is_blocked():
    # 50 tokens at 10 ms plus 40 ms TTFT ~ 530 ms. Blocking the loop for 300 ms
    # mid-stream must not add 300 ms: overdue steps run at once to catch up.
    async with engine_running(ttft_ms=40.0, itl_ms=10.0, reply_tokens=50) as engine:
        t0 = time.monotonic()
        gen = engine.generate(make_request())
        n = 0
        async for event in gen:
            if isinstance(event, EngineDelta):
                n += event.tokens
                if n == 5:
                    time.sleep(0.3)  # deliberately block the event loop
        elapsed_ms = (time.monotonic() - t0) * 1000
        assert engine.stats()["late_steps"] > 0
        # recent_itl_ms is the simulated step time, not skewed by catch-up steps.
        assert engine.load().recent_itl_ms == pytest.approx(10.0)
    assert 500.0 <= elapsed_ms < 750.0


# ------------------------------------------------------------------ batching


async def test_continuous_batching_caps_running():
    async with engine_running(ttft_ms=10.0, itl_ms=5.0, max_num_seqs=2, reply_tokens=10) as engine:
        max_running = 0

        async def consume(i: int):
            nonlocal max_running
            async for event in engine.generate(make_request(f"prompt {i}")):
                max_running = max(max_running, engine.load().running)
                if isinstance(event, EngineFinish):
                    return event

        tasks = [asyncio.create_task(consume(i)) for i in range(4)]
        await wait_for(lambda: engine.load().running == 2)
        load = engine.load()
        assert (load.running, load.waiting, load.max_num_seqs) == (2, 2, 2)
        finishes = await asyncio.gather(*tasks)
        assert all(f.completion_tokens == 10 for f in finishes)
        assert max_running <= 2
        # The later two waited for a whole generation before their first token.
        ttfts = sorted(f.engine_ttft_ms for f in finishes)
        assert ttfts[2] > ttfts[0] + 30.0
        assert engine.load().running == engine.load().waiting == 0


async def test_cancellation_frees_slot():
    async with engine_running(ttft_ms=4.0, itl_ms=4.0, max_num_seqs=1, reply_tokens=500) as engine:
        first = engine.generate(make_request("first"))
        await first.__anext__()
        second_started = asyncio.Event()

        async def consume_second():
            async for _event in engine.generate(make_request("second")):
                second_started.set()

        task = asyncio.create_task(consume_second())
        await wait_for(lambda: engine.load().waiting == 1)
        assert engine.load().running == 1
        await first.aclose()  # consumer closes the stream
        assert engine.load().running == 0  # freed at once
        await asyncio.wait_for(second_started.wait(), 3.0)
        assert (engine.load().running, engine.load().waiting) == (1, 0)

        # Cancelling the consuming task also frees the slot.
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.load().running == 0


async def test_cancel_while_waiting_leaves_queue():
    async with engine_running(**FAST, max_num_seqs=1, reply_tokens=500) as engine:
        tasks = [
            asyncio.create_task(collect(engine, make_request(f"p{i}"))) for i in range(3)
        ]
        await wait_for(lambda: engine.load().waiting == 2)
        tasks[2].cancel()
        await asyncio.gather(tasks[2], return_exceptions=True)
        assert engine.load().waiting == 1
        await cancel_all(tasks)
        assert (engine.load().running, engine.load().waiting) == (0, 0)


async def test_abort_by_id():
    async with engine_running(**FAST, reply_tokens=500) as engine:
        events = []

        async def consume():
            async for event in engine.generate(make_request(rid="to-abort")):
                events.append(event)

        task = asyncio.create_task(consume())
        await wait_for(lambda: len(events) >= 2)
        await engine.abort("to-abort")
        assert engine.load().running == 0
        await asyncio.wait_for(task, 3.0)  # the generator just ends
        assert not any(isinstance(e, EngineFinish) for e in events)
        await engine.abort("to-abort")  # unknown / finished: no-op
        await engine.abort("never-existed")
        # The id can be reused afterwards.
        _, _, finish = await collect(engine, make_request(rid="to-abort", max_tokens=3))
        assert finish.completion_tokens == 3


async def test_abort_waiting_request():
    async with engine_running(**FAST, max_num_seqs=1, reply_tokens=500) as engine:
        running = asyncio.create_task(collect(engine, make_request("a")))
        waiting = asyncio.create_task(collect(engine, make_request("b", rid="waiting-one")))
        await wait_for(lambda: engine.load().waiting == 1)
        await engine.abort("waiting-one")
        assert engine.load().waiting == 0
        with pytest.raises(AssertionError):  # collect() saw no EngineFinish
            await asyncio.wait_for(waiting, 3.0)
        await cancel_all([running])


async def test_failure_injection_raises_engine_error():
    async with engine_running(**FAST, reply_tokens=50) as engine:
        engine.fail_after(3, requests=1)
        received = 0
        with pytest.raises(EngineError):
            async for event in engine.generate(make_request()):
                assert isinstance(event, EngineDelta)
                received += event.tokens
        assert received == 3
        assert engine.load().running == 0
        # Only one request was affected.
        _, _, finish = await collect(engine, make_request())
        assert finish.completion_tokens == 50

    async with engine_running(**FAST, reply_tokens=50, fail_after_tokens=0) as engine:
        assert engine.ready  # warm-up is never failed
        with pytest.raises(EngineError):
            await collect(engine, make_request())


# -------------------------------------------------------------- prefix cache


async def test_prefix_cache_hits_and_saves_prefill():
    history = (
        ChatMessage("user", " ".join(f"story{i % 37} about the sea" for i in range(40))),
        ChatMessage("assistant", "That sounds lovely."),
    )
    kwargs = dict(ttft_ms=5.0, itl_ms=2.0, prefill_ms_per_token=1.0, reply_tokens=3)
    async with engine_running(**kwargs) as engine:
        _, _, cold = await collect(engine, make_request("first question", history=history))
        _, _, warm = await collect(engine, make_request("second question", history=history))
    assert cold.cached_prompt_tokens == 0
    assert warm.cached_prompt_tokens >= 160
    assert warm.cached_prompt_tokens % 16 == 0
    assert warm.cached_prompt_tokens < warm.prompt_tokens
    assert cold.prompt_tokens > 170  # ~170+ ms of prefill when uncached
    assert warm.engine_ttft_ms < cold.engine_ttft_ms - 80.0

    async with engine_running(**kwargs, prefix_cache_blocks=0) as nocache:
        await collect(nocache, make_request("first question", history=history))
        _, _, again = await collect(nocache, make_request("second question", history=history))
    assert again.cached_prompt_tokens == 0


async def test_prefix_cache_covers_previous_reply():
    # Output tokens fill cache blocks, so the next turn reuses prompt + reply.
    async with engine_running(**FAST, reply_tokens=40) as engine:
        first = make_request("tell me a story " * 8)
        reply, _, f1 = await collect(engine, first)
        history = (*first.messages[1:], ChatMessage("assistant", reply))
        _, _, f2 = await collect(engine, make_request("and then?", history=history))
    covered = f1.prompt_tokens + f1.completion_tokens
    assert f2.cached_prompt_tokens >= covered // 16 * 16


async def test_prefix_cache_lru_evicts():
    async with engine_running(**FAST, reply_tokens=2, prefix_cache_blocks=4) as engine:
        long_a = "alpha " * 60
        await collect(engine, make_request(long_a))
        await collect(engine, make_request("beta " * 60))  # evicts alpha's blocks
        _, _, finish = await collect(engine, make_request(long_a))
    assert finish.cached_prompt_tokens == 0


# --------------------------------------------------------- estimate / close


async def test_estimate_ttft_grows_with_queue():
    async with engine_running(ttft_ms=40.0, itl_ms=20.0, max_num_seqs=2, reply_tokens=400) as engine:
        idle = engine.estimate_ttft_ms(100)
        assert idle == pytest.approx(engine.step_time_ms(1, 1, 100))
        tasks = [asyncio.create_task(collect(engine, make_request(f"p{i}"))) for i in range(2)]
        await wait_for(lambda: engine.load().running == 2)
        estimates = [engine.estimate_ttft_ms(100)]
        for i in range(4):
            tasks.append(asyncio.create_task(collect(engine, make_request(f"q{i}"))))
            await wait_for(lambda i=i: engine.load().waiting == i + 1)
            estimates.append(engine.estimate_ttft_ms(100))
        assert all(b > a for a, b in zip(estimates, estimates[1:], strict=False))
        # Two full generations (400 tokens each, ~20 ms a step) ahead of the last one.
        assert estimates[-1] > 2 * 400 * 20.0 * 0.9
        await cancel_all(tasks)


async def test_close_cancels_step_loop_and_fails_inflight():
    engine = SimulatedEngine(**FAST, reply_tokens=1000)
    await engine.start()
    task = engine._task
    assert task is not None and not task.done()
    consumer = asyncio.create_task(collect(engine, make_request()))
    await wait_for(lambda: engine.load().running == 1)
    await engine.close()
    assert task.done()
    assert engine._task is None
    with pytest.raises(EngineError):
        await asyncio.wait_for(consumer, 3.0)
    assert (engine.load().running, engine.load().waiting) == (0, 0)
    leftover = [t for t in asyncio.all_tasks() if t.get_name().startswith("simulated-engine-steps")]
    assert leftover == []
    with pytest.raises(EngineError):
        await collect(engine, make_request())


async def test_generate_before_start_raises():
    engine = SimulatedEngine(**FAST)
    with pytest.raises(EngineError):
        await collect(engine, make_request())


async def test_many_concurrent_requests():
    async with engine_running(ttft_ms=5.0, itl_ms=5.0, max_num_seqs=256, reply_tokens=20) as engine:
        results = await asyncio.gather(
            *(collect(engine, make_request(f"user {i}")) for i in range(1000))
        )
        assert all(f.completion_tokens == 20 for _, _, f in results)
        assert engine.load().running == engine.load().waiting == 0


def test_template_tokens_are_the_same_when_remembered():
    """The per-message token cache (_content_tokens) changes no count: the second
    call for the same history answers from the cache, with the same tokens."""
    from server.engines.simulated import _content_tokens, _template_tokens

    history = [ChatMessage("system", "Be kind."), ChatMessage("user", "你好, how are you? 😀 fine..."),
               ChatMessage("assistant", "Soft rain on the window, tonight.")]
    first = _template_tokens(history)
    hits = _content_tokens.cache_info().hits
    assert _template_tokens(history) == first
    assert _content_tokens.cache_info().hits >= hits + len(history)
    expected = sum(len(tokenize(m.content)) + 3 for m in history) + 2
    assert len(first) == expected
