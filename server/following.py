"""Following turns that generate in other processes, through their delta logs.

Several gateway processes share one Redis, and a client may reconnect to any of
them (guarantee 2 holds across processes). A turn generating in this process is
followed from memory by :class:`server.turns.TurnManager`; every other turn --
generating in another process, or already ended and gone from memory -- is
followed here, from its Redis delta log: the backlog after the client's last
seq, then blocking stream reads until the log's end entry.

While it follows a running turn, a follower tells the owning process that
someone is reading (``attach``, then ``detach``), so the owner does not end a
turn followed only from elsewhere as abandoned. A ``turn.cancel`` for a turn
running elsewhere is sent to its owner; if no process listens on the owner's
channel, the owner is gone and the turn is ended here, as the reaper would.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from protocol import frames
from protocol.errors import NotFound, RapportError, ResumeExpired
from sessions.store import ConversationStore, LogDelta, LogEnd, TurnRecord

from .coordination import Coordinator, end_orphaned_turn


class Follower(Protocol):
    """A connection that receives a turn's frames."""

    user_id: str

    def push(self, frame: dict[str, Any], *, live: bool = False) -> None:
        """Queue a frame for sending; never blocks. ``live`` marks a delta fresh
        from the engine (which a lagging socket may merge with the previous one)."""

    def adopt(self, turn_id: str, task: asyncio.Task[None]) -> None:
        """Take ownership of a task following ``turn_id`` from another process."""


def end_frame_of(record: TurnRecord) -> dict[str, Any]:
    """``turn.end`` rebuilt from a stored turn record (whose own end frame is gone with its log)."""
    return frames.turn_end(turn_id=record.turn_id, seq=record.last_seq,
                           finish_reason=record.finish_reason or "interrupted", text=record.text,
                           usage=record.usage or {"prompt_tokens": 0, "completion_tokens": 0,
                                                  "cached_prompt_tokens": 0},
                           timings=record.timings or {"queue_ms": None, "ttft_ms": None,
                                                      "total_ms": None})


class DistantTurns:
    """Turns this process does not generate, followed and cancelled through Redis.

    The coordinator (leases and control messages) is passed to each call: it is
    None when the process runs without one, and then nobody can be told.
    """

    def __init__(self, store: ConversationStore, *, block_ms: int) -> None:
        self.store = store
        # How long one blocking read of a delta log waits before the turn record is checked.
        self.block_ms = block_ms

    async def resume(self, follower: Follower, turn_id: str, after_seq: int, coordinator: Coordinator | None,
                     *, replay: bool = False) -> asyncio.Task[None] | None:
        """Send the deltas after ``after_seq``, then live ones, then the end.

        Returns the task that follows the delta log (the caller owns it), or
        None when everything was sent at once. ``replay`` is a re-sent
        ``turn.start``: once the log has expired it gets the end straight away
        instead of ``resume_expired``.
        """
        record = await self.store.get_turn(user_id=follower.user_id, turn_id=turn_id)
        if record is None:
            raise NotFound(f"no turn '{turn_id}'", turn_id=turn_id)
        if record.status == "ended" and not await self.store.log_exists(user_id=follower.user_id,
                                                                       turn_id=turn_id):
            if replay:
                # Guarantee 1: once the delta log has expired, turn.accepted is
                # followed directly by the turn's end, whose text is the whole reply.
                follower.push(end_frame_of(record))
                return None
            raise ResumeExpired(
                "the turn's delta log has expired; its final text is in 'text'",
                turn_id=turn_id, text=record.text, finish_reason=record.finish_reason,
            )
        return asyncio.get_running_loop().create_task(
            self.follow(follower, record, after_seq, coordinator), name=f"follow {turn_id}")

    async def follow(self, follower: Follower, record: TurnRecord, after_seq: int,
                     coordinator: Coordinator | None) -> None:
        """Follow a turn owned by another process, telling the owner someone is reading."""
        attach: asyncio.Task[int] | None = None
        if coordinator is not None and record.status == "running":
            # The attach goes out alongside the first log read rather than before
            # it: the resuming client waits on the read, the owner only needs to
            # hear of us before its grace period runs out. It is a task of its own
            # so that cancelling this follower cannot cut it off half-way.
            attach = asyncio.get_running_loop().create_task(
                self._tell(coordinator, "attach", record), name=f"attach {record.turn_id}")
        try:
            await self.follow_log(follower, record, after_seq)
        finally:
            if attach is not None:
                assert coordinator is not None
                try:
                    delivered = await asyncio.shield(attach) > 0
                except (RapportError, asyncio.CancelledError):
                    delivered = False
                # A detach only for an attach the owner got: an unmatched one would
                # take away another follower's count and let the turn expire under it.
                if delivered:
                    with contextlib.suppress(RapportError):
                        await self._tell(coordinator, "detach", record)

    @staticmethod
    async def _tell(coordinator: Coordinator, op: str, record: TurnRecord) -> int:
        """Send ``op`` about the turn to its owner; how many processes got it."""
        return await coordinator.send(record.owner, op, record.user_id, record.turn_id)

    async def follow_log(self, follower: Follower, record: TurnRecord, after_seq: int, *,
                         only_end: bool = False) -> None:
        """Follow a turn through its delta log: backlog, then blocking reads until its end.

        ``only_end`` sends nothing but the end (for a canceller, who holds no deltas).
        """
        seq = after_seq
        entries = await self.store.read_log(user_id=record.user_id, turn_id=record.turn_id,
                                            after_seq=seq)
        while True:
            for entry in entries:
                if isinstance(entry, LogEnd):
                    follower.push(entry.end)
                    return
                if isinstance(entry, LogDelta) and entry.seq > seq:
                    if not only_end:
                        follower.push(frames.turn_delta(record.turn_id, entry.seq, entry.text))
                    seq = entry.seq
            entries = await self.store.follow_log(user_id=record.user_id, turn_id=record.turn_id,
                                                  after_seq=seq, block_ms=self.block_ms)
            if not entries:
                # Nothing new within block_ms: the record says whether the turn
                # ended without an end entry this read could see (its log expired).
                current = await self.store.get_turn(user_id=record.user_id, turn_id=record.turn_id)
                if current is None:
                    raise NotFound(f"no turn '{record.turn_id}'", turn_id=record.turn_id)
                if current.status == "ended":
                    entries = await self.store.read_log(user_id=record.user_id,
                                                        turn_id=record.turn_id, after_seq=seq)
                    if not entries:
                        follower.push(end_frame_of(current))
                        return

    async def cancel(self, follower: Follower, turn_id: str, coordinator: Coordinator | None) -> None:
        """``turn.cancel`` for a turn not generating here; the follower gets its end."""
        record = await self.store.get_turn(user_id=follower.user_id, turn_id=turn_id)
        if record is None:
            raise NotFound(f"no turn '{turn_id}'", turn_id=turn_id)
        if record.status == "ended" or coordinator is None:
            follower.push(end_frame_of(record))
            return
        # The turn runs in another process: ask its owner to cancel it.
        received = await coordinator.send(record.owner, "cancel", record.user_id, turn_id)
        if received == 0 and await coordinator.leases.claim(record.user_id, turn_id):
            # Nobody listens on the owner's channel: the process is gone.
            ended = await end_orphaned_turn(self.store, record, "cancelled")
            follower.push(end_frame_of(ended))
            return
        follower.adopt(turn_id, asyncio.get_running_loop().create_task(
            self.follow_log(follower, record, record.last_seq, only_end=True),
            name=f"await end {turn_id}"))
