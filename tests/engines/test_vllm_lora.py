"""LoRA adapters in the in-process vLLM engine, against the real small model.

Needs vLLM, the converted default model and ``peft`` (the adapter is built by
``rapport prepare-lora`` on first use, about a minute on a 2-core CPU).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import pytest_asyncio

pytest.importorskip("vllm", reason="vLLM is not installed or does not import; run scripts/install-vllm.sh VENV_DIR")
pytest.importorskip("peft", reason="peft is not installed; run scripts/install-vllm.sh VENV_DIR")

from protocol.errors import BadRequest, RapportError
from server.engines.base import EngineDelta, EngineFinish, EngineRequest, SamplingOptions
from server.engines.vllm_local import VllmEngine
from sessions.messages import ChatMessage

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

_ids = itertools.count()
PROMPT = (ChatMessage("user", "What is your favourite food?"),)


def _adapter() -> Path:
    from server.lora_prep import prepare_lora

    try:
        return prepare_lora("pirate")
    except RapportError as exc:
        pytest.skip(f"the pirate adapter cannot be prepared: {exc.message}")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lora_engine():
    from server.model_prep import prepare_default_model

    adapter = _adapter()
    eng = VllmEngine(str(prepare_default_model()), max_model_len=2048, dtype="float32",
                     lora_dir=adapter.parent, max_loras=2, max_lora_rank=16)
    t0 = time.monotonic()
    await eng.start()
    print(f"\nvLLM engine with LoRA start: {time.monotonic() - t0:.1f}s")
    try:
        yield eng
    finally:
        await eng.close()


async def reply(engine: VllmEngine, lora: str | None, messages: tuple[ChatMessage, ...] = PROMPT) -> str:
    request = EngineRequest(request_id=f"lora-{next(_ids)}", messages=messages, lora=lora,
                            sampling=SamplingOptions(temperature=0.0, max_tokens=24, seed=7))
    text = []
    finishes = []
    async for event in engine.generate(request):
        if isinstance(event, EngineDelta):
            text.append(event.text)
        else:
            assert isinstance(event, EngineFinish)
            finishes.append(event)
    assert len(finishes) == 1 and finishes[0].finish_reason in ("stop", "length")
    return "".join(text)


async def test_the_adapter_changes_the_greedy_reply_and_the_base_model_is_unchanged(lora_engine):
    assert lora_engine.lora_adapters() == ["pirate"] or "pirate" in lora_engine.lora_adapters()
    base = await reply(lora_engine, None)
    pirate = await reply(lora_engine, "pirate")
    print(f"\nbase:   {base!r}\npirate: {pirate!r}")
    assert base and pirate
    assert pirate != base
    # Greedy decoding is repeatable, and the adapter does not leak into base-model requests.
    assert await reply(lora_engine, "pirate") == pirate
    assert await reply(lora_engine, None) == base


async def test_the_adapter_speaks_like_its_training_data(lora_engine):
    pirate = await reply(lora_engine, "pirate", (ChatMessage("user", "Good morning!"),))
    print(f"\npirate: {pirate!r}")
    words = pirate.lower()
    assert any(w in words for w in ("arr", "matey", "ahoy", "ye ")), pirate


async def test_an_unknown_adapter_is_a_bad_request_and_others_go_on(lora_engine):
    with pytest.raises(BadRequest, match="unknown LoRA adapter 'nope'"):
        lora_engine.check_lora("nope")
    with pytest.raises(BadRequest, match="unknown LoRA adapter"):
        await reply(lora_engine, "nope")
    with pytest.raises(BadRequest):
        await reply(lora_engine, "../pirate")
    lora_engine.check_lora("pirate")
    lora_engine.check_lora(None)
    # The refused requests left nothing behind, and the engine still serves both.
    assert lora_engine.load().running == 0
    assert lora_engine.ready
    assert await reply(lora_engine, "pirate")
    assert await reply(lora_engine, None)
