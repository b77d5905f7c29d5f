"""Deleting the Redis keys a test or a benchmark wrote under its own key prefix."""

from __future__ import annotations

import re

import redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: Keys deleted per DEL command: big enough to be quick, small enough not to block Redis.
_BATCH = 500
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


def clean_prefix(prefix: str, url: str = DEFAULT_REDIS_URL) -> int:
    """Delete every key starting with ``prefix``; how many were deleted.

    The prefix is matched literally: glob characters in it are escaped.
    """
    r = redis.Redis.from_url(url)
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
