"""Raw-socket helpers for end-to-end tests that look at individual frames."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import msgpack
import pytest
from conftest import ServerProcess
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

JSON = "rapport.v1.json"
MSGPACK = "rapport.v1.msgpack"


async def open_ws(server: ServerProcess, *, user: str | None = None, token: str | None = None,
                  subprotocol: str = JSON, header_token: str | None = None, hello: bool = True,
                  **kw):
    headers = {"Authorization": f"Bearer {header_token}"} if header_token else None
    ws = await connect(server.ws_url, subprotocols=[subprotocol], additional_headers=headers,
                       max_size=None, **kw)
    if hello:
        frame: dict = {"type": "hello"}
        if user:
            frame["user"] = user
        if token:
            frame["token"] = token
        await send(ws, frame)
        ready = await recv(ws)
        assert ready["type"] == "ready", ready
    return ws


async def send(ws, frame: dict) -> None:
    if ws.subprotocol == MSGPACK:
        await ws.send(msgpack.packb(frame, use_bin_type=True))
    else:
        await ws.send(json.dumps(frame, ensure_ascii=False))


async def recv(ws, timeout: float = 5.0) -> dict:
    data = await asyncio.wait_for(ws.recv(), timeout)
    if isinstance(data, bytes):
        return msgpack.unpackb(data, raw=False)
    return json.loads(data)


async def recv_until(ws, kind: str, timeout: float = 10.0) -> list[dict]:
    out = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(ws, max(0.1, deadline - time.monotonic()))
        out.append(frame)
        if frame["type"] == kind:
            return out


async def stream_turn(ws, text: str = "hello", *, timeout: float = 10.0, **fields) -> list[dict]:
    await send(ws, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": text, **fields})
    return await recv_until(ws, "turn.end", timeout=timeout)


def assert_contiguous(frames: list[dict]) -> None:
    deltas = [f for f in frames if f["type"] == "turn.delta"]
    end = frames[-1]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == end["text"]
    assert end["seq"] == len(deltas)


async def expect_error(ws, code: str, skip: tuple[str, ...] = ("ping", "turn.delta")) -> dict:
    """The next error frame, passing over heartbeats and deltas of turns this socket follows."""
    frame = await recv(ws)
    while frame["type"] in skip:
        frame = await recv(ws)
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    return frame


async def expect_close(ws, code: int, timeout: float = 8.0) -> None:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert info.value.rcvd is not None and info.value.rcvd.code == code, info.value


