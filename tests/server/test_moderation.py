"""Moderation end to end: two gateway processes sharing Redis, both subprotocols and the
OpenAI endpoint, a real block list. The simulated engine's ``--sim-echo`` makes a
reply begin with the user's message, so a test chooses what the "model" says;
``output:`` entries are checked only in replies, so such a message gets through.

The simulated tokeniser cuts words after six characters, so ``zorblax`` is
generated as ``zorbla`` + ``x``: a blocked term split across two deltas.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import JWT_SECRET, REDIS_URL, ServerProcess, clean_prefix, make_token
from openai import AsyncOpenAI
from wire import JSON, MSGPACK, assert_contiguous, expect_error, open_ws, recv, recv_until, send

from protocol import client_frames
from sessions.moderation import ChainModerator
from testkit.servers import gateways_sharing_prefix

ITL_MS = 200  # one engine step: the bound on what the hold-back may add to the first token
FLAGS = ["--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", str(ITL_MS), "--sim-echo",
         "--auth", "dev", "--turns-per-minute", "100000"]

BLOCK_LIST = """\
# both directions
forbiddenword
# replies only: a user may ask about it, the model may not say it
output:zorblax
output:re:\\b\\d{3}-\\d{4}\\b
"""


@pytest.fixture(scope="module")
def list_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moderation") / "blocklist.txt"
    path.write_text(BLOCK_LIST, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gateways(redis_url: str, list_path: Path) -> Iterator[list[ServerProcess]]:
    prefix = f"rapport-test-mod:{uuid.uuid4().hex[:10]}:"
    with gateways_sharing_prefix(2, prefix=prefix, redis_url=REDIS_URL, jwt_secret=JWT_SECRET,
                                 extra=[*FLAGS, "--moderation-list", str(list_path)]) as servers:
        yield servers


@pytest.fixture(scope="module")
def plain_gateway(redis_url: str) -> Iterator[ServerProcess]:
    """The same engine without moderation: the baseline of the time-to-first-token figure."""
    prefix = f"rapport-test-mod-plain:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=FLAGS).start()
    yield server
    server.stop()
    clean_prefix(prefix)


def user() -> str:
    return f"mod-{uuid.uuid4().hex[:8]}"


async def history(ws, conversation_id: str = "default") -> list[dict]:
    await send(ws, {"type": "history.get", "conversation_id": conversation_id})
    frames = await recv_until(ws, "history")
    return frames[-1]["messages"]


# ---------------------------------------------------------------- the WebSocket


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_a_blocked_reply_ends_content_filter_and_every_process_replays_what_was_seen(
        gateways: list[ServerProcess], subprotocol: str) -> None:
    a, b = gateways
    name = user()
    ws = await open_ws(a, user=name, subprotocol=subprotocol)
    await send(ws, client_frames.turn_start("tell me about zorblax please", client_turn_id="c1"))
    frames = await recv_until(ws, "turn.end", timeout=20)
    assert frames[0]["type"] == "turn.accepted"
    assert_contiguous(frames)
    end = frames[-1]
    deltas = [f for f in frames if f["type"] == "turn.delta"]
    assert end["finish_reason"] == "content_filter"
    # The term was split across two engine steps; no part of it went out.
    assert end["text"] == "tell me about "
    assert not any("zorb" in d["text"] or "x" in d["text"] for d in deltas)
    await ws.close()

    # The other process: history holds what the user saw, resume replays exactly it.
    ws_b = await open_ws(b, user=name, subprotocol=subprotocol)
    messages = await history(ws_b)
    assert [(m["role"], m["text"], m["status"]) for m in messages] == [
        ("user", "tell me about zorblax please", "complete"),
        ("assistant", "tell me about ", "content_filter"),
    ]
    for after in (0, 1):
        await send(ws_b, {"type": "turn.resume", "turn_id": end["turn_id"], "after_seq": after})
        replay = await recv_until(ws_b, "turn.end")
        assert [f for f in replay if f["type"] == "turn.delta"] == deltas[after:]
        assert replay[-1] == end
    await ws_b.close()


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_a_blocked_message_is_refused_and_nothing_is_stored(
        gateways: list[ServerProcess], subprotocol: str) -> None:
    a, b = gateways
    name = user()
    ws = await open_ws(a, user=name, subprotocol=subprotocol)
    # Full width, with a zero-width space inside: the same word once normalised.
    await send(ws, client_frames.turn_start("is Ｆｏｒｂｉｄｄｅｎ\u200bｗｏｒｄ ok?", client_turn_id="k1"))
    err = await expect_error(ws, "content_filter")
    assert err["client_turn_id"] == "k1" and "turn_id" not in err
    assert await history(ws) == []
    # The idempotency key was not taken either: the same id starts a fresh turn.
    await send(ws, client_frames.turn_start("hello there", client_turn_id="k1", options={"max_tokens": 3}))
    frames = await recv_until(ws, "turn.end", timeout=20)
    assert frames[0]["replayed"] is False and frames[-1]["finish_reason"] in ("stop", "length")
    await ws.close()
    ws_b = await open_ws(b, user=name, subprotocol=subprotocol)
    assert [m["text"] for m in await history(ws_b)] == ["hello there", frames[-1]["text"]]
    await ws_b.close()


async def test_a_clean_reply_that_ends_in_a_held_prefix_is_released_whole(
        gateways: list[ServerProcess]) -> None:
    a, _ = gateways
    ws = await open_ws(a, user=user())
    # The reply is the echo, cut at max_tokens: "call 555-12" may still become a number.
    await send(ws, client_frames.turn_start("call 555-12", options={"max_tokens": 4}))
    frames = await recv_until(ws, "turn.end", timeout=20)
    assert_contiguous(frames)
    assert frames[-1]["finish_reason"] == "length"
    assert frames[-1]["text"] == "call 555-12"
    await ws.close()


async def test_a_pattern_blocks_across_deltas(gateways: list[ServerProcess]) -> None:
    _, b = gateways
    ws = await open_ws(b, user=user(), subprotocol=MSGPACK)
    await send(ws, client_frames.turn_start("my number is 555-1234 ok"))
    frames = await recv_until(ws, "turn.end", timeout=20)
    assert_contiguous(frames)
    assert frames[-1]["finish_reason"] == "content_filter"
    assert frames[-1]["text"] == "my number is "
    await ws.close()


# ---------------------------------------------------------------- the time to first token


async def first_delta_ms(server: ServerProcess, text: str) -> float:
    """Milliseconds from sending turn.start to the first turn.delta, at the client."""
    ws = await open_ws(server, user=user())
    t0 = time.monotonic()
    await send(ws, client_frames.turn_start(text, options={"max_tokens": 3}))
    first = None
    while True:
        frame = await recv(ws, timeout=20)
        if frame["type"] == "turn.delta" and first is None:
            first = (time.monotonic() - t0) * 1000.0
        if frame["type"] == "turn.end":
            break
    await ws.close()
    assert first is not None
    return first


async def test_the_hold_back_adds_at_most_one_engine_step_to_the_first_token(
        gateways: list[ServerProcess], plain_gateway: ServerProcess) -> None:
    a, _ = gateways

    async def median(server: ServerProcess, text: str) -> float:
        return statistics.median([await first_delta_ms(server, text) for _ in range(5)])

    plain = await median(plain_gateway, "hello there friend")
    filtered = await median(a, "hello there friend")  # nothing to hold
    held = await median(a, "zorbl there friend")  # "zorbl" may become "zorblax": held one step
    print(f"\nfirst delta (median of 5, engine step {ITL_MS} ms): no filter {plain:.1f} ms, "
          f"filter {filtered:.1f} ms, filter holding the first word {held:.1f} ms")
    # Text that cannot start a blocked entry goes out with its delta.
    assert filtered < plain + ITL_MS / 2
    # Text that can is released by the next step at the latest.
    assert ITL_MS / 2 < held - plain <= ITL_MS + ITL_MS / 2


# ---------------------------------------------------------------- the OpenAI endpoint


def client_for(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.base}/v1", api_key=make_token(user()), max_retries=0, timeout=60.0)


async def test_openai_streaming_reply_ends_content_filter(gateways: list[ServerProcess]) -> None:
    _, b = gateways
    stream = await client_for(b).chat.completions.create(
        model="any", stream=True, messages=[{"role": "user", "content": "tell me about zorblax please"}])
    texts, reasons = [], []
    async for chunk in stream:
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(texts) == "tell me about "
    assert reasons[-1] == "content_filter" and reasons.count("content_filter") == 1


async def test_openai_reply_ends_content_filter(gateways: list[ServerProcess]) -> None:
    a, _ = gateways
    reply = await client_for(a).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "my number is 555-1234"}])
    assert reply.choices[0].finish_reason == "content_filter"
    assert reply.choices[0].message.content == "my number is "
    clean = await client_for(a).chat.completions.create(
        model="any", max_tokens=4, messages=[{"role": "user", "content": "call 555-12"}])
    assert clean.choices[0].message.content == "call 555-12"


async def test_openai_blocked_message_is_refused(gateways: list[ServerProcess]) -> None:
    _, b = gateways
    with pytest.raises(openai.BadRequestError) as info:
        await client_for(b).chat.completions.create(model="any", messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "a forbiddenword"}])
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "content_filter" and body["param"] == "messages[2]"
    r = httpx.post(f"{b.base}/v1/chat/completions", headers={"Authorization": f"Bearer {make_token(user())}"},
                   json={"messages": [{"role": "user", "content": "FORBIDDENWORD"}]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"


def test_a_bad_list_stops_the_server_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("fine\nre:\\d+\n", encoding="utf-8")
    server = ServerProcess(prefix=f"rapport-test-mod-bad:{uuid.uuid4().hex[:6]}:",
                           extra=[*FLAGS, "--moderation-list", str(bad)])
    with pytest.raises(RuntimeError, match="line 2"):
        server.start(timeout=30)
    server.stop()


# ---------------------------------------------------------------- loading, in process


class _ShoutingPolicy:
    """A custom policy as ``--moderation module:callable`` loads it: no shouting."""

    def input_blocked(self, text: str) -> bool:
        return text.isupper()

    def output_filter(self) -> _ShoutingFilter:
        return _ShoutingFilter()


class _ShoutingFilter:
    def feed(self, text: str) -> tuple[str, bool]:
        return ("", True) if "!!!" in text else (text, False)

    def finish(self) -> tuple[str, bool]:
        return "", False


def custom_policy() -> _ShoutingPolicy:
    return _ShoutingPolicy()


def test_a_list_and_a_callable_apply_together(list_path: Path) -> None:
    from types import SimpleNamespace

    from server import moderation

    settings = SimpleNamespace(moderation_list=str(list_path), moderation=f"{__name__}:custom_policy")
    policy = moderation.load(settings)  # type: ignore[arg-type]
    assert isinstance(policy, ChainModerator)
    assert policy is not None
    assert policy.input_blocked("HELLO") and policy.input_blocked("a forbiddenword")
    assert not policy.input_blocked("hello zorblax")  # zorblax is for replies only
    f = policy.output_filter()
    assert f.feed("so zorbl") == ("so ", False)
    assert f.feed("ax") == ("", False)  # complete, but the next character decides
    assert f.feed(" ok") == ("", True)
    g = policy.output_filter()
    assert g.feed("fine!!!") == ("", True)


@pytest.mark.parametrize(("spec", "message"), [
    ("no_colon", "module:callable"),
    ("no_such_module_here:x", "cannot load"),
    (f"{__name__}:ITL_MS", "not callable"),
    (f"{__name__}:user", "input_blocked"),
])
def test_a_bad_callable_is_refused(spec: str, message: str) -> None:
    from server import moderation

    with pytest.raises(moderation.ModerationConfigError, match=message):
        moderation.load_callable(spec)


async def test_a_block_is_recorded_in_the_audit_log_without_text() -> None:
    import redis.asyncio as aioredis

    from protocol.errors import ContentFiltered
    from server import moderation
    from server.audit import Audit
    from sessions.keys import KeySpace

    keys = KeySpace(f"rapport-test-moderation-audit:{uuid.uuid4().hex[:8]}:")
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    audit = Audit(redis, keys)
    audit.start()
    try:
        policy = moderation.Moderation(parse_list_for_test(), audit=audit)
        with pytest.raises(ContentFiltered):
            policy.check_input("forbiddenword", user_id="u1")
        assert await audit.flush()
        entries = [fields for _, fields in await redis.xrange(keys.audit())]
        assert [(e["kind"], e["user"], e["direction"]) for e in entries] == [("moderation_block", "u1", "input")]
        assert not any("forbiddenword" in value for e in entries for value in e.values())
    finally:
        await audit.close()
        await redis.delete(keys.audit())
        await redis.aclose()


def parse_list_for_test():
    from sessions.moderation import parse_list

    return parse_list(BLOCK_LIST)
