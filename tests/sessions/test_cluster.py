"""sessions.cluster: batched scripts and one user's scan, on the single Redis and on a cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import pytest
from conftest import REDIS_URL, clean_prefix

from server.redis_clients import async_client, discover
from sessions.cluster import is_cluster, run_scripts, scan_slot_of
from sessions.keys import KeySpace

# Sets KEYS[1] to ARGV[1] and answers the previous value; fails on ARGV[1] == "boom".
SWAP_LUA = """
if ARGV[1] == 'boom' then return redis.error_reply('boom') end
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
return old
"""


@pytest.fixture(params=["single", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, KeySpace]]:
    url = request.getfixturevalue("redis_cluster").url if request.param == "cluster" else REDIS_URL
    client = async_client(url, decode_responses=True)
    await discover(client)
    keys = KeySpace(f"rapport-test-cluster:{uuid4().hex[:8]}:")
    yield client, keys
    await client.aclose()
    clean_prefix(keys.prefix, url)


async def test_scripts_of_many_users_run_in_order_with_their_replies(backend) -> None:
    client, keys = backend
    swap = client.register_script(SWAP_LUA)
    users = [f"user-{i}" for i in range(30)]
    first = await run_scripts(client, [(swap, [keys.user_key(u, "v")], [f"{u}-1"]) for u in users])
    assert first == [None] * len(users)
    second = await run_scripts(client, [(swap, [keys.user_key(u, "v")], [f"{u}-2"]) for u in users])
    assert second == [f"{u}-1" for u in users]
    if is_cluster(client):
        assert len({client.get_node_from_key(keys.user_key(u, "v")).name for u in users}) == 3


async def test_a_failed_script_stands_in_its_place_or_is_raised(backend) -> None:
    client, keys = backend
    swap = client.register_script(SWAP_LUA)
    calls = [(swap, [keys.user_key("a", "v")], ["x"]), (swap, [keys.user_key("b", "v")], ["boom"]),
             (swap, [keys.user_key("c", "v")], ["y"])]
    replies = await run_scripts(client, calls, raise_on_error=False)
    assert replies[0] is None and replies[2] is None
    assert isinstance(replies[1], Exception) and "boom" in str(replies[1])
    with pytest.raises(Exception, match="boom"):
        await run_scripts(client, calls)
    assert await run_scripts(client, []) == []


async def test_a_script_the_node_forgot_is_loaded_again(backend) -> None:
    client, keys = backend
    swap = client.register_script(SWAP_LUA)
    await run_scripts(client, [(swap, [keys.user_key("a", "v")], ["1"])])
    await client.script_flush()  # every primary forgets its scripts (a restart, a promoted replica)
    assert await run_scripts(client, [(swap, [keys.user_key(u, "v")], ["2"]) for u in ("a", "b")]) == ["1", None]


async def test_a_users_scan_finds_all_of_theirs_and_nothing_else(backend) -> None:
    client, keys = backend
    for user in ("bob", "bob2", "alice"):
        for suffix in ("convs", "active", "hist:x", "turn:t1"):
            await client.set(keys.user_key(user, suffix), "1")
    found = sorted([k async for k in scan_slot_of(client, keys.user_key("bob", ""), match=keys.user_pattern("bob"))])
    assert found == sorted(keys.user_key("bob", s) for s in ("convs", "active", "hist:x", "turn:t1"))
