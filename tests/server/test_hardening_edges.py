"""Smaller findings of the attacker's review, each with what the client must see.

- A validly signed JWT whose ``sub`` holds a lone surrogate: close 4401 with a
  reason on the WebSocket, 401 over REST (not a hang, not a 500).
- A client that reconnects while the server drains after SIGTERM is refused,
  or closed with 1001, never 1012.
- An invalid-UTF-8 text frame logs one line, not a traceback.
- In development mode a DNS-rebinding page (same Host and Origin, but not a
  loopback name) is refused.

End to end: real server processes on 127.0.0.1, raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import uuid
from typing import Any

import httpx
import pytest
from conftest import SIM_FLAGS, ServerProcess, clean_prefix, make_token
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from wire import JSON

LONE_SURROGATE_USER = "mallory\ud800"


async def hello_ws(server: ServerProcess, frame: dict[str, Any], **kw: Any):
    ws = await connect(server.ws_url, subprotocols=[JSON], max_size=None, **kw)
    # json.dumps escapes the surrogate as \ud800: valid UTF-8 on the wire.
    await ws.send(json.dumps({"type": "hello", **frame}))
    return ws


async def frames_until_close(ws, timeout: float = 15.0) -> tuple[list[dict], int | None, str]:
    out: list[dict] = []
    try:
        while True:
            out.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    except ConnectionClosed as closed:
        if closed.rcvd is None:
            return out, None, ""
        return out, closed.rcvd.code, closed.rcvd.reason


@pytest.fixture(scope="module")
def dev_server(redis_url):
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*SIM_FLAGS, "--auth", "dev", "--log-level", "info"]).start()
    yield server
    server.stop()
    clean_prefix(prefix)


@pytest.fixture(scope="module")
def token_server(redis_url):
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*SIM_FLAGS, "--auth", "jwt"]).start()
    yield server
    server.stop()
    clean_prefix(prefix)


# ---------------------------------------------------------------- lone surrogates


async def test_a_token_whose_sub_holds_a_lone_surrogate_closes_4401_with_a_reason(token_server):
    # (hello.user cannot carry one: the codec refuses such JSON with bad_request.)
    ws = await hello_ws(token_server, {"token": make_token(LONE_SURROGATE_USER)})
    frames, code, reason = await frames_until_close(ws, timeout=4)
    assert [f["type"] for f in frames] == ["error"], frames
    assert frames[0]["code"] == "unauthorized"
    assert code == 4401
    assert "unicode" in reason.lower()


async def test_rest_with_a_lone_surrogate_user_id_is_401(token_server):
    headers = {"Authorization": f"Bearer {make_token(LONE_SURROGATE_USER)}"}
    async with httpx.AsyncClient(base_url=token_server.base, timeout=10) as http:
        for method, path in (("DELETE", "/v1/users/me"), ("GET", "/v1/conversations"),
                             ("GET", "/v1/conversations/default/messages"),
                             ("DELETE", "/v1/conversations/default")):
            answer = await http.request(method, path, headers=headers)
            assert answer.status_code == 401, (method, path, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] == "unauthorized"


# ---------------------------------------------------------------- the SIGTERM drain


def small_buffer_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def attempt(server: ServerProcess) -> str:
    """One reconnect: how it ended ("refused", or the close code after or without ready)."""
    try:
        ws = await hello_ws(server, {"user": f"back-{uuid.uuid4().hex[:6]}"}, open_timeout=3)
    except (OSError, InvalidHandshake, TimeoutError):
        return "refused"
    except ConnectionClosed as closed:
        return f"closed {closed.rcvd.code if closed.rcvd else None}"
    frames, code, _ = await frames_until_close(ws, timeout=10)
    ready = "ready then " if any(f["type"] == "ready" for f in frames) else ""
    return f"{ready}closed {code}"


async def test_reconnecting_during_the_drain_is_refused_or_closed_1001(redis_url):
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "1", "--sim-reply-tokens", "1000",
        "--max-tokens-limit", "1024", "--auth", "dev", "--socket-send-buffer", "4096",
        "--shutdown-drain-s", "3", "--turns-per-minute", "1000",
    ]).start()
    try:
        # A phone that stopped reading: its socket cannot close quickly, which holds the
        # server in the first phase of its shutdown (where it used to still accept).
        stuck = await connect(server.ws_url, subprotocols=[JSON], sock=small_buffer_socket(server.port),
                              max_queue=1, max_size=None)
        await stuck.send(json.dumps({"type": "hello", "user": f"stuck-{uuid.uuid4().hex[:6]}"}))
        assert json.loads(await stuck.recv())["type"] == "ready"
        for i in range(3):
            await stuck.send(json.dumps({"type": "turn.start", "client_turn_id": f"s{i}", "text": "go",
                                         "conversation_id": f"c{i}", "options": {"max_tokens": 1000}}))
        await asyncio.sleep(1.0)

        stopping = asyncio.create_task(asyncio.to_thread(server.stop, signal.SIGTERM, 30.0))
        outcomes: list[str] = []
        started = time.monotonic()
        while not stopping.done() and time.monotonic() - started < 20:
            outcomes.append(await attempt(server))
            await asyncio.sleep(0.02)
        await stopping
        stuck.transport.abort()
        wrong = [o for o in outcomes if o not in ("refused", "closed 1001", "ready then closed 1001")]
        assert not wrong, outcomes
    finally:
        server.stop()
        clean_prefix(prefix)


# ---------------------------------------------------------------- invalid UTF-8


async def test_invalid_utf8_frames_log_one_line_each_and_no_traceback(dev_server):
    before = dev_server.log_path.read_text(errors="replace")
    for _ in range(3):
        ws = await connect(dev_server.ws_url, subprotocols=[JSON])
        # Before any hello: the client library refuses to send such a frame, so write it by hand.
        ws.protocol.send_frame(Frame(Opcode.TEXT, b'{"type":"hello","user":"\xff\xfe"}'))
        ws.transport.write(b"".join(ws.protocol.data_to_send()))
        _, code, _ = await frames_until_close(ws)
        assert code == 1007
    await asyncio.sleep(0.5)
    added = dev_server.log_path.read_text(errors="replace")[len(before):]
    assert "Traceback" not in added, added
    utf8_lines = [line for line in added.splitlines() if "UTF-8" in line]
    assert len(utf8_lines) <= 3, added


# ---------------------------------------------------------------- DNS rebinding


async def test_dev_mode_refuses_a_dns_rebinding_page(dev_server):
    # A page from attacker.example whose name now resolves to 127.0.0.1: its
    # browser sends the attacker's name as Host and as Origin.
    sock = socket.create_connection(("127.0.0.1", dev_server.port))
    host = f"attacker.example:{dev_server.port}"
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://{host}/v1/ws", sock=sock, origin=f"http://{host}", subprotocols=[JSON])
    assert info.value.response.status_code == 403
    sock.close()
    # The chat page served from a loopback name is still same-origin.
    for name in ("127.0.0.1", "localhost"):
        sock = socket.create_connection(("127.0.0.1", dev_server.port))
        origin_host = f"{name}:{dev_server.port}"
        ws = await connect(f"ws://{origin_host}/v1/ws", sock=sock, origin=f"http://{origin_host}",
                           subprotocols=[JSON])
        await ws.send(json.dumps({"type": "hello", "user": f"page-{uuid.uuid4().hex[:6]}"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.close()


@pytest.mark.parametrize(("origin", "host", "dev", "allowed"), [
    ("http://attacker.example:8000", "attacker.example:8000", True, False),
    ("http://attacker.example:8000", "attacker.example:8000", False, True),  # no trust without a token
    ("http://127.0.0.1:8000", "127.0.0.1:8000", True, True),
    ("http://localhost:8000", "localhost:8000", True, True),
    ("http://[::1]:8000", "[::1]:8000", True, True),
    ("http://127.0.0.1.nip.io:8000", "127.0.0.1.nip.io:8000", True, False),
    ("http://127.0.0.1:8000", "attacker.example:8000", True, False),
    (None, "attacker.example:8000", True, True),  # not a browser
])
def test_same_origin_in_development_mode_needs_a_loopback_host(origin, host, dev, allowed):
    from server.gateway import origin_allowed

    assert origin_allowed(origin, host, [], loopback_only=dev) is allowed
    # An explicitly allowed origin stays allowed.
    if origin:
        assert origin_allowed(origin, host, [origin], loopback_only=dev)
