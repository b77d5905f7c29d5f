"""One connection to a Rapport server: :class:`RapportConnection` and its :class:`TurnStream`.

One WebSocket, no reconnection (see :mod:`clients.resilient` for that). The
socket is opened and the ``hello``/``ready`` handshake made by
:meth:`clients.driver.Driver.open`; then exactly one reader task routes every
server frame: turn frames to their :class:`TurnStream`, ``pong`` to
:meth:`RapportConnection.ping`, ``history``/``history.cleared`` and errors
without a turn to the request/response calls, anything else to a bounded
queue read by :meth:`RapportConnection.recv_frame`. A server ``ping`` is
answered with ``pong`` at once. The reader task is owned by the connection
and stopped by :meth:`RapportConnection.close`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any

from protocol import client_frames, close_codes
from protocol.codec import JSON_SUBPROTOCOL
from protocol.frames import DEFAULT_CONVERSATION

from .driver import Driver
from .errors import ClientError, ConnectionLost, ProtocolViolation, ServerError
from .turn_stream import BaseTurnStream

__all__ = ["CLIENT_VERSION", "DEFAULT_MAX_SIZE", "RapportConnection", "TurnStream"]

log = logging.getLogger("rapport.client")

CLIENT_VERSION = "0.1.0"
DEFAULT_MAX_SIZE = 4 * 2**20  # history pages can be large; the server limits what *we* send.
_UNROUTED_LIMIT = 1000  # frames nobody asked for are kept, bounded, for recv_frame()


def _key(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class TurnStream(BaseTurnStream):
    """One turn on one :class:`RapportConnection`. Strict: a gap or duplicate raises."""

    def __init__(self, connection: RapportConnection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._connection = connection

    async def cancel(self) -> None:
        if self.turn_id is None:
            raise ClientError("the turn has not been accepted yet; nothing to cancel")
        await self._connection.cancel(self.turn_id)


class RapportConnection:
    """One authenticated WebSocket connection. No reconnection; see ResilientClient."""

    def __init__(self, driver: Driver) -> None:
        if driver.ready is None:
            raise ValueError("a RapportConnection starts after the handshake: open the Driver with hello=True")
        self._driver = driver
        self._ready: dict[str, Any] = driver.ready
        self._loop = asyncio.get_running_loop()
        self._by_turn: dict[str, BaseTurnStream] = {}
        self._by_client: dict[str, BaseTurnStream] = {}
        self._requests: deque[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = deque()
        self._pings: dict[Any, asyncio.Future[float]] = {}
        self._ping_ids = itertools.count(1)
        # Frames nobody was waiting for, then None once the socket closed (kept for later readers).
        self._frames: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._closed_event = asyncio.Event()
        self._close_code: int | None = None
        self._close_reason = ""
        self._failure: ClientError | None = None
        self._lost: ClientError | None = None
        self.last_received = self._loop.time()
        self._reader = self._loop.create_task(self._read_loop(), name="rapport:reader")

    # -------------------------------------------------- opening

    @classmethod
    async def open(cls, url: str, *, token: str | None = None, user: str | None = None,
                   subprotocol: str = JSON_SUBPROTOCOL, token_in_header: bool = True,
                   client_name: str = "rapport-python", client_version: str = CLIENT_VERSION,
                   open_timeout: float = 10.0, close_timeout: float = 5.0,
                   max_size: int | None = DEFAULT_MAX_SIZE, **connect_kwargs: Any) -> RapportConnection:
        """Connect, send ``hello``, wait for ``ready`` (the handshake is :meth:`Driver.open`'s).

        ``token`` goes into the ``Authorization`` header, or into ``hello``
        with ``token_in_header=False`` (as browsers must). Raises
        AuthenticationError (close 4401, HTTP 401/403), ServerError (an
        ``error`` answered the hello), ConnectionLost (anything else).
        """
        driver = await Driver.open(
            url, subprotocol=subprotocol, user=user,
            header_token=token if token_in_header else None,
            token=None if token_in_header else token,
            client={"name": client_name, "version": client_version},
            # A lagging socket may get consecutive deltas merged into one frame
            # covering seq_start..seq (docs/protocol.md); BaseTurnStream handles it.
            coalesce=True,
            open_timeout=open_timeout, close_timeout=close_timeout, max_size=max_size, **connect_kwargs)
        return cls(driver)

    # -------------------------------------------------- properties

    @property
    def ready(self) -> dict[str, Any]:
        return self._ready

    @property
    def subprotocol(self) -> str:
        return self._driver.codec.subprotocol

    @property
    def local_address(self) -> Any:
        """This end's socket address (host, port): which TCP connection is in use."""
        return self._driver.ws.local_address

    @property
    def closed(self) -> bool:
        return self._closed_event.is_set()

    @property
    def close_code(self) -> int | None:
        return self._close_code

    @property
    def close_reason(self) -> str:
        return self._close_reason

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    # -------------------------------------------------- the reader task

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._driver.recv(timeout=None)
                self.last_received = self._loop.time()
                await self._dispatch(frame)
        except ConnectionLost as exc:
            self._close_code, self._close_reason = exc.close_code, exc.reason
        except ProtocolViolation as exc:
            log.error("closing the connection: %s", exc)
            self._failure = exc
            await self._driver.close(close_codes.PROTOCOL_ERROR, "protocol violation")
        finally:
            self._on_closed()

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind in ("turn.accepted", "turn.delta", "turn.end") or (
                kind == "error" and (_key(frame.get("turn_id")) or _key(frame.get("client_turn_id")))):
            sink = self._route(frame)
            if sink is not None:
                sink._on_frame(frame)
                if sink.done or kind == "error":
                    self._unregister(sink)
                return
            # An error about a turn no stream follows may answer a select or a rating.
            if kind == "error" and self._resolve_request(frame, key=_key(frame.get("turn_id"))):
                return
        elif kind == "ping":
            await self._driver.send(client_frames.pong(frame.get("t")))
            return
        elif kind == "pong":
            t = frame.get("t")
            waiter = self._pings.pop(t, None) if isinstance(t, (int, float, str)) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(self._loop.time())
            return
        if kind in ("turn.selected", "feedback.recorded") and self._resolve_request(
                frame, key=_key(frame.get("turn_id"))):
            return
        untargeted = not (_key(frame.get("turn_id")) or _key(frame.get("client_turn_id")))
        if kind in ("history", "history.cleared", "memory", "error") and untargeted and self._resolve_request(frame):
            return
        if self._frames.qsize() >= _UNROUTED_LIMIT:
            self._frames.get_nowait()
        self._frames.put_nowait(frame)

    def _route(self, frame: dict[str, Any]) -> BaseTurnStream | None:
        turn_id, client_turn_id = _key(frame.get("turn_id")), _key(frame.get("client_turn_id"))
        if frame["type"] == "turn.accepted":
            sink = self._by_client.pop(client_turn_id, None) if client_turn_id else None
            if sink is None:
                return self._by_turn.get(turn_id) if turn_id else None
            if turn_id:
                self._by_turn[turn_id] = sink
            return sink
        sink = self._by_turn.get(turn_id) if turn_id else None
        if sink is None and client_turn_id:
            sink = self._by_client.get(client_turn_id)
        return sink

    def _unregister(self, sink: BaseTurnStream) -> None:
        for table in (self._by_turn, self._by_client):
            for key in [k for k, v in table.items() if v is sink]:
                del table[key]

    def _resolve_request(self, frame: dict[str, Any], key: str | None = None) -> bool:
        """Answer the pending request ``frame`` belongs to. Requests wait under the
        conversation they ask about, or (select, feedback) the turn they name: ``key``."""
        kind = frame["type"]
        wanted = key if key is not None else frame.get("conversation_id")
        candidates = [e for e in self._requests if kind == "error" or e[0] == kind]
        if key is not None:
            candidates = [e for e in candidates if e[1] == key]
        if not candidates:
            return False
        # The server answers in order; prefer the request for the same conversation.
        entry = next((e for e in candidates if e[1] == wanted), candidates[0])
        self._requests.remove(entry)
        if not entry[2].done():
            if kind == "error":
                entry[2].set_exception(ServerError(frame))
            else:
                entry[2].set_result(frame)
        return True

    def _on_closed(self) -> None:
        if self._closed_event.is_set():
            return
        if self._close_code is None:
            # Closed by close() before the reader saw it: what websockets recorded.
            self._close_code = self._driver.ws.close_code or close_codes.ABNORMAL
            self._close_reason = self._driver.ws.close_reason or ""
        exc = self._failure or ConnectionLost.from_close(self._close_code, self._close_reason)
        self._lost = exc
        sinks = {id(s): s for s in [*self._by_turn.values(), *self._by_client.values()]}
        self._by_turn.clear()
        self._by_client.clear()
        for sink in sinks.values():
            sink._on_lost(exc)
        for _, _, request in self._requests:
            if not request.done():
                request.set_exception(exc)
        self._requests.clear()
        for pong in self._pings.values():
            if not pong.done():
                pong.set_exception(exc)
        self._pings.clear()
        self._frames.put_nowait(None)
        self._closed_event.set()

    def _lost_error(self) -> ClientError:
        return self._lost or ConnectionLost("connection closed", close_code=self._close_code)

    # -------------------------------------------------- sending

    async def send_raw(self, data: str | bytes) -> None:
        """Send bytes as they are (tests probe bad input with this)."""
        if self.closed:
            raise self._lost_error()
        await self._driver.send_raw(data)

    async def send_frame(self, frame: dict[str, Any]) -> None:
        await self.send_raw(self._driver.codec.encode(frame))

    async def recv_frame(self, timeout: float | None = None) -> dict[str, Any]:
        """The next frame that was not routed to a turn, a ping or a pending request."""
        async with asyncio.timeout(timeout):
            item = await self._frames.get()
        if item is None:
            self._frames.put_nowait(None)
            raise self._lost_error()
        return item

    async def start_turn(self, text: str, *, conversation_id: str = DEFAULT_CONVERSATION,
                         client_turn_id: str | None = None,
                         options: dict[str, Any] | None = None) -> TurnStream:
        frame = client_frames.turn_start(text, client_turn_id=client_turn_id, conversation_id=conversation_id,
                                         options=options)
        stream = TurnStream(self, client_turn_id=frame["client_turn_id"], conversation_id=conversation_id)
        await self._start_with_sink(frame, stream)
        return stream

    async def start_frame(self, frame: dict[str, Any]) -> TurnStream:
        """Send a turn-starting frame built by :mod:`protocol.client_frames` (``turn.start``,
        ``turn.regenerate``, ``turn.edit``) and stream the turn it starts."""
        stream = TurnStream(self, client_turn_id=frame["client_turn_id"],
                            conversation_id=frame.get("conversation_id", DEFAULT_CONVERSATION))
        await self._start_with_sink(frame, stream)
        return stream

    async def resume(self, turn_id: str, after_seq: int) -> TurnStream:
        stream = TurnStream(self, turn_id=turn_id, after_seq=after_seq)
        await self._resume_with_sink(turn_id, after_seq, stream)
        return stream

    async def _start_with_sink(self, frame: dict[str, Any], sink: BaseTurnStream) -> None:
        self._by_client[frame["client_turn_id"]] = sink
        try:
            await self.send_frame(frame)
        except ConnectionLost:
            self._unregister(sink)
            raise

    async def _resume_with_sink(self, turn_id: str, after_seq: int, sink: BaseTurnStream) -> None:
        previous = self._by_turn.get(turn_id)
        if previous is not None and previous is not sink:
            self._unregister(previous)
            previous._fail(ClientError(f"turn {turn_id} was resumed by another stream"))
        self._by_turn[turn_id] = sink
        try:
            await self.send_frame(client_frames.turn_resume(turn_id, after_seq))
        except ConnectionLost:
            self._unregister(sink)
            raise

    async def cancel(self, turn_id: str) -> None:
        """Ask the server to abort the turn; its stream then ends with ``cancelled``."""
        await self.send_frame(client_frames.turn_cancel(turn_id))

    async def history(self, conversation_id: str = DEFAULT_CONVERSATION, limit: int = 50,
                      before: str | None = None, *, timeout: float | None = 30.0) -> dict[str, Any]:
        frame = client_frames.history_get(conversation_id, limit=limit, before=before)
        return await self._request(frame, "history", conversation_id, timeout)

    async def clear_history(self, conversation_id: str = DEFAULT_CONVERSATION, *,
                            timeout: float | None = 30.0) -> dict[str, Any]:
        frame = client_frames.history_clear(conversation_id)
        return await self._request(frame, "history.cleared", conversation_id, timeout)

    async def select(self, turn_id: str, conversation_id: str = DEFAULT_CONVERSATION, *,
                     timeout: float | None = 30.0) -> dict[str, Any]:
        """``turn.select``: the reply ``turn_id`` is the one the model sees from now on."""
        frame = client_frames.turn_select(turn_id, conversation_id=conversation_id)
        return await self._request(frame, "turn.selected", turn_id, timeout)

    async def feedback(self, turn_id: str, rating: int, reason: str | None = None, *,
                       timeout: float | None = 30.0) -> dict[str, Any]:
        """Rate the reply ``turn_id`` (1 or -1)."""
        frame = client_frames.feedback(turn_id, rating, reason=reason)
        return await self._request(frame, "feedback.recorded", turn_id, timeout)

    async def memory_add(self, text: str, *, timeout: float | None = 30.0) -> dict[str, Any]:
        """``memory.add``: pin a fact; the answer is the ``memory`` frame with the whole list."""
        # A memory answer names no conversation nor turn: it waits under no key and
        # is matched by its type (the server answers a socket's requests in order).
        return await self._request(client_frames.memory_add(text), "memory", None, timeout)

    async def memory_list(self, *, timeout: float | None = 30.0) -> dict[str, Any]:
        """``memory.list``: the ``memory`` frame with the user's pinned facts."""
        return await self._request(client_frames.memory_list(), "memory", None, timeout)

    async def memory_delete(self, fact_id: str, *, timeout: float | None = 30.0) -> dict[str, Any]:
        """``memory.delete``: unpin one fact; the ``memory`` frame after the change."""
        return await self._request(client_frames.memory_delete(fact_id), "memory", None, timeout)

    async def _request(self, frame: dict[str, Any], expect: str, key: str | None,
                       timeout: float | None) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        entry = (expect, key, fut)
        self._requests.append(entry)
        try:
            await self.send_frame(frame)
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if entry in self._requests:
                self._requests.remove(entry)

    async def ping(self, t: float | None = None, *, timeout: float | None = 10.0) -> float:
        """Round trip of a protocol ``ping``/``pong``, in seconds."""
        if t is None:
            t = next(self._ping_ids)
        fut: asyncio.Future[float] = self._loop.create_future()
        self._pings[t] = fut
        started = self._loop.time()
        try:
            await self.send_frame(client_frames.ping(t))
            async with asyncio.timeout(timeout):
                answered = await fut
        finally:
            if self._pings.get(t) is fut:
                del self._pings[t]
        return answered - started

    async def send_heartbeat(self) -> None:
        """A ``ping`` nobody waits for (any answer counts as life)."""
        await self.send_frame(client_frames.ping(next(self._ping_ids)))

    # -------------------------------------------------- closing

    def abort(self) -> None:
        """Drop the socket at once (dead peer): no closing handshake."""
        self._driver.abort()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket and stop the reader task. Idempotent."""
        await self._driver.close(code, reason)  # a no-op when the socket is already closed
        if not self._reader.done():
            # The reader sees the closed socket at once; cancelling is only a safety net.
            await asyncio.wait([self._reader], timeout=1.0)
            if not self._reader.done():
                self._reader.cancel()
                await asyncio.wait([self._reader])
        if not self._reader.cancelled() and self._reader.exception() is not None:
            log.error("reader task failed", exc_info=self._reader.exception())
        self._on_closed()
