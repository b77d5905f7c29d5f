"""CharacterStore against the real Redis (no mocks): atomic writes, the index, limits, avatars.

Each test runs under its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import pytest
import redis.asyncio as aioredis
from conftest import REDIS_URL, clean_prefix, free_port

from protocol.errors import BadRequest, Conflict, RapportError, TooLarge, Unavailable
from sessions.character_store import KEEP_AVATAR, CharacterStore
from sessions.characters import Character, parse_card
from sessions.keys import KeySpace, glob_escape

UNICODE_NAME = "Zoë 夜桜 🌸"
#: Not UTF-8: an avatar must come back byte for byte through a decoding client.
BINARY = bytes(range(256)) * 4


def card(name: str = "Aria", **data: Any) -> dict[str, Any]:
    return {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": name, "description": f"{name} is a test character.", "first_mes": "Hello {{user}}!",
                     "alternate_greetings": ["Hi.", "Hey."], "tags": ["test"], **data}}


def character(character_id: str, name: str = "Aria", **data: Any) -> Character:
    return parse_card(card(name, **data), character_id=character_id)


class Env:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace, **limits: int) -> None:
        self.redis: Any = redis
        self.keys = keys
        self.store = CharacterStore(redis, keys, **limits)

    async def all_keys(self) -> list[str]:
        return sorted([k async for k in self.redis.scan_iter(match=glob_escape(self.keys.prefix) + "*")])


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def env(redis: aioredis.Redis) -> AsyncIterator[Env]:
    prefix = f"rapport-test-chars:{uuid4().hex[:12]}:"
    yield Env(redis, KeySpace(prefix))
    clean_prefix(prefix)


async def test_create_get_round_trip(env: Env) -> None:
    aria = character("aria", UNICODE_NAME, extensions={"rapport": {"sampling": {"temperature": 0.7}, "lora": "x1"},
                                                       "other_app": {"keep": [1, 2]}})
    assert await env.store.put(aria, create=True) == aria
    assert await env.store.get("aria") == aria
    # Exactly the character key and the index (no avatar for a JSON card), all under {chars}.
    keys = await env.all_keys()
    assert keys == sorted([env.keys.character("aria"), env.keys.character_index()])
    assert all("{chars}" in k for k in keys)
    assert json.loads(await env.redis.get(env.keys.character("aria"))) == aria.to_json()
    assert await env.store.get("nobody") is None
    # Ids no write could have made are simply absent (never a key built from them).
    assert await env.store.get("no/slash") is None and await env.store.get("") is None


async def test_create_refuses_a_taken_id_and_changes_nothing(env: Env) -> None:
    first = character("aria", "Aria")
    await env.store.put(first, create=True)
    before = await env.redis.zscore(env.keys.character_index(), "aria")
    with pytest.raises(Conflict) as ei:
        await env.store.put(character("aria", "Someone Else"), create=True, avatar=BINARY)
    assert ei.value.code == "conflict" and "aria" in ei.value.message and "PUT" in ei.value.message
    assert await env.store.get("aria") == first
    assert await env.store.get_avatar("aria") is None
    assert await env.redis.zscore(env.keys.character_index(), "aria") == before


async def test_upsert_replaces_or_creates(env: Env) -> None:
    created = await env.store.write(character("bea", "Bea"), create=False)
    assert created.created is True
    replaced = await env.store.write(character("bea", "Bea Two"), create=False)
    assert replaced.created is False and replaced.updated_at >= created.updated_at
    got = await env.store.get("bea")
    assert got is not None and got.name == "Bea Two"
    assert await env.store.count() == 1


async def test_list_newest_update_first_with_paging(env: Env) -> None:
    for cid in ("a", "b", "c"):
        await env.store.put(character(cid, cid.upper()), create=True)
        await asyncio.sleep(0.005)  # distinct update times (ms, Redis' clock)
    assert [c.id for c in await env.store.list()] == ["c", "b", "a"]
    await env.store.put(character("a", "A again"), create=False)
    assert [c.id for c in await env.store.list()] == ["a", "c", "b"]
    assert [c.id for c in await env.store.list(offset=1, limit=1)] == ["c"]
    assert await env.store.list(offset=3) == []
    entries = await env.store.entries()
    assert [e.updated_at for e in entries] == sorted((e.updated_at for e in entries), reverse=True)
    assert entries[0].character.name == "A again"
    with pytest.raises(BadRequest):
        await env.store.list(limit=0)
    with pytest.raises(BadRequest):
        await env.store.list(offset=-1)


async def test_delete_removes_character_avatar_and_index_entry(env: Env) -> None:
    await env.store.put(character("gone"), create=True, avatar=BINARY)
    await env.store.put(character("stays"), create=True)
    assert await env.store.delete("gone") is True
    assert await env.store.get("gone") is None and await env.store.get_avatar("gone") is None
    assert [c.id for c in await env.store.list()] == ["stays"]
    assert await env.all_keys() == sorted([env.keys.character("stays"), env.keys.character_index()])
    assert await env.store.delete("gone") is False
    with pytest.raises(BadRequest):
        await env.store.delete("not a valid id")


async def test_avatar_set_keep_and_drop(env: Env) -> None:
    await env.store.put(character("pic"), create=True, avatar=BINARY)
    assert await env.store.get_avatar("pic") == BINARY
    assert await env.store.has_avatar("pic") is True
    await env.store.put(character("pic", "Renamed"), create=False, avatar=KEEP_AVATAR)
    assert await env.store.get_avatar("pic") == BINARY
    await env.store.put(character("pic", "Again"), create=False, avatar=b"\x89PNG other")
    assert await env.store.get_avatar("pic") == b"\x89PNG other"
    await env.store.put(character("pic", "No picture"), create=False, avatar=None)
    assert await env.store.get_avatar("pic") is None and await env.store.has_avatar("pic") is False


async def test_deployment_cap_on_characters(redis: aioredis.Redis) -> None:
    prefix = f"rapport-test-chars:{uuid4().hex[:12]}:"
    env = Env(redis, KeySpace(prefix), max_characters=2)
    try:
        await env.store.put(character("one"), create=True)
        await env.store.put(character("two"), create=False)
        for create in (True, False):
            with pytest.raises(TooLarge) as ei:
                await env.store.put(character("three"), create=create, avatar=BINARY)
            assert "2 characters" in ei.value.message
        assert await env.store.get("three") is None and await env.store.get_avatar("three") is None
        assert await env.store.count() == 2
        # Replacing one at the cap is still allowed; so is adding after a delete.
        await env.store.put(character("two", "Two again"), create=False)
        await env.store.delete("one")
        await env.store.put(character("three"), create=True)
        assert sorted(c.id for c in await env.store.list()) == ["three", "two"]
    finally:
        clean_prefix(prefix)


async def test_size_limits_refuse_before_writing(redis: aioredis.Redis) -> None:
    prefix = f"rapport-test-chars:{uuid4().hex[:12]}:"
    env = Env(redis, KeySpace(prefix), max_json_bytes=4096, max_avatar_bytes=100)
    try:
        with pytest.raises(BadRequest) as ei:
            await env.store.put(character("big", description="x" * 5000), create=True)
        assert "4096" in ei.value.message
        with pytest.raises(BadRequest) as ei:
            await env.store.put(character("pic"), create=True, avatar=b"y" * 101)
        assert "image" in ei.value.message
        assert await env.all_keys() == []
    finally:
        clean_prefix(prefix)


async def test_unreadable_stored_value_is_an_error_not_absence(env: Env) -> None:
    await env.redis.set(env.keys.character("bad"), "{not json")
    await env.redis.zadd(env.keys.character_index(), {"bad": 1})
    with pytest.raises(RapportError) as ei:
        await env.store.get("bad")
    assert "bad" in ei.value.message and type(ei.value) is RapportError
    with pytest.raises(RapportError):
        await env.store.list()


async def test_concurrent_creates_of_one_id_one_wins(env: Env) -> None:
    results = await asyncio.gather(*(env.store.write(character("race", f"Racer {i}"), create=True)
                                     for i in range(8)), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, Conflict) for r in results if r not in winners)
    got = await env.store.get("race")
    assert got is not None and got.name == winners[0].character.name


async def test_redis_down_is_unavailable() -> None:
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True,
                                   socket_connect_timeout=0.5)
    store = CharacterStore(dead, KeySpace("rapport-test-chars-dead:"))
    try:
        for call in (store.get("x"), store.put(character("x"), create=True), store.list(), store.delete("x")):
            with pytest.raises(Unavailable) as ei:
                await call
            assert "127.0.0.1" not in ei.value.message
    finally:
        await dead.aclose()


def test_limits_are_checked() -> None:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    for bad in ({"max_characters": 0}, {"max_json_bytes": -1}, {"max_avatar_bytes": True}):
        with pytest.raises(ValueError):
            CharacterStore(client, KeySpace("x:"), **bad)
