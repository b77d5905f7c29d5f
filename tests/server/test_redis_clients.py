"""``--redis-url``: one server or a Redis Cluster, and a bad URL as one line of error."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import redis
import redis.asyncio as aioredis
from conftest import ROOT, clean_prefix
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from server.redis_clients import RedisTarget, RedisUrlError, async_client, discover, parse_redis_url, sync_client
from sessions.keys import KeySpace


@pytest.mark.parametrize(("url", "target"), [
    ("redis://127.0.0.1:6379/0", RedisTarget("redis://127.0.0.1:6379/0", cluster=False)),
    ("rediss://user:pw@cache.example:6380/2", RedisTarget("rediss://user:pw@cache.example:6380/2", cluster=False)),
    ("unix:///run/redis.sock?db=1", RedisTarget("unix:///run/redis.sock?db=1", cluster=False)),
    ("redis+cluster://10.0.0.5:7000", RedisTarget("redis://10.0.0.5:7000", cluster=True)),
    ("REDIS+CLUSTER://10.0.0.5:7000/0", RedisTarget("redis://10.0.0.5:7000/0", cluster=True)),
    ("rediss+cluster://:secret@cfg.example:6379?ssl_cert_reqs=none",
     RedisTarget("rediss://:secret@cfg.example:6379?ssl_cert_reqs=none", cluster=True)),
])
def test_urls_name_one_server_or_a_cluster(url: str, target: RedisTarget) -> None:
    assert parse_redis_url(url) == target


@pytest.mark.parametrize(("url", "says"), [
    ("127.0.0.1:6379", "must start with"),
    ("http://127.0.0.1:6379", "must start with"),
    ("redis+sentinel://127.0.0.1:26379", "must start with"),
    ("redis+cluster://10.0.0.5:7000/3", "database 0 only"),
    ("redis+cluster:///var/run/redis.sock", "names no host"),
    ("redis://127.0.0.1:6379/0?socket_timeout=abc", "not a valid Redis URL"),
    ("redis+cluster://10.0.0.5:port", "not a valid Redis URL"),
])
def test_unusable_urls_are_refused_with_why(url: str, says: str) -> None:
    with pytest.raises(RedisUrlError, match=says):
        parse_redis_url(url)


def test_the_password_never_appears_in_the_error() -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url("redis+cluster://admin:hunter2@10.0.0.5:7000/5")
    assert "hunter2" not in str(caught.value) and "***" in str(caught.value)


@pytest.mark.parametrize("command", [["serve", "--engine", "simulated"], ["audit", "tail"],
                                     ["export", "--format", "sft"]])
@pytest.mark.parametrize("url", ["redis+clustre://127.0.0.1:7000", "redis+cluster://127.0.0.1:7000/9"])
def test_a_bad_url_is_one_line_of_error(command: list[str], url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "rapport.cli", *command, "--redis-url", url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode in (1, 2), done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--redis-url" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


async def test_clients_follow_the_url(redis_cluster, redis_url) -> None:
    single = async_client(redis_url, decode_responses=True)
    cluster = async_client(redis_cluster.url, decode_responses=True)
    try:
        assert type(single) is aioredis.Redis
        assert isinstance(cluster, AsyncRedisCluster)
        await discover(single, cluster)
        assert len(cluster.get_primaries()) == 3
        assert await single.ping() and await cluster.ping()
    finally:
        await single.aclose()
        await cluster.aclose()
    blocking = sync_client(redis_cluster.url)
    try:
        assert isinstance(blocking, redis.RedisCluster)
    finally:
        blocking.close()


async def test_clean_prefix_finds_keys_on_every_node_of_a_cluster(redis_cluster) -> None:
    """The test cleanup (testkit.redis_prefix) scans every primary and deletes across slots."""
    prefix = f"rapport-test-clients:{uuid.uuid4().hex[:8]}:"
    keys = KeySpace(prefix)
    client = async_client(redis_cluster.url, decode_responses=True)
    try:
        await discover(client)
        names = [keys.conversations(f"user-{i}") for i in range(60)] + [keys.running_index(), keys.audit()]
        for name in names:
            await client.set(name, "x")
        nodes = {client.get_node_from_key(name).name for name in names}
        assert len(nodes) == 3  # the keys are spread over every primary
        other = "rapport-test-clients-other:" + uuid.uuid4().hex
        await client.set(other, "kept")
        assert clean_prefix(prefix, redis_cluster.url) is None
        assert sum([await client.exists(name) for name in names]) == 0
        assert await client.get(other) == "kept"
        await client.delete(other)
    finally:
        await client.aclose()
