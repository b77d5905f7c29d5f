"""Connections that have not authenticated yet cannot hold the server.

Every stage a client passes before ``ready`` has a deadline (the request's
headers, its body, the WebSocket upgrade, ``hello``), headers are capped in
size, and each process holds a bounded number of such connections, so
silent or trickling sockets can neither exhaust the process's file
descriptors nor keep legitimate clients out. End to end: real server
processes on 127.0.0.1 and raw sockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import SIM_FLAGS, ServerProcess, clean_prefix, make_token
from websockets.asyncio.client import connect
from wire import JSON, assert_contiguous, stream_turn

# Deadlines short enough for a test, given through the environment.
FAST_DEADLINES = {
    "RAPPORT_REQUEST_HEADER_TIMEOUT_MS": "1000",
    "RAPPORT_REQUEST_BODY_TIMEOUT_MS": "1000",
}


@contextlib.contextmanager
def soft_descriptor_limit(limit: int) -> Iterator[None]:
    """Lower this process's soft RLIMIT_NOFILE while a child is started (it inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def server_descriptor_limit(server: ServerProcess) -> int:
    assert server.proc is not None
    soft, _ = resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE)
    return soft


async def ready_ws(server: ServerProcess, user: str, **kw: Any):
    """A WebSocket past ``ready``."""
    ws = await connect(server.ws_url, subprotocols=[JSON], max_size=None, **kw)
    await ws.send(json.dumps({"type": "hello", "user": user}))
    frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
    assert frame["type"] == "ready", frame
    return ws


def raw_connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection; (data, closed in time)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def upgrade_request(port: int, extra_headers: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extra_headers}\r\n").encode()


@pytest.fixture(scope="module")
def fast_server(redis_url):
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*SIM_FLAGS, "--auth", "dev"], env=FAST_DEADLINES).start()
    yield server
    server.stop()
    clean_prefix(prefix)


# ---------------------------------------------------------------- deadlines


def test_a_silent_connection_is_closed_after_the_header_deadline(fast_server):
    sock = raw_connect(fast_server.port)
    started = time.monotonic()
    data, closed = read_until_closed(sock, timeout=20)
    sock.close()
    assert closed, "a connection that never sent a byte stayed open"
    assert data == b""  # nothing was asked, so nothing is answered
    assert time.monotonic() - started < 15


def test_partial_headers_get_408_and_a_closed_socket(fast_server):
    sock = raw_connect(fast_server.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    data, closed = read_until_closed(sock, timeout=20)
    sock.close()
    assert closed, "a request whose headers never completed stayed open"
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]


def test_trickled_headers_do_not_extend_the_deadline(fast_server):
    sock = raw_connect(fast_server.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    closed = False
    # One header byte every 100 ms would keep an idle timer from ever firing.
    while time.monotonic() - started < 20:
        try:
            sock.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        sock.settimeout(0.1)
        try:
            if sock.recv(65536) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except ConnectionResetError:
            closed = True
            break
    sock.close()
    assert closed, "trickling header bytes kept the connection open"
    assert time.monotonic() - started < 15


def test_a_slow_body_gets_408_and_a_closed_socket(fast_server):
    sock = raw_connect(fast_server.port)
    token = make_token(f"body-{uuid.uuid4().hex[:6]}")
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode())
    data, closed = read_until_closed(sock, timeout=20)
    sock.close()
    assert closed, "a request whose body never completed stayed open"
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]


def test_a_websocket_upgrade_with_an_over_long_header_line_gets_431_and_is_closed(fast_server):
    sock = raw_connect(fast_server.port)
    sock.sendall(upgrade_request(fast_server.port, f"X-Long: {'a' * 10_000}\r\n"))
    data, closed = read_until_closed(sock, timeout=20)
    sock.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert closed, "the socket was left open after refusing the upgrade"


def test_headers_larger_than_the_cap_get_431_and_are_closed(fast_server):
    sock = raw_connect(fast_server.port)
    lines = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(80))  # ~80 KB of headers
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode())
    data, closed = read_until_closed(sock, timeout=20)
    sock.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert closed


async def test_legitimate_requests_still_work_with_deadlines(fast_server):
    # Keep-alive, a body, an upgrade and a whole turn: none of it trips a deadline.
    async with httpx.AsyncClient(base_url=fast_server.base, timeout=10) as http:
        for _ in range(3):
            assert (await http.get("/healthz")).status_code == 200
            await asyncio.sleep(0.3)
        token = make_token(f"ok-{uuid.uuid4().hex[:6]}")
        answer = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                                 json={"model": "x", "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 5})
        assert answer.status_code == 200, answer.text
    ws = await ready_ws(fast_server, f"ok-{uuid.uuid4().hex[:6]}")
    # An authenticated socket is past every deadline: it may idle longer than they last.
    await asyncio.sleep(2.5)
    assert_contiguous(await stream_turn(ws))
    await ws.close()


# ---------------------------------------------------------------- the descriptor limit


async def test_legitimate_clients_are_served_while_silent_connections_exceed_the_descriptor_limit(redis_url):
    """1,000 silent sockets against a process allowed 300 descriptors (default settings)."""
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*SIM_FLAGS, "--auth", "dev"])
    with soft_descriptor_limit(300):
        server.start(wait_ready=False)
    silent: list[socket.socket] = []
    try:
        server.wait_ready()
        assert server_descriptor_limit(server) == 300
        for _ in range(1000):
            silent.append(raw_connect(server.port))

        async with httpx.AsyncClient(base_url=server.base, timeout=20) as http:
            assert (await http.get("/healthz")).status_code == 200
            ws = await ready_ws(server, f"legit-{uuid.uuid4().hex[:6]}", open_timeout=20)
            assert_contiguous(await stream_turn(ws, timeout=20))
            await ws.close()
            assert (await http.get("/healthz")).status_code == 200
    finally:
        for sock in silent:
            sock.close()
        server.stop()
        clean_prefix(prefix)
