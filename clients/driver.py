"""A lean protocol driver: one WebSocket, frames in and out, nothing in the background.

:class:`Driver` opens the socket offering one subprotocol, optionally performs
the ``hello``/``ready`` handshake, and then only does what it is asked: send a
frame, receive the next frame. It starts no task, answers no ping on its own
after the handshake and keeps no state about turns, so load generators can
run thousands of them on one event loop and tests can look at every frame the
server sends (heartbeat pings included)::

    async with await Driver.open(url, user="alice") as driver:
        await driver.send(client_frames.turn_start("hi"))
        frames = await driver.recv_until("turn.end")

The reconnecting client (:mod:`clients.resilient`) and the one-connection
client (:mod:`clients.connection`) open their sockets through
:meth:`Driver.open`, so there is one handshake in the toolkit.

Failures are the toolkit's errors: :class:`~clients.errors.ConnectionLost`
(with the close code the server sent), :class:`~clients.errors.AuthenticationError`
(close 4401 or an HTTP 401/403 handshake), :class:`~clients.errors.ServerError`
(an ``error`` answered the hello and the server then closed the socket) and
:class:`~clients.errors.ProtocolViolation` (an undecodable server frame). An
``error`` before ``ready`` that the server follows with ``ready`` (``unavailable``
when it could not list the user's active turns) does not fail the open: it is
kept in :attr:`Driver.pre_ready_errors`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from protocol import client_frames, close_codes
from protocol.codec import JSON_SUBPROTOCOL, Codec, codec_for
from protocol.errors import BadRequest

from .errors import AuthenticationError, ClientError, ConnectionLost, ProtocolViolation, ServerError

__all__ = ["Driver", "decode_server_frame", "lost_from"]

#: websockets' own default for the opening handshake; the wait for ``ready`` uses the same bound.
DEFAULT_OPEN_TIMEOUT = 10.0


def decode_server_frame(codec: Codec, data: str | bytes) -> dict[str, Any]:
    """Decode one server frame; a frame the contract does not allow is a ProtocolViolation."""
    try:
        frame = codec.decode(data)
    except BadRequest as exc:
        raise ProtocolViolation(f"undecodable frame from the server: {exc.message}") from None
    if not isinstance(frame.get("type"), str):
        raise ProtocolViolation("server frame without a string 'type'")
    return frame


def lost_from(exc: ConnectionClosed) -> ConnectionLost:
    """The toolkit's error for a closed socket, with the close code the peer sent.

    No close frame received means the TCP connection died: RFC 6455 section
    7.1.5 calls that 1006, a code that is never sent on the wire.
    """
    if exc.rcvd is None:
        return ConnectionLost.from_close(close_codes.ABNORMAL)
    return ConnectionLost.from_close(exc.rcvd.code, exc.rcvd.reason)


class Driver:
    """One WebSocket speaking the Rapport protocol, driven frame by frame by its caller."""

    __slots__ = ("codec", "pre_ready_errors", "ready", "ws")

    ws: ClientConnection
    codec: Codec
    ready: dict[str, Any] | None
    #: ``error`` frames the server sent before ``ready`` (the open still succeeded).
    pre_ready_errors: list[dict[str, Any]]

    def __init__(self, ws: ClientConnection, codec: Codec, ready: dict[str, Any] | None = None) -> None:
        self.ws = ws
        self.codec = codec
        self.ready = ready
        self.pre_ready_errors = []

    @classmethod
    async def open(cls, url: str, *, subprotocol: str = JSON_SUBPROTOCOL, token: str | None = None,
                   user: str | None = None, hello: bool = True, header_token: str | None = None,
                   client: dict[str, str] | None = None, coalesce: bool | None = None,
                   **connect_kwargs: Any) -> Driver:
        """Connect offering ``subprotocol``; with ``hello``, send it and wait for ``ready``.

        ``header_token`` goes into ``Authorization: Bearer``; ``token`` into the
        ``hello`` frame (where browsers put it). ``connect_kwargs`` go to
        :func:`websockets.asyncio.client.connect`; its ``open_timeout`` also
        bounds the wait for ``ready``. Unless given, frames of any size are
        accepted and websockets' own keepalive is off: the protocol has its own
        heartbeat (guarantee 7), which a caller drives with ``ping`` frames.
        """
        connect_kwargs.setdefault("max_size", None)
        connect_kwargs.setdefault("ping_interval", None)
        open_timeout = connect_kwargs.setdefault("open_timeout", DEFAULT_OPEN_TIMEOUT)
        headers = {"Authorization": f"Bearer {header_token}"} if header_token else None
        try:
            ws = await connect(url, subprotocols=[Subprotocol(subprotocol)], additional_headers=headers,
                               **connect_kwargs)
        except InvalidStatus as exc:
            status = exc.response.status_code
            kind = AuthenticationError if status in (401, 403) else ConnectionLost
            raise kind(f"handshake refused with HTTP {status}") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionLost(f"cannot connect to {url}: {exc!r}") from exc

        # With no subprotocol selected the server speaks JSON (docs/protocol.md, "Transport").
        driver = cls(ws, codec_for(ws.subprotocol))
        if not hello:
            return driver
        try:
            await driver.send(client_frames.hello(token=token, user=user, client=client, coalesce=coalesce))
            async with asyncio.timeout(open_timeout):
                driver.ready = await driver._await_ready()
        except TimeoutError:
            await ws.close()
            raise ConnectionLost(f"no 'ready' within {open_timeout} s") from None
        except ConnectionLost:
            raise
        except ClientError:
            await ws.close()
            raise
        except BaseException:
            driver.abort()  # cancelled: do not linger in a closing handshake
            raise
        return driver

    async def _await_ready(self) -> dict[str, Any]:
        while True:
            try:
                frame = await self.recv(timeout=None)
            except ConnectionLost as lost:
                # A refused hello is an error frame, then the close: the server's own words say why.
                if self.pre_ready_errors:
                    raise ServerError(self.pre_ready_errors[-1]) from lost
                raise
            kind = frame["type"]
            if kind == "ready":
                return frame
            if kind == "error":
                # Not necessarily a refusal: the gateway answers `unavailable` and still sends
                # ready when it cannot list the user's active turns. Only a close fails the open.
                self.pre_ready_errors.append(frame)
                continue
            if kind == "ping":
                await self.send(client_frames.pong(frame.get("t")))
            # anything else before ready is not for us: ignore it

    # -------------------------------------------------- frames

    async def send(self, frame: dict[str, Any]) -> None:
        """Encode ``frame`` with the negotiated codec and send it."""
        await self.send_raw(self.codec.encode(frame))

    async def send_raw(self, data: str | bytes) -> None:
        """Send bytes or text as they are (a str is a text frame, bytes a binary frame)."""
        try:
            await self.ws.send(data)
        except ConnectionClosed as exc:
            raise lost_from(exc) from None

    async def recv(self, timeout: float | None = 5.0) -> dict[str, Any]:
        """The next frame, decoded; TimeoutError after ``timeout`` seconds (None: no limit)."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.ws.recv()
        except ConnectionClosed as exc:
            raise lost_from(exc) from None
        return decode_server_frame(self.codec, data)

    async def recv_until(self, kind: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every frame up to and including the first of type ``kind``, all within ``timeout``."""
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout=None)
                frames.append(frame)
                if frame["type"] == kind:
                    return frames

    # -------------------------------------------------- closing

    async def close(self, code: int = close_codes.NORMAL, reason: str = "") -> None:
        """The closing handshake (RFC 6455 section 7.1.2); a no-op on a closed socket."""
        await self.ws.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame, as a phone losing its network does."""
        transport = self.ws.transport
        if transport is not None:
            transport.abort()

    async def __aenter__(self) -> Driver:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
