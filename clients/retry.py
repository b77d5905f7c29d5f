"""The one retry helper of the clients: backoff with full jitter, and a small retry loop.

Protocol guarantee 7 asks clients to reconnect "with exponential backoff and
full jitter (0.5 s doubling to a 10 s cap)": :func:`backoff_delay` is that
schedule. Full jitter (a uniform draw from zero to the bound, rather than the
bound plus a little noise) spreads a crowd of clients that lost the same
server over the whole window, so they do not come back in synchronized waves.

:func:`retry` runs an operation until it succeeds. One callable, ``delay``,
decides after each failure both *whether* to try again (None: give up and
re-raise) and *how long* to wait, so each caller keeps its own rules (which
errors are final, what the server advised) without writing the loop again.
:func:`advised_delay` turns a server's ``retry_after_ms`` into that wait.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["advised_delay", "backoff_delay", "retry"]

T = TypeVar("T")

#: Guarantee 7's schedule: 0.5 s, doubling, capped at 10 s.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 10.0


def backoff_delay(attempt: int, *, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    # The exponent is clamped so a very long outage cannot overflow the float.
    bound = min(cap, base * 2.0 ** min(max(attempt, 0), 62))
    return (rng or random).uniform(0.0, bound)


def advised_delay(retry_after_ms: Any, *, default: float, cap: float | None = None, jitter: float = 0.0,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait after a ``busy`` or ``rate_limited`` answer.

    The server's ``retry_after_ms`` when it is a usable number (else
    ``default`` seconds), at most ``cap`` seconds, stretched by a random factor
    in ``[1, 1 + jitter]`` so that clients refused together do not all return
    in the same instant.
    """
    # 0 is a usable answer ("now"); a missing, negative or non-numeric one is not.
    usable = isinstance(retry_after_ms, (int, float)) and not isinstance(retry_after_ms, bool) \
        and retry_after_ms >= 0
    seconds = float(retry_after_ms) / 1000.0 if usable else default
    if cap is not None:
        seconds = min(seconds, cap)
    if jitter > 0:
        seconds *= (rng or random).uniform(1.0, 1.0 + jitter)
    return seconds


async def retry(operation: Callable[[], Awaitable[T]], *,
                delay: Callable[[Exception, int], float | None],
                max_retries: int | None = None,
                sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> T:
    """Await ``operation()`` until it returns, retrying the failures ``delay`` accepts.

    After the ``n``-th failure (``n`` from 0) ``delay(exc, n)`` answers the
    seconds to wait before the next try, or None to give up. Giving up, or
    failing once more after ``max_retries`` retries (None: no limit),
    re-raises the last exception unchanged. Only :class:`Exception` is
    retried: a cancellation always goes straight through. ``sleep`` is
    injectable (tests; a caller that must keep answering pings while it waits).
    """
    retries = 0
    while True:
        try:
            return await operation()
        except Exception as exc:
            wait = delay(exc, retries) if max_retries is None or retries < max_retries else None
            if wait is None:
                raise
        retries += 1
        await sleep(wait)
