"""``rapport serve --engine vllm`` with a LoRA adapter, and vLLM's own log kept off the console.

One real server (the small model on CPU, the pirate adapter from
``rapport prepare-lora``): the OpenAI endpoint routes ``model`` = an adapter
name to that adapter, and vLLM's configuration dump and exit messages go to
``--vllm-log`` instead of the console. A second server with
``--log-level debug`` shows them on the console.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, clean_prefix, make_token
from wire import expect_error, open_ws, recv_until, send

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh installs it)")
pytest.importorskip("peft", reason="peft is not installed (scripts/install-vllm.sh installs it)")

from protocol.errors import RapportError

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

#: What vLLM's engine core logs at start (its whole configuration) and at exit.
VLLM_START_LINE = "Initializing a V1 LLM engine"
VLLM_EXIT_LINE = "[shutdown]"
#: What vLLM's child processes print outside its logging: a progress bar, and a
#: message logged before their logging is configured.
VLLM_CHILD_NOISE = ("Loading safetensors checkpoint shards", "Triton is installed")

SERVE_FLAGS = ["--engine", "vllm", "--auth", "dev", "--default-max-tokens", "24", "--default-temperature", "0",
               "--ttft-budget-ms", "600000", "--hard-deadline-ms", "600000", "--turns-per-minute", "1000"]


def _adapter_dir() -> Path:
    from server.lora_prep import prepare_lora

    try:
        return prepare_lora("pirate").parent
    except RapportError as exc:
        pytest.skip(f"the pirate adapter cannot be prepared: {exc.message}")


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    vllm_log = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, log_level="info", extra=[
        *SERVE_FLAGS, "--lora-dir", str(_adapter_dir()), "--vllm-log", str(vllm_log)])
    try:
        server.start(timeout=600)
        yield server, vllm_log
    finally:
        server.stop(timeout=60)
        clean_prefix(prefix)


def completion(server: ServerProcess, model: str, text: str) -> dict:
    r = httpx.post(f"{server.base}/v1/chat/completions", timeout=300,
                   headers={"Authorization": f"Bearer {make_token('lora-' + uuid.uuid4().hex[:6])}"},
                   json={"model": model, "messages": [{"role": "user", "content": text}],
                         "temperature": 0, "max_tokens": 24})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_the_adapter_and_model_names_route_to_it(lora_server):
    server, _ = lora_server
    r = httpx.get(f"{server.base}/v1/models", headers={"Authorization": f"Bearer {make_token('m')}"}, timeout=30)
    listed = {m["id"]: m for m in r.json()["data"]}
    assert "pirate" in listed
    base_name = next(name for name, m in listed.items() if m["parent"] is None)
    assert listed["pirate"]["parent"] == base_name

    base = completion(server, base_name, "What is your favourite food?")
    pirate = completion(server, "pirate", "What is your favourite food?")
    base_text = base["choices"][0]["message"]["content"]
    pirate_text = pirate["choices"][0]["message"]["content"]
    print(f"\nbase:   {base_text!r}\npirate: {pirate_text!r}")
    assert pirate["model"] == "pirate" and base["model"] == base_name
    assert base_text and pirate_text and pirate_text != base_text
    # Greedy and repeatable: the same adapter answers the same again, the base model too.
    assert completion(server, "pirate", "What is your favourite food?")["choices"][0]["message"]["content"] \
        == pirate_text
    # A name that is no adapter is the base model (OpenAI clients send whatever they were set up with).
    assert completion(server, "gpt-4o", "What is your favourite food?")["choices"][0]["message"]["content"] \
        == base_text


def _card(name: str, lora: str | None) -> dict:
    extensions = {"rapport": {"lora": lora}} if lora else {}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": name, "description": f"{name} answers questions briefly.", "personality": "", "scenario": "",
        "first_mes": "", "mes_example": "", "creator_notes": "", "system_prompt": "",
        "post_history_instructions": "", "alternate_greetings": [], "tags": [], "creator": "",
        "character_version": "1", "extensions": extensions}}


async def _character_reply(server: ServerProcess, character_id: str, text: str) -> dict:
    ws = await open_ws(server, user=f"lora-ws-{uuid.uuid4().hex[:6]}")
    try:
        await send(ws, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": text,
                        "conversation_id": "c", "character_id": character_id})
        frames = [f for f in await recv_until(ws, "turn.end", timeout=300) if f["type"] != "ping"]
        return frames[-1]
    finally:
        await ws.close()


async def test_a_character_with_an_adapter_and_one_without_in_one_server(lora_server):
    """Addition 18: a character's ``extensions.rapport.lora`` picks the adapter for its conversations."""
    server, _ = lora_server
    operator = make_token("lora-operator", roles=["operator"])
    async with httpx.AsyncClient(base_url=server.base, timeout=60,
                                 headers={"Authorization": f"Bearer {operator}"}) as http:
        for character_id, lora in (("plain-guide", None), ("pirate-guide", "pirate")):
            r = await http.put(f"/v1/characters/{character_id}", json=_card("Guide", lora))
            assert r.status_code in (200, 201), r.text
        r = await http.put("/v1/characters/ghost-guide", json=_card("Guide", "no-such-adapter"))
        assert r.status_code in (200, 201), r.text
    plain = await _character_reply(server, "plain-guide", "What is your favourite food?")
    pirate = await _character_reply(server, "pirate-guide", "What is your favourite food?")
    print(f"\nplain character: {plain['text']!r}\npirate character: {pirate['text']!r}")
    assert plain["finish_reason"] in ("stop", "length") and pirate["finish_reason"] in ("stop", "length")
    assert plain["text"] != pirate["text"]
    # The same prompt and temperature 0 differ only by the adapter; an adapter the
    # server does not have is refused before the turn exists.
    ws = await open_ws(server, user=f"lora-ws-{uuid.uuid4().hex[:6]}")
    try:
        await send(ws, {"type": "turn.start", "client_turn_id": "ghost", "text": "hi", "conversation_id": "g",
                        "character_id": "ghost-guide"})
        err = await expect_error(ws, "bad_request")
        assert "no-such-adapter" in err["message"]
    finally:
        await ws.close()


def test_vllm_start_up_noise_goes_to_its_log_file(lora_server):
    server, vllm_log = lora_server
    console = server.log(None)
    for noise in (VLLM_START_LINE, *VLLM_CHILD_NOISE):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    assert f"vLLM's own log goes to {vllm_log}" in console
    kept = vllm_log.read_text(encoding="utf-8")
    for noise in (VLLM_START_LINE, *VLLM_CHILD_NOISE):
        assert noise in kept, noise


def test_vllm_exit_noise_goes_to_its_log_file(lora_server):
    server, vllm_log = lora_server
    server.stop(timeout=60)  # the fixture's stop is then a no-op
    console = server.log(None)
    assert VLLM_EXIT_LINE not in console, console[-3000:]
    assert VLLM_EXIT_LINE in vllm_log.read_text(encoding="utf-8")


def test_log_level_debug_shows_vllm_on_the_console(tmp_path):
    vllm_log = tmp_path / "vllm.log"
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, log_level="debug", log_dir=tmp_path, extra=[
        *SERVE_FLAGS, "--lora-dir", str(tmp_path / "no-adapters"), "--vllm-log", str(vllm_log)])
    try:
        server.start(timeout=600)
        assert VLLM_START_LINE in server.log(None)
    finally:
        server.stop(timeout=60)
        clean_prefix(prefix)
    assert VLLM_EXIT_LINE in server.log(None)
    assert not vllm_log.exists()

