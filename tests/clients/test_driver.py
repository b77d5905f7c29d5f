"""clients/driver.py: the lean protocol driver, against the real simulated-engine server."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import make_token

from clients.driver import Driver, decode_server_frame, lost_from
from clients.errors import AuthenticationError, ConnectionLost, ProtocolViolation, ServerError
from protocol import client_frames, close_codes
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, SUBPROTOCOLS, Codec


def user() -> str:
    return f"driver-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- pure


def test_undecodable_server_frames_are_protocol_violations():
    codec = Codec(JSON_SUBPROTOCOL)
    assert decode_server_frame(codec, '{"type":"pong"}') == {"type": "pong"}
    with pytest.raises(ProtocolViolation):
        decode_server_frame(codec, "not json")
    with pytest.raises(ProtocolViolation):
        decode_server_frame(codec, '{"type": 3}')
    with pytest.raises(ProtocolViolation):
        decode_server_frame(Codec(MSGPACK_SUBPROTOCOL), '{"type":"pong"}')  # text on msgpack


def test_a_close_without_a_close_frame_is_1006():
    from websockets.exceptions import ConnectionClosedError
    from websockets.frames import Close

    assert lost_from(ConnectionClosedError(None, None)).close_code == close_codes.ABNORMAL
    lost = lost_from(ConnectionClosedError(Close(4401, "bad token"), None))
    assert isinstance(lost, AuthenticationError) and lost.close_code == 4401 and lost.reason == "bad token"
    assert type(lost_from(ConnectionClosedError(Close(4429, ""), None))) is ConnectionLost


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("subprotocol", SUBPROTOCOLS)
async def test_a_turn_frame_by_frame(sim_server, subprotocol):
    async with await Driver.open(sim_server.ws_url, subprotocol=subprotocol, user=user()) as driver:
        assert driver.codec.subprotocol == subprotocol
        assert driver.ready is not None and driver.ready["type"] == "ready"
        start = client_frames.turn_start("hello there", conversation_id="d")
        await driver.send(start)
        frames = await driver.recv_until("turn.end")
    accepted, *deltas, end = [f for f in frames if f["type"] != "ping"]
    assert accepted["type"] == "turn.accepted" and accepted["client_turn_id"] == start["client_turn_id"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1)) and deltas
    assert "".join(d["text"] for d in deltas) == end["text"] and end["seq"] == len(deltas)


async def test_hello_false_leaves_the_handshake_to_the_caller(sim_server):
    async with await Driver.open(sim_server.ws_url, hello=False) as driver:
        assert driver.ready is None
        await driver.send(client_frames.ping(7))
        frame = await driver.recv()
        assert frame["type"] == "error" and frame["code"] == "unauthorized"  # nothing before hello
        await driver.send(client_frames.hello(user=user(), client={"name": "test", "version": "1"}))
        assert (await driver.recv())["type"] == "ready"
        await driver.send(client_frames.ping(7))
        assert await driver.recv() == {"type": "pong", "t": 7}


async def test_recv_times_out_and_send_raw_sends_bytes_as_they_are(sim_server):
    async with await Driver.open(sim_server.ws_url, user=user()) as driver:
        with pytest.raises(TimeoutError):
            await driver.recv(timeout=0.05)
        await driver.send_raw('{"type":"ping","t":1}')
        assert await driver.recv() == {"type": "pong", "t": 1}
        await driver.send_raw("{")
        frame = await driver.recv()
        assert frame["type"] == "error" and frame["code"] == "bad_request"
        with pytest.raises(TimeoutError):
            await driver.recv_until("turn.end", timeout=0.1)


async def test_credentials_in_the_header_or_in_hello(jwt_server):
    name = user()
    async with await Driver.open(jwt_server.ws_url, header_token=make_token(name)) as driver:
        assert driver.ready is not None and driver.ready["user_id"] == name
    async with await Driver.open(jwt_server.ws_url, token=make_token(name)) as driver:
        assert driver.ready is not None and driver.ready["user_id"] == name


async def test_refused_credentials_raise_and_then_close_4401(jwt_server):
    with pytest.raises(ServerError) as info:
        await Driver.open(jwt_server.ws_url, token="not-a-jwt")
    assert info.value.code == "unauthorized"
    driver = await Driver.open(jwt_server.ws_url, hello=False)
    await driver.send(client_frames.hello(token="not-a-jwt"))
    assert (await driver.recv())["code"] == "unauthorized"
    with pytest.raises(AuthenticationError) as closed:
        await driver.recv()
    assert closed.value.close_code == close_codes.UNAUTHORIZED


async def test_a_server_close_is_connection_lost_with_its_code(sim_server):
    async with await Driver.open(sim_server.ws_url, user=user()) as driver:
        await driver.send_raw(b"binary on the json subprotocol")
        assert (await driver.recv())["code"] == "bad_request"  # the socket stays open
        await driver.send_raw("x" * (64 * 1024 + 1))  # over limits.max_frame_bytes
        with pytest.raises(ConnectionLost) as info:
            await driver.recv()
        assert info.value.close_code == close_codes.TOO_BIG
        with pytest.raises(ConnectionLost):
            await driver.send(client_frames.ping())


async def test_abort_drops_the_socket_and_the_turn_stays_resumable(sim_server):
    name = user()
    driver = await Driver.open(sim_server.ws_url, user=name)
    await driver.send(client_frames.turn_start("tell me a long story", conversation_id="abort"))
    frames = await driver.recv_until("turn.delta")
    turn_id = frames[-1]["turn_id"]
    driver.abort()
    with pytest.raises(ConnectionLost) as info:
        while True:  # frames that arrived before the abort are still delivered, then the loss
            assert (await driver.recv())["type"] in ("turn.delta", "turn.end", "ping")
    assert info.value.close_code == close_codes.ABNORMAL

    async with await Driver.open(sim_server.ws_url, user=name) as again:
        assert again.ready is not None
        await again.send(client_frames.turn_resume(turn_id, 0))
        resumed = [f for f in await again.recv_until("turn.end") if f["type"] in ("turn.delta", "turn.end")]
    *deltas, end = resumed
    assert [d["seq"] for d in deltas] == list(range(1, end["seq"] + 1))
    assert "".join(d["text"] for d in deltas) == end["text"]


async def test_an_unreachable_server_is_connection_lost():
    with pytest.raises(ConnectionLost) as info:
        await Driver.open("ws://127.0.0.1:9/v1/ws", open_timeout=2)
    assert info.value.close_code is None


async def test_an_http_refusal_is_an_authentication_error_for_401_and_403(sim_server):
    # A browser Origin outside the allowlist is refused before the upgrade.
    with pytest.raises(AuthenticationError, match="HTTP 403"):
        await Driver.open(sim_server.ws_url, origin="https://evil.example")


async def test_cancelling_open_drops_the_socket_at_once():
    from websockets.asyncio.server import ServerConnection, serve

    gone = asyncio.Event()

    async def silent(ws: ServerConnection) -> None:  # accepts the upgrade, never answers hello
        await ws.wait_closed()
        gone.set()

    async with serve(silent, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        task = asyncio.ensure_future(Driver.open(f"ws://127.0.0.1:{port}/v1/ws", user="u"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Aborted, not left in a closing handshake that would wait for the silent peer.
        async with asyncio.timeout(1.0):
            await gone.wait()


async def test_no_ready_within_open_timeout_is_connection_lost():
    from websockets.asyncio.server import ServerConnection, serve

    async def silent(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(silent, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionLost, match="no 'ready' within 0.2 s"):
            await Driver.open(f"ws://127.0.0.1:{port}/v1/ws", user="u", open_timeout=0.2)


async def test_an_error_before_ready_is_kept_and_the_open_waits_for_ready():
    """The gateway answers `unavailable` (it could not list the active turns) and then `ready`."""
    from websockets.asyncio.server import ServerConnection, serve

    unavailable = {"type": "error", "code": "unavailable", "message": "cannot list active turns"}

    async def degraded(ws: ServerConnection) -> None:
        await ws.recv()  # hello
        await ws.send(Codec(JSON_SUBPROTOCOL).encode(unavailable))
        await ws.send(Codec(JSON_SUBPROTOCOL).encode({"type": "ready", "active_turns": []}))
        await ws.wait_closed()

    async with serve(degraded, "127.0.0.1", 0, subprotocols=[JSON_SUBPROTOCOL]) as server:
        port = server.sockets[0].getsockname()[1]
        async with await Driver.open(f"ws://127.0.0.1:{port}/v1/ws", user="u", open_timeout=2) as driver:
            assert driver.ready is not None and driver.ready["type"] == "ready"
            assert driver.pre_ready_errors == [unavailable]


async def test_an_error_then_a_close_before_ready_fails_the_open():
    from websockets.asyncio.server import ServerConnection, serve

    async def refusing(ws: ServerConnection) -> None:
        await ws.recv()  # hello
        await ws.send(Codec(JSON_SUBPROTOCOL).encode({"type": "error", "code": "unauthorized", "message": "no"}))
        await ws.close(close_codes.UNAUTHORIZED, "bad token")

    async with serve(refusing, "127.0.0.1", 0, subprotocols=[JSON_SUBPROTOCOL]) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ServerError) as info:
            await Driver.open(f"ws://127.0.0.1:{port}/v1/ws", user="u", open_timeout=2)
    assert info.value.code == "unauthorized"
    assert isinstance(info.value.__cause__, AuthenticationError)
    assert info.value.__cause__.close_code == close_codes.UNAUTHORIZED
