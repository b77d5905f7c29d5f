"""Client frame validation and server frame shapes (protocol/frames.py, protocol.md)."""

from __future__ import annotations

from typing import Any

import pytest

from protocol import frames
from protocol.errors import BadRequest, TooLarge
from protocol.frames import (
    ClientInfo,
    Hello,
    HistoryClear,
    HistoryGet,
    Ping,
    Pong,
    TurnCancel,
    TurnOptions,
    TurnResume,
    TurnStart,
)

MAX_INPUT = 100


def parse(obj: dict[str, Any]) -> frames.ClientFrame:
    return frames.parse_client_frame(obj, max_input_chars=MAX_INPUT)


def bad(obj: dict[str, Any]) -> BadRequest:
    """Parse a frame that must be refused with bad_request."""
    with pytest.raises(BadRequest) as exc:
        parse(obj)
    assert not isinstance(exc.value, TooLarge)
    assert exc.value.code == "bad_request"
    assert exc.value.message
    return exc.value


def start(**fields: Any) -> dict[str, Any]:
    return {"type": "turn.start", "client_turn_id": "c-1", "text": "hello", **fields}


def with_options(**options: Any) -> dict[str, Any]:
    return start(options=options)


# ---------------------------------------------------------------- every type parses


def test_hello_minimal() -> None:
    assert parse({"type": "hello"}) == Hello(token=None, user=None, client=None)


def test_hello_full() -> None:
    frame = parse({"type": "hello", "token": "a.b.c", "user": "alice",
                   "client": {"name": "ios", "version": "1.2.3"}})
    assert frame == Hello(token="a.b.c", user="alice", client=ClientInfo("ios", "1.2.3"))


def test_hello_empty_client_map() -> None:
    assert parse({"type": "hello", "client": {}}) == Hello(None, None, ClientInfo("", ""))


def test_turn_start_minimal_has_defaults() -> None:
    assert parse(start()) == TurnStart(client_turn_id="c-1", text="hello", conversation_id="default",
                                       options=TurnOptions())
    assert TurnOptions() == TurnOptions(None, None, None, None)


def test_turn_start_full() -> None:
    frame = parse(start(conversation_id="chat-7", options={
        "temperature": 0.3, "top_p": 0.9, "max_tokens": 128, "enable_thinking": True}))
    assert frame == TurnStart(
        client_turn_id="c-1", text="hello", conversation_id="chat-7",
        options=TurnOptions(temperature=0.3, top_p=0.9, max_tokens=128, enable_thinking=True),
    )


def test_turn_start_integer_sampling_values_are_numbers() -> None:
    frame = parse(with_options(temperature=1, top_p=1))
    assert isinstance(frame, TurnStart)
    assert frame.options.temperature == 1.0 and frame.options.top_p == 1.0


def test_turn_start_empty_options() -> None:
    frame = parse(start(options={}))
    assert isinstance(frame, TurnStart) and frame.options == TurnOptions()


def test_turn_start_keeps_text_verbatim() -> None:
    text = "  你好，世界！😀\n"
    frame = parse(start(text=text))
    assert isinstance(frame, TurnStart) and frame.text == text


def test_turn_cancel() -> None:
    assert parse({"type": "turn.cancel", "turn_id": "t-1"}) == TurnCancel("t-1")


@pytest.mark.parametrize("after_seq", [0, 1, 7, 2**53])
def test_turn_resume(after_seq: int) -> None:
    assert parse({"type": "turn.resume", "turn_id": "t-1", "after_seq": after_seq}) == TurnResume(
        "t-1", after_seq)


def test_history_get_defaults() -> None:
    assert parse({"type": "history.get"}) == HistoryGet(conversation_id="default", limit=50, before=None)


@pytest.mark.parametrize("limit", [1, 50, 100])
def test_history_get_full(limit: int) -> None:
    frame = parse({"type": "history.get", "conversation_id": "c", "limit": limit, "before": "m-9"})
    assert frame == HistoryGet(conversation_id="c", limit=limit, before="m-9")


def test_history_clear() -> None:
    assert parse({"type": "history.clear"}) == HistoryClear("default")
    assert parse({"type": "history.clear", "conversation_id": "x"}) == HistoryClear("x")


@pytest.mark.parametrize("t", [None, 0, 1, -5, 1.5, 10**15])
@pytest.mark.parametrize(("kind", "cls"), [("ping", Ping), ("pong", Pong)])
def test_ping_pong(kind: str, cls: type, t: Any) -> None:
    obj: dict[str, Any] = {"type": kind}
    if t is not None:
        obj["t"] = t
    assert parse(obj) == cls(t)


