"""The one codec for both subprotocols (docs/protocol.md, "Transport").

``rapport.v1.json`` carries UTF-8 JSON in text frames; ``rapport.v1.msgpack``
carries MessagePack in binary frames. Both decode to the same plain ``dict``
that :mod:`protocol.frames` validates, and both encode the same ``dict``.
A frame of the wrong kind for the negotiated subprotocol is a ``bad_request``,
not a silent conversion, so that client bugs surface early.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

from .errors import BadRequest

JSON_SUBPROTOCOL = "rapport.v1.json"
MSGPACK_SUBPROTOCOL = "rapport.v1.msgpack"
SUBPROTOCOLS = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)


@dataclass(frozen=True, slots=True)
class Codec:
    subprotocol: str

    @property
    def binary(self) -> bool:
        return self.subprotocol == MSGPACK_SUBPROTOCOL

    def encode(self, frame: dict[str, Any]) -> str | bytes:
        if self.binary:
            packed: bytes = msgpack.packb(frame, use_bin_type=True)
            return packed
        # ensure_ascii=False keeps Chinese and emoji as UTF-8 rather than
        # \u escapes: smaller frames, and byte-identical text for clients.
        return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))

    def encode_frame(self, frame: dict[str, Any]) -> str | bytes:
        """Encode a server frame on the hot path: msgspec, ~20x faster than ``json.dumps``.

        The same maps on the wire as :meth:`encode` (compact JSON with UTF-8
        text, MessagePack str / bin types), except that a non-finite float
        becomes JSON ``null`` rather than the invalid ``NaN``. What msgspec
        refuses (a lone surrogate, an int beyond 64 bits) goes through
        :meth:`encode`, so such a frame fails or passes exactly as before.
        Decoding keeps its guards; only encoding is fast.
        """
        try:
            if self.binary:
                return _MSGPACK_ENCODE(frame)
            return _JSON_ENCODE(frame).decode("utf-8")
        except (TypeError, ValueError, OverflowError):
            return self.encode(frame)

    def decode(self, data: str | bytes) -> dict[str, Any]:
        if self.binary:
            if not isinstance(data, bytes):
                raise BadRequest("text frame on the rapport.v1.msgpack subprotocol; send binary frames")
            try:
                # raw=False decodes MessagePack str as UTF-8 and rejects invalid UTF-8.
                obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
            except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
                raise BadRequest(f"invalid MessagePack: {type(exc).__name__}") from None
        else:
            if not isinstance(data, str):
                raise BadRequest("binary frame on the rapport.v1.json subprotocol; send text frames")
            try:
                obj = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
            except RecursionError:
                raise BadRequest("invalid JSON: nested too deeply") from None
            except ValueError as exc:
                raise BadRequest(f"invalid JSON: {exc}") from None
            if _SURROGATE_ESCAPE.search(data):
                # RFC 8259 section 8.2: an escaped lone surrogate is not a character;
                # such a string could not be stored or sent back as UTF-8.
                _check_scalar_values(obj)
        if not isinstance(obj, dict):
            raise BadRequest("a frame must be a map with a string field 'type'")
        return obj


# One encoder each, made once: msgspec's encoders keep their buffers between calls.
_JSON_ENCODE = msgspec.json.Encoder().encode
_MSGPACK_ENCODE = msgspec.msgpack.Encoder().encode

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _refuse_constant(name: str) -> float:
    # NaN and Infinity are not JSON (RFC 8259 section 6); browsers cannot parse them back.
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range")
    return value


def _check_scalar_values(obj: Any) -> None:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("invalid JSON: a string contains a lone surrogate") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def choose_subprotocol(offered: list[str]) -> str | None:
    """The first offered subprotocol we support; None when the client offered none we know.

    With no offer at all the server speaks JSON without echoing a subprotocol
    (RFC 6455 section 4.2.2: the server must not select one the client did not offer).
    """
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    return None


def codec_for(subprotocol: str | None) -> Codec:
    return Codec(subprotocol or JSON_SUBPROTOCOL)
