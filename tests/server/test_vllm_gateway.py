"""The WebSocket gateway in front of the real vLLM engine and the small real model.

One gateway process with the in-process engine serves the whole module (the
engine takes tens of seconds to start on this CPU).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import REDIS_URL, ROOT, ServerProcess, clean_prefix
from wire import assert_contiguous, expect_error, open_ws, recv, recv_until, send, stream_turn

from sessions.character_store import CharacterStore
from sessions.characters import parse_card
from sessions.keys import KeySpace

pytestmark = pytest.mark.vllm

try:
    import vllm  # noqa: F401
except ImportError:  # pragma: no cover - the project's install script provides it
    pytest.skip("vLLM is not installed (scripts/install-vllm.sh installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[ServerProcess]:
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "vllm", "--auth", "dev", "--max-history-turns", "100",
        "--default-max-tokens", "24", "--default-temperature", "0",
        # This CPU serves a few tokens a second: no first-token budget here.
        "--ttft-budget-ms", "600000", "--hard-deadline-ms", "600000", "--turns-per-minute", "1000",
    ])
    server.start(timeout=600)
    yield server
    server.stop(timeout=60)
    clean_prefix(prefix)


async def unfinished(server: ServerProcess) -> float:
    async with httpx.AsyncClient() as http:
        body = (await http.get(server.base + "/metrics")).text
    return float(re.search(r"^rapport_engine_unfinished_requests (\S+)$", body, re.M).group(1))


async def test_a_turn_streams_a_real_reply_with_usage(vllm_server):
    ws = await open_ws(vllm_server, user=f"real-{uuid.uuid4().hex[:6]}")
    frames = await stream_turn(ws, "What is the capital of France?", timeout=120)
    assert_contiguous(frames)
    end = frames[-1]
    assert end["text"].strip(), end
    assert end["finish_reason"] in ("stop", "length")
    assert end["usage"]["prompt_tokens"] > 10 and end["usage"]["completion_tokens"] > 0
    await ws.close()


async def test_later_turns_are_served_from_the_prefix_cache(vllm_server):
    ws = await open_ws(vllm_server, user=f"cache-{uuid.uuid4().hex[:6]}")
    usages = []
    # vLLM caches whole KV blocks (128 tokens on this CPU backend), so the
    # conversation must be a few blocks long before a hit can show.
    intro = ("Hi! My name is Lena and I live in Lyon. " + " ".join(
        f"On day {n} I walked along the river and bought bread." for n in range(25)))
    for text in (intro, "I love cooking pasta.", "What is my name?"):
        frames = await stream_turn(ws, text, timeout=120)
        usages.append(frames[-1]["usage"])
    assert all(u["cached_prompt_tokens"] > 0 for u in usages[1:]), usages
    # The cache covers most of each later prompt (all but the new turn).
    assert usages[-1]["cached_prompt_tokens"] >= usages[-1]["prompt_tokens"] // 2, usages
    await ws.close()


async def test_cancel_aborts_the_vllm_request_and_keeps_the_partial_reply(vllm_server):
    ws = await open_ws(vllm_server, user=f"cancel-{uuid.uuid4().hex[:6]}")
    await send(ws, {"type": "turn.start", "client_turn_id": "long", "text":
                    "Write a very long story about a lighthouse keeper, with many chapters.",
                    "options": {"max_tokens": 800}})
    accepted = await recv(ws, timeout=120)
    got = [await recv(ws, timeout=120) for _ in range(3)]
    assert all(f["type"] == "turn.delta" for f in got)
    await send(ws, {"type": "turn.cancel", "turn_id": accepted["turn_id"]})
    frames = await recv_until(ws, "turn.end", timeout=60)
    end = frames[-1]
    assert end["finish_reason"] == "cancelled"
    assert_contiguous([accepted, *got, *frames])
    deadline = time.monotonic() + 15
    while await unfinished(vllm_server) != 0:
        assert time.monotonic() < deadline, "vLLM still runs the cancelled request"
        await asyncio.sleep(0.2)
    await send(ws, {"type": "history.get"})
    history = (await recv_until(ws, "history"))[-1]["messages"]
    assert history[-1]["status"] == "cancelled" and history[-1]["text"] == end["text"] != ""
    await ws.close()


async def test_an_over_long_message_is_too_large(vllm_server):
    ws = await open_ws(vllm_server, user=f"huge-{uuid.uuid4().hex[:6]}")
    # Under the character limit, far over the model's 2048-token context.
    await send(ws, {"type": "turn.start", "client_turn_id": "huge", "text": "你好世界" * 990})
    err = await expect_error(ws, "too_large")
    assert err["client_turn_id"] == "huge"
    await send(ws, {"type": "history.get"})
    assert (await recv_until(ws, "history"))[-1]["messages"] == []  # nothing was stored
    await ws.close()


async def test_a_history_longer_than_the_context_is_trimmed_and_answered(vllm_server):
    ws = await open_ws(vllm_server, user=f"trim-{uuid.uuid4().hex[:6]}")
    filler = " ".join(f"fact{n} is about the number {n}." for n in range(60))  # ~400 tokens
    prompts = []
    for i in range(7):
        frames = await stream_turn(ws, f"Turn {i}. Remember this: {filler}", timeout=300,
                                   options={"max_tokens": 8})
        end = frames[-1]
        assert end["finish_reason"] in ("stop", "length"), end
        prompts.append(end["usage"]["prompt_tokens"])
    # 7 turns of ~400 tokens do not fit 2048 - 8 tokens: the window was trimmed.
    assert max(prompts) <= 2048 - 8
    assert prompts[-1] < sum(p for p in prompts[:2]) + 1000
    await ws.close()


def test_eval_harness_against_the_real_model(vllm_server, tmp_path, capsys):
    """A short `rapport eval` run against the real small model; its table is printed.

    The small model's scores are low; the test checks they were measured, not their level.
    """
    import argparse
    import json

    from clients.eval import add_eval_arguments, eval_command

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "eval.json"
    args = parser.parse_args(["--target", vllm_server.ws_url, "--scenario", "smoke-recall", "--repeat", "1",
                              "--dev-users", "--json", str(out), "--turn-timeout-s", "300"])
    code = eval_command(args)
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + printed)
    assert code == 0
    report = json.loads(out.read_text())
    assert report, report
    text = json.dumps(report)
    assert "SmolLM2" in text and "accuracy" in text


async def test_a_long_characters_prompt_is_shared_by_every_conversation_with_it(vllm_server):
    """Addition 18: the character's static text comes first, so the first turn of a
    new conversation with an already-used character is served from vLLM's cache."""
    card = json.loads((ROOT / "tests/fixtures/cards/long_character_v2.json").read_text(encoding="utf-8"))
    char_id = f"long-{uuid.uuid4().hex[:6]}"
    r = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        await CharacterStore(r, KeySpace(vllm_server.prefix)).put(parse_card(card, character_id=char_id),
                                                                  create=True)
    finally:
        await r.aclose()
    usages = []
    for n in range(2):
        ws = await open_ws(vllm_server, user=f"char-cache-{n}-{uuid.uuid4().hex[:6]}")
        await send(ws, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "character_id": char_id,
                        "conversation_id": f"first-{n}", "text": f"Good evening! Question number {n}?"})
        frames = [f for f in await recv_until(ws, "turn.end", timeout=300) if f["type"] != "ping"]
        assert frames[-1]["finish_reason"] in ("stop", "length"), frames[-1]
        usages.append(frames[-1]["usage"])
        await ws.close()
    second = usages[1]
    share = second["cached_prompt_tokens"] / second["prompt_tokens"]
    print(f"\nlong character: first turn of a second conversation: {second['cached_prompt_tokens']} of "
          f"{second['prompt_tokens']} prompt tokens cached ({share:.1%}); the first conversation's: "
          f"{usages[0]['cached_prompt_tokens']} of {usages[0]['prompt_tokens']}")
    assert second["prompt_tokens"] > 1000, usages  # the persona is long
    assert share >= 0.80, usages
