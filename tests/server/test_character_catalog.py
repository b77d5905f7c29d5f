"""CharacterCatalog against the real Redis: one read per TTL per id, shared misses, local writes at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import clean_prefix, free_port

from protocol.errors import Unavailable
from server.character_catalog import CharacterCatalog
from sessions.character_store import CharacterStore
from sessions.characters import parse_card
from sessions.keys import KeySpace


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def catalog_env(redis_url: str) -> AsyncIterator[tuple[CharacterStore, CharacterCatalog, Clock]]:
    prefix = f"rapport-test-chars:{uuid.uuid4().hex[:10]}:"
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = CharacterStore(client, KeySpace(prefix))
    clock = Clock()
    yield store, CharacterCatalog(store, ttl_s=2.0, clock=clock), clock
    await client.aclose()
    clean_prefix(prefix)


def _character(cid: str, name: str) -> Any:
    return parse_card({"name": name}, character_id=cid)


async def test_catalog_reads_redis_once_per_ttl(catalog_env: tuple[CharacterStore, CharacterCatalog, Clock]) -> None:
    store, catalog, clock = catalog_env
    await store.put(_character("c1", "One"), create=True)
    first = await catalog.get("c1")
    assert first is not None and first.name == "One" and catalog.loads == 1
    # Written behind the catalog's back (as another process would): not seen within the TTL...
    await store.put(_character("c1", "Changed elsewhere"), create=False)
    clock.now += 1.9
    for _ in range(5):
        got = await catalog.get("c1")
        assert got is not None and got.name == "One"
    assert catalog.loads == 1
    # ...and seen once it has passed.
    clock.now += 0.2
    got = await catalog.get("c1")
    assert got is not None and got.name == "Changed elsewhere"

    # Unknown ids are remembered too.
    assert await catalog.get("ghost") is None
    await store.put(_character("ghost", "Ghost"), create=True)
    assert await catalog.get("ghost") is None
    clock.now += 2.1
    ghost = await catalog.get("ghost")
    assert ghost is not None and ghost.name == "Ghost"
    assert catalog.loads == 4


async def test_catalog_counts_and_shares_reads(catalog_env: tuple[CharacterStore, CharacterCatalog, Clock]) -> None:
    store, catalog, clock = catalog_env
    await store.put(_character("c2", "Two"), create=True)
    results = await asyncio.gather(*(catalog.get("c2") for _ in range(50)))
    assert {r.name for r in results if r is not None} == {"Two"} and catalog.loads == 1
    await catalog.get("c2")
    assert catalog.loads == 1
    clock.now += 2.5
    await catalog.get("c2")
    assert catalog.loads == 2


async def test_catalog_local_writes_show_at_once(catalog_env: tuple[CharacterStore, CharacterCatalog, Clock]) -> None:
    store, catalog, clock = catalog_env
    assert await catalog.get("c3") is None
    await catalog.put(_character("c3", "Three"), create=True)
    got = await catalog.get("c3")
    assert got is not None and got.name == "Three"
    await catalog.put(_character("c3", "Three b"), create=False)
    got = await catalog.get("c3")
    assert got is not None and got.name == "Three b"
    assert await catalog.delete("c3") is True
    assert await catalog.get("c3") is None
    assert await store.get("c3") is None


async def test_catalog_does_not_cache_failures(redis_url: str) -> None:
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True,
                                   socket_connect_timeout=0.5)
    catalog = CharacterCatalog(CharacterStore(dead, KeySpace("rapport-test-chars-dead:")))
    try:
        for _ in range(2):
            with pytest.raises(Unavailable):
                await catalog.get("anything")
        assert catalog.loads == 2  # a failure is not remembered as "no such character"
    finally:
        await dead.aclose()




async def test_catalog_is_bounded(catalog_env: tuple[CharacterStore, CharacterCatalog, Clock]) -> None:
    store, _, clock = catalog_env
    catalog = CharacterCatalog(store, ttl_s=60.0, max_entries=3, clock=clock)
    for cid in ("a", "b", "c", "d", "e"):
        assert await catalog.get(cid) is None
    assert catalog.loads == 5
    for cid in ("c", "d", "e"):  # the newest three are remembered
        await catalog.get(cid)
    assert catalog.loads == 5
    await catalog.get("a")  # the oldest went
    assert catalog.loads == 6


async def test_one_waiter_cancelled_does_not_fail_the_others(
        catalog_env: tuple[CharacterStore, CharacterCatalog, Clock]) -> None:
    store, catalog, _ = catalog_env
    await store.put(_character("c4", "Four"), create=True)
    first = asyncio.create_task(catalog.get("c4"))
    second = asyncio.create_task(catalog.get("c4"))
    await asyncio.sleep(0)  # both wait on the one read
    first.cancel()
    got = await second
    assert got is not None and got.name == "Four" and catalog.loads == 1
    assert first.cancelled()


class GatedStore(CharacterStore):
    """A real store whose reads hold their answer until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()

    async def get(self, character_id: str) -> Any:
        value = await super().get(character_id)
        await self.gate.wait()
        return value


async def test_a_read_racing_a_local_write_does_not_cache_the_old_value(
        catalog_env: tuple[CharacterStore, CharacterCatalog, Clock]) -> None:
    plain, _, clock = catalog_env
    store = GatedStore(plain.redis, plain.keys)
    catalog = CharacterCatalog(store, ttl_s=60.0, clock=clock)
    await store.put(_character("c5", "Old"), create=True)
    reading = asyncio.create_task(catalog.get("c5"))
    while catalog.loads == 0:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)  # the read has its (old) answer and waits at the gate
    await catalog.put(_character("c5", "New"), create=False)
    store.gate.set()
    old = await reading
    assert old is not None and old.name == "Old"
    got = await catalog.get("c5")  # the late old answer did not replace what the write cached
    assert got is not None and got.name == "New" and catalog.loads == 1
