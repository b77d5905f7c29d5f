"""Malformed input for a running gateway, and the contract it is checked against.

One generator for ``tests/test_fuzz.py`` (a short, seeded run in the suite) and
``bench/fuzz.py`` (a long run that watches the server's memory). Everything is
drawn from a :class:`random.Random`, so a seed reproduces a failing case in
either place.

What is generated:

* WebSocket frames for both subprotocols: valid-looking client frames with
  fields replaced by wrong types, huge, deeply nested, unicode and lone
  surrogate values, NaN/Infinity, big ints, MessagePack bin/ext/timestamp
  values and non-string map keys, fields dropped or added, unknown and
  near-miss ``type``s; also non-map top levels, truncated and corrupted
  encodings, random bytes, frames of the wrong kind for the subprotocol,
  text frames that are not UTF-8 and frames over ``max_frame_bytes``.
* ``POST /v1/chat/completions`` requests: mutated valid bodies, bodies that
  are not JSON, not UTF-8, not objects, empty or too big, and missing or
  broken credentials.

What is checked (:class:`SessionReport`, :class:`RequestReport`): the server
never answers ``error`` ``internal``, never closes 1011, closes only with a
code the contract gives for what was sent (1007 invalid UTF-8, 1009 over size,
1008 a flood, 4401 before ``ready``), answers every socket it keeps open, and
over HTTP never answers 500 and always answers an error status with an
OpenAI-style JSON error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
from websockets.exceptions import ConnectionClosed

from clients.driver import Driver
from clients.errors import ClientError
from clients.target import mint_token
from protocol import client_frames, close_codes
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from protocol.errors import BadRequest

SUBPROTOCOLS = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)

#: The server's default ``max_frame_bytes``; frames over it must close the socket with 1009.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024

#: ``t`` of the ping that ends a session: its pong proves every earlier frame was handled.
SENTINEL_T = -7_357_735.5

#: How long a socket the server kept open may take to answer the sentinel ping.
ANSWER_TIMEOUT_S = 15.0

#: Stands for "the turn this socket started last" in generated frames: a session
#: swaps in the real id (same length, so either encoding stays well formed)
#: before sending, so cancels and resumes also reach turns that exist.
LIVE_TURN_PLACEHOLDER = "t_" + "~" * 32


# ---------------------------------------------------------------- values

#: Placeholders for bytes no encoder would produce (invalid UTF-8 inside a string,
#: nesting deeper than any encoder allows, integers too long to print): the value
#: carries an ASCII token, and the encoded frame gets the raw bytes in its place.
_SPLICE_TOKEN = "~~fuzz-splice-{}~~"


@dataclass(frozen=True, slots=True)
class _Splice:
    json: bytes
    msgpack: bytes


class _Splices:
    def __init__(self) -> None:
        self.by_token: dict[str, _Splice] = {}

    def add(self, json_bytes: bytes, msgpack_bytes: bytes) -> str:
        token = _SPLICE_TOKEN.format(len(self.by_token))
        self.by_token[token] = _Splice(json_bytes, msgpack_bytes)
        return token


_UNICODE_SAMPLES = [
    "你好，今天怎么样？", "😀", "👩‍👩‍👧‍👦", "e\u0301", "\u202eRTL override", "\u200b\u200c\u200d\ufeff",
    "\x00", "\x7f", "\u0085", "\u2028\u2029", "\r\n", "\t", "𝕳𝖊𝖑𝖑𝖔", "Ω≈ç√∫", "\U0010ffff", "\ufffd",
    "مرحبا", "שלום", "नमस्ते",
]
_SURROGATES = ["\ud800", "\udfff", "a\udc80b", "\ud83d", "\ude00\ud83d"]
_ID_LIKE = ["t_" + "0" * 32, "0-0", "1-1", "18446744073709551615-0", "-", "+", "$", "*", "{user}", "a}b{c",
            "default", "..", "../../etc/passwd", "%s%n", "' OR 1=1 --", "\\", "null", "NaN"]
_NUMBERS: list[Any] = [0, -1, 1, 2, 63, 64, 65, 100, 101, 4000, 4001, 2**31, 2**53 + 1, 2**63 - 1, -(2**63),
                       2**64 - 1, 10**30, -(10**30), 0.0, -0.0, 0.5, 1.5, 2.0000001, 1e308, -1e308, 5e-324,
                       float("nan"), float("inf"), float("-inf")]
_INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82",
                 b"a\xc3", b"\xf8\x88\x80\x80\x80"]
#: Mostly over some field limit but under the frame limit; now and then over that too (1009).
_LONG_LENGTHS = [65, 129, 4001, 8193, 12_000, 65, 129, 4001, 8193, 12_000, 70_000]


def _long_string(rng: random.Random) -> str:
    unit = rng.choice(["x", "好", "😀", " ", "\\", '"'])
    return unit * rng.choice(_LONG_LENGTHS)


def _invalid_utf8_string(rng: random.Random, splices: _Splices) -> str:
    raw = b"ok" + rng.choice(_INVALID_UTF8) + b"ok"
    # fixstr header (0xa0 | length) for MessagePack; quotes for JSON.
    return splices.add(b'"' + raw + b'"', bytes([0xA0 | len(raw)]) + raw)


def _deep(rng: random.Random, splices: _Splices) -> str:
    depth = rng.choice([64, 200, 1_000, 5_000])
    if rng.random() < 0.5:
        as_json = b"[" * depth + b"]" * depth
    else:
        as_json = b'{"a":' * depth + b"1" + b"}" * depth
    # fixarray of one element, nested: MessagePack's unpacker has a stack limit.
    as_msgpack = b"\x91" * depth + b"\xc0"
    return splices.add(as_json, as_msgpack)


def _huge_int(rng: random.Random, splices: _Splices) -> str:
    digits = rng.choice([20, 400, 4_301, 10_000])
    # MessagePack has no integer wider than 64 bits: the widest it has, then a float that overflows.
    as_msgpack = rng.choice([b"\xcf" + b"\xff" * 8, b"\xd3" + b"\x80" + b"\x00" * 7, b"\xcb\x7f\xf0" + b"\x00" * 6])
    return splices.add(b"9" * digits, as_msgpack)


def _json_literal(rng: random.Random, splices: _Splices) -> str:
    """Number spellings Python's own JSON writer never produces."""
    literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1E+999999", b"0.0e-99999",
                          b"-0", b"1.0", b"true", b"null"])
    return splices.add(literal, msgpack.packb(float("nan")))


