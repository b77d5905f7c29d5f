"""Which Redis a URL names, and the redis-py clients for it: one server or a Redis Cluster.

``--redis-url`` takes redis-py's own URLs (``redis://``, ``rediss://``,
``unix://``) for a single Redis, and the same URL with ``+cluster`` after the
scheme for a cluster::

    redis+cluster://[[user]:[password]@]host:port     plain TCP
    rediss+cluster://[[user]:[password]@]host:port    TLS

The host and port are one reachable node (a seed): redis-py's
``RedisCluster`` asks it for the slot map and finds every other node. What
follows the scheme is handed to ``RedisCluster.from_url`` unchanged as a
``redis://``/``rediss://`` URL, so every query parameter redis-py accepts there
works here. A scheme in the URL (rather than a separate flag) keeps the whole
Redis setting one string, which is what an environment variable
(``RAPPORT_REDIS_URL``) or a compose file carries.

A cluster has no databases (``/0`` only) and no unix sockets; such URLs, and
any URL redis-py cannot parse, are refused with :class:`RedisUrlError`, which
``Settings.validate`` turns into a ``ConfigError`` (printed by the command line
as one line, not a traceback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.connection import parse_url

from protocol.errors import RapportError

__all__ = ["RedisTarget", "RedisUrlError", "async_client", "discover", "parse_redis_url", "sync_client"]

#: Cluster scheme -> the redis-py scheme of its seed node.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SINGLE_SCHEMES = ("redis", "rediss", "unix")


class RedisUrlError(RapportError):
    """A ``--redis-url`` that names no usable Redis (the message says why, in one line)."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``--redis-url``: the URL redis-py takes and whether it names a cluster."""

    url: str
    cluster: bool


def parse_redis_url(url: str) -> RedisTarget:
    """Check ``url`` and say what it names; :class:`RedisUrlError` (one line) when it is unusable."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in (*SINGLE_SCHEMES, *CLUSTER_SCHEMES):
        raise RedisUrlError(
            f"--redis-url must start with redis://, rediss://, unix:// (one server) or redis+cluster://, "
            f"rediss+cluster:// (a Redis Cluster), not {_shown(url)!r}")
    cluster = scheme in CLUSTER_SCHEMES
    plain = f"{CLUSTER_SCHEMES[scheme]}://{rest}" if cluster else url
    try:
        parsed = parse_url(plain)
    except ValueError as exc:
        raise RedisUrlError(f"--redis-url {_shown(url)!r} is not a valid Redis URL: {exc}") from None
    if cluster:
        if not urlsplit(plain).hostname:
            raise RedisUrlError(f"--redis-url {_shown(url)!r} names no host: give one node of the cluster")
        if parsed.get("db", 0) not in (0, None):
            raise RedisUrlError(f"--redis-url {_shown(url)!r}: a Redis Cluster has database 0 only")
    return RedisTarget(url=plain, cluster=cluster)


def _shown(url: str) -> str:
    """``url`` without its password, for error messages."""
    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
            return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "<unparsable URL>"
    return url


def async_client(url: str, *, max_connections: int | None = None, blocking_pool: bool = False,
                 pool_timeout: float = 5.0, **options: Any) -> Any:
    """An asyncio client for ``url``: ``redis.asyncio.Redis`` or ``RedisCluster``.

    ``options`` are connection options both take (``decode_responses``,
    ``socket_timeout``, ...). ``max_connections`` bounds the pool (per node on a
    cluster; None: redis-py's default). ``blocking_pool``: on one server, a command waits up to
    ``pool_timeout`` for a free connection instead of failing; redis-py's
    cluster client has no such pool (it fails at once with
    ``MaxConnectionsError``, reported as unavailable), so give it room.
    """
    target = parse_redis_url(url)
    if max_connections is not None:
        options["max_connections"] = max_connections
    if target.cluster:
        return AsyncRedisCluster.from_url(target.url, **options)
    if blocking_pool:
        return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            target.url, timeout=pool_timeout, **options))
    return aioredis.Redis.from_url(target.url, **options)


async def discover(*clients: Any) -> None:
    """Have every cluster client among ``clients`` read the slot map now (no-op for one server).

    redis-py's cluster client reads the slot map on its first command. When
    that first command is one of many sent at once (a burst of turns right
    after a start), the concurrent first uses race the discovery and can fail
    on a connection it is replacing; discovering once, before any traffic,
    avoids that. Sharded pub/sub needs the map too (it picks a channel's node
    from it without sending a command). Raises what the client raises when no
    node answers.
    """
    for client in clients:
        if isinstance(client, AsyncRedisCluster):
            await client.initialize()


def sync_client(url: str, **options: Any) -> Any:
    """A blocking client for ``url`` (command-line tools): ``redis.Redis`` or ``redis.RedisCluster``."""
    target = parse_redis_url(url)
    if target.cluster:
        return redis.RedisCluster.from_url(target.url, **options)
    return redis.Redis.from_url(target.url, **options)