def test_null_fields_count_as_absent() -> None:
    assert parse(start(conversation_id=None, options=None)) == parse(start())
    assert parse({"type": "history.get", "limit": None, "before": None}) == HistoryGet("default", 50, None)
    assert parse({"type": "ping", "t": None}) == Ping(None)


VALID = [
    {"type": "hello"},
    start(),
    {"type": "turn.cancel", "turn_id": "t"},
    {"type": "turn.resume", "turn_id": "t", "after_seq": 0},
    {"type": "history.get"},
    {"type": "history.clear"},
    {"type": "ping"},
    {"type": "pong"},
]


@pytest.mark.parametrize("obj", VALID, ids=[o["type"] for o in VALID])
def test_unknown_fields_are_ignored(obj: dict[str, Any]) -> None:
    extra = {**obj, "future_field": {"nested": [1, 2]}, "x": None, "flag": True}
    assert parse(extra) == parse(obj)


def test_unknown_option_fields_are_ignored() -> None:
    assert parse(with_options(seed=3, stop=["x"])) == parse(start())


def test_every_contract_client_type_has_a_parser() -> None:
    assert {o["type"] for o in VALID} == {"hello", "turn.start", "turn.cancel", "turn.resume",
                                          "history.get", "history.clear", "ping", "pong"}


# ---------------------------------------------------------------- the type field


@pytest.mark.parametrize("obj", [
    {},
    {"text": "hi"},
    {"type": None},
    {"type": 5},
    {"type": True},
    {"type": ["hello"]},
    {"type": {"name": "hello"}},
    {"type": b"hello"},
], ids=["empty", "missing", "null", "int", "bool", "list", "map", "bytes"])
def test_missing_or_non_string_type(obj: dict[str, Any]) -> None:
    bad(obj)


@pytest.mark.parametrize("kind", ["", "turn.stop", "HELLO", "Hello", " hello", "ready", "turn.delta",
                                  "error", "x" * 10_000])
def test_unknown_type(kind: str) -> None:
    err = bad({"type": kind})
    assert len(err.message) < 200  # the echoed type is truncated


# ---------------------------------------------------------------- missing required fields


@pytest.mark.parametrize("obj", [
    {"type": "turn.start", "text": "hi"},
    {"type": "turn.cancel"},
    {"type": "turn.resume", "after_seq": 0},
    {"type": "turn.resume", "turn_id": "t"},
], ids=["start-no-client_turn_id", "cancel-no-turn_id", "resume-no-turn_id", "resume-no-after_seq"])
def test_missing_required_field(obj: dict[str, Any]) -> None:
    bad(obj)


def test_missing_text_carries_client_turn_id() -> None:
    err = bad({"type": "turn.start", "client_turn_id": "c-9"})
    assert err.fields == {"client_turn_id": "c-9"}


# ---------------------------------------------------------------- wrong field types


@pytest.mark.parametrize("obj", [
    start(client_turn_id=5),
    start(client_turn_id=True),
    start(client_turn_id=["c"]),
    start(conversation_id=5),
    start(conversation_id=True),
    start(options="fast"),
    start(options=[0.5]),
    with_options(temperature="0.5"),
    with_options(temperature=True),
    with_options(temperature=False),
    with_options(temperature=[1]),
    with_options(top_p="0.9"),
    with_options(top_p=True),
    with_options(max_tokens=1.5),
    with_options(max_tokens=10.0),
    with_options(max_tokens="10"),
    with_options(max_tokens=True),
    with_options(enable_thinking=1),
    with_options(enable_thinking="true"),
    {"type": "turn.cancel", "turn_id": 5},
    {"type": "turn.cancel", "turn_id": ["t"]},
    {"type": "turn.resume", "turn_id": 7, "after_seq": 0},
    {"type": "turn.resume", "turn_id": "t", "after_seq": "1"},
    {"type": "turn.resume", "turn_id": "t", "after_seq": 1.0},
    {"type": "turn.resume", "turn_id": "t", "after_seq": True},
    {"type": "turn.resume", "turn_id": "t", "after_seq": False},
    {"type": "history.get", "limit": "10"},
    {"type": "history.get", "limit": 10.0},
    {"type": "history.get", "limit": True},
    {"type": "history.get", "before": 5},
    {"type": "history.get", "conversation_id": 5},
    {"type": "history.clear", "conversation_id": ["a"]},
    {"type": "ping", "t": "now"},
    {"type": "ping", "t": True},
    {"type": "pong", "t": [1]},
    {"type": "pong", "t": False},
    {"type": "hello", "token": 5},
    {"type": "hello", "user": 5},
    {"type": "hello", "user": True},
    {"type": "hello", "client": "ios"},
    {"type": "hello", "client": {"name": 5}},
    {"type": "hello", "client": {"version": 1.2}},
])
def test_wrong_field_type(obj: dict[str, Any]) -> None:
    bad(obj)


