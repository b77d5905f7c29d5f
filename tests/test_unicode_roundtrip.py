"""Chinese text, emoji (ZWJ sequences, skin tones, flags, variation selectors),
full-width punctuation and combining marks come back byte-identical on every
path: the WebSocket in both subprotocols (the streamed reply, ``turn.end.text``,
``history.get``), history over REST, and the OpenAI-compatible endpoint.

The server runs the simulated engine with ``--sim-echo``: every reply begins
with the user's last message, so the reply path carries the user's exact text
too. (The echo rebuilds the text from its tokens, keeping single ASCII spaces;
texts with other whitespace are checked on the history paths only.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import SIM_FLAGS, ServerProcess, clean_prefix, make_token
from websockets.asyncio.client import connect

from clients.client import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, RapportConnection
from protocol.codec import Codec

ECHOED = {
    "chinese": "我和阿杰分手了，三年的感情就这样结束了。你说我该怎么办？",
    "zwj-family-and-flags": "家庭👨‍👩‍👧‍👦、程序员👩🏽‍💻、彩虹旗🏳️‍🌈、心火❤️‍🔥和国旗🇨🇳🇯🇵！",
    "skin-tones": "👍🏻👍🏼👍🏽👍🏾👍🏿 👋🏿 🧑🏾‍🤝‍🧑🏻 🫶🏽",
    "full-width": "（全角括号）「引号」『书名』：；！？、。～ ＡＢＣ１２３＠＃％",
    "mixed-scripts": "Café naïve e\u0301 日本語のテキスト、한국어 텍스트 😀 Ω≈ç√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
}
# Not echoed verbatim (the simulated tokeniser folds whitespace), but stored verbatim.
HISTORY_ONLY = {
    "whitespace": "第一行\n第二行\t制表\u3000全角空格  两个空格\r\n末尾空格 ",
}
ALL = {**ECHOED, **HISTORY_ONLY}
SUBPROTOCOLS = [JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL]


def utf8(text: str) -> bytes:
    return text.encode("utf-8")


@pytest.fixture(scope="module")
def echo_server(redis_url: str) -> Iterator[ServerProcess]:
    prefix = f"rapport-test-unicode:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*SIM_FLAGS, "--auth", "dev", "--sim-echo",
                                                 "--turns-per-minute", "100000"]).start()
    yield server
    server.stop()
    clean_prefix(prefix)


async def one_turn(server: ServerProcess, text: str, subprotocol: str) -> tuple[str, str, dict[str, Any],
                                                                                  list[str], dict[str, Any]]:
    """(user, conversation, turn.end, delta texts, history frame) for one turn."""
    user = f"uni-{uuid.uuid4().hex[:10]}"
    conversation = f"c-{uuid.uuid4().hex[:10]}"
    conn = await RapportConnection.open(server.ws_url, token=make_token(user), subprotocol=subprotocol)
    try:
        assert conn.subprotocol == subprotocol
        stream = await conn.start_turn(text, conversation_id=conversation, options={"max_tokens": 200})
        deltas = [d["text"] async for d in stream]
        end = stream.end
        assert end is not None
        history = await conn.history(conversation)
    finally:
        await conn.close()
    return user, conversation, end, deltas, history


@pytest.mark.parametrize("subprotocol", SUBPROTOCOLS)
@pytest.mark.parametrize("name", list(ALL))
async def test_websocket_roundtrip(echo_server, subprotocol, name):
    text = ALL[name]
    _, _, end, deltas, history = await one_turn(echo_server, text, subprotocol)
    assert end["finish_reason"] in ("stop", "length")
    reply = end["text"]
    assert utf8("".join(deltas)) == utf8(reply)
    if name in ECHOED:
        assert utf8(reply).startswith(utf8(text)), (reply, text)
    user_msg, assistant_msg = history["messages"]
    assert user_msg["role"] == "user" and utf8(user_msg["text"]) == utf8(text)
    assert assistant_msg["role"] == "assistant" and utf8(assistant_msg["text"]) == utf8(reply)


@pytest.mark.parametrize("subprotocol", SUBPROTOCOLS)
async def test_text_is_raw_utf8_on_the_wire(echo_server, subprotocol):
    """No escaping, no re-encoding: the frames carry the text's own UTF-8 bytes."""
    text = ECHOED["zwj-family-and-flags"] + ECHOED["full-width"]
    codec = Codec(subprotocol)
    user = f"uni-{uuid.uuid4().hex[:10]}"
    raw_frames: list[bytes] = []
    async with connect(echo_server.ws_url, subprotocols=[subprotocol],  # type: ignore[list-item]
                       additional_headers={"Authorization": f"Bearer {make_token(user)}"}) as ws:
        await ws.send(codec.encode({"type": "hello"}))
        while codec.decode(await ws.recv())["type"] != "ready":
            pass
        await ws.send(codec.encode({"type": "turn.start", "client_turn_id": "t1", "text": text,
                                    "conversation_id": "wire"}))
        while True:
            raw = await ws.recv()
            data = raw if isinstance(raw, bytes) else raw.encode("utf-8")
            assert isinstance(raw, bytes) == (subprotocol == MSGPACK_SUBPROTOCOL)
            frame = codec.decode(raw)
            raw_frames.append(data)
            if frame["type"] == "turn.end":
                break
            assert frame["type"] in ("turn.accepted", "turn.delta", "ping"), frame
        await ws.send(codec.encode({"type": "history.get", "conversation_id": "wire"}))
        while (frame := codec.decode(raw := await ws.recv()))["type"] != "history":
            pass
        history_raw = raw if isinstance(raw, bytes) else raw.encode("utf-8")
    assert utf8(text) in raw_frames[-1]  # turn.end's text begins with the echo
    assert history_raw.count(utf8(text)) >= 2  # the user message, and the reply that echoes it
    assert b"\\u" not in raw_frames[-1] and b"\\u" not in history_raw


