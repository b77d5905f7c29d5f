"""A connection's outgoing frames: bounded, so a phone that stops reading
cannot grow the server's memory without bound.

``put`` never blocks (the engine's fan-out must not wait for one slow socket);
when the backlog passes ``max_frames`` it raises :class:`OutboxOverflow` and the
connection closes that socket. Its turns keep running and stay resumable.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .errors import RapportError


class OutboxOverflow(RapportError):
    code = "internal"


class Outbox:
    __slots__ = ("_frames", "max_frames")

    def __init__(self, max_frames: int = 1024) -> None:
        self._frames: deque[dict[str, Any]] = deque()
        self.max_frames = max_frames

    def put(self, frame: dict[str, Any]) -> None:
        if len(self._frames) >= self.max_frames:
            raise OutboxOverflow(f"more than {self.max_frames} frames waiting to be sent")
        self._frames.append(frame)

    def get(self) -> dict[str, Any]:
        return self._frames.popleft()

    def __len__(self) -> int:
        return len(self._frames)

    def __bool__(self) -> bool:
        return bool(self._frames)
