"""Turns generating in this process (server/turns.py): the TurnManager feeding the
pure turn and carrying out what it decides.

In process, with a scripted engine and the real ConversationStore on the Redis
at 127.0.0.1:6379. The end-to-end behaviour over sockets is in
test_gateway_turns.py and test_resilience.py; these tests reach the timings
and races that are hard to arrange from outside: a deadline just missed or just
met, a cancel before the generation task has run, interruptions that collide.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from protocol import frames
from protocol.errors import EngineError, NotFound, Unavailable
from server.engines.base import Engine, EngineDelta, EngineEvent, EngineFinish, EngineLoad, EngineRequest
from server.summaries import Summarizer
from server.turns import TurnManager, TurnPolicy, now_ms
from sessions.characters import Character, parse_card
from sessions.keys import KeySpace, glob_escape
from sessions.memory import FactStore
from sessions.store import ConversationStore, LogDelta, LogEnd

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]

Script = Callable[[], AsyncIterator[EngineEvent]]


class ScriptedEngine(Engine):
    """Plays a script per request; records which requests ran and which were closed (aborted)."""

    model_name = "scripted"
    max_model_len = 4096

    def __init__(self, script: Script) -> None:
        self.script = script
        self.started: list[str] = []
        self.closed: list[str] = []
        self.requests: list[EngineRequest] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:  # type: ignore[override]
        self.started.append(request.request_id)
        self.requests.append(request)
        try:
            async for event in self.script():
                yield event
        finally:
            self.closed.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        pass

    def load(self) -> EngineLoad:
        return EngineLoad(running=0, waiting=0, max_num_seqs=8)


async def forever() -> None:
    await asyncio.Event().wait()


def finish(reason: str = "stop", tokens: int = 2) -> EngineFinish:
    return EngineFinish(finish_reason=reason, prompt_tokens=7, completion_tokens=tokens, cached_prompt_tokens=4)


def scripted(*steps: EngineEvent | float | Callable[[], Awaitable[None]]) -> Script:
    """Events in order; a number sleeps that many seconds; a callable is awaited."""

    async def script() -> AsyncIterator[EngineEvent]:
        for step in steps:
            if isinstance(step, (int, float)):
                await asyncio.sleep(step)
            elif callable(step):
                await step()
            else:
                yield step

    return script


class Recorder:
    """A following connection."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.frames: list[dict[str, Any]] = []
        self.adopted: dict[str, asyncio.Task[None]] = {}

    def push(self, frame: dict[str, Any], *, live: bool = False) -> None:
        self.frames.append(frame)

    def adopt(self, turn_id: str, task: asyncio.Task[None]) -> None:
        self.adopted[turn_id] = task

    def texts(self) -> str:
        return "".join(f["text"] for f in self.frames if f["type"] == "turn.delta")

    async def delta_count(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while sum(f["type"] == "turn.delta" for f in self.frames) < n:
                await asyncio.sleep(0.005)

    async def end(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while not any(f["type"] == "turn.end" for f in self.frames):
                await asyncio.sleep(0.005)
        ends = [f for f in self.frames if f["type"] == "turn.end"]
        assert len(ends) == 1, ends
        return ends[0]


class Env:
    def __init__(self, store: ConversationStore) -> None:
        self.store = store
        self.managers: list[TurnManager] = []

    def manager(self, script: Script, *, deadline_ms: float = 5000, grace_ms: float = 5000) -> TurnManager:
        manager = TurnManager(store=self.store, engine=ScriptedEngine(script), policy=TurnPolicy(
            system_prompt="be kind", max_history_turns=4, detached_grace_ms=grace_ms,
            hard_deadline_ms=deadline_ms, ttft_budget_ms=2000, default_max_tokens=50, max_tokens_limit=100,
            default_temperature=0.7, store_retry_s=1.0, remote_follow_block_ms=100))
        self.managers.append(manager)
        return manager


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    prefix = f"rapport-test-turns:{uuid.uuid4().hex}:"
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    e = Env(ConversationStore(redis, KeySpace(prefix)))
    try:
        yield e
    finally:
        for manager in e.managers:
            await manager.close()
        keys = [k async for k in redis.scan_iter(match=glob_escape(prefix) + "*", count=1000)]
        if keys:
            await redis.unlink(*keys)
        await redis.aclose()


async def start(manager: TurnManager, follower: Recorder, text: str = "hello") -> str:
    return await manager.start(follower, frames.TurnStart(
        client_turn_id=uuid.uuid4().hex, text=text, conversation_id="default", options=frames.TurnOptions()),
        now_ms())


def engine_of(manager: TurnManager) -> ScriptedEngine:
    assert isinstance(manager.engine, ScriptedEngine)
    return manager.engine


async def stored(env: Env, user: str, turn_id: str) -> tuple[str | None, str]:
    record = await env.store.get_turn(user_id=user, turn_id=turn_id)
    assert record is not None and record.status == "ended"
    return record.finish_reason, record.text


# ---------------------------------------------------------------- a turn that runs its course


async def test_a_turn_streams_its_deltas_and_ends_with_the_engines_reason_and_usage(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("Hel", 1), EngineDelta("", 1), EngineDelta("lo", 1),
                                   finish("length", tokens=3)))
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    end = await alice.end()
    assert [f["seq"] for f in alice.frames if f["type"] == "turn.delta"] == [1, 2]
    assert end["finish_reason"] == "length" and end["text"] == "Hello" and end["seq"] == 2
    assert end["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "cached_prompt_tokens": 4}
    assert 0 <= end["timings"]["queue_ms"] <= end["timings"]["ttft_ms"] <= end["timings"]["total_ms"]
    assert await stored(env, "alice", turn_id) == ("length", "Hello")
    assert turn_id not in manager.live


# ---------------------------------------------------------------- the hard deadline


async def test_no_first_token_within_the_hard_deadline_ends_budget_exceeded_and_aborts(env: Env) -> None:
    manager = env.manager(scripted(forever), deadline_ms=80)
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    end = await alice.end()
    assert end["finish_reason"] == "budget_exceeded"
    assert end["timings"]["ttft_ms"] is None and end["timings"]["total_ms"] >= 80
    assert engine_of(manager).closed == [turn_id]  # the engine request was aborted
    assert await stored(env, "alice", turn_id) == ("budget_exceeded", "")


async def test_the_hard_deadline_no_longer_applies_once_the_first_token_came(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("quick", 1), 0.25, EngineDelta(" then slow", 1), finish()),
                          deadline_ms=80)
    alice = Recorder("alice")
    await start(manager, alice)
    end = await alice.end()
    assert end["finish_reason"] == "stop" and end["text"] == "quick then slow"


# ---------------------------------------------------------------- cancel


async def test_cancel_aborts_at_once_and_keeps_the_partial_reply(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("some", 1), EngineDelta(" words", 1), forever))
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    await alice.delta_count(2)
    await manager.cancel(alice, turn_id)
    end = await alice.end()
    assert end["finish_reason"] == "cancelled" and end["text"] == "some words" and end["seq"] == 2
    assert end["usage"]["completion_tokens"] == 2 and end["usage"]["prompt_tokens"] > 0
    assert engine_of(manager).closed == [turn_id]
    assert await stored(env, "alice", turn_id) == ("cancelled", "some words")