@pytest.mark.parametrize("name", list(ALL))
async def test_rest_history_roundtrip(echo_server, name):
    text = ALL[name]
    user, conversation, end, _, _ = await one_turn(echo_server, text, JSON_SUBPROTOCOL)
    async with httpx.AsyncClient(base_url=echo_server.base, timeout=30) as http:
        r = await http.get(f"/v1/conversations/{conversation}/messages",
                           headers={"Authorization": f"Bearer {make_token(user)}"})
    assert r.status_code == 200, r.text
    assert "charset=utf-8" in r.headers["content-type"].lower() or r.encoding in (None, "utf-8")
    messages = json.loads(r.content.decode("utf-8"))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert utf8(messages[0]["text"]) == utf8(text)
    assert utf8(messages[1]["text"]) == utf8(end["text"])


def sse_content(body: bytes) -> str:
    parts = []
    for line in body.decode("utf-8").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        for choice in chunk.get("choices", []):
            parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


@pytest.mark.parametrize("name", list(ECHOED))
async def test_openai_endpoint_roundtrip(echo_server, name):
    text = ECHOED[name]
    body = {"model": "m", "messages": [{"role": "system", "content": "简短回答。"},
                                       {"role": "user", "content": text}],
            "temperature": 0, "seed": 7, "max_tokens": 200}
    headers = {"Authorization": f"Bearer {make_token('uni-oai')}"}
    async with httpx.AsyncClient(base_url=echo_server.base, timeout=60) as http:
        whole = await http.post("/v1/chat/completions", json=body, headers=headers)
        assert whole.status_code == 200, whole.text
        content = json.loads(whole.content.decode("utf-8"))["choices"][0]["message"]["content"]
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)
        assert streamed.status_code == 200, streamed.text
    assert utf8(content).startswith(utf8(text)), (content, text)
    assert utf8(text) in whole.content  # raw UTF-8 in the body, not \u escapes
    pieces = sse_content(streamed.content)
    assert utf8(pieces) == utf8(content)  # same seed and messages: the same reply, streamed
