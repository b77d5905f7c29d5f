"""The reference async client for the Rapport wire protocol v1.

Mobile and desktop apps should copy the *behaviour* of this module; it is kept
small and explicit on purpose. Two layers:

``RapportConnection``
    One WebSocket, no reconnection. Opens the socket offering one subprotocol,
    sends ``hello``, waits for ``ready``, then runs exactly one reader task that
    routes every server frame: turn frames to their :class:`TurnStream`,
    ``pong`` to :meth:`RapportConnection.ping`, ``history``/``history.cleared``
    and errors without a turn to the request/response calls, anything else to a
    queue read by :meth:`RapportConnection.recv_frame`. A server ``ping`` is
    answered with ``pong`` automatically.

``ResilientClient``
    Hides a flaky network from the application (protocol guarantees 1-3, 7):
    reconnects with exponential backoff and full jitter, heartbeats, resumes
    every followed turn with the last seq it holds, re-sends an unacknowledged
    ``turn.start`` with the same ``client_turn_id`` and drops the replayed
    duplicates by seq. The app sees one uninterrupted stream per turn::

        async with ResilientClient(url, token=jwt) as client:
            async for delta in client.send("hi", conversation_id="default"):
                print(delta["text"], end="", flush=True)

Every task this module creates is owned (named ``rapport:*``), cancelled and
awaited on ``close()``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from protocol import close_codes
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, Codec, codec_for
from protocol.errors import BadRequest, RapportError

__all__ = [
    "JSON_SUBPROTOCOL",
    "MSGPACK_SUBPROTOCOL",
    "AuthenticationError",
    "ClientError",
    "ConnectionLost",
    "ProtocolViolation",
    "RapportConnection",
    "ResilientClient",
    "ResilientTurn",
    "ServerError",
    "TurnStream",
    "backoff_delay",
]

log = logging.getLogger("rapport.client")

CLIENT_VERSION = "0.1.0"
DEFAULT_MAX_SIZE = 4 * 2**20  # history pages can be large; the server limits what *we* send.
DEFAULT_CONVERSATION = "default"


_UNROUTED_LIMIT = 1000  # frames nobody asked for are kept, bounded, for recv_frame()


# ---------------------------------------------------------------- exceptions


class ClientError(RapportError):
    """Root of every error raised by the client side."""

    code = "client_error"


class ProtocolViolation(ClientError):
    """The server broke the contract: a seq gap or duplicate, an undecodable frame..."""

    code = "protocol_violation"


class ServerError(ClientError):
    """The server answered with an ``error`` frame; ``code`` is the protocol's error code."""

    def __init__(self, frame: dict[str, Any]) -> None:
        code = frame.get("code")
        code = code if isinstance(code, str) else "internal"
        message = frame.get("message")
        super().__init__(
            message if isinstance(message, str) else code,
            turn_id=frame.get("turn_id"),
            client_turn_id=frame.get("client_turn_id"),
            retry_after_ms=frame.get("retry_after_ms"),
        )
        self.code = code
        self.frame = dict(frame)

    @property
    def retry_after_ms(self) -> int | None:
        return self.fields.get("retry_after_ms")  # type: ignore[return-value]

    @property
    def turn_id(self) -> str | None:
        return self.fields.get("turn_id")  # type: ignore[return-value]

    @property
    def client_turn_id(self) -> str | None:
        return self.fields.get("client_turn_id")  # type: ignore[return-value]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectionLost(ClientError):
    """The socket closed (or could not be opened); ``close_code`` when the server sent one."""

    code = "connection_lost"

    def __init__(self, message: str, *, close_code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason

    @staticmethod
    def from_close(close_code: int | None, reason: str = "") -> ConnectionLost:
        detail = f"{close_code}" + (f" {reason}" if reason else "")
        if close_code == close_codes.UNAUTHORIZED:
            return AuthenticationError(f"server refused the credentials (close {detail}); a new token is needed",
                                       close_code=close_code, reason=reason)
        return ConnectionLost(f"connection closed ({detail})", close_code=close_code, reason=reason)


class AuthenticationError(ConnectionLost):
    """Close 4401 or an HTTP 401/403 handshake: retrying without new credentials is pointless."""

    code = "unauthorized"


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 10.0,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    bound = min(cap, base * 2.0 ** min(max(attempt, 0), 62))
    return (rng or random).uniform(0.0, bound)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _key(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _turn_start_frame(text: str, conversation_id: str, client_turn_id: str | None,
                      options: dict[str, Any] | None) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "turn.start",
        "client_turn_id": client_turn_id or uuid.uuid4().hex,
        "text": text,
        "conversation_id": conversation_id,
    }
    if options:
        frame["options"] = dict(options)
    return frame


# ---------------------------------------------------------------- turn streams

_END = object()
_CLOSED = object()


class _TurnBase:
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
        self._items: asyncio.Queue[Any] = asyncio.Queue()

    @property
    def text(self) -> str:
        """Concatenation of the deltas received so far (the whole reply once done)."""
        return "".join(self._parts)

    @property
    def done(self) -> bool:
        return self._finished

    def __aiter__(self) -> _TurnBase:
        return self

    async def __anext__(self) -> dict[str, Any]:
        await self._before_read()
        item = await self._items.get()
        if item is _END:
            self._items.put_nowait(_END)
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
        self._items.put_nowait(_END)
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


class TurnStream(_TurnBase):
    """One turn on one :class:`RapportConnection`. Strict: a gap or duplicate raises."""

    def __init__(self, connection: RapportConnection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._connection = connection

    async def cancel(self) -> None:
        if self.turn_id is None:
            raise ClientError("the turn has not been accepted yet; nothing to cancel")
        await self._connection.cancel(self.turn_id)


# ---------------------------------------------------------------- one connection


class RapportConnection:
    """One authenticated WebSocket connection. No reconnection; see ResilientClient."""

    def __init__(self, ws: ClientConnection, codec: Codec, ready: dict[str, Any]) -> None:
        self._ws = ws
        self._codec = codec
        self._ready = ready
        self._loop = asyncio.get_running_loop()
        self._by_turn: dict[str, _TurnBase] = {}
        self._by_client: dict[str, _TurnBase] = {}
        self._requests: deque[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = deque()
        self._pings: dict[Any, asyncio.Future[float]] = {}
        self._ping_ids = itertools.count(1)
        self._frames: asyncio.Queue[Any] = asyncio.Queue()
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
        """Connect, send ``hello``, wait for ``ready``.

        Raises AuthenticationError (close 4401, HTTP 401/403), ServerError (an
        ``error`` answered the hello), ConnectionLost (anything else).
        """
        headers = {"Authorization": f"Bearer {token}"} if token and token_in_header else None
        try:
            ws = await connect(url, subprotocols=[subprotocol], additional_headers=headers,  # type: ignore[list-item]
                               open_timeout=open_timeout, close_timeout=close_timeout,
                               max_size=max_size, ping_interval=None, **connect_kwargs)
        except InvalidStatus as exc:
            status = exc.response.status_code
            kind = AuthenticationError if status in (401, 403) else ConnectionLost
            raise kind(f"handshake refused with HTTP {status}") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionLost(f"cannot connect to {url}: {exc!r}") from exc

        # With no subprotocol selected the server speaks JSON (protocol.md, Transport).
        codec = codec_for(ws.subprotocol)
        # coalesce: a lagging socket may get consecutive deltas merged into one
        # frame covering seq_start..seq (docs/protocol.md); _on_delta handles it.
        hello: dict[str, Any] = {"type": "hello", "client": {"name": client_name, "version": client_version},
                                 "coalesce": True}
        if token and not token_in_header:
            hello["token"] = token
        if user:
            hello["user"] = user
        try:
            await ws.send(codec.encode(hello))
            async with asyncio.timeout(open_timeout):
                ready = await cls._await_ready(ws, codec)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else close_codes.ABNORMAL
            raise ConnectionLost.from_close(code, exc.rcvd.reason if exc.rcvd else "") from None
        except TimeoutError:
            await ws.close()
            raise ConnectionLost(f"no 'ready' within {open_timeout} s") from None
        except ClientError:
            await ws.close()
            raise
        except BaseException:
            ws.transport.abort()  # cancelled: do not linger in a closing handshake
            raise
        return cls(ws, codec, ready)

    @staticmethod
    async def _await_ready(ws: ClientConnection, codec: Codec) -> dict[str, Any]:
        while True:
            frame = RapportConnection._decode(codec, await ws.recv())
            kind = frame.get("type")
            if kind == "ready":
                return frame
            if kind == "error":
                raise ServerError(frame)
            if kind == "ping":
                await ws.send(codec.encode(RapportConnection._pong_for(frame)))
            # anything else before ready is not for us: ignore it

    @staticmethod
    def _decode(codec: Codec, raw: str | bytes) -> dict[str, Any]:
        try:
            frame = codec.decode(raw)
        except BadRequest as exc:
            raise ProtocolViolation(f"undecodable frame from the server: {exc.message}") from None
        if not isinstance(frame.get("type"), str):
            raise ProtocolViolation("server frame without a string 'type'")
        return frame

    @staticmethod
    def _pong_for(frame: dict[str, Any]) -> dict[str, Any]:
        return {"type": "pong", "t": frame["t"]} if "t" in frame else {"type": "pong"}

    # -------------------------------------------------- properties

    @property
    def ready(self) -> dict[str, Any]:
        return self._ready

    @property
    def subprotocol(self) -> str:
        return self._codec.subprotocol

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
                raw = await self._ws.recv()
                self.last_received = self._loop.time()
                await self._dispatch(self._decode(self._codec, raw))
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                self._close_code, self._close_reason = exc.rcvd.code, exc.rcvd.reason
        except ProtocolViolation as exc:
            log.error("closing the connection: %s", exc)
            self._failure = exc
            await self._ws.close(1002, "protocol violation")
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
        elif kind == "ping":
            await self._ws.send(self._codec.encode(self._pong_for(frame)))
            return
        elif kind == "pong":
            t = frame.get("t")
            waiter = self._pings.pop(t, None) if isinstance(t, (int, float, str)) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(self._loop.time())
            return
        untargeted = not (_key(frame.get("turn_id")) or _key(frame.get("client_turn_id")))
        if kind in ("history", "history.cleared", "error") and untargeted and self._resolve_request(frame):
            return
        if self._frames.qsize() >= _UNROUTED_LIMIT:
            self._frames.get_nowait()
        self._frames.put_nowait(frame)

    def _route(self, frame: dict[str, Any]) -> _TurnBase | None:
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

    def _unregister(self, sink: _TurnBase) -> None:
        for table in (self._by_turn, self._by_client):
            for key in [k for k, v in table.items() if v is sink]:
                del table[key]

    def _resolve_request(self, frame: dict[str, Any]) -> bool:
        kind, conversation = frame["type"], frame.get("conversation_id")
        candidates = [e for e in self._requests if kind == "error" or e[0] == kind]
        if not candidates:
            return False
        # The server answers in order; prefer the request for the same conversation.
        entry = next((e for e in candidates if e[1] == conversation), candidates[0])
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
            self._close_code = self._ws.close_code or close_codes.ABNORMAL
            self._close_reason = self._ws.close_reason or ""
        exc = self._failure or ConnectionLost.from_close(self._close_code, self._close_reason)
        self._lost = exc
        sinks = {id(s): s for s in [*self._by_turn.values(), *self._by_client.values()]}
        self._by_turn.clear()
        self._by_client.clear()
        for sink in sinks.values():
            sink._on_lost(exc)
        for _, _, fut in self._requests:
            if not fut.done():
                fut.set_exception(exc)
        self._requests.clear()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pings.clear()
        self._frames.put_nowait(_CLOSED)
        self._closed_event.set()

    def _lost_error(self) -> ClientError:
        return self._lost or ConnectionLost("connection closed", close_code=self._close_code)

    # -------------------------------------------------- sending

    async def send_raw(self, data: str | bytes) -> None:
        """Send bytes as they are (tests probe bad input with this)."""
        if self.closed:
            raise self._lost_error()
        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else close_codes.ABNORMAL
            raise ConnectionLost.from_close(code, exc.rcvd.reason if exc.rcvd else "") from None

    async def send_frame(self, frame: dict[str, Any]) -> None:
        await self.send_raw(self._codec.encode(frame))

    async def recv_frame(self, timeout: float | None = None) -> dict[str, Any]:
        """The next frame that was not routed to a turn, a ping or a pending request."""
        async with asyncio.timeout(timeout):
            item = await self._frames.get()
        if item is _CLOSED:
            self._frames.put_nowait(_CLOSED)
            raise self._lost_error()
        return item

    async def start_turn(self, text: str, *, conversation_id: str = DEFAULT_CONVERSATION,
                         client_turn_id: str | None = None,
                         options: dict[str, Any] | None = None) -> TurnStream:
        frame = _turn_start_frame(text, conversation_id, client_turn_id, options)
        stream = TurnStream(self, client_turn_id=frame["client_turn_id"], conversation_id=conversation_id)
        await self._start_with_sink(frame, stream)
        return stream

    async def resume(self, turn_id: str, after_seq: int) -> TurnStream:
        stream = TurnStream(self, turn_id=turn_id, after_seq=after_seq)
        await self._resume_with_sink(turn_id, after_seq, stream)
        return stream

    async def _start_with_sink(self, frame: dict[str, Any], sink: _TurnBase) -> None:
        self._by_client[frame["client_turn_id"]] = sink
        try:
            await self.send_frame(frame)
        except ConnectionLost:
            self._unregister(sink)
            raise

    async def _resume_with_sink(self, turn_id: str, after_seq: int, sink: _TurnBase) -> None:
        previous = self._by_turn.get(turn_id)
        if previous is not None and previous is not sink:
            self._unregister(previous)
            previous._fail(ClientError(f"turn {turn_id} was resumed by another stream"))
        self._by_turn[turn_id] = sink
        try:
            await self.send_frame({"type": "turn.resume", "turn_id": turn_id, "after_seq": after_seq})
        except ConnectionLost:
            self._unregister(sink)
            raise

    async def cancel(self, turn_id: str) -> None:
        """Ask the server to abort the turn; its stream then ends with ``cancelled``."""
        await self.send_frame({"type": "turn.cancel", "turn_id": turn_id})

    async def history(self, conversation_id: str = DEFAULT_CONVERSATION, limit: int = 50,
                      before: str | None = None, *, timeout: float | None = 30.0) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "history.get", "conversation_id": conversation_id, "limit": limit}
        if before is not None:
            frame["before"] = before
        return await self._request(frame, "history", conversation_id, timeout)

    async def clear_history(self, conversation_id: str = DEFAULT_CONVERSATION, *,
                            timeout: float | None = 30.0) -> dict[str, Any]:
        frame = {"type": "history.clear", "conversation_id": conversation_id}
        return await self._request(frame, "history.cleared", conversation_id, timeout)

    async def _request(self, frame: dict[str, Any], expect: str, conversation_id: str | None,
                       timeout: float | None) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        entry = (expect, conversation_id, fut)
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
            await self.send_frame({"type": "ping", "t": t})
            async with asyncio.timeout(timeout):
                answered = await fut
        finally:
            if self._pings.get(t) is fut:
                del self._pings[t]
        return answered - started

    async def send_heartbeat(self) -> None:
        """A ``ping`` nobody waits for (any answer counts as life)."""
        await self.send_frame({"type": "ping", "t": next(self._ping_ids)})

    # -------------------------------------------------- closing

    def abort(self) -> None:
        """Drop the socket at once (dead peer): no closing handshake."""
        transport = self._ws.transport
        if transport is not None:
            transport.abort()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket and stop the reader task. Idempotent."""
        await self._ws.close(code, reason)  # a no-op when the socket is already closed
        if not self._reader.done():
            # The reader sees the closed socket at once; cancelling is only a safety net.
            await asyncio.wait([self._reader], timeout=1.0)
            if not self._reader.done():
                self._reader.cancel()
                await asyncio.wait([self._reader])
        if not self._reader.cancelled() and self._reader.exception() is not None:
            log.error("reader task failed", exc_info=self._reader.exception())
        self._on_closed()


# ---------------------------------------------------------------- resilient layer


class ResilientTurn(_TurnBase):
    """One turn followed across reconnects; the app sees each delta exactly once.

    Returned un-sent by :meth:`ResilientClient.send` (iterating sends it) and
    sent by :meth:`ResilientClient.start_turn`.
    """

    strict = False

    def __init__(self, client: ResilientClient, start_frame: dict[str, Any] | None, *,
                 turn_id: str | None = None, after_seq: int = 0,
                 conversation_id: str | None = None) -> None:
        super().__init__(
            turn_id=turn_id,
            client_turn_id=start_frame["client_turn_id"] if start_frame else None,
            conversation_id=start_frame["conversation_id"] if start_frame else conversation_id,
            after_seq=after_seq,
        )
        self._client = client
        self._start_frame = start_frame
        self._conn: RapportConnection | None = None
        self._sends = 0
        self._submitted = False
        self._cancel_requested = False
        self._recovering = False

    async def submit(self) -> None:
        if not self._submitted:
            self._submitted = True
            await self._client._submit(self)

    def cancel(self) -> None:
        """Request cancellation (safe from sync UI callbacks); delivered even across reconnects."""
        self._client._spawn(self._client.cancel(self))

    async def _before_read(self) -> None:
        await self.submit()

    def _on_lost(self, exc: ClientError) -> None:
        pass  # still followed: the client resumes or re-sends it on the next connection

    def _dropped(self) -> None:
        self._client.duplicates_dropped += 1

    def _on_accepted(self, frame: dict[str, Any]) -> None:
        super()._on_accepted(frame)
        if self._cancel_requested:
            self._client._spawn(self._client._deliver_cancel(self))

    def _on_error(self, frame: dict[str, Any]) -> None:
        if frame.get("code") == "resume_expired" and self.turn_id is not None:
            self._recovering = True
            self._client._spawn(self._client._recover_expired(self, frame))
            return
        super()._on_error(frame)

    def _finish_with_text(self, text: str, finish_reason: Any, source: str) -> None:
        """End the turn from a final text obtained outside the delta stream."""
        if self._start_seq == 0:
            held = self.text
            if not text.startswith(held):
                self._fail(ProtocolViolation("the final text does not extend the deltas already delivered"))
                return
            if len(text) > len(held):
                self._push({"type": "turn.delta", "turn_id": self.turn_id, "seq": self.last_seq + 1,
                            "text": text[len(held):], "catch_up": True})
        self._finish({"type": "turn.end", "turn_id": self.turn_id, "seq": self.last_seq,
                      "finish_reason": finish_reason if isinstance(finish_reason, str) else "unknown",
                      "text": text, "usage": None, "timings": None, "recovered_from": source})

    def _done_hook(self) -> None:
        self._client._turns.pop(self, None)


class ResilientClient:
    """A Rapport client that reconnects, heartbeats and resumes on its own.

    ``token`` may be a string or a (sync or async) callable returning one,
    called before every connection attempt. ``rng``/``sleep`` are injectable
    for tests; ``heartbeat_interval``/``heartbeat_timeout`` (seconds) override
    the ``ready`` frame's. ``max_attempts`` bounds consecutive failed
    connection attempts (None: forever).
    """

    def __init__(self, url: str, *, token: str | Callable[[], str | Awaitable[str]] | None = None,
                 user: str | None = None, subprotocol: str = JSON_SUBPROTOCOL,
                 token_in_header: bool = True, client_name: str = "rapport-python",
                 open_timeout: float = 10.0, close_timeout: float = 2.0,
                 max_size: int | None = DEFAULT_MAX_SIZE,
                 backoff_base: float = 0.5, backoff_cap: float = 10.0,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 max_attempts: int | None = None,
                 heartbeat_interval: float | None = None, heartbeat_timeout: float | None = None,
                 on_state: Callable[[str], Any] | None = None) -> None:
        self.url = url
        self._token = token
        self._open_kwargs = dict(user=user, subprotocol=subprotocol, token_in_header=token_in_header,
                                 client_name=client_name, open_timeout=open_timeout,
                                 close_timeout=close_timeout, max_size=max_size)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._max_attempts = max_attempts
        self._hb_interval = heartbeat_interval
        self._hb_timeout = heartbeat_timeout
        self._on_state = on_state

        self._turns: dict[ResilientTurn, None] = {}  # followed turns, in start order
        self._conn: RapportConnection | None = None
        self._ready: dict[str, Any] | None = None
        self._changed = asyncio.Event()  # replaced on every change: a broadcast
        self._fatal: BaseException | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

        self.state = "idle"
        self.active_turns: list[dict[str, Any]] = []  # server-reported turns this client does not follow
        self.connect_attempts = 0
        self.reconnects = 0  # connections that reached ready after the first one
        self.resumes = 0  # turn.resume frames sent
        self.resends = 0  # turn.start frames sent again (same client_turn_id)
        self.duplicates_dropped = 0
        self.dead_connections = 0  # connections abandoned for server silence

    # -------------------------------------------------- lifecycle

    @property
    def ready(self) -> dict[str, Any] | None:
        return self._ready

    @property
    def connection(self) -> RapportConnection | None:
        return self._conn

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> dict[str, int]:
        return {"connect_attempts": self.connect_attempts, "reconnects": self.reconnects,
                "resumes": self.resumes, "resends": self.resends,
                "duplicates_dropped": self.duplicates_dropped, "dead_connections": self.dead_connections}

    def start(self) -> None:
        if self._closed:
            raise ClientError("client closed")
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._run(), name="rapport:supervisor")

    async def connect(self, timeout: float | None = None) -> dict[str, Any]:
        """Start (if needed) and wait for a ready connection; returns the ``ready`` frame."""
        self.start()
        return await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            await self._live_connection()
        assert self._ready is not None
        return self._ready

    async def _live_connection(self) -> RapportConnection:
        while True:
            if self._fatal is not None:
                raise self._fatal
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:  # a UI callback must not kill the connection machinery
                log.exception("on_state callback failed")

    async def __aenter__(self) -> ResilientClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop everything: the supervisor, helper tasks, the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._fatal is None:
            self._fatal = ClientError("client closed")
        tasks = [t for t in [self._supervisor, *self._tasks] if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        for turn in list(self._turns):
            turn._fail(ConnectionLost("client closed"))
        self._notify()
        self._set_state("closed")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name="rapport:task")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("client task failed", exc_info=task.exception())

    def _fail(self, exc: BaseException) -> None:
        """A fatal condition: every followed turn and waiter gets ``exc``."""
        if self._fatal is None:
            self._fatal = exc
        for turn in list(self._turns):
            turn._fail(exc)
        self._notify()
        self._set_state("closed")

    # -------------------------------------------------- the supervisor

    def _delay(self, attempt: int) -> float:
        return backoff_delay(attempt, base=self._backoff_base, cap=self._backoff_cap, rng=self._rng)

    async def _run(self) -> None:
        try:
            await self._supervise()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surface to the app instead of dying silently
            log.exception("rapport client stopped")
            self._fail(exc)

    async def _open(self) -> RapportConnection:
        token = self._token
        if callable(token):
            token = token()
            if inspect.isawaitable(token):
                token = await token
        return await RapportConnection.open(self.url, token=token, **self._open_kwargs)  # type: ignore[arg-type]

    async def _supervise(self) -> None:
        attempt = 0  # backoff exponent; reset by every ready
        failures = 0  # consecutive failed attempts, for max_attempts
        first = True
        while True:
            self._set_state("connecting" if first else "reconnecting")
            self.connect_attempts += 1
            try:
                conn = await self._open()
            except AuthenticationError as exc:
                self._fail(exc)
                return
            except ServerError as exc:
                if exc.code == "unauthorized":
                    self._fail(AuthenticationError(f"hello refused: {exc.message}"))
                    return
                error: ClientError | None = exc
            except ConnectionLost as exc:  # includes 4429/1008 before ready: plain backoff
                error = exc
            else:
                error = None
            if error is not None:
                failures += 1
                log.info("connection attempt %d failed: %s", failures, error)
                if self._max_attempts is not None and failures >= self._max_attempts:
                    self._fail(ConnectionLost(f"gave up after {failures} attempts: {error}",
                                              close_code=getattr(error, "close_code", None)))
                    return
                await self._sleep(self._delay(attempt))
                attempt += 1
                continue

            attempt, failures = 0, 0
            if not first:
                self.reconnects += 1
            first = False
            try:
                await self._attach(conn)
                await self._watch(conn)
            finally:
                if self._conn is conn:
                    self._conn = None
                    self._notify()
                await conn.close()
            code = conn.close_code
            if code == close_codes.UNAUTHORIZED:
                self._fail(ConnectionLost.from_close(code, conn.close_reason))
                return
            if code in (close_codes.TOO_MANY_CONNECTIONS, close_codes.POLICY):
                attempt = max(attempt, 3)  # the server pushed back: wait longer (up to 4 s window)
            log.info("connection lost (close %s); reconnecting", code)
            self._set_state("reconnecting")
            await self._sleep(self._delay(attempt))
            attempt += 1

    async def _attach(self, conn: RapportConnection) -> None:
        self._conn = conn
        self._ready = conn.ready
        followed = {t.turn_id for t in self._turns if t.turn_id}
        reported = conn.ready.get("active_turns")
        self.active_turns = [t for t in reported if isinstance(t, dict) and t.get("turn_id") not in followed] \
            if isinstance(reported, list) else []
        self._notify()
        self._set_state("ready")
        for turn in list(self._turns):
            await self._attach_turn(turn, conn)

    async def _attach_turn(self, turn: ResilientTurn, conn: RapportConnection) -> None:
        """Start, re-send or resume ``turn`` on ``conn`` (at most once per connection)."""
        if turn.done or turn._recovering or turn._conn is conn or conn.closed:
            return
        turn._conn = conn
        turn._since_attach = 0
        try:
            if turn.turn_id is None:
                assert turn._start_frame is not None
                if turn._sends:
                    self.resends += 1
                turn._sends += 1
                await conn._start_with_sink(turn._start_frame, turn)  # the SAME frame every time
            else:
                self.resumes += 1
                await conn._resume_with_sink(turn.turn_id, turn.last_seq, turn)
                if turn._cancel_requested:
                    await conn.cancel(turn.turn_id)
        except ConnectionLost:
            pass  # the next connection attaches it again

    async def _watch(self, conn: RapportConnection) -> None:
        """Heartbeat ``conn`` until it closes or the server falls silent too long."""
        loop = asyncio.get_running_loop()
        beat = conn.ready.get("heartbeat")
        beat = beat if isinstance(beat, dict) else {}
        interval = self._hb_interval if self._hb_interval is not None else _seconds(beat.get("interval_ms"), 15.0)
        timeout = self._hb_timeout if self._hb_timeout is not None else _seconds(beat.get("timeout_ms"), 45.0)
        dead_after = interval + timeout
        next_ping = loop.time() + interval
        while not conn.closed:
            now = loop.time()
            if now - conn.last_received >= dead_after:
                self.dead_connections += 1
                log.warning("no frame from the server for %.1f s; dropping the connection", now - conn.last_received)
                conn.abort()
                await conn.wait_closed()
                return
            if now >= next_ping:
                try:
                    async with asyncio.timeout(dead_after):
                        await conn.send_heartbeat()
                except (ConnectionLost, TimeoutError):
                    pass  # the loop notices the closed or silent connection
                next_ping = loop.time() + interval
                continue
            try:
                async with asyncio.timeout(min(next_ping, conn.last_received + dead_after) - now):
                    await conn.wait_closed()
            except TimeoutError:
                pass

    # -------------------------------------------------- turns

    def send(self, text: str, *, conversation_id: str = DEFAULT_CONVERSATION,
             client_turn_id: str | None = None, options: dict[str, Any] | None = None) -> ResilientTurn:
        """A turn to iterate: ``async for delta in client.send(text)``; sent on first read."""
        return ResilientTurn(self, _turn_start_frame(text, conversation_id, client_turn_id, options))

    async def start_turn(self, text: str, *, conversation_id: str = DEFAULT_CONVERSATION,
                         client_turn_id: str | None = None,
                         options: dict[str, Any] | None = None) -> ResilientTurn:
        turn = self.send(text, conversation_id=conversation_id, client_turn_id=client_turn_id, options=options)
        await turn.submit()
        return turn

    async def follow(self, turn_id: str, *, after_seq: int = 0,
                     conversation_id: str | None = None) -> ResilientTurn:
        """Follow a turn started elsewhere (e.g. one of ``ready.active_turns``)."""
        for turn in self._turns:
            if turn.turn_id == turn_id:
                return turn
        turn = ResilientTurn(self, None, turn_id=turn_id, after_seq=after_seq, conversation_id=conversation_id)
        await turn.submit()
        return turn

    async def _submit(self, turn: ResilientTurn) -> None:
        if self._fatal is not None:
            raise self._fatal
        self.start()
        self._turns[turn] = None
        conn = self._conn
        if conn is not None and not conn.closed:
            await self._attach_turn(turn, conn)
        # otherwise the supervisor attaches it once a connection is ready

    async def cancel(self, turn: ResilientTurn | str) -> None:
        """Cancel a turn (object or turn_id). Delivered once accepted, also after a reconnect."""
        if isinstance(turn, str):
            found = next((t for t in self._turns if t.turn_id == turn), None)
            if found is None:
                await self._call(lambda conn: conn.cancel(turn), 30.0)  # type: ignore[arg-type]
                return
            turn = found
        if turn.done:
            return
        turn._cancel_requested = True
        if not turn._submitted:  # never sent: nothing to abort on the server
            turn._submitted = True
            turn._finish({"type": "turn.end", "turn_id": None, "seq": 0, "finish_reason": "cancelled",
                          "text": "", "usage": None, "timings": None})
            return
        await self._deliver_cancel(turn)

    async def _deliver_cancel(self, turn: ResilientTurn) -> None:
        conn = self._conn
        if turn.turn_id is None or conn is None or turn._conn is not conn or turn.done:
            return  # sent on turn.accepted or after the next resume
        try:
            await conn.cancel(turn.turn_id)
        except ConnectionLost:
            pass  # re-sent after the resume on the next connection

    async def _recover_expired(self, turn: ResilientTurn, frame: dict[str, Any]) -> None:
        """``resume_expired``: finish from the server's final text if we can get it, else raise."""
        try:
            text = frame.get("text")
            if isinstance(text, str):
                turn._finish_with_text(text, frame.get("finish_reason"), "error")
                return
            if turn.conversation_id is not None:
                try:
                    page = await self.history(turn.conversation_id, limit=100)
                except (ClientError, TimeoutError) as exc:
                    log.info("history lookup after resume_expired failed: %s", exc)
                    page = {}
                messages = page.get("messages")
                for msg in reversed(messages if isinstance(messages, list) else []):
                    if (isinstance(msg, dict) and msg.get("turn_id") == turn.turn_id
                            and msg.get("role") == "assistant" and isinstance(msg.get("text"), str)):
                        turn._finish_with_text(msg["text"], msg.get("status"), "history")
                        return
            turn._fail(ServerError(frame))
        finally:
            turn._recovering = False

    # -------------------------------------------------- request/response

    async def _call(self, fn: Callable[[RapportConnection], Awaitable[Any]], timeout: float | None) -> Any:
        """Run an idempotent request on the live connection, retrying across reconnects."""
        async with asyncio.timeout(timeout):
            while True:
                conn = await self._live_connection()
                try:
                    return await fn(conn)
                except ConnectionLost:
                    if self._fatal is not None:
                        raise
                    await conn.wait_closed()  # then wait for the supervisor's next connection

    async def history(self, conversation_id: str = DEFAULT_CONVERSATION, limit: int = 50,
                      before: str | None = None, *, timeout: float | None = 30.0) -> dict[str, Any]:
        return await self._call(lambda conn: conn.history(conversation_id, limit, before, timeout=None), timeout)

    async def clear_history(self, conversation_id: str = DEFAULT_CONVERSATION, *,
                            timeout: float | None = 30.0) -> dict[str, Any]:
        return await self._call(lambda conn: conn.clear_history(conversation_id, timeout=None), timeout)

    async def ping(self, *, timeout: float | None = 10.0) -> float:
        return await self._call(lambda conn: conn.ping(timeout=None), timeout)


def _seconds(ms: Any, default: float) -> float:
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0:
        return ms / 1000.0
    return default
