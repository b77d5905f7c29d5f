"""A connection's outgoing frames: bounded, so a phone that stops reading
cannot grow the server's memory without bound nor hold up anyone else.

``put`` never blocks (the engine's fan-out must not wait for one slow socket).

Coalescing: when a socket lags, live deltas pile up here. For a client that
asked for it in ``hello`` (``coalesce: true``), a new live delta that continues
its turn's newest queued delta is merged into it: the
merged frame carries ``seq_start`` (its first seq) and ``seq`` (its last), so
the seq range a client receives stays contiguous. Only live deltas merge, never
a replayed backlog, so a merged frame never overlaps what the socket already
carried. Clients that did not ask get one frame per delta, as in version 1.

A socket that stays stuck is closed by its connection: when more than
``max_frames`` frames wait, or when nothing has been sent for a while although
frames wait (see :attr:`stalled_since`). Its turns keep running and stay
resumable.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from protocol.errors import RapportError


class OutboxOverflow(RapportError):
    code = "internal"


class Outbox:
    __slots__ = ("_frames", "max_frames", "coalesce", "_open", "merged", "stalled_since")

    def __init__(self, max_frames: int = 1024, *, coalesce: bool = False) -> None:
        self._frames: deque[dict[str, Any]] = deque()
        self.max_frames = max_frames
        self.coalesce = coalesce
        # turn_id -> that turn's newest queued frame, while it is a live delta
        # that later deltas may still be merged into.
        self._open: dict[str, dict[str, Any]] = {}
        self.merged = 0  # deltas folded into an earlier frame, for metrics and tests
        # When the oldest queued frame started waiting without the sender taking
        # anything since; None while empty.
        self.stalled_since: float | None = None

    def put(self, frame: dict[str, Any], *, live: bool = False) -> None:
        turn_id = frame.get("turn_id")
        if live and self.coalesce and frame.get("type") == "turn.delta":
            pending = self._open.get(turn_id)  # type: ignore[arg-type]
            if pending is not None and pending["seq"] + 1 == frame["seq"]:
                if "seq_start" not in pending:
                    # The queued frame is shared with other followers: merge into a copy.
                    copy = {**pending, "seq_start": pending["seq"]}
                    self._replace(pending, copy)
                    pending = copy
                pending["seq"] = frame["seq"]
                pending["text"] += frame["text"]
                self.merged += 1
                return
            self._append(frame)
            self._open[turn_id] = frame  # type: ignore[index]
            return
        self._append(frame)
        if turn_id is not None:
            # Anything else of this turn (its end, a replayed backlog) closes it to merging.
            self._open.pop(turn_id, None)

    def _append(self, frame: dict[str, Any]) -> None:
        if len(self._frames) >= self.max_frames:
            raise OutboxOverflow(f"more than {self.max_frames} frames waiting to be sent")
        if not self._frames:
            self.stalled_since = time.monotonic()
        self._frames.append(frame)

    def _replace(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        # The open frame of a turn is near the tail; search from there.
        for i in range(len(self._frames) - 1, -1, -1):
            if self._frames[i] is old:
                self._frames[i] = new
                self._open[new["turn_id"]] = new
                return
        raise AssertionError("an open frame is always queued")

    def get(self) -> dict[str, Any]:
        frame = self._frames.popleft()
        turn_id = frame.get("turn_id")
        if turn_id is not None and self._open.get(turn_id) is frame:
            del self._open[turn_id]
        self.stalled_since = time.monotonic() if self._frames else None
        return frame

    def __len__(self) -> int:
        return len(self._frames)

    def __bool__(self) -> bool:
        return bool(self._frames)
