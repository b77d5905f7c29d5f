"""LoRA adapters through the remote engine: the adapter is the completion's ``model``.

Against the fake vLLM server (which answers an unknown model with 404, as vLLM
does) and, when vLLM is installed, against vLLM's own OpenAI server started
with ``--enable-lora --lora-modules pirate=PATH``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fake_vllm_server import FakeVllmServer, running

from protocol.errors import BadRequest, RapportError
from server.engines.base import EngineDelta, EngineFinish, EngineRequest, SamplingOptions
from server.engines.chat_completions import chat_completion_body
from server.engines.remote import RemoteEngine
from sessions.messages import ChatMessage
from testkit.servers import VllmServer

_ids = itertools.count()
PROMPT = (ChatMessage("user", "What is your favourite food?"),)


def request(lora: str | None, max_tokens: int = 24) -> EngineRequest:
    return EngineRequest(request_id=f"remote-lora-{next(_ids)}", messages=PROMPT, lora=lora, user_id="u1",
                         sampling=SamplingOptions(temperature=0.0, max_tokens=max_tokens, seed=7))


async def reply(engine: RemoteEngine, lora: str | None) -> str:
    text: list[str] = []
    finishes = 0
    async for event in engine.generate(request(lora)):
        if isinstance(event, EngineDelta):
            text.append(event.text)
        elif isinstance(event, EngineFinish):
            finishes += 1
    assert finishes == 1
    return "".join(text)


def test_the_adapter_is_the_requests_model() -> None:
    assert chat_completion_body(request(None), "base")["model"] == "base"
    assert chat_completion_body(request("pirate"), "base")["model"] == "pirate"


@contextlib.asynccontextmanager
async def started(upstreams: list[str], model: str) -> AsyncIterator[RemoteEngine]:
    engine = RemoteEngine(upstreams, model=model, health_interval_s=0.5, start_timeout_s=600)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def test_an_adapter_the_upstream_does_not_serve_is_a_bad_request_and_the_replica_stays_up() -> None:
    async with running(FakeVllmServer(model="m", tokens=("Hi", "!"))) as [fake]:
        async with started([fake.url], "m") as engine:
            with pytest.raises(BadRequest, match="unknown LoRA adapter 'nope'"):
                await reply(engine, "nope")
            assert fake.requests[-1]["model"] == "nope"
            # Not the replica's fault: it stays routable and serves the base model.
            assert engine.replica_for("u1") == fake.url
            assert await reply(engine, None) == "Hi!"
            with pytest.raises(BadRequest):
                engine.check_lora("../x")
            engine.check_lora("pirate")


@pytest.mark.vllm
@pytest.mark.timeout(900)
async def test_vllm_serves_the_adapter_by_name(tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("peft") is None:
        pytest.skip("vLLM and peft are needed (scripts/install-vllm.sh installs them)")
    from server.lora_prep import prepare_lora
    from server.model_prep import prepare_default_model

    try:
        model, adapter = prepare_default_model(), prepare_lora("pirate")
    except RapportError as exc:
        pytest.skip(f"the model or adapter cannot be prepared: {exc.message}")
    server = VllmServer(str(model), served_name="smol", log_dir=tmp_path, extra=[
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--lora-modules", f"pirate={adapter}"])
    try:
        server.start(timeout=600)
        async with started([server.base], "smol") as engine:
            base = await reply(engine, None)
            pirate = await reply(engine, "pirate")
            print(f"\nbase:   {base!r}\npirate: {pirate!r}")
            assert base and pirate and pirate != base
            assert await reply(engine, "pirate") == pirate
            with pytest.raises(BadRequest, match="unknown LoRA adapter"):
                await reply(engine, "nope")
            assert await reply(engine, None) == base
    finally:
        server.stop(timeout=60)
