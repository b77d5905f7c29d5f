"""Writing the deltas of this process's turns to their Redis delta logs.

Every delta a turn generates here goes straight to its followers' outboxes and,
through the process's one :class:`DeltaLogWriter`, to the turn's delta log (a
Redis Stream), from which a follower on another process, a resuming client and
a replayed ``turn.start`` read it. The writer batches: whatever piled up for all
turns while its previous write was in flight goes out in one pipelined round
trip, rather than one round trip per turn per engine step.
"""

from __future__ import annotations

import asyncio
import logging
import time

from protocol.errors import Unavailable
from sessions.store import ConversationStore

log = logging.getLogger("rapport.delta_log")


class DeltaLogWriter:
    """Writes the deltas of every turn in this process to their Redis delta logs.

    One task, one pipelined round trip per cycle for all turns with new deltas
    (rather than one per turn per engine step): at most one write is in flight,
    and whatever arrives meanwhile goes out in the next. Order per turn is kept
    because a turn's deltas are only ever written by this one loop. When Redis
    is unreachable the batch is retried with backoff, so a short outage loses
    no delta.
    """

    def __init__(self, store: ConversationStore, retry_s: float) -> None:
        self._store = store
        self._retry_s = retry_s
        self._pending: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self._inflight: frozenset[tuple[str, str]] = frozenset()
        self._cycle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, user_id: str, turn_id: str, seq: int, text: str) -> None:
        self._pending.setdefault((user_id, turn_id), []).append((seq, text))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="delta log writer")

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            self._inflight = frozenset(batch)
            try:
                await self._write(batch)
            finally:
                self._inflight = frozenset()
                done, self._cycle = self._cycle, asyncio.Event()
                done.set()

    async def _write(self, batch: dict[tuple[str, str], list[tuple[int, str]]]) -> None:
        delay = 0.05
        deadline = time.monotonic() + self._retry_s
        items = [(user_id, turn_id, deltas) for (user_id, turn_id), deltas in batch.items()]
        while True:
            try:
                failed = await self._store.append_deltas_many(items)
            except Unavailable:
                if time.monotonic() > deadline:
                    log.error("giving up on the deltas of %d turn(s): Redis stayed unreachable", len(items))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            for turn_id, why in failed.items():
                log.error("turn %s: its deltas could not be logged (%s)", turn_id, why)
            return

    async def drain(self, user_id: str, turn_id: str) -> None:
        """Return once every delta of this turn added so far is written (or given up)."""
        key = (user_id, turn_id)
        while key in self._pending or key in self._inflight:
            await self._cycle.wait()

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
