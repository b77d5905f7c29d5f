"""Deleting the Redis keys a test or a benchmark wrote under its own key prefix.

The URL is one Rapport takes (:mod:`server.redis_clients`): on a Redis Cluster
(``redis+cluster://``) redis-py's cluster client scans every primary in turn,
and deletes keys of several slots by splitting the DEL per slot.
"""

from __future__ import annotations

import re

from server.redis_clients import sync_client

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: Keys deleted per DEL command: big enough to be quick, small enough not to block Redis.
_BATCH = 500
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


def clean_prefix(prefix: str, url: str = DEFAULT_REDIS_URL) -> int:
    """Delete every key starting with ``prefix``; how many were deleted.

    The prefix is matched literally: glob characters in it are escaped.
    """
    r = sync_client(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in r.scan_iter(match=_GLOB_SPECIALS.sub(r"\\\1", prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= _BATCH:
                deleted += r.delete(*batch)
                batch.clear()
        if batch:
            deleted += r.delete(*batch)
    finally:
        r.close()
    return deleted
