"""Feedback on replies (docs/protocol.md addition 20): ratings and choices kept for training.

One service answers the WebSocket's ``feedback`` frame and ``POST /v1/feedback``
(:mod:`server.feedback_api`), and is told of every ``turn.select``. Each call
takes a fresh snapshot of the exchange from the turn manager (prompt, every
alternative, the choice) and keeps it with the rating in
:class:`sessions.training.TrainingLog`, so the export still has the exchange
after history was trimmed.

A turn of another user is NotFound, as if it did not exist; a turn still
running is BadRequest (both raised by the turn manager's snapshot).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from protocol.errors import BadRequest, RapportError
from sessions.training import MAX_REASON_CHARS, ExchangeSnapshot, TrainingLog

log = logging.getLogger("rapport.feedback")

__all__ = ["FeedbackService", "SnapshotSource"]

SnapshotSource = Callable[[str, str], Awaitable[ExchangeSnapshot]]


def _now_ms() -> int:
    return int(time.time() * 1000)


class FeedbackService:
    """Ratings and choices of one process, written as training snapshots.

    ``manager_snapshot(user_id, turn_id)`` is the turn manager's
    ``exchange_snapshot``: it raises NotFound for a turn the user does not
    have and BadRequest for one still running.
    """

    def __init__(self, manager_snapshot: SnapshotSource, log: TrainingLog) -> None:
        self._snapshot = manager_snapshot
        self._log = log

    async def rate(self, user_id: str, turn_id: str, rating: int, reason: str | None) -> dict[str, Any]:
        """Record ``rating`` (-1 or 1) of the reply ``turn_id``; a new rating replaces the old one."""
        if isinstance(rating, bool) or not isinstance(rating, int) or rating not in (-1, 1):
            raise BadRequest("'rating' must be -1 or 1")
        if not isinstance(turn_id, str) or not turn_id:
            raise BadRequest("'turn_id' must be a non-empty string")
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            raise BadRequest(f"'reason' is longer than {MAX_REASON_CHARS} characters")
        snapshot = await self._snapshot(user_id, turn_id)
        await self._log.record_rating(snapshot, turn_id, rating, reason, _now_ms())
        return {"turn_id": turn_id, "rating": rating}

    async def selected(self, user_id: str, turn_id: str) -> bool:
        """Keep the exchange's snapshot after ``turn.select`` chose ``turn_id``; whether it was kept.

        Called once the selection itself is stored and answered: losing the
        snapshot (Redis away) costs one training example, never the user's
        choice, so a failure is logged rather than raised.
        """
        try:
            snapshot = await self._snapshot(user_id, turn_id)
            await self._log.record_selection(snapshot, _now_ms())
        except RapportError as exc:
            log.warning("training snapshot of a selection not kept: %s: %s", exc.code, exc.message)
            return False
        return True
