"""Writing the deltas of this process's turns to their Redis delta logs.

Every delta a turn generates here goes straight to its followers' outboxes and,
through the process's one :class:`DeltaLogWriter`, to the turn's delta log (a
Redis Stream), from which a follower on another process, a resuming client and
a replayed ``turn.start`` read it. The writer batches: whatever piled up for all
turns while its previous write was in flight goes out in one pipelined round
trip, rather than one round trip per turn per engine step.

A delta may reach a socket before it is in the log; guarantee 2 only needs the
log to hold every delta, in order, before the turn's end is stored. So the
writer never gives a write up while the process runs, however long Redis is
away: a batch given up, followed by a later one written, would leave a hole
(the log's script refuses the later one as a gap, and the end entry would then
follow a log that does not concatenate to its text). What waits is bounded by
memory, not time: it is text the turns hold in memory anyway.
"""

from __future__ import annotations

import asyncio
import logging

from protocol.errors import Unavailable
from sessions.store import ConversationStore

log = logging.getLogger("rapport.delta_log")

Key = tuple[str, str]  # (user_id, turn_id)


class DeltaLogWriter:
    """Writes the deltas of every turn in this process to their Redis delta logs.

    One task, one pipelined round trip per cycle for all turns with new deltas
    (rather than one per turn per engine step): at most one write is in flight,
    and whatever arrives meanwhile goes out in the next. Order per turn is kept
    because a turn's deltas are only ever written by this one loop, and a
    failed write is retried (with what piled up meanwhile appended behind it)
    until it succeeds. Only :meth:`close` gives up, after ``retry_s``: the
    process is stopping, its turns' logs keep a prefix without a hole, and the
    process that reaps their leases ends them with exactly that prefix.
    """

    def __init__(self, store: ConversationStore, retry_s: float) -> None:
        self._store = store
        # At shutdown, how long to keep trying before the rest is given up.
        self._retry_s = retry_s
        self._pending: dict[Key, list[tuple[int, str]]] = {}
        self._inflight: frozenset[Key] = frozenset()
        self._cycle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Set once the writer has given up: nothing is written after that, since
        # it could follow deltas that never reached the log.
        self._abandoned = asyncio.Event()
        # Turns with deltas that will never be logged (given up, or refused).
        self._unwritten: set[Key] = set()

    def add(self, user_id: str, turn_id: str, seq: int, text: str) -> None:
        key = (user_id, turn_id)
        if self._abandoned.is_set():
            self._unwritten.add(key)
            return
        self._pending.setdefault(key, []).append((seq, text))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="delta log writer")

    async def _run(self) -> None:
        batch: dict[Key, list[tuple[int, str]]] = {}
        try:
            while self._pending and not self._abandoned.is_set():
                batch, self._pending = self._pending, {}
                self._inflight = frozenset(batch)
                try:
                    await self._write(batch)
                finally:
                    self._inflight = frozenset()
                    self._next_cycle()
                batch = {}
        finally:
            if self._abandoned.is_set():
                # Given up while a write was in flight: neither it nor what
                # waited behind it will be logged.
                self._unwritten.update(batch)
                self._unwritten.update(self._pending)
                self._pending = {}
                self._next_cycle()

    def _next_cycle(self) -> None:
        done, self._cycle = self._cycle, asyncio.Event()
        done.set()

    async def _write(self, batch: dict[Key, list[tuple[int, str]]]) -> None:
        delay = 0.05
        while True:
            items = [(user_id, turn_id, deltas) for (user_id, turn_id), deltas in batch.items()]
            try:
                failed = await self._store.append_deltas_many(items)
            except Unavailable:
                if self._abandoned.is_set():
                    self._unwritten.update(batch)
                    return
                # Wait, but wake at once when the writer is given up.
                try:
                    async with asyncio.timeout(delay):
                        await self._abandoned.wait()
                except TimeoutError:
                    pass
                delay = min(delay * 2, 1.0)
                # What arrived meanwhile goes behind the batch, in the same
                # round trip: per turn it continues the batch's seqs.
                for key, deltas in self._pending.items():
                    batch.setdefault(key, []).extend(deltas)
                self._pending = {}
                self._inflight = frozenset(batch)
                continue
            by_turn = {turn_id: (user_id, turn_id) for user_id, turn_id in batch}
            for turn_id, why in failed.items():
                # Not an outage (the record is gone, a gap): retrying cannot help.
                log.error("turn %s: its deltas could not be logged (%s)", turn_id, why)
                self._unwritten.add(by_turn[turn_id])
            return

    async def drain(self, user_id: str, turn_id: str) -> bool:
        """Wait until every delta of this turn added so far is written; False if some never will be."""
        key = (user_id, turn_id)
        while key in self._pending or key in self._inflight:
            await self._cycle.wait()
        return key not in self._unwritten

    def forget(self, user_id: str, turn_id: str) -> None:
        """The turn is over here: drop what the writer remembers of it."""
        self._unwritten.discard((user_id, turn_id))

    def abandon(self) -> None:
        """Give up every write not done yet (the process is stopping and Redis is away)."""
        if not self._abandoned.is_set():
            self._abandoned.set()
            if self._task is None or self._task.done():
                self._unwritten.update(self._pending)
                self._pending = {}
                self._next_cycle()

    async def close(self) -> None:
        """Wait for the last write; if Redis is still away after ``retry_s``, give it up."""
        task = self._task
        if task is None:
            return
        if self._abandoned.is_set():
            task.cancel()  # already given up: nothing in flight is worth waiting for
        done, _ = await asyncio.wait({task}, timeout=self._retry_s)
        if not done:
            log.error("giving up on the deltas of %d turn(s): Redis stayed unreachable",
                      len(self._pending) + len(self._inflight))
            self.abandon()
            # A write in flight may hang until its socket times out: stop waiting for it.
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