async def test_a_cancel_before_the_generation_task_ran_still_ends_the_turn(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("never sent", 1), finish()))
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    # No await in between: the turn's task has not taken its first step yet.
    await manager.cancel(alice, turn_id)
    end = await alice.end()
    assert end["finish_reason"] == "cancelled" and end["text"] == ""
    assert engine_of(manager).started == []  # nothing reached the engine
    assert await stored(env, "alice", turn_id) == ("cancelled", "")


async def test_the_first_interruption_wins_and_later_ones_change_nothing(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("a", 1), forever), deadline_ms=5000)
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    await alice.delta_count(1)
    await manager.cancel(alice, turn_id)
    manager.on_control("cancel", "alice", turn_id)  # the same cancel, through another process
    await manager.cancel(alice, turn_id)
    end = await alice.end()
    assert end["finish_reason"] == "cancelled"
    assert await stored(env, "alice", turn_id) == ("cancelled", "a")


async def test_another_users_cancel_is_not_theirs_to_make(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("a", 1), 0.1, finish()))
    alice, mallory = Recorder("alice"), Recorder("mallory")
    turn_id = await start(manager, alice)
    manager.on_control("cancel", "mallory", turn_id)
    with pytest.raises(NotFound):
        await manager.cancel(mallory, turn_id)
    assert (await alice.end())["finish_reason"] == "stop"