@pytest.mark.parametrize("text", [5, 1.5, True, ["hi"], {"t": "hi"}, b"hi"])
def test_non_string_text_carries_client_turn_id(text: Any) -> None:
    err = bad(start(text=text))
    assert err.fields == {"client_turn_id": "c-1"}


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize("value", [0, 0.0, 1.0, 2, 2.0])
def test_temperature_bounds_are_inclusive(value: float) -> None:
    frame = parse(with_options(temperature=value))
    assert isinstance(frame, TurnStart) and frame.options.temperature == value


@pytest.mark.parametrize("value", [-0.0001, -1, 2.0001, 3, float("inf"), float("-inf"), float("nan")])
def test_temperature_out_of_range(value: float) -> None:
    bad(with_options(temperature=value))


@pytest.mark.parametrize("value", [1e-9, 0.5, 1, 1.0])
def test_top_p_in_range(value: float) -> None:
    frame = parse(with_options(top_p=value))
    assert isinstance(frame, TurnStart) and frame.options.top_p == value


@pytest.mark.parametrize("value", [0, 0.0, -0.0])
def test_top_p_zero_is_refused(value: float) -> None:
    err = bad(with_options(top_p=value))
    assert err.fields == {"client_turn_id": "c-1"}


@pytest.mark.parametrize("value", [-0.1, 1.0001, 2, float("nan"), float("inf")])
def test_top_p_out_of_range(value: float) -> None:
    bad(with_options(top_p=value))


@pytest.mark.parametrize("value", [1, 256, 1_000_000])
def test_max_tokens_in_range(value: int) -> None:
    frame = parse(with_options(max_tokens=value))
    assert isinstance(frame, TurnStart) and frame.options.max_tokens == value


@pytest.mark.parametrize("value", [0, -1, 1_000_001, 2**63])
def test_max_tokens_out_of_range(value: int) -> None:
    bad(with_options(max_tokens=value))


@pytest.mark.parametrize("value", [0, -1, 101, 1000])
def test_history_limit_out_of_range(value: int) -> None:
    bad({"type": "history.get", "limit": value})


@pytest.mark.parametrize("value", [-1, -(2**31), 2**53 + 1])
def test_after_seq_out_of_range(value: int) -> None:
    bad({"type": "turn.resume", "turn_id": "t", "after_seq": value})


@pytest.mark.parametrize("options", [{"temperature": 5}, {"top_p": 1.5}, {"max_tokens": 0},
                                     {"enable_thinking": "yes"}])
def test_option_errors_carry_client_turn_id(options: dict[str, Any]) -> None:
    err = bad(start(options=options))
    assert err.fields.get("client_turn_id") == "c-1"


# ---------------------------------------------------------------- string lengths


def test_client_turn_id_up_to_64_chars() -> None:
    frame = parse(start(client_turn_id="c" * 64))
    assert isinstance(frame, TurnStart) and frame.client_turn_id == "c" * 64


@pytest.mark.parametrize("length", [65, 1000])
def test_client_turn_id_over_64_chars(length: int) -> None:
    bad(start(client_turn_id="c" * length))


def test_empty_client_turn_id() -> None:
    bad(start(client_turn_id=""))


@pytest.mark.parametrize("text", ["", " ", "   ", "\n\t \r\n", "\u3000", "\u00a0"])
def test_empty_or_whitespace_text(text: str) -> None:
    err = bad(start(text=text))
    assert err.fields == {"client_turn_id": "c-1"}


def test_text_at_max_input_chars() -> None:
    assert isinstance(parse(start(text="x" * MAX_INPUT)), TurnStart)


def test_text_limit_counts_characters_not_bytes() -> None:
    frame = parse(start(text="😀" * MAX_INPUT))  # 400 UTF-8 bytes, 100 characters
    assert isinstance(frame, TurnStart)
    assert isinstance(parse(start(text="你" * MAX_INPUT)), TurnStart)


@pytest.mark.parametrize("text", ["x" * (MAX_INPUT + 1), "你" * (MAX_INPUT + 1), "y" * 100_000])
def test_text_over_max_input_chars_is_too_large(text: str) -> None:
    with pytest.raises(TooLarge) as exc:
        parse(start(text=text))
    assert exc.value.code == "too_large"
    assert exc.value.fields == {"client_turn_id": "c-1"}
    assert frames.error_from(exc.value)["client_turn_id"] == "c-1"


