"""Ordered delivery of one turn's frames to the application.

:class:`BaseTurnStream` checks what guarantee 2 of docs/protocol.md promises
(seq starts after the last one held and grows by 1, the deltas concatenate to
``turn.end.text``) as frames arrive, and hands them to the application in
order through ``async for`` or :meth:`BaseTurnStream.wait`. It does no I/O: a
connection's reader feeds it (``_on_frame``). The strict
:class:`clients.connection.TurnStream` (one socket) and the forgiving
:class:`clients.resilient.ResilientTurn` (across reconnects) build on it.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeGuard

from .errors import ClientError, ProtocolViolation, ServerError

__all__ = ["BaseTurnStream"]


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass in Python; true/false is not a seq on the wire.
    return isinstance(value, int) and not isinstance(value, bool)


class BaseTurnStream:
    """Ordered delivery of one turn: deltas, then its ``turn.end`` or an error.

    Frames are fed by the connection's reader (``_on_frame``); the application
    reads with ``async for`` or ``wait()``. Seq order is checked on arrival.
    """

    strict = True  # duplicates are a violation (raw connection); False: dropped (resilient)

    def __init__(self, *, turn_id: str | None = None, client_turn_id: str | None = None,
                 conversation_id: str | None = None, after_seq: int = 0) -> None:
        self.turn_id = turn_id
        self.client_turn_id = client_turn_id
        self.conversation_id = conversation_id
        self.accepted: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.deltas: list[dict[str, Any]] = []
        self.last_seq = after_seq
        self.duplicates_dropped = 0
        self._start_seq = after_seq
        self._parts: list[str] = []
        self._since_attach = 0  # deltas since the last accepted/resume on this socket
        self._finished = False
        # Deltas in order, then None (the end) or the error; both stay queued for later readers.
        self._items: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()

    @property
    def text(self) -> str:
        """Concatenation of the deltas received so far (the whole reply once done)."""
        return "".join(self._parts)

    @property
    def done(self) -> bool:
        return self._finished

    def __aiter__(self) -> BaseTurnStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        await self._before_read()
        item = await self._items.get()
        if item is None:
            self._items.put_nowait(None)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._items.put_nowait(item)
            raise item
        return item

    async def wait(self) -> dict[str, Any]:
        """Consume the turn fully; return its ``turn.end`` frame (or raise its error)."""
        async for _ in self:
            pass
        assert self.end is not None
        return self.end

    # -------------------------------------------------- fed by the reader task

    def _on_frame(self, frame: dict[str, Any]) -> None:
        if self._finished:
            return
        kind = frame.get("type")
        try:
            if kind == "turn.accepted":
                self._on_accepted(frame)
            elif kind == "turn.delta":
                self._on_delta(frame)
            elif kind == "turn.end":
                self._on_end(frame)
            elif kind == "error":
                self._on_error(frame)
        except ProtocolViolation as exc:
            self._fail(exc)

    def _on_accepted(self, frame: dict[str, Any]) -> None:
        turn_id = frame.get("turn_id")
        if not isinstance(turn_id, str):
            raise ProtocolViolation("turn.accepted without a string turn_id")
        if self.turn_id is not None and turn_id != self.turn_id:
            raise ProtocolViolation(f"turn.accepted names turn {turn_id!r}, expected {self.turn_id!r}")
        self.turn_id = turn_id
        if self.accepted is None:
            self.accepted = frame
        if isinstance(frame.get("conversation_id"), str):
            self.conversation_id = frame["conversation_id"]
        self._since_attach = 0

    def _on_delta(self, frame: dict[str, Any]) -> None:
        seq, text = frame.get("seq"), frame.get("text")
        if not _is_int(seq) or not isinstance(text, str):
            raise ProtocolViolation("turn.delta needs an integer seq and a string text")
        first = frame.get("seq_start", seq)  # a merged delta covers seq_start..seq
        if not _is_int(first) or first > seq:
            raise ProtocolViolation("turn.delta seq_start must be an integer no greater than seq")
        if seq <= self.last_seq:
            if self.strict:
                raise ProtocolViolation(f"duplicate delta: seq {seq}, already hold up to {self.last_seq}")
            self.duplicates_dropped += 1
            self._dropped()
            return
        if first != self.last_seq + 1:
            raise ProtocolViolation(f"gap in deltas: expected seq {self.last_seq + 1}, got {first}")
        self._push(frame)

    def _push(self, delta: dict[str, Any]) -> None:
        self.last_seq = delta["seq"]
        self._since_attach += 1
        self.deltas.append(delta)
        self._parts.append(delta["text"])
        self._items.put_nowait(delta)

    def _on_end(self, frame: dict[str, Any]) -> None:
        seq, text = frame.get("seq"), frame.get("text")
        if seq is not None and not _is_int(seq):
            raise ProtocolViolation("turn.end seq must be an integer")
        if _is_int(seq) and seq < self.last_seq:
            raise ProtocolViolation(f"turn.end at seq {seq} but deltas already reached {self.last_seq}")
        if _is_int(seq) and seq > self.last_seq:
            # Legitimate only when the delta log expired: the server then sends
            # turn.end straight after turn.accepted, with the whole reply
            # (guarantee 1). Hand the missing part over as one catch-up delta.
            held = self.text
            if not (self._since_attach == 0 and self._start_seq == 0
                    and isinstance(text, str) and text.startswith(held)):
                raise ProtocolViolation(f"turn.end at seq {seq} but deltas stop at {self.last_seq}")
            self._push({"type": "turn.delta", "turn_id": self.turn_id, "seq": seq,
                        "text": text[len(held):], "catch_up": True})
        elif self._start_seq == 0 and isinstance(text, str) and text != self.text:
            raise ProtocolViolation("turn.end text differs from the concatenated deltas")
        self._finish(frame)

    def _on_error(self, frame: dict[str, Any]) -> None:
        self._fail(ServerError(frame))

    def _on_lost(self, exc: ClientError) -> None:
        self._fail(exc)

    def _finish(self, frame: dict[str, Any]) -> None:
        self.end = frame
        self._finished = True
        self._items.put_nowait(None)
        self._done_hook()

    def _fail(self, exc: BaseException) -> None:
        if self._finished:
            return
        self.error = exc
        self._finished = True
        self._items.put_nowait(exc)
        self._done_hook()

    # -------------------------------------------------- subclass hooks

    async def _before_read(self) -> None:
        return None

    def _dropped(self) -> None:
        return None

    def _done_hook(self) -> None:
        return None