def _raw_ext(code: int, data: bytes, splices: _Splices) -> str:
    """An ext8 value (0xc7, length, signed type, data): ExtType refuses the reserved negative types."""
    return splices.add(b'"ext"', b"\xc7" + bytes([len(data), code & 0xFF]) + data)


def _msgpack_only(rng: random.Random, splices: _Splices) -> Any:
    """Values only MessagePack carries (JSON sends a stand-in): bin, ext, timestamps."""
    choice = rng.randrange(4)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 40))
    if choice == 1:
        return msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(rng.randrange(0, 20)))
    if choice == 2:
        # Ext type -1 is MessagePack's timestamp: valid with 4, 8 or 12 bytes of data.
        return _raw_ext(-1, rng.randbytes(rng.choice([4, 8, 12, 3, 0])), splices)
    return _raw_ext(rng.randrange(-128, 0), rng.randbytes(rng.randrange(0, 8)), splices)


def nasty_value(rng: random.Random, splices: _Splices, depth: int = 0) -> Any:
    """One value a client should not send where a field is expected."""
    roll = rng.random()
    if roll < 0.08:
        return rng.choice([None, True, False])
    if roll < 0.25:
        return rng.choice(_NUMBERS)
    if roll < 0.35:
        return rng.choice(_UNICODE_SAMPLES) * rng.randrange(1, 4)
    if roll < 0.42:
        return rng.choice(_SURROGATES)
    if roll < 0.50:
        return rng.choice(_ID_LIKE)
    if roll < 0.55:
        return _long_string(rng)
    if roll < 0.60:
        return "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(0, 12)))
    if roll < 0.66:
        return _msgpack_only(rng, splices)
    if roll < 0.675:
        return _invalid_utf8_string(rng, splices)
    if roll < 0.74:
        return _deep(rng, splices)
    if roll < 0.77:
        return _huge_int(rng, splices)
    if roll < 0.80:
        return _json_literal(rng, splices)
    if roll < 0.85:
        return ""
    if depth >= 2:
        return rng.choice([[], {}])
    if roll < 0.93:
        return [nasty_value(rng, splices, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys: list[Any] = ["type", "text", "t", "a", "", "😀"]
    if rng.random() < 0.3:
        # Not strings: JSON turns them into strings, MessagePack keeps them (and the server refuses them).
        keys += [1, -1, 2.5, True, None, b"bin-key"]
    return {rng.choice(keys): nasty_value(rng, splices, depth + 1) for _ in range(rng.randrange(0, 4))}


# ---------------------------------------------------------------- encoding


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return repr(value)


def _for_msgpack(value: Any, splices: _Splices) -> Any:
    """``value`` as packb takes it: surrogates and out-of-range ints become splices."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raw = value.encode("utf-8", "surrogatepass")
            header = bytes([0xA0 | len(raw)]) if len(raw) < 32 else b"\xd9" + bytes([min(len(raw), 255)])
            return splices.add(b'"x"', header + raw[:255])
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, dict):
            return {_for_msgpack(k, splices): _for_msgpack(v, splices) for k, v in value.items()}
        if isinstance(value, list):
            return [_for_msgpack(v, splices) for v in value]
        return value
    return max(-(2**63), min(2**64 - 1, value))


def _apply_splices(data: bytes, splices: _Splices, kind: str) -> bytes:
    for token, splice in splices.by_token.items():
        raw = splice.json if kind == "json" else splice.msgpack
        if kind == "json":
            data = data.replace(b'"' + token.encode() + b'"', raw)
        else:
            data = data.replace(msgpack.packb(token), raw)
    return data


def encode(value: Any, subprotocol: str, splices: _Splices, rng: random.Random) -> bytes:
    """``value`` as the subprotocol's bytes (a text frame's UTF-8, or MessagePack)."""
    if subprotocol == MSGPACK_SUBPROTOCOL:
        packed = msgpack.packb(_for_msgpack(value, splices), use_bin_type=rng.random() < 0.9)
        return _apply_splices(packed, splices, "msgpack")
    ascii_only = rng.random() < 0.5
    text = json.dumps(value, ensure_ascii=ascii_only, default=_json_default, skipkeys=True)
    if not ascii_only and rng.random() < 0.9 and not is_utf8(text.encode("utf-8", "surrogatepass")):
        # Mostly the escaped form ("\ud800"), which the server must refuse with an error frame;
        # now and then the raw form, which it must refuse by closing 1007.
        text = json.dumps(value, ensure_ascii=True, default=_json_default, skipkeys=True)
    # Unescaped lone surrogates cannot be UTF-8: they become bytes a text frame must not carry.
    return _apply_splices(text.encode("utf-8", "surrogatepass"), splices, "json")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------- tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def crafted_token(rng: random.Random, jwt_secret: str | None) -> str:
    """A JWT-shaped token with fuzzed header and claims, HS256-signed with ``jwt_secret`` when given.

    Signed with the server's own secret, its claims get past the signature to
    the checks behind it (``sub``, ``exp``/``nbf``/``iat``, roles); without it,
    only the parsing before the signature is reached.
    """
    splices = _Splices()
    now = int(time.time())
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    claims: dict[str, Any] = {"sub": "fuzz-" + uuid.UUID(int=rng.getrandbits(128)).hex[:8], "exp": now + 600,
                              "iat": now}
    for _ in range(rng.randrange(0, 3)):
        mutate(rng, claims, splices, ["sub", "exp", "nbf", "iat", "iss", "aud", "roles", "jti"])
    if rng.random() < 0.2:
        mutate(rng, header, splices, ["alg", "typ", "kid", "crit", "jku", "x5u"])
    signing_input = _b64url(encode(header, JSON_SUBPROTOCOL, splices, rng)) + "." \
        + _b64url(encode(claims, JSON_SUBPROTOCOL, splices, rng))
    if jwt_secret is not None and rng.random() < 0.8:
        signature = hmac.new(jwt_secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    else:
        signature = rng.randbytes(32)
    return signing_input + "." + _b64url(signature)


# ---------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class FuzzFrame:
    """One WebSocket message: its bytes, whether it goes as a text frame, and what it is meant to be."""

    data: bytes
    text: bool
    label: str

    @property
    def invalid_utf8(self) -> bool:
        return self.text and not is_utf8(self.data)

    def fails_connection(self, max_frame_bytes: int) -> bool:
        """A frame the server must answer by closing (1007 or 1009), not with an error frame."""
        return self.invalid_utf8 or len(self.data) > max_frame_bytes


def valid_frame(rng: random.Random, user: str, jwt_secret: str | None = None) -> dict[str, Any]:
    """A frame a correct client could send (hello included, which is only valid first).

    Its ``hello`` carries a crafted token now and then (see :func:`crafted_token`).
    """
    conversation = rng.choice([None, "default", "fuzz", "c-" + uuid.uuid4().hex[:6]])
    kind = rng.choice(["turn.start", "turn.start", "turn.cancel", "turn.resume", "history.get", "history.clear",
                       "ping", "pong", "hello"])
    if kind == "turn.start":
        options = client_frames.turn_options(temperature=rng.choice([None, 0.0, 0.7, 2.0]),
                                             top_p=rng.choice([None, 0.5, 1.0]),
                                             max_tokens=rng.choice([None, 1, 4, 16]),
                                             enable_thinking=rng.choice([None, False, True]))
        # A few fixed idempotency keys, so some starts are replays of earlier ones.
        client_turn_id = rng.choice([None, None, "fuzz-ctid-1", "fuzz-ctid-2"])
        return client_frames.turn_start(rng.choice(["hi", "hello there", "你好", "tell me a story"]),
                                        client_turn_id=client_turn_id, conversation_id=conversation,
                                        options=options or None)
    turn_id = LIVE_TURN_PLACEHOLDER if rng.random() < 0.6 else "t_" + uuid.uuid4().hex
    if kind == "turn.cancel":
        return client_frames.turn_cancel(turn_id)
    if kind == "turn.resume":
        return client_frames.turn_resume(turn_id, rng.choice([0, 1, 2, 5, 2**53]))
    if kind == "history.get":
        return client_frames.history_get(conversation_id=conversation, limit=rng.choice([None, 1, 50, 100]),
                                         before=rng.choice([None, "0-0", "1-0", "9999999999999-0"]))
    if kind == "history.clear":
        return client_frames.history_clear(conversation_id=conversation)
    if kind == "ping":
        return client_frames.ping(rng.choice([None, 0, 1.5, int(time.time() * 1000)]))
    if kind == "pong":
        return client_frames.pong(rng.choice([None, 0, 12]))
    token = crafted_token(rng, jwt_secret) if rng.random() < 0.3 else None
    return client_frames.hello(user=user, token=token, client={"name": "fuzz", "version": "1"})


_NEAR_MISS_TYPES = ["turn.Start", "turn.start ", " turn.start", "turn_start", "turn.", "turn.start\x00", "TURN.START",
                    "ping.", "hello2", "history", "error", "ready", "turn.delta", "turn.end", "", "🤖", "t" * 500]
_FIELD_NAMES = ["type", "client_turn_id", "text", "conversation_id", "options", "turn_id", "after_seq", "limit",
                "before", "t", "token", "user", "client", "coalesce", "extra", "__proto__", "constructor"]
_OPTION_NAMES = ["temperature", "top_p", "max_tokens", "enable_thinking", "stop", "seed"]


def _containers(obj: Any) -> list[Any]:
    """Every dict and list inside ``obj`` (itself included), for mutation to pick from."""
    found: list[Any] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            found.append(item)
            stack.extend(item)
    return found


def mutate(rng: random.Random, obj: dict[str, Any], splices: _Splices, names: list[str]) -> None:
    """Change ``obj`` in place: replace, drop or add one field somewhere inside it."""
    target = rng.choice(_containers(obj))
    roll = rng.random()
    if isinstance(target, list):
        if target and roll < 0.5:
            target[rng.randrange(len(target))] = nasty_value(rng, splices)
        elif target and roll < 0.7:
            target.pop(rng.randrange(len(target)))
        else:
            target.append(nasty_value(rng, splices))
        return
    if target and roll < 0.55:
        target[rng.choice(list(target))] = nasty_value(rng, splices)
    elif target and roll < 0.70:
        del target[rng.choice(list(target))]
    else:
        target[rng.choice(names)] = nasty_value(rng, splices)


def fuzz_frame(rng: random.Random, subprotocol: str, *, user: str,
               max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, jwt_secret: str | None = None) -> FuzzFrame:
    """One frame for a socket speaking ``subprotocol``; ``jwt_secret`` signs the tokens of some hellos."""
    text = subprotocol == JSON_SUBPROTOCOL
    splices = _Splices()
    roll = rng.random()
    if roll < 0.15:
        frame = valid_frame(rng, user, jwt_secret)
        return FuzzFrame(encode(frame, subprotocol, splices, rng), text, "valid:" + frame["type"])
    if roll < 0.62:
        frame = valid_frame(rng, user, jwt_secret)
        label = "mutated:" + frame["type"]
        for _ in range(rng.randrange(1, 4)):
            mutate(rng, frame, splices, [*_FIELD_NAMES, *_OPTION_NAMES])
        if rng.random() < 0.1:
            frame["type"] = rng.choice(_NEAR_MISS_TYPES)
            label = "unknown-type"
        return FuzzFrame(encode(frame, subprotocol, splices, rng), text, label)
    if roll < 0.70:
        top = rng.choice([[], [1, 2], "type", 0, None, 1.5, True]) if rng.random() < 0.5 \
            else nasty_value(rng, splices)
        if isinstance(top, dict):
            top = [top]
        return FuzzFrame(encode(top, subprotocol, splices, rng), text, "not-a-map")
    if roll < 0.78:
        encoded = encode(valid_frame(rng, user), subprotocol, splices, rng)
        cut = rng.randrange(0, len(encoded))
        corrupted = bytearray(encoded[:cut] if rng.random() < 0.5 else encoded)
        if corrupted and rng.random() < 0.5:
            corrupted[rng.randrange(len(corrupted))] = rng.randrange(256)
        data = bytes(corrupted)
        if text and not is_utf8(data):
            data = data.decode("utf-8", "replace").encode("utf-8")  # corrupt JSON, not corrupt UTF-8
        return FuzzFrame(data, text, "corrupted")
    if roll < 0.86:
        return FuzzFrame(rng.randbytes(rng.randrange(0, 200)), False, "random-binary")
    if roll < 0.91:
        junk = "".join(rng.choice('{}[]":,.0123456789-eE tnrufals\\u"ype') for _ in range(rng.randrange(0, 80)))
        return FuzzFrame(junk.encode(), True, "random-text")
    if roll < 0.97:
        # The right encoding in the wrong kind of frame for the subprotocol.
        other = MSGPACK_SUBPROTOCOL if text else JSON_SUBPROTOCOL
        return FuzzFrame(encode(valid_frame(rng, user), other, splices, rng), not text, "wrong-frame-kind")
    if roll < 0.98:
        raw = b'{"type":"ping","t":"' + rng.choice(_INVALID_UTF8) + b'"}'
        return FuzzFrame(raw, True, "invalid-utf8-text")
    if roll < 0.99:
        frame = client_frames.turn_start("x" * (max_frame_bytes + rng.randrange(1, 2048)))
        return FuzzFrame(encode(frame, subprotocol, splices, rng), text, "over-size")
    # A frame at the limit (JSON: exactly; MessagePack: within a few bytes) must be parsed, not refused.
    frame = client_frames.ping(0)
    frame["padding"] = ""
    padding = max_frame_bytes - len(encode(frame, subprotocol, splices, rng)) - 4
    frame["padding"] = "p" * padding
    data = encode(frame, subprotocol, splices, rng)
    return FuzzFrame(data + b" " * (max_frame_bytes - len(data)) if text else data, text, "at-size-limit")


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """One socket's worth of fuzzing: its subprotocol, whether it says hello first, its frames."""

    subprotocol: str
    user: str
    hello_first: bool
    frames: tuple[FuzzFrame, ...]


def session_plan(rng: random.Random, *, subprotocol: str | None = None, max_frames: int = 30,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, jwt_secret: str | None = None) -> SessionPlan:
    subprotocol = subprotocol or rng.choice(SUBPROTOCOLS)
    user = "fuzz-" + uuid.UUID(int=rng.getrandbits(128)).hex[:12]
    frames: list[FuzzFrame] = []
    for _ in range(rng.randrange(1, max_frames + 1)):
        frames.append(fuzz_frame(rng, subprotocol, user=user, max_frame_bytes=max_frame_bytes,
                                 jwt_secret=jwt_secret))
        if frames[-1].fails_connection(max_frame_bytes):
            # The session ends here: the server closes the socket, and frames sent
            # after it would race that close (a reset can swallow the close frame).
            break
    return SessionPlan(subprotocol=subprotocol, user=user, hello_first=rng.random() < 0.8,
                       frames=tuple(frames))


# ---------------------------------------------------------------- a session against the server


@dataclass
class SessionReport:
    frames_sent: int = 0
    #: Server frames by type; errors as ``error:<code>``.
    answers: Counter[str] = field(default_factory=Counter)
    #: The close code the server sent (None: the socket stayed open until the client closed it).
    close_code: int | None = None
    close_reason: str = ""
    violations: list[str] = field(default_factory=list)


def allowed_close_codes(sent: list[FuzzFrame], *, ready: bool, flood_burst: int | None,
                        max_frame_bytes: int) -> set[int]:
    """The close codes the contract gives for what this socket sent."""
    allowed = set()
    if any(f.invalid_utf8 for f in sent):
        allowed.add(close_codes.INVALID_PAYLOAD)
    if any(len(f.data) > max_frame_bytes for f in sent):
        allowed.add(close_codes.TOO_BIG)
    if flood_burst is not None and len(sent) > flood_burst:
        allowed.add(close_codes.POLICY)
    if not ready:
        allowed.add(close_codes.UNAUTHORIZED)
    return allowed


class _Reader:
    """Reads every server frame of one socket in the background, noting what breaks the contract."""

    def __init__(self, driver: Driver, report: SessionReport) -> None:
        self.driver = driver
        self.report = report
        self.ready = asyncio.Event()
        self.sentinel = asyncio.Event()
        self.closed = asyncio.Event()
        #: The id of the last turn the server accepted on this socket, for LIVE_TURN_PLACEHOLDER.
        self.last_turn_id: str | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        ws, codec = self.driver.ws, self.driver.codec
        try:
            while True:
                data = await ws.recv()
                try:
                    frame = codec.decode(data)
                except BadRequest as exc:
                    self.report.violations.append(f"undecodable server frame: {exc.message}")
                    continue
                kind = frame.get("type")
                if not isinstance(kind, str):
                    self.report.violations.append(f"server frame without a string type: {frame!r:.200}")
                    continue
                if kind == "error":
                    code = frame.get("code")
                    self.report.answers[f"error:{code}"] += 1
                    if code == "internal":
                        self.report.violations.append(f"error internal: {frame!r:.300}")
                    continue
                self.report.answers[kind] += 1
                if kind == "ready":
                    self.ready.set()
                elif kind == "turn.accepted" and isinstance(frame.get("turn_id"), str):
                    self.last_turn_id = frame["turn_id"]
                elif kind == "pong" and frame.get("t") == SENTINEL_T:
                    self.sentinel.set()
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                self.report.close_code = exc.rcvd.code
                self.report.close_reason = exc.rcvd.reason
            else:
                self.report.close_code = close_codes.ABNORMAL
        finally:
            self.closed.set()

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Until ``event`` or the close; True when ``event`` came."""
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.closed.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        return event.is_set()


def _with_live_turn(data: bytes, turn_id: str | None) -> bytes:
    if turn_id is None or len(turn_id) != len(LIVE_TURN_PLACEHOLDER):
        return data
    return data.replace(LIVE_TURN_PLACEHOLDER.encode(), turn_id.encode())


async def run_session(url: str, plan: SessionPlan, *, flood_burst: int | None = None,
                      max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> SessionReport:
    """Send ``plan``'s frames on one socket and check every answer and the close.

    Afterwards, unless the server closed the socket: a valid ``hello`` if
    ``ready`` never came, then a ping whose pong must arrive, which shows that
    the server handled everything sent before it and still serves this socket.
    ``flood_burst`` is the server's ``--frame-burst`` when the fuzzer may exceed
    it (a 1008 is then the contract's answer); None when it is raised out of reach.
    """
    report = SessionReport()
    try:
        driver = await Driver.open(url, subprotocol=plan.subprotocol, user=plan.user if plan.hello_first else None,
                                   hello=plan.hello_first)
    except ClientError as exc:
        report.violations.append(f"could not open a session: {exc!r}")
        return report
    reader = _Reader(driver, report)
    if plan.hello_first:
        reader.ready.set()
    sent: list[FuzzFrame] = []
    try:
        for frame in plan.frames:
            if reader.closed.is_set():
                break
            try:
                # text=True sends the bytes as a text frame as they are, UTF-8 or not.
                await driver.ws.send(_with_live_turn(frame.data, reader.last_turn_id), text=frame.text)
            except ConnectionClosed:
                break
            sent.append(frame)
        if sent and sent[-1].fails_connection(max_frame_bytes):
            if not await reader.wait(reader.closed, ANSWER_TIMEOUT_S):
                report.violations.append(f"{sent[-1].label} ({len(sent[-1].data)} bytes) did not close the socket")
        elif not reader.closed.is_set() and not reader.ready.is_set():
            with contextlib.suppress(ClientError):
                await driver.send(client_frames.hello(user=plan.user))
            await reader.wait(reader.ready, ANSWER_TIMEOUT_S)
        if not reader.closed.is_set():
            with contextlib.suppress(ClientError):
                await driver.send(client_frames.ping(SENTINEL_T))
            if not await reader.wait(reader.sentinel, ANSWER_TIMEOUT_S) and not reader.closed.is_set():
                report.violations.append(f"no pong within {ANSWER_TIMEOUT_S:.0f} s after {len(sent)} frames")
    finally:
        report.frames_sent = len(sent)
        server_closed = reader.closed.is_set()
        with contextlib.suppress(ConnectionClosed, OSError):
            await asyncio.wait_for(driver.close(), 5.0)
        if not reader.closed.is_set():
            driver.abort()
        await asyncio.gather(reader.task, return_exceptions=True)
        if not server_closed:
            report.close_code = None  # our own close, echoed
    if report.close_code is not None:
        allowed = allowed_close_codes(sent, ready=reader.ready.is_set(), flood_burst=flood_burst,
                                      max_frame_bytes=max_frame_bytes)
        if report.close_code not in allowed:
            labels = Counter(f.label for f in sent)
            report.violations.append(f"closed {report.close_code} ({report.close_reason!r}); allowed {sorted(allowed)}"
                                     f" after {len(sent)} frames {dict(labels)}")
    return report


async def honest_turn(url: str, subprotocol: str, *, attempts: int = 20) -> str | None:
    """A fresh user on a fresh socket completes a turn; None, or what went wrong.

    ``busy`` and ``rate_limited`` are answers the contract allows while fuzzed
    turns occupy the engine: the turn is sent again after ``retry_after_ms``.
    """
    user = "honest-" + uuid.uuid4().hex[:10]
    try:
        async with await Driver.open(url, subprotocol=subprotocol, user=user) as driver:
            for _ in range(attempts):
                await driver.send(client_frames.turn_start("are you there?"))
                frames: list[dict[str, Any]] = []
                async with asyncio.timeout(30.0):
                    while True:
                        frame = await driver.recv(timeout=None)
                        frames.append(frame)
                        if frame["type"] in ("turn.end", "error"):
                            break
                last = frames[-1]
                if last["type"] == "turn.end":
                    deltas = "".join(f["text"] for f in frames if f["type"] == "turn.delta")
                    if deltas != last["text"]:
                        return f"deltas {deltas!r} do not add up to the reply {last['text']!r}"
                    return None
                if last["code"] not in ("busy", "rate_limited"):
                    return f"an honest turn was answered {last!r:.300}"
                await asyncio.sleep(min(2.0, float(last.get("retry_after_ms", 100)) / 1000.0))
            return f"an honest turn was refused {attempts} times"
    except (ClientError, TimeoutError, OSError) as exc:
        return f"an honest client failed: {exc!r}"


# ---------------------------------------------------------------- the OpenAI endpoint


@dataclass(frozen=True, slots=True)
class FuzzRequest:
    body: bytes
    headers: dict[str, str]
    label: str

    @property
    def headers_may_exceed_cap(self) -> bool:
        size = sum(len(k) + len(v) + 4 for k, v in self.headers.items())
        return size + _CLIENT_HEADER_BYTES > MAX_REQUEST_HEADER_BYTES


def _valid_completion_body(rng: random.Random) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        messages.append({"role": rng.choice(["system", "developer"]), "content": "Be brief."})
    messages.append({"role": "user", "content": rng.choice(["hi", "你好", [{"type": "text", "text": "hello"}]])})
    if rng.random() < 0.3:
        messages += [{"role": "assistant", "content": "hello!"}, {"role": "user", "content": "and?"}]
    body: dict[str, Any] = {"model": rng.choice(["rapport", "gpt-4o", "x"]), "messages": messages,
                            "max_tokens": rng.choice([1, 4, 8])}
    if rng.random() < 0.5:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": rng.random() < 0.5}
    for name, values in (("temperature", [0.0, 0.7]), ("top_p", [0.9, 1.0]), ("stop", ["\n", ["a", "b"]]),
                         ("seed", [1, 42]), ("n", [1]), ("user", ["u"]), ("ignore_eos", [False]),
                         ("chat_template_kwargs", [{"enable_thinking": False}])):
        if rng.random() < 0.15:
            body[name] = rng.choice(values)
    return body


_COMPLETION_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
                      "include_usage", "temperature", "top_p", "stop", "seed", "n", "user", "ignore_eos",
                      "chat_template_kwargs", "enable_thinking", "role", "content", "text", "type", "tools"]

#: Bodies over the endpoint's limit (4 MiB) must answer 413 before any parsing.
_OVER_BODY_LIMIT = 4 * 1024 * 1024 + 1

#: The server's cap on a request's headers (docs/protocol.md, addition 7): over it
#: the HTTP layer answers a plain-text 431 before any endpoint sees the request.
MAX_REQUEST_HEADER_BYTES = 64 * 1024
#: What the HTTP client adds to the headers a fuzzed request sets (request line, Host, User-Agent, ...).
_CLIENT_HEADER_BYTES = 1024


def completion_request(rng: random.Random, token: str, jwt_secret: str | None = None) -> FuzzRequest:
    """One ``POST /v1/chat/completions``; ``token`` is a valid JWT for the server, ``jwt_secret`` its secret.

    A fresh user's token for each request lets more of them reach the engine
    rather than the per-user turn rate limit (which answers 429).
    """
    splices = _Splices()
    roll = rng.random()
    if roll < 0.15:
        body, label = encode(_valid_completion_body(rng), JSON_SUBPROTOCOL, splices, rng), "valid"
    elif roll < 0.70:
        obj = _valid_completion_body(rng)
        for _ in range(rng.randrange(1, 4)):
            mutate(rng, obj, splices, _COMPLETION_FIELDS)
        body, label = encode(obj, JSON_SUBPROTOCOL, splices, rng), "mutated"
    elif roll < 0.77:
        body, label = encode(nasty_value(rng, splices), JSON_SUBPROTOCOL, splices, rng), "not-an-object"
    elif roll < 0.83:
        body, label = rng.randbytes(rng.randrange(0, 300)), "random-bytes"
    elif roll < 0.87:
        body, label = b'{"messages":[{"role":"user","content":"' + rng.choice(_INVALID_UTF8) + b'"}]}', "invalid-utf8"
    elif roll < 0.91:
        body, label = rng.choice([b"", b" ", b"\xef\xbb\xbf", b"{", b"null", b"[]", b"{}"]), "empty-ish"
    elif roll < 0.95:
        inner = encode(_valid_completion_body(rng), JSON_SUBPROTOCOL, splices, rng)
        body, label = b"\xef\xbb\xbf" + inner, "byte-order-mark"
    elif roll < 0.97:
        body, label = b'{"messages":"' + b"x" * _OVER_BODY_LIMIT + b'"}', "over-size"
    else:
        body, label = encode(nasty_value(rng, splices), JSON_SUBPROTOCOL, splices, rng)[:100], "truncated"
    headers = {"content-type": rng.choice(["application/json"] * 4 + ["text/plain", "application/x-msgpack", ""])}
    auth = rng.random()
    if auth < 0.85:
        headers["authorization"] = f"Bearer {token}"
    elif auth < 0.90:
        headers["authorization"] = rng.choice(["Bearer", "Basic dXNlcjpwYXNz", "bearer x.y.z",
                                               "Bearer " + "a" * 5000, "Bearer eyJhbGciOiJub25lIn0.e30."])
    elif auth < 0.92:
        headers["authorization"] = f"Bearer {mint_token('fuzz', 'not-the-servers-secret-' + 'x' * 32)}"
    elif auth < 0.97:
        headers["authorization"] = f"Bearer {crafted_token(rng, jwt_secret)}"
    return FuzzRequest(body=body, headers=headers, label=label)


@dataclass
class RequestReport:
    status: int = 0
    #: OpenAI-style ``error.code`` of an error answer (None for 200).
    error_code: str | None = None
    violations: list[str] = field(default_factory=list)


def _check_error_body(response: httpx.Response, report: RequestReport) -> None:
    try:
        body = response.json()
    except ValueError:
        report.violations.append(f"HTTP {response.status_code} without a JSON body: {response.text[:200]!r}")
        return
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) \
            or not isinstance(error.get("type"), str) or "code" not in error:
        report.violations.append(f"HTTP {response.status_code} without an OpenAI-style error: {body!r:.300}")
        return
    report.error_code = str(error["code"])


def _check_stream(text: str, report: RequestReport) -> None:
    events = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        report.violations.append(f"an event stream that does not end with [DONE]: {text[-200:]!r}")
        return
    for event in events[:-1]:
        try:
            json.loads(event)
        except ValueError:
            report.violations.append(f"an event that is not JSON: {event[:200]!r}")
            return


async def send_request(client: httpx.AsyncClient, base: str, request: FuzzRequest) -> RequestReport:
    """POST ``request`` and check the answer's status and shape."""
    report = RequestReport()
    try:
        response = await client.post(base + "/v1/chat/completions", content=request.body, headers=request.headers)
    except httpx.HTTPError as exc:
        report.violations.append(f"{request.label}: the request failed: {exc!r}")
        return report
    report.status = response.status_code
    content_type = response.headers.get("content-type", "")
    if response.status_code == 431 and request.headers_may_exceed_cap:
        pass  # the HTTP layer's refusal, in its own words; the endpoint never saw the request
    elif response.status_code >= 500 and response.status_code != 503:
        report.violations.append(f"{request.label}: HTTP {response.status_code}: {response.text[:300]!r}")
    elif response.status_code >= 400:
        _check_error_body(response, report)
    elif response.status_code == 200 and content_type.startswith("text/event-stream"):
        _check_stream(response.text, report)
    elif response.status_code == 200:
        try:
            ok = isinstance(response.json().get("choices"), list)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            report.violations.append(f"{request.label}: HTTP 200 that is not a chat.completion: "
                                     f"{response.text[:200]!r}")
    else:
        report.violations.append(f"{request.label}: unexpected HTTP {response.status_code}")
    return report


# ---------------------------------------------------------------- tallies


@dataclass
class Tally:
    """What a run of many sessions and requests added up to."""

    sessions: int = 0
    frames_sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def add_session(self, report: SessionReport, describe: Callable[[], str] = lambda: "") -> None:
        self.sessions += 1
        self.frames_sent += report.frames_sent
        self.answers.update(report.answers)
        self.closes["open" if report.close_code is None else str(report.close_code)] += 1
        self.violations += [f"{describe()}{v}" for v in report.violations]

    def add_request(self, report: RequestReport, describe: Callable[[], str] = lambda: "") -> None:
        self.requests += 1
        key = str(report.status) + (f" {report.error_code}" if report.error_code else "")
        self.statuses[key] += 1
        self.violations += [f"{describe()}{v}" for v in report.violations]