# ---------------------------------------------------------------- detached turns


async def test_a_detached_turn_nobody_resumes_ends_interrupted_after_the_grace(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("partial", 1), forever), grace_ms=80)
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    await alice.delta_count(1)
    manager.leave(alice, turn_id)
    async with asyncio.timeout(5):
        while turn_id in manager.live:
            await asyncio.sleep(0.01)
    assert await stored(env, "alice", turn_id) == ("interrupted", "partial")
    assert engine_of(manager).closed == [turn_id]
    assert [f["type"] for f in alice.frames] == ["turn.accepted", "turn.delta"]  # it had left


async def test_a_follower_coming_back_within_the_grace_keeps_the_turn_going(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("one", 1), 0.2, EngineDelta(" two", 1), finish()), grace_ms=80)
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    await alice.delta_count(1)
    manager.leave(alice, turn_id)
    back = Recorder("alice")
    assert await manager.follow(back, turn_id, 0) is None
    end = await back.end()
    assert end["finish_reason"] == "stop" and back.texts() == "one two"


async def test_a_follower_on_another_process_keeps_a_detached_turn_going(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("one", 1), forever), grace_ms=80)
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    await alice.delta_count(1)
    manager.on_control("attach", "alice", turn_id)
    manager.leave(alice, turn_id)
    await asyncio.sleep(0.2)  # well past the grace: still followed from elsewhere
    assert turn_id in manager.live
    manager.on_control("detach", "alice", turn_id)  # the last follower anywhere went away
    async with asyncio.timeout(5):
        while turn_id in manager.live:
            await asyncio.sleep(0.01)
    assert await stored(env, "alice", turn_id) == ("interrupted", "one")


# ---------------------------------------------------------------- the engine and shutdown


async def test_an_engine_failure_ends_the_turn_interrupted_with_its_partial_reply(env: Env) -> None:
    async def fail() -> None:
        raise EngineError("the engine process died")

    manager = env.manager(scripted(EngineDelta("half a", 1), fail))
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    end = await alice.end()
    assert end["finish_reason"] == "interrupted" and end["text"] == "half a"
    assert await stored(env, "alice", turn_id) == ("interrupted", "half a")


@pytest.mark.parametrize("last", [finish("abort"), None], ids=["abort-finish", "no-finish"])
async def test_an_engine_that_gives_the_request_up_ends_it_interrupted(env: Env, last: EngineFinish | None) -> None:
    steps: list[EngineEvent] = [EngineDelta("so far", 1)] + ([last] if last is not None else [])
    manager = env.manager(scripted(*steps))
    alice = Recorder("alice")
    await start(manager, alice)
    end = await alice.end()
    assert end["finish_reason"] == "interrupted" and end["text"] == "so far"


async def test_an_unexpected_error_ends_the_turn_error(env: Env) -> None:
    async def bug() -> None:
        raise ValueError("a bug")

    manager = env.manager(scripted(EngineDelta("x", 1), bug))
    alice = Recorder("alice")
    await start(manager, alice)
    assert (await alice.end())["finish_reason"] == "error"


async def test_shutdown_ends_the_turns_still_running_interrupted(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("cut", 1), forever))
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    await alice.delta_count(1)
    await manager.close(drain_s=0.05)
    end = await alice.end()
    assert end["finish_reason"] == "interrupted" and end["text"] == "cut"
    assert manager.live == {}
    assert await stored(env, "alice", turn_id) == ("interrupted", "cut")


# ---------------------------------------------------------------- Redis away for longer than any retry time


