"""clients/retry.py: the backoff schedule and the retry loop (pure: injected sleep and rng)."""

from __future__ import annotations

import asyncio
import random

import pytest

from clients.retry import BACKOFF_BASE_S, BACKOFF_CAP_S, advised_delay, backoff_delay, retry


class Flaky:
    """Fails with the given exceptions, one per call, then answers ``result``."""

    def __init__(self, *failures: Exception, result: str = "ok") -> None:
        self.failures = list(failures)
        self.calls = 0
        self.result = result

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_backoff_is_guarantee_7s_schedule_with_full_jitter():
    assert (BACKOFF_BASE_S, BACKOFF_CAP_S) == (0.5, 10.0)
    rng, twin = random.Random(5), random.Random(5)
    for attempt in range(10):
        assert backoff_delay(attempt, rng=rng) == twin.uniform(0, min(10.0, 0.5 * 2 ** attempt))
    assert backoff_delay(-3, rng=random.Random(1)) == random.Random(1).uniform(0, 0.5)  # clamped below
    assert 0 <= backoff_delay(10_000) <= 10.0  # no overflow after a very long outage
    assert backoff_delay(3, base=0.01, cap=0.05, rng=random.Random(2)) == random.Random(2).uniform(0, 0.05)


def test_advised_delay_follows_the_server_within_bounds():
    assert advised_delay(1500, default=1.0) == 1.5
    for unusable in (None, -5, "soon", True):
        assert advised_delay(unusable, default=0.5) == 0.5
    assert advised_delay(0, default=0.5) == 0.0  # "now" is an answer
    assert advised_delay(600_000, default=0.5, cap=60.0) == 60.0
    rng, twin = random.Random(9), random.Random(9)
    assert advised_delay(1000, default=1.0, jitter=0.25, rng=rng) == 1.0 * twin.uniform(1.0, 1.25)
    spread = [advised_delay(2000, default=1.0, jitter=0.25) for _ in range(200)]
    assert all(2.0 <= s <= 2.5 for s in spread) and max(spread) > min(spread)


async def test_retry_returns_the_first_success_after_waiting_as_told():
    sleeps = Sleeps()
    op = Flaky(OSError("a"), OSError("b"))
    seen: list[tuple[str, int]] = []

    def delay(exc: Exception, retries: int) -> float:
        seen.append((str(exc), retries))
        return 0.1 * (retries + 1)

    assert await retry(op, delay=delay, sleep=sleeps) == "ok"
    assert op.calls == 3 and sleeps == [0.1, 0.2] and seen == [("a", 0), ("b", 1)]


async def test_retry_gives_up_when_delay_says_none_and_reraises_unchanged():
    sleeps = Sleeps()
    final = PermissionError("refused")
    op = Flaky(OSError("transient"), final)
    with pytest.raises(PermissionError) as info:
        await retry(op, delay=lambda exc, n: None if isinstance(exc, PermissionError) else 0.0, sleep=sleeps)
    assert info.value is final and op.calls == 2 and sleeps == [0.0]


async def test_retry_stops_after_max_retries():
    sleeps = Sleeps()
    op = Flaky(*(OSError(str(i)) for i in range(10)))
    with pytest.raises(OSError, match="3"):
        await retry(op, delay=lambda exc, n: 0.0, max_retries=3, sleep=sleeps)
    assert op.calls == 4 and len(sleeps) == 3  # one try and three retries
    op = Flaky(OSError("only"))
    with pytest.raises(OSError):
        await retry(op, delay=lambda exc, n: 0.0, max_retries=0, sleep=sleeps)
    assert op.calls == 1


async def test_cancellation_is_never_retried():
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    calls: list[int] = []
    task = asyncio.ensure_future(retry(forever, delay=lambda exc, n: calls.append(n) or 0.0))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == []


async def test_a_backoff_retry_loop_as_callers_write_it():
    rng, twin = random.Random(3), random.Random(3)
    sleeps = Sleeps()
    op = Flaky(ConnectionError(), ConnectionError(), ConnectionError())
    await retry(op, delay=lambda exc, n: backoff_delay(n, rng=rng), max_retries=5, sleep=sleeps)
    assert sleeps == [twin.uniform(0, 0.5), twin.uniform(0, 1.0), twin.uniform(0, 2.0)]
