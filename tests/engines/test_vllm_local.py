"""The in-process vLLM engine against a real model (SmolLM2-135M-Instruct on CPU).

Needs vLLM (scripts/install-vllm.sh) and the converted model
(``python -m server.model_prep``; built here on first use if the model package
is installed). Set RAPPORT_VLLM_MODEL to test another model folder.

vLLM's engine core runs in a child process started with multiprocessing.
Under pytest that works as is: the child re-imports pytest's own entry point,
which is guarded by ``if __name__ == "__main__"``, so no
VLLM_ENABLE_V1_MULTIPROCESSING=0 is needed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time

import pytest
import pytest_asyncio

# Make the repository root importable when the project is not installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed or does not import; run scripts/install-vllm.sh VENV_DIR"
)

from server.engines.base import (  # noqa: E402
    ChatMessage,
    EngineDelta,
    EngineFinish,
    EngineRequest,
    SamplingOptions,
)
from server.engines.vllm_local import VllmEngine  # noqa: E402

# Engine start alone takes ~40 s on a 2-core CPU.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

_ids = itertools.count()

SYSTEM = (
    "You are Mira, a warm and curious companion who lives in a small seaside town. "
    "You love tide pools, old maps, rainy afternoons and strong tea. You answer in one "
    "or two short sentences, you never use lists, and you ask a gentle question back "
    "when the user seems lonely. "
) * 8  # long enough to span several KV cache blocks

HISTORY = (
    ChatMessage("user", "Hi Mira, I just got back from a long walk on the beach."),
    ChatMessage("assistant", "Welcome back! Did the tide leave anything interesting in the pools?"),
    ChatMessage("user", "A tiny crab and a piece of green sea glass."),
    ChatMessage("assistant", "Sea glass is lovely. Are you going to keep it on your windowsill?"),
)


def make_request(*messages: ChatMessage, **sampling: object) -> EngineRequest:
    opts = {"temperature": 0.0, "max_tokens": 24, "seed": 1234, **sampling}
    return EngineRequest(
        request_id=f"test-vllm-{next(_ids)}",
        messages=tuple(messages),
        sampling=SamplingOptions(**opts),  # type: ignore[arg-type]
    )


async def collect(engine: VllmEngine, request: EngineRequest):
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


async def wait_idle(engine: VllmEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The adapter's view, vLLM's front end, and the scheduler's own report
        # (vLLM sends one more stats update after an abort) must all agree.
        if (
            engine.load().running == 0
            and engine.unfinished_requests() == 0
            and engine.scheduler_stats()["running"] == 0
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"engine not idle after {timeout}s: {engine.load()}, "
        f"unfinished={engine.unfinished_requests()}, scheduler={engine.scheduler_stats()}"
    )


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


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine():
    eng = VllmEngine(
        _model_folder(),
        max_model_len=2048,
        dtype="float32",
        engine_args={"enforce_eager": True},
    )
    assert not eng.ready
    t0 = time.monotonic()
    await eng.start()
    print(f"\nvLLM engine start (incl. warm-up): {time.monotonic() - t0:.1f}s")
    try:
        yield eng
    finally:
        await eng.close()
        assert not eng.ready


async def test_ready_and_config(engine: VllmEngine) -> None:
    assert engine.ready
    assert engine.max_model_len == 2048
    assert engine.model_name == "SmolLM2-135M-Instruct" or os.environ.get("RAPPORT_VLLM_MODEL")
    load = engine.load()
    assert load.running == 0 and load.waiting == 0
    assert load.max_num_seqs > 0


async def test_short_turn_streams_reply(engine: VllmEngine) -> None:
    request = make_request(
        ChatMessage("system", "You are a helpful assistant. Answer briefly."),
        ChatMessage("user", "What is the capital of France?"),
        max_tokens=32,
    )
    t0 = time.monotonic()
    first: float | None = None
    deltas: list[EngineDelta] = []
    finish: EngineFinish | None = None
    async for event in engine.generate(request):
        if isinstance(event, EngineDelta):
            first = first or time.monotonic()
            deltas.append(event)
        else:
            finish = event
    text = "".join(d.text for d in deltas)
    print(f"\nreply: {text!r}; first token after {((first or t0) - t0) * 1000:.0f} ms; {finish}")
    assert text.strip()
    assert "Paris" in text
    assert all(d.text for d in deltas)
    assert finish is not None
    assert finish.finish_reason in ("stop", "length")
    assert finish.prompt_tokens > 0
    assert finish.completion_tokens == sum(d.tokens for d in deltas) > 0
    assert finish.engine_ttft_ms is not None and finish.engine_ttft_ms > 0
    await wait_idle(engine)


async def test_length_limit_and_throughput(engine: VllmEngine) -> None:
    request = make_request(ChatMessage("user", "Tell me a long story about a lighthouse."),
                           max_tokens=48, ignore_eos=True)
    t0 = time.monotonic()
    first = None
    tokens = 0
    finish = None
    async for event in engine.generate(request):
        if isinstance(event, EngineDelta):
            first = first or time.monotonic()
            tokens += event.tokens
        else:
            finish = event
    elapsed = time.monotonic() - t0
    assert finish is not None and first is not None
    assert finish.finish_reason == "length"
    assert finish.completion_tokens == tokens == 48
    rate = (tokens - 1) / max(elapsed - (first - t0), 1e-6)
    print(f"\n48 tokens: first after {(first - t0) * 1000:.0f} ms, then {rate:.1f} tokens/s")
    load = engine.load()
    assert load.recent_ttft_ms is not None and load.recent_ttft_ms > 0
    assert load.recent_itl_ms is not None and load.recent_itl_ms > 0


async def test_count_tokens_matches_prompt_tokens(engine: VllmEngine) -> None:
    messages = (ChatMessage("system", "Be concise."), *HISTORY, ChatMessage("user", "What should I cook tonight?"))
    counted = engine.count_tokens(messages)
    _, finish = await collect(engine, make_request(*messages, max_tokens=4))
    assert counted == finish.prompt_tokens > 0


async def test_shared_prefix_hits_prefix_cache(engine: VllmEngine) -> None:
    first = (ChatMessage("system", SYSTEM), *HISTORY, ChatMessage("user", "What should I name the crab?"))
    _, f1 = await collect(engine, make_request(*first, max_tokens=8))
    assert f1.prompt_tokens > 300
    # The next turn of the same conversation: same system prompt and history,
    # plus the previous exchange and a new message.
    second = (*first, ChatMessage("assistant", "How about Pinch?"), ChatMessage("user", "Ha, I like it."))
    _, f2 = await collect(engine, make_request(*second, max_tokens=8))
    print(f"\nprompt {f2.prompt_tokens} tokens, {f2.cached_prompt_tokens} from the prefix cache")
    assert f2.cached_prompt_tokens > 0
    # At least the whole first prompt, minus the last partial block, was reused.
    assert f2.cached_prompt_tokens >= f1.prompt_tokens // 2
    assert f2.cached_prompt_tokens < f2.prompt_tokens
    share = engine.prefix_cache_hit_share()
    assert share is not None and 0 < share < 1
    assert engine.scheduler_stats()["prefix_cache_hits"] > 0


async def test_aclose_mid_stream_aborts_in_vllm(engine: VllmEngine) -> None:
    request = make_request(ChatMessage("user", "Write a very long poem about the sea."),
                           max_tokens=1000, ignore_eos=True)
    stream = engine.generate(request)
    got = 0
    async for event in stream:
        assert isinstance(event, EngineDelta)
        got += 1
        if got == 3:
            break
    assert engine.unfinished_requests() == 1
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_idle(engine)
    # The engine still serves afterwards.
    deltas, finish = await collect(engine, make_request(ChatMessage("user", "Say hi."), max_tokens=4))
    assert finish.completion_tokens == sum(d.tokens for d in deltas)


async def test_cancelling_consumer_aborts_in_vllm(engine: VllmEngine) -> None:
    request = make_request(ChatMessage("user", "Describe every shell on the beach."),
                           max_tokens=1000, ignore_eos=True)
    started = asyncio.Event()

    async def consume() -> None:
        async for event in engine.generate(request):
            if isinstance(event, EngineDelta):
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    assert engine.load().running + engine.load().waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)


async def test_abort_by_id_ends_stream(engine: VllmEngine) -> None:
    request = make_request(ChatMessage("user", "Count slowly from one to a thousand."),
                           max_tokens=1000, ignore_eos=True)
    deltas: list[EngineDelta] = []
    finish: EngineFinish | None = None
    async for event in engine.generate(request):
        if isinstance(event, EngineDelta):
            deltas.append(event)
            if len(deltas) == 2:
                await engine.abort(request.request_id)
        else:
            finish = event
    assert finish is not None
    assert finish.finish_reason == "abort"
    assert finish.completion_tokens == sum(d.tokens for d in deltas) < 1000
    await wait_idle(engine)
    # Unknown or finished ids are a no-op.
    await engine.abort(request.request_id)
    await engine.abort("no-such-request")


async def test_concurrent_turns(engine: VllmEngine) -> None:
    requests = [
        make_request(ChatMessage("user", f"Give me a fun fact about the number {i}."),
                     max_tokens=16, ignore_eos=True)
        for i in range(4)
    ]
    t0 = time.monotonic()
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    elapsed = time.monotonic() - t0
    total = sum(f.completion_tokens for _, f in results)
    print(f"\n4 concurrent turns: {total} tokens in {elapsed:.2f}s ({total / elapsed:.1f} tokens/s in all)")
    for deltas, finish in results:
        assert finish.finish_reason == "length"
        assert finish.completion_tokens == sum(d.tokens for d in deltas) == 16
    await wait_idle(engine)