class FlakyStore(ConversationStore):
    """The real store, with Redis "away" for the writes a turn makes while ``away`` is set.

    ``begin_lost_reply`` makes the next begin_turn take effect in Redis but
    raise Unavailable, as when the reply is lost to a dropped connection.
    """

    away = False
    begin_lost_reply = False

    async def begin_turn(self, **kwargs: Any) -> Any:  # type: ignore[override]
        outcome = await super().begin_turn(**kwargs)
        if self.begin_lost_reply:
            self.begin_lost_reply = False
            raise Unavailable("storage unavailable; retry shortly", retry_after_ms=1000)
        return outcome

    async def append_deltas_many(self, batches: Any) -> dict[str, str]:
        if self.away:
            raise Unavailable("storage unavailable; retry shortly", retry_after_ms=1000)
        return await super().append_deltas_many(batches)

    async def finish_turn(self, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.away:
            raise Unavailable("storage unavailable; retry shortly", retry_after_ms=1000)
        return await super().finish_turn(**kwargs)


@pytest.fixture
def flaky(env: Env) -> FlakyStore:
    store = FlakyStore(env.store.redis, env.store.keys)
    env.store = store
    return store


async def test_an_outage_longer_than_the_retry_time_holds_the_end_until_history_has_it(
        env: Env, flaky: FlakyStore) -> None:
    # store_retry_s is 1 s; Redis is away for 4 s while the turn streams and ends.
    release = asyncio.Event()
    manager = env.manager(scripted(EngineDelta("Hel", 1), release.wait, EngineDelta("lo", 1),
                                   EngineDelta(" you", 1), finish("stop", tokens=3)))
    alice = Recorder("alice")
    turn_id = await start(manager, alice)
    await alice.delta_count(1)
    flaky.away = True
    release.set()
    await alice.delta_count(3)  # deltas still reach the socket during the outage
    await asyncio.sleep(4.0)
    # Neither the end nor a different story: nothing until Redis has it.
    assert not [f for f in alice.frames if f["type"] == "turn.end"]
    record = await env.store.get_turn(user_id="alice", turn_id=turn_id)
    assert record is not None and record.status == "running"
    flaky.away = False
    end = await alice.end(timeout=5.0)
    assert (end["finish_reason"], end["text"], end["seq"]) == ("stop", "Hello you", 3)
    assert await stored(env, "alice", turn_id) == ("stop", "Hello you")
    history = await env.store.history(user_id="alice", conversation_id="default")
    assert [(m.role, m.status, m.text) for m in history][-1] == ("assistant", "stop", "Hello you")
    # The log has every delta, in order, so a resume from 0 concatenates to the end's text.
    log = await env.store.read_log(user_id="alice", turn_id=turn_id, after_seq=0)
    assert [e.seq for e in log if isinstance(e, LogDelta)] == [1, 2, 3]
    assert "".join(e.text for e in log if isinstance(e, LogDelta)) == end["text"]
    assert isinstance(log[-1], LogEnd) and log[-1].end == end
    # The conversation is free at once: no lingering turn_in_progress.
    next_turn = Recorder("alice")
    await start(manager, next_turn)
    await next_turn.end()


async def test_a_turn_accepted_by_redis_whose_reply_was_lost_is_ended_and_frees_the_conversation(
        env: Env, flaky: FlakyStore) -> None:
    manager = env.manager(scripted(EngineDelta("hi", 1), finish()))
    alice = Recorder("alice")
    flaky.begin_lost_reply = True
    with pytest.raises(Unavailable) as ei:
        await start(manager, alice)
    assert ei.value.fields.get("retry_after_ms")
    # The turn record Redis did write is ended (interrupted, nothing said),
    # rather than holding the conversation until a lease runs out.

    async def free() -> bool:
        return await env.store.active_turns(user_id="alice") == []

    async with asyncio.timeout(5.0):
        while not await free():
            await asyncio.sleep(0.02)
    history = await env.store.history(user_id="alice", conversation_id="default")
    assert [(m.role, m.status, m.text) for m in history] == [("user", "complete", "hello"),
                                                              ("assistant", "interrupted", "")]
    again = Recorder("alice")
    await start(manager, again)
    assert (await again.end())["finish_reason"] == "stop"


# ---------------------------------------------------------------- characters and swipes


class Characters:
    """The manager's character source, holding cards in memory."""

    def __init__(self, *characters: Character) -> None:
        self.by_id = {c.id: c for c in characters}

    async def get(self, character_id: str) -> Character | None:
        return self.by_id.get(character_id)


CARD = {
    "spec": "chara_card_v2", "spec_version": "2.0",
    "data": {
        "name": "Mira", "description": "{{char}} is a lighthouse keeper who talks to {{user}} at night.",
        "personality": "warm, dry humour", "scenario": "A storm outside.",
        "first_mes": "*lights a lamp* Evening, {{user}}.", "mes_example": "<START>\n{{user}}: hi\n{{char}}: hey",
        "creator_notes": "", "system_prompt": "", "post_history_instructions": "Stay in character as {{char}}.",
        "alternate_greetings": [], "tags": [], "creator": "", "character_version": "1",
        "extensions": {"rapport": {"sampling": {"temperature": 0.3, "max_tokens": 40}, "lora": "pirate"}},
    },
}


async def run_turn(manager: TurnManager, follower: Recorder, frame: Any, user_name: str = "Sam") -> dict[str, Any]:
    follower.frames.clear()
    await manager.start(follower, frame, now_ms(), user_name=user_name)
    return await follower.end()


def start_frame(text: str, *, conv: str = "c", character_id: str | None = None,
                options: frames.TurnOptions | None = None) -> frames.TurnStart:
    return frames.TurnStart(client_turn_id=uuid.uuid4().hex, text=text, conversation_id=conv,
                            options=options or frames.TurnOptions(), character_id=character_id)


async def test_a_bound_character_shapes_the_prompt_sampling_and_adapter(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("ok", 1), finish()))
    manager.characters = Characters(parse_card(CARD, character_id="mira"))
    alice = Recorder("alice")
    await run_turn(manager, alice, start_frame("hello", character_id="mira"))
    request = engine_of(manager).requests[-1]
    roles = [m.role for m in request.messages]
    # persona, greeting, the user's message, then the post-history instructions
    assert roles == ["system", "assistant", "user", "system"]
    system = request.messages[0].content
    assert "Mira is a lighthouse keeper who talks to Sam at night." in system
    assert system.startswith("be kind")  # the card has no system_prompt: the server's is used
    assert system.index("lighthouse") < system.index("warm, dry humour") < system.index("A storm outside.")
    assert request.messages[1].content == "*lights a lamp* Evening, Sam."
    assert request.messages[-1].content == "Stay in character as Mira."
    assert request.sampling.temperature == 0.3 and request.sampling.max_tokens == 40
    assert request.lora == "pirate"
    # The turn's own options win over the character's defaults.
    await run_turn(manager, alice, start_frame("again", options=frames.TurnOptions(temperature=1.1)))
    request = engine_of(manager).requests[-1]
    assert request.sampling.temperature == 1.1 and request.sampling.max_tokens == 40
    assert [m.role for m in request.messages] == ["system", "assistant", "user", "assistant", "user", "system"]


