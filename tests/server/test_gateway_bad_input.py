"""Bad input gets the contract's error or close code, and never hurts another user.

End-to-end: a real server process on 127.0.0.1, real Redis, real sockets.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import msgpack
import pytest
from conftest import make_token
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wire import JSON, MSGPACK, assert_contiguous, expect_close, expect_error, open_ws, recv, send, stream_turn

BAD_JSON_FRAMES = [
    ("{not json", "bad_request"),
    ("[1, 2]", "bad_request"),
    ('{"no_type": 1}', "bad_request"),
    ('{"type": 7}', "bad_request"),
    ('{"type": "what.is.this"}', "bad_request"),
    ('{"type": "turn.start", "text": "hi"}', "bad_request"),
    ('{"type": "turn.start", "client_turn_id": 5, "text": "hi"}', "bad_request"),
    ('{"type": "turn.start", "client_turn_id": "x", "text": ["hi"]}', "bad_request"),
    ('{"type": "turn.start", "client_turn_id": "x", "text": "hi", "options": {"temperature": "hot"}}',
     "bad_request"),
    ('{"type": "turn.start", "client_turn_id": "%s", "text": "hi"}' % ("x" * 65), "bad_request"),
    ('{"type": "turn.resume", "turn_id": "t", "after_seq": -1}', "bad_request"),
    ('{"type": "history.get", "limit": 1000}', "bad_request"),
    ('{"type": "ping", "t": "soon"}', "bad_request"),
]


async def test_bad_json_frames_answer_errors_and_keep_the_connection(sim_server):
    ws = await open_ws(sim_server, user=f"bad-{uuid.uuid4().hex[:6]}")
    for data, code in BAD_JSON_FRAMES:
        await ws.send(data)
        await expect_error(ws, code)
    # Still usable afterwards.
    frames = await stream_turn(ws)
    assert_contiguous(frames)
    await ws.close()


async def test_over_long_text_is_too_large(sim_server):
    ws = await open_ws(sim_server, user=f"long-{uuid.uuid4().hex[:6]}")
    await send(ws, {"type": "turn.start", "client_turn_id": "c-long", "text": "x" * 4001})
    err = await expect_error(ws, "too_large")
    assert err["client_turn_id"] == "c-long"
    await ws.close()


async def test_msgpack_bad_input(sim_server):
    ws = await open_ws(sim_server, user=f"mp-{uuid.uuid4().hex[:6]}", subprotocol=MSGPACK)
    await ws.send(b"\xc1\xc1\xc1")  # 0xc1 is never used in MessagePack
    await expect_error(ws, "bad_request")
    await ws.send('{"type": "ping"}')  # a text frame on the binary subprotocol
    await expect_error(ws, "bad_request")
    # A MessagePack str whose bytes are not UTF-8.
    bad_str = b"\x82\xa4type\xa4ping\xa1t\xa2\xff\xfe"
    await ws.send(bad_str)
    await expect_error(ws, "bad_request")
    await ws.send(msgpack.packb([1, 2, 3]))
    await expect_error(ws, "bad_request")
    frames = await stream_turn(ws)
    assert_contiguous(frames)
    await ws.close()


async def test_binary_frame_on_json_subprotocol(sim_server):
    ws = await open_ws(sim_server, user=f"bin-{uuid.uuid4().hex[:6]}")
    await ws.send(b'{"type": "ping"}')
    await expect_error(ws, "bad_request")
    await ws.close()


async def test_oversized_frame_closes_1009(sim_server):
    ws = await open_ws(sim_server, user=f"big-{uuid.uuid4().hex[:6]}")
    await ws.send(json.dumps({"type": "ping", "pad": "x" * (70 * 1024)}))
    await expect_close(ws, 1009)


async def test_invalid_utf8_text_frame_fails_the_connection(sim_server):
    """RFC 6455 section 8.1: a text frame with invalid UTF-8 fails the connection with 1007.

    The client library refuses to send one, so this writes the frame itself.
    """
    ws = await open_ws(sim_server, user=f"utf-{uuid.uuid4().hex[:6]}")
    from websockets.frames import Frame, Opcode

    ws.protocol.send_frame(Frame(Opcode.TEXT, b'{"type":"ping","x":"\xff\xfe"}'))
    ws.transport.write(b"".join(ws.protocol.data_to_send()))
    await expect_close(ws, 1007)


async def test_frames_before_hello_are_unauthorized(sim_server):
    ws = await open_ws(sim_server, hello=False)
    await send(ws, {"type": "turn.start", "client_turn_id": "c", "text": "hi"})
    await expect_error(ws, "unauthorized")
    await send(ws, {"type": "hello", "user": "late-hello"})
    assert (await recv(ws))["type"] == "ready"
    await ws.close()


async def test_no_hello_closes_4401_after_5s(sim_server):
    ws = await open_ws(sim_server, hello=False)
    started = time.monotonic()
    await expect_close(ws, 4401, timeout=10)
    assert 4.0 <= time.monotonic() - started <= 9.0


@pytest.mark.parametrize("token_kind", ["missing", "expired", "wrong_secret", "garbage", "alg_none"])
async def test_bad_jwt_closes_4401(jwt_server, token_kind):
    import jwt as pyjwt

    user = f"jwt-{uuid.uuid4().hex[:6]}"
    tokens = {
        "missing": None,
        # Expired beyond the server's leeway on exp (--jwt-leeway-s, 30 s by default).
        "expired": make_token(user, ttl=-120),
        "wrong_secret": make_token(user, secret="not-the-secret-" + "y" * 32),
        "garbage": "abc.def.ghi",
        "alg_none": pyjwt.encode({"sub": user, "exp": int(time.time()) + 60}, None, algorithm="none"),
    }
    ws = await open_ws(jwt_server, hello=False)
    frame = {"type": "hello"}
    if tokens[token_kind]:
        frame["token"] = tokens[token_kind]
    await send(ws, frame)
    await expect_error(ws, "unauthorized")
    await expect_close(ws, 4401)


async def test_jwt_in_header_and_in_hello(jwt_server):
    user = f"jwt-ok-{uuid.uuid4().hex[:6]}"
    ws = await open_ws(jwt_server, header_token=make_token(user))
    ws2 = await open_ws(jwt_server, token=make_token(user))
    for w in (ws, ws2):
        frames = await stream_turn(w, conversation_id=uuid.uuid4().hex)
        assert_contiguous(frames)
        await w.close()


async def test_dev_user_refused_in_jwt_mode(jwt_server):
    ws = await open_ws(jwt_server, hello=False)
    await send(ws, {"type": "hello", "user": "mallory"})
    await expect_error(ws, "unauthorized")
    await expect_close(ws, 4401)


async def test_foreign_origin_refused_before_accept(sim_server):
    with pytest.raises(InvalidStatus) as info:
        await connect(sim_server.ws_url, origin="https://evil.example", subprotocols=[JSON])
    assert info.value.response.status_code == 403
    # Same-origin pages (the chat page) are allowed.
    ws = await connect(sim_server.ws_url, origin=f"http://127.0.0.1:{sim_server.port}", subprotocols=[JSON])
    await ws.close()


async def test_no_subprotocol_offer_speaks_json(sim_server):
    ws = await connect(sim_server.ws_url)
    assert ws.subprotocol is None
    await ws.send(json.dumps({"type": "hello", "user": "plain"}))
    assert json.loads(await ws.recv())["type"] == "ready"
    await ws.close()


async def test_bad_input_does_not_disturb_another_users_stream(sim_server):
    """User A streams long replies while user B throws every kind of garbage."""
    a = await open_ws(sim_server, user=f"calm-{uuid.uuid4().hex[:6]}")
    b_user = f"chaos-{uuid.uuid4().hex[:6]}"

    async def chaos() -> None:
        for data, _code in BAD_JSON_FRAMES:
            b = await open_ws(sim_server, user=b_user)
            await b.send(data)
            await b.send(b"\xff\x00 binary junk")
            await b.send(json.dumps({"type": "ping", "pad": "x" * (70 * 1024)}))  # closes 1009
            try:
                while True:
                    await asyncio.wait_for(b.recv(), 5)
            except ConnectionClosed:
                pass

    chaos_task = asyncio.create_task(chaos())
    for i in range(3):
        frames = await stream_turn(a, f"message {i}", options={"max_tokens": 40})
        assert_contiguous(frames)
        assert frames[-1]["finish_reason"] in ("stop", "length")
    await chaos_task
    await a.close()