def test_max_input_chars_is_the_callers() -> None:
    obj = start(text="x" * 10)
    assert isinstance(frames.parse_client_frame(obj, max_input_chars=10), TurnStart)
    with pytest.raises(TooLarge):
        frames.parse_client_frame(obj, max_input_chars=9)


@pytest.mark.parametrize(("obj", "ok"), [
    (start(conversation_id="c" * 128), True),
    (start(conversation_id="c" * 129), False),
    (start(conversation_id=""), False),
    ({"type": "turn.cancel", "turn_id": "t" * 128}, True),
    ({"type": "turn.cancel", "turn_id": "t" * 129}, False),
    ({"type": "turn.cancel", "turn_id": ""}, False),
    ({"type": "turn.resume", "turn_id": "", "after_seq": 0}, False),
    ({"type": "history.get", "before": "m" * 64}, True),
    ({"type": "history.get", "before": "m" * 65}, False),
    ({"type": "history.get", "conversation_id": ""}, False),
    ({"type": "history.clear", "conversation_id": "c" * 129}, False),
    ({"type": "hello", "user": "u" * 128}, True),
    ({"type": "hello", "user": "u" * 129}, False),
    ({"type": "hello", "token": "t" * 8192}, True),
    ({"type": "hello", "token": "t" * 8193}, False),
    ({"type": "hello", "client": {"name": "n" * 201}}, False),
])
def test_field_lengths(obj: dict[str, Any], ok: bool) -> None:
    if ok:
        parse(obj)
    else:
        bad(obj)


# ---------------------------------------------------------------- server frames


def test_error_frame_from_exception() -> None:
    exc = TooLarge("too long", client_turn_id="c-1", turn_id=None)
    assert frames.error_from(exc) == {"type": "error", "code": "too_large", "message": "too long",
                                      "client_turn_id": "c-1"}
    assert frames.error_from(BadRequest("nope")) == {"type": "error", "code": "bad_request",
                                                     "message": "nope"}


def test_error_frame_drops_none_fields() -> None:
    assert frames.error("busy", "later", retry_after_ms=250, turn_id=None) == {
        "type": "error", "code": "busy", "message": "later", "retry_after_ms": 250}


def test_ping_and_pong_frames_keep_falsy_t() -> None:
    assert frames.ping() == {"type": "ping"}
    assert frames.ping(0) == {"type": "ping", "t": 0}
    assert frames.pong(None) == {"type": "pong"}
    assert frames.pong(0.0) == {"type": "pong", "t": 0.0}
    assert frames.pong(12.5) == {"type": "pong", "t": 12.5}


def test_ready_frame_has_the_contract_fields() -> None:
    frame = frames.ready(session_id="s", user_id="u", model="m", interval_ms=15_000, timeout_ms=45_000,
                         max_frame_bytes=65_536, max_input_chars=4000, turns_per_minute=30,
                         active_turns=[{"turn_id": "t", "conversation_id": "c", "last_seq": 3}])
    assert frame == {
        "type": "ready", "session_id": "s", "user_id": "u", "protocol": "rapport.v1", "model": "m",
        "heartbeat": {"interval_ms": 15_000, "timeout_ms": 45_000},
        "limits": {"max_frame_bytes": 65_536, "max_input_chars": 4000, "turns_per_minute": 30},
        "active_turns": [{"turn_id": "t", "conversation_id": "c", "last_seq": 3}],
    }


def test_turn_frames_have_the_contract_fields() -> None:
    assert frames.turn_accepted(turn_id="t", client_turn_id="c", conversation_id="default",
                                replayed=False) == {
        "type": "turn.accepted", "turn_id": "t", "client_turn_id": "c",
        "conversation_id": "default", "replayed": False}
    assert frames.turn_delta("t", 1, "hi") == {"type": "turn.delta", "turn_id": "t", "seq": 1,
                                               "text": "hi"}
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "cached_prompt_tokens": 0}
    timings = {"queue_ms": 1.0, "ttft_ms": None, "total_ms": 3.0}
    assert frames.turn_end(turn_id="t", seq=0, finish_reason="cancelled", text="", usage=usage,
                           timings=timings) == {
        "type": "turn.end", "turn_id": "t", "seq": 0, "finish_reason": "cancelled", "text": "",
        "usage": usage, "timings": timings}


def test_history_frames() -> None:
    msgs = [{"id": "m1", "role": "user", "text": "hi", "turn_id": "t", "status": "done",
             "created_at": 1.0}]
    assert frames.history("c", msgs) == {"type": "history", "conversation_id": "c", "messages": msgs}
    assert frames.history_cleared("c") == {"type": "history.cleared", "conversation_id": "c"}