async def test_two_users_of_one_character_share_the_prompt_prefix(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("ok", 1), finish()))
    manager.characters = Characters(parse_card(CARD, character_id="mira"))
    for user in ("u1", "u2"):
        await run_turn(manager, Recorder(user), start_frame(f"hi from {user}", character_id="mira"), user_name="Sam")
    one, two = engine_of(manager).requests
    assert one.messages[:2] == two.messages[:2]  # the static persona and greeting: vLLM's prefix cache serves both


async def test_a_regenerated_reply_sees_the_history_before_its_exchange_and_the_selection_sticks(
        env: Env) -> None:
    replies = iter(["first reply", "second reply", "third reply", "next reply"])

    async def script() -> AsyncIterator[EngineEvent]:
        yield EngineDelta(next(replies), 1)
        yield finish()

    manager = env.manager(script)
    alice = Recorder("alice")
    first = await run_turn(manager, alice, start_frame("question"))
    exchange = first["turn_id"]
    await run_turn(manager, alice, frames.TurnRegenerate(client_turn_id="r1", conversation_id="c",
                                                       options=frames.TurnOptions()))
    accepted = alice.frames[0]
    assert accepted["exchange_id"] == exchange and accepted["alternative"] == 1
    request = engine_of(manager).requests[-1]
    # The regenerated reply answers the same message; the first reply is not shown to it.
    assert [(m.role, m.content) for m in request.messages] == [("system", "be kind"), ("user", "question")]
    assert await manager.select("alice", "c", exchange) == exchange
    await run_turn(manager, alice, start_frame("follow-up"))
    request = engine_of(manager).requests[-1]
    assert [(m.role, m.content) for m in request.messages][1:] == [
        ("user", "question"), ("assistant", "first reply"), ("user", "follow-up")]
    snapshot = await manager.exchange_snapshot("alice", exchange)
    assert snapshot.exchange_id == exchange and snapshot.selected == exchange
    assert [a.text for a in snapshot.alternatives] == ["first reply", "second reply"]
    assert [(m.role, m.content) for m in snapshot.prompt] == [("system", "be kind"), ("user", "question")]


