"""The codec for both subprotocols (protocol/codec.py, protocol.md "Transport")."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from protocol import frames
from protocol.codec import (
    JSON_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    SUBPROTOCOLS,
    Codec,
    choose_subprotocol,
    codec_for,
)
from protocol.errors import BadRequest, RapportError

JSON = Codec(JSON_SUBPROTOCOL)
MSGPACK = Codec(MSGPACK_SUBPROTOCOL)

# Chinese, emoji (incl. a ZWJ sequence and a flag), full-width punctuation, RTL, combining marks.
TRICKY = "你好，世界！「测试」（全角）：；？😀👩‍💻🇨🇳 ｈｅｌｌｏ ～ مرحبا é\u0301 \u2028 \"quoted\" \\ \n\t"


def server_frames() -> list[dict[str, Any]]:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "cached_prompt_tokens": 8}
    return [
        frames.ready(session_id="s-1", user_id="用户", model="qwen", interval_ms=15_000, timeout_ms=45_000,
                     max_frame_bytes=65_536, max_input_chars=4000, turns_per_minute=30,
                     active_turns=[{"turn_id": "t", "conversation_id": "c", "last_seq": 2}]),
        frames.turn_accepted(turn_id="t", client_turn_id="c", conversation_id="default", replayed=True),
        frames.turn_delta("t", 1, TRICKY),
        frames.turn_end(turn_id="t", seq=3, finish_reason="stop", text=TRICKY, usage=usage,
                        timings={"queue_ms": 1.25, "ttft_ms": None, "total_ms": 250.0}),
        frames.history("c", [{"id": "m1", "role": "assistant", "text": TRICKY, "turn_id": "t",
                              "status": "done", "created_at": 1_700_000_000.123}]),
        frames.history_cleared("c"),
        frames.error("too_large", "文本太长", client_turn_id="c"),
        frames.ping(1234.5),
        frames.pong(0),
        frames.ping(),
    ]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
@pytest.mark.parametrize("frame", server_frames(), ids=lambda f: f["type"])
def test_round_trip(codec: Codec, frame: dict[str, Any]) -> None:
    data = codec.encode(frame)
    assert isinstance(data, bytes if codec.binary else str)
    assert codec.decode(data) == frame


def test_json_keeps_text_byte_identical() -> None:
    frame = frames.turn_delta("t", 1, TRICKY)
    data = JSON.encode(frame)
    assert isinstance(data, str)
    raw = data.encode("utf-8")
    # Non-ASCII travels as UTF-8, not as \\u escapes.
    for piece in ("你好，世界！", "😀", "👩‍💻", "🇨🇳", "（全角）", "ｈｅｌｌｏ", "مرحبا"):
        assert piece in data
        assert piece.encode("utf-8") in raw
    assert "\\ud83d" not in data
    assert json.loads(raw.decode("utf-8"))["text"] == TRICKY
    assert JSON.decode(data)["text"].encode("utf-8") == TRICKY.encode("utf-8")


def test_json_is_compact() -> None:
    assert JSON.encode({"type": "ping", "t": 1}) == '{"type":"ping","t":1}'


def test_msgpack_keeps_text_byte_identical() -> None:
    data = MSGPACK.encode(frames.turn_delta("t", 1, TRICKY))
    assert isinstance(data, bytes)
    assert TRICKY.encode("utf-8") in data
    decoded = MSGPACK.decode(data)
    assert decoded["text"].encode("utf-8") == TRICKY.encode("utf-8")
    # A generic client sees str (not bin) values.
    assert msgpack.unpackb(data, raw=False) == frames.turn_delta("t", 1, TRICKY)


@pytest.mark.parametrize("frame", server_frames(), ids=lambda f: f["type"])
def test_both_subprotocols_decode_to_the_same_map(frame: dict[str, Any]) -> None:
    assert JSON.decode(JSON.encode(frame)) == MSGPACK.decode(MSGPACK.encode(frame))


def test_client_frames_decode_and_parse_the_same_on_both() -> None:
    obj = {"type": "turn.start", "client_turn_id": "c-1", "text": TRICKY, "conversation_id": "默认",
           "options": {"temperature": 0.5, "max_tokens": 64, "enable_thinking": False}}
    via_json = frames.parse_client_frame(JSON.decode(json.dumps(obj, ensure_ascii=True)),
                                         max_input_chars=4000)
    via_msgpack = frames.parse_client_frame(MSGPACK.decode(msgpack.packb(obj, use_bin_type=True)),
                                            max_input_chars=4000)
    assert via_json == via_msgpack
    assert via_json.text == TRICKY  # type: ignore[union-attr]


# ---------------------------------------------------------------- wrong frame kind


def test_text_frame_on_msgpack_is_bad_request() -> None:
    with pytest.raises(BadRequest) as exc:
        MSGPACK.decode('{"type":"ping"}')
    assert exc.value.code == "bad_request"


def test_binary_frame_on_json_is_bad_request() -> None:
    with pytest.raises(BadRequest) as exc:
        JSON.decode(b'{"type":"ping"}')
    assert exc.value.code == "bad_request"
    with pytest.raises(BadRequest):
        JSON.decode(msgpack.packb({"type": "ping"}))


# ---------------------------------------------------------------- invalid input


@pytest.mark.parametrize("data", ["", " ", "{", '{"type":', '{"type":"ping",}', "{'type':'ping'}",
                                  "hello", '{"type":"ping"} x', '{"type":"ping"}{}', "\ufeff{}",
                                  '{"type":"ping","t":01}'])
def test_invalid_json(data: str) -> None:
    with pytest.raises(BadRequest) as exc:
        JSON.decode(data)
    assert exc.value.code == "bad_request"


@pytest.mark.parametrize("data", [
    b"",  # nothing
    b"\xc1",  # the one byte MessagePack never uses
    b"\x81\xa4typ",  # truncated
    b"\x81\xa4type\xa4pin",  # truncated string value
    msgpack.packb({"type": "ping"}) + b"\x00",  # trailing data
    b"\x81\x01\xa4ping",  # an integer map key
    b"\x81\x91\x01\xa4ping",  # an array as a map key
    b"\x91" * 100_000,  # nested deeper than the unpacker's stack
], ids=["empty", "never-used", "truncated", "truncated-str", "trailing", "int-key", "array-key", "deep"])
def test_invalid_msgpack(data: bytes) -> None:
    with pytest.raises(BadRequest) as exc:
        MSGPACK.decode(data)
    assert exc.value.code == "bad_request"


@pytest.mark.parametrize("bad_utf8", [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf0\x9f\x98"],
                         ids=["ff-fe", "bad-continuation", "surrogate", "truncated-emoji"])
def test_msgpack_str_with_invalid_utf8(bad_utf8: bytes) -> None:
    value = bytes([0xA0 | len(bad_utf8)]) + bad_utf8  # fixstr header + raw bytes
    for data in (b"\x81\xa4type" + value, b"\x82\xa4type\xa4ping\xa1t" + value, b"\x81" + value + b"\x01"):
        with pytest.raises(BadRequest):
            MSGPACK.decode(data)


def test_msgpack_bin_values_are_not_strings() -> None:
    obj = MSGPACK.decode(msgpack.packb({"type": b"ping"}, use_bin_type=True))
    with pytest.raises(BadRequest):
        frames.parse_client_frame(obj, max_input_chars=100)


@pytest.mark.parametrize("value", [[], [{"type": "ping"}], "ping", 1, 1.5, None, True, b"ping"])
def test_non_map_top_level(value: Any) -> None:
    with pytest.raises(BadRequest):
        JSON.decode(json.dumps(value) if not isinstance(value, bytes) else '"ping"')
    with pytest.raises(BadRequest):
        MSGPACK.decode(msgpack.packb(value, use_bin_type=True))


def test_decode_errors_are_rapport_errors_only() -> None:
    for codec, data in ((JSON, "}"), (MSGPACK, b"\xc1"), (JSON, b"x"), (MSGPACK, "x")):
        with pytest.raises(RapportError):
            codec.decode(data)


# ---------------------------------------------------------------- contract holes (bugs)


@pytest.mark.parametrize("data", ["[" * 20_000, '{"a":' * 10_000, '{"type":"ping","x":' + "[" * 20_000],
                         ids=["arrays", "objects", "inside-a-ping"])
def test_deeply_nested_json_is_bad_request(data: str) -> None:
    assert len(data.encode()) < 64 * 1024
    with pytest.raises(BadRequest):
        JSON.decode(data)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(constant: str) -> None:
    with pytest.raises(BadRequest):
        frames.parse_client_frame(JSON.decode('{"type":"ping","t":' + constant + '}'), max_input_chars=100)


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "x\\ud83dy"])
def test_lone_surrogates_in_json_are_refused(escape: str) -> None:
    data = '{"type":"turn.start","client_turn_id":"c","text":"' + escape + '"}'
    with pytest.raises(BadRequest):
        frames.parse_client_frame(JSON.decode(data), max_input_chars=100)


def test_valid_surrogate_pair_escapes_are_fine() -> None:
    obj = JSON.decode('{"type":"turn.start","client_turn_id":"c","text":"\\ud83d\\ude00"}')
    assert obj["text"] == "😀"


# ---------------------------------------------------------------- subprotocol choice


def test_subprotocol_names() -> None:
    assert SUBPROTOCOLS == ("rapport.v1.json", "rapport.v1.msgpack")


@pytest.mark.parametrize(("offered", "chosen"), [
    ([], None),
    (["chat", "v2"], None),
    (["rapport.v1.json"], "rapport.v1.json"),
    (["rapport.v1.msgpack"], "rapport.v1.msgpack"),
    (["rapport.v1.msgpack", "rapport.v1.json"], "rapport.v1.msgpack"),  # the client's order
    (["rapport.v1.json", "rapport.v1.msgpack"], "rapport.v1.json"),
    (["rapport.v2.json", "x", "rapport.v1.msgpack"], "rapport.v1.msgpack"),
    (["RAPPORT.V1.JSON"], None),  # subprotocol tokens are case-sensitive
    (["rapport.v1"], None),
])
def test_choose_subprotocol(offered: list[str], chosen: str | None) -> None:
    assert choose_subprotocol(offered) == chosen


def test_codec_for() -> None:
    assert codec_for(None) == JSON and not codec_for(None).binary
    assert codec_for(JSON_SUBPROTOCOL) == JSON
    assert codec_for(MSGPACK_SUBPROTOCOL) == MSGPACK and MSGPACK.binary


# ---------------------------------------------------------------- the server's fast encoder


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
@pytest.mark.parametrize("frame", server_frames(), ids=lambda f: f["type"])
def test_encode_frame_decodes_to_the_same_map_as_encode(codec: Codec, frame: dict[str, Any]) -> None:
    fast = codec.encode_frame(frame)
    assert isinstance(fast, bytes if codec.binary else str)
    assert codec.decode(fast) == codec.decode(codec.encode(frame)) == frame


def test_encode_frame_json_is_compact_utf8() -> None:
    data = JSON.encode_frame(frames.turn_delta("t", 1, TRICKY))
    assert isinstance(data, str)
    assert TRICKY.replace("\\", "\\\\").replace('"', '\\"').split("\n")[0] in data
    assert ", " not in data.split('"text"')[0] and ": " not in data.split('"text"')[0]


def test_encode_frame_never_writes_nan_into_json() -> None:
    data = JSON.encode_frame({"type": "turn.end", "timings": {"ttft_ms": float("nan")}})
    assert json.loads(data) == {"type": "turn.end", "timings": {"ttft_ms": None}}
    # Decoding still refuses the constant, whatever the encoder.
    with pytest.raises(BadRequest):
        JSON.decode('{"type":"x","v":NaN}')


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
@pytest.mark.parametrize("value", ["lone \ud800 surrogate", 2**70], ids=["surrogate", "bigint"])
def test_encode_frame_falls_back_to_encode_for_what_msgspec_refuses(codec: Codec, value: Any) -> None:
    frame = {"type": "turn.delta", "turn_id": "t", "seq": 1, "text": value}
    try:
        expected: Any = codec.encode(frame)
    except (TypeError, ValueError, OverflowError) as exc:
        with pytest.raises(type(exc)):
            codec.encode_frame(frame)
        return
    assert codec.encode_frame(frame) == expected
