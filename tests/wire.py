"""Raw-socket helpers for end-to-end tests that look at individual frames.

Tests hold the ``websockets`` connection itself (to send malformed bytes, read
close codes, abort the TCP connection), so these helpers take and return it
and let ``websockets``' own exceptions through. Frames are encoded and decoded
with :mod:`protocol.codec`, the codec the server uses, for the subprotocol the
connection negotiated; the handshake is :meth:`clients.driver.Driver.open`'s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import ServerProcess
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from clients.driver import Driver
from protocol import client_frames
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, codec_for

JSON = JSON_SUBPROTOCOL
MSGPACK = MSGPACK_SUBPROTOCOL

#: websockets' default keepalive interval. The driver turns that keepalive off;
#: these tests have always run with it on unless they said otherwise.
WEBSOCKETS_PING_INTERVAL_S = 20.0


async def open_ws(server: ServerProcess, *, user: str | None = None, token: str | None = None,
                  subprotocol: str = JSON, header_token: str | None = None, hello: bool = True,
                  **kw: Any) -> ClientConnection:
    """A connection to ``server``; with ``hello``, past the hello/ready handshake."""
    kw.setdefault("ping_interval", WEBSOCKETS_PING_INTERVAL_S)
    driver = await Driver.open(server.ws_url, subprotocol=subprotocol, token=token or None, user=user or None,
                               hello=hello, header_token=header_token, **kw)
    return driver.ws


async def send(ws: ClientConnection, frame: dict) -> None:
    await ws.send(codec_for(ws.subprotocol).encode(frame))


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict:
    data = await asyncio.wait_for(ws.recv(), timeout)
    return codec_for(ws.subprotocol).decode(data)


async def recv_until(ws: ClientConnection, kind: str, timeout: float = 10.0) -> list[dict]:
    out = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(ws, max(0.1, deadline - time.monotonic()))
        out.append(frame)
        if frame["type"] == kind:
            return out


async def stream_turn(ws: ClientConnection, text: str = "hello", *, timeout: float = 10.0,
                      **fields: Any) -> list[dict]:
    await send(ws, {**client_frames.turn_start(text), **fields})
    return await recv_until(ws, "turn.end", timeout=timeout)


def assert_contiguous(frames: list[dict]) -> None:
    deltas = [f for f in frames if f["type"] == "turn.delta"]
    end = frames[-1]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == end["text"]
    assert end["seq"] == len(deltas)


async def expect_error(ws: ClientConnection, code: str, skip: tuple[str, ...] = ("ping", "turn.delta")) -> dict:
    """The next error frame, passing over heartbeats and deltas of turns this socket follows."""
    frame = await recv(ws)
    while frame["type"] in skip:
        frame = await recv(ws)
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    return frame


async def expect_close(ws: ClientConnection, code: int, timeout: float = 8.0) -> None:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert info.value.rcvd is not None and info.value.rcvd.code == code, info.value