async def test_an_edit_replaces_the_newest_message_and_its_replies(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("r", 1), finish()))
    alice = Recorder("alice")
    await run_turn(manager, alice, start_frame("one"))
    second = await run_turn(manager, alice, start_frame("two"))
    await run_turn(manager, alice, frames.TurnEdit(client_turn_id="e1", conversation_id="c",
                                                 exchange_id=second["turn_id"], text="TWO",
                                                 options=frames.TurnOptions()))
    history = await env.store.history(user_id="alice", conversation_id="c")
    assert [(m.role, m.text) for m in history] == [("user", "one"), ("assistant", "r"), ("user", "TWO"),
                                                  ("assistant", "r")]
    request = engine_of(manager).requests[-1]
    assert [m.content for m in request.messages if m.role == "user"] == ["one", "TWO"]


# ---------------------------------------------------------------- memory: facts, lore, summaries


async def test_pinned_facts_and_lore_take_their_places_in_the_prompt(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("ok", 1), finish()))
    card = json.loads((ROOT / "tests/fixtures/cards/v3_card.json").read_text(encoding="utf-8"))
    character = parse_card(card, character_id="kestrel")
    manager.characters = Characters(character)
    facts = FactStore(env.store.redis, env.store.keys)
    manager.facts = facts
    await facts.add("alice", "My sister is called Noor.")
    await facts.add("alice", "My dog Biscuit is ill.")
    alice = Recorder("alice")
    await run_turn(manager, alice, start_frame("hello", character_id="kestrel"))
    request = engine_of(manager).requests[-1]
    system = request.messages[0].content
    # Facts follow the persona inside the one system message, oldest first.
    assert system.index(character.name) < system.index("Noor") < system.index("Biscuit")
    assert not any("Kestrel is a patched-up" in m.content for m in request.messages)
    # A keyword in the new message activates the entry, placed right before it.
    await run_turn(manager, alice, start_frame("Tell me about Port Vantage"))
    messages = engine_of(manager).requests[-1].messages
    user_at = max(i for i, m in enumerate(messages) if m.role == "user")
    lore = messages[user_at - 1]
    assert lore.role == "system" and "floating market" in lore.content and "{{char}}" not in lore.content
    assert messages[0].content == system  # the prefix did not move


async def test_trimmed_turns_are_folded_into_a_summary_that_changes_only_at_trims(env: Env) -> None:
    manager = env.manager(scripted(EngineDelta("a reply", 1), finish()))
    summarizer = Summarizer(env.store.redis, env.store.keys, manager.engine, instructions="", max_tokens=50)
    manager.summarizer = summarizer
    alice = Recorder("alice")
    systems = []
    for n in range(9):  # max_history_turns is 4: the window trims in blocks
        turn_id = (await run_turn(manager, alice, start_frame(f"message {n}")))["turn_id"]
        await summarizer.wait_idle()
        request = next(r for r in engine_of(manager).requests if r.request_id == turn_id)
        systems.append(request.messages[0].content)
    meta = await env.store.conversation_meta(user_id="alice", conversation_id="c")
    try:
        assert meta.get("summary")  # folded by the scripted engine
        # Turn 5 is the first whose window drops turns (4 at once). They were
        # folded ahead, during turn 4, so the summary appears on turn 5 itself:
        # the system message (the cached prefix) changes on the trim and on no other turn.
        changes = [i for i in range(1, len(systems)) if systems[i] != systems[i - 1]]
        assert changes == [5], (changes, systems)
        assert "a reply" in systems[5] and "a reply" not in systems[4]
        # Turn 8 staged the fold for the next trim (turn 9 drops 4 more); not shown yet.
        assert meta.get("summary_next") and meta.get("summary_next_upto")
    finally:
        await summarizer.close()
