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
``max_frames`` frames or ``max_bytes`` bytes wait, or when nothing has been
sent for a while although frames wait (see :attr:`stalled_since`). Its turns
keep running and stay resumable.

Bytes, not only frames: one ``history.get`` answer can hold half a megabyte,
so 2,048 of them would be a gigabyte for one socket that never reads. A
frame's bytes are what its Python objects occupy (:func:`frame_bytes`), which
is what the server's memory actually holds while the frame waits.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

from protocol.errors import RapportError


class OutboxOverflow(RapportError):
    code = "internal"


#: What a delta frame's dict and its small fields occupy besides its text.
_DELTA_OVERHEAD = sys.getsizeof({"type": "", "turn_id": "", "seq": 0, "text": ""}) + 64


def frame_bytes(frame: dict[str, Any]) -> int:
    """Memory a queued frame holds: the sizes of its containers and values, recursively.

    Deltas, the bulk of all frames, take a shortcut: the dict and small fields
    are a constant, the text is what varies (and what merging grows).
    """
    if frame.get("type") == "turn.delta":
        return _DELTA_OVERHEAD + sys.getsizeof(frame.get("text", ""))
    total = 0
    stack: list[Any] = [frame]
    while stack:
        obj = stack.pop()
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


class Outbox:
    __slots__ = ("_frames", "max_frames", "max_bytes", "bytes", "coalesce", "_open", "merged", "stalled_since")

    def __init__(self, max_frames: int = 1024, *, max_bytes: int | None = None, coalesce: bool = False) -> None:
        self._frames: deque[dict[str, Any]] = deque()
        self.max_frames = max_frames
        # None: frames only. A frame put into an empty outbox is always taken, however
        # large, so that one big answer (a full history page) can always be sent.
        self.max_bytes = max_bytes
        self.bytes = 0  # what the queued frames hold, by frame_bytes()
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
                before = sys.getsizeof(pending["text"])
                pending["seq"] = frame["seq"]
                pending["text"] += frame["text"]
                self.bytes += sys.getsizeof(pending["text"]) - before
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
        size = frame_bytes(frame)
        if self.max_bytes is not None and self._frames and self.bytes + size > self.max_bytes:
            raise OutboxOverflow(f"more than {self.max_bytes} bytes waiting to be sent")
        if not self._frames:
            self.stalled_since = time.monotonic()
        self._frames.append(frame)
        self.bytes += size

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
        # The same measure as when it was queued (merges were added as they happened).
        self.bytes = 0 if not self._frames else self.bytes - frame_bytes(frame)
        self.stalled_since = time.monotonic() if self._frames else None
        return frame

    def clear(self) -> None:
        """Drop every queued frame (the socket is being closed: nobody will read them)."""
        self._frames.clear()
        self._open.clear()
        self.bytes = 0
        self.stalled_since = None

    def __len__(self) -> int:
        return len(self._frames)

    def __bool__(self) -> bool:
        return bool(self._frames)
