"""The one codec for both subprotocols (docs/protocol.md, "Transport").

``rapport.v1.json`` carries UTF-8 JSON in text frames; ``rapport.v1.msgpack``
carries MessagePack in binary frames. Both decode to the same plain ``dict``
that :mod:`server.frames` validates, and both encode the same ``dict``.
A frame of the wrong kind for the negotiated subprotocol is a ``bad_request``,
not a silent conversion, so that client bugs surface early.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack

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
            return msgpack.packb(frame, use_bin_type=True)
        # ensure_ascii=False keeps Chinese and emoji as UTF-8 rather than
        # \u escapes: smaller frames, and byte-identical text for clients.
        return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))

    def decode(self, data: str | bytes) -> dict[str, Any]:
        if self.binary:
            if not isinstance(data, bytes):
                raise BadRequest("text frame on the rapport.v1.msgpack subprotocol; send binary frames")
            try:
                # raw=False decodes MessagePack str as UTF-8 and rejects invalid UTF-8.
                obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
            except (ValueError, msgpack.UnpackException, TypeError) as exc:
                raise BadRequest(f"invalid MessagePack: {exc}") from None
        else:
            if not isinstance(data, str):
                raise BadRequest("binary frame on the rapport.v1.json subprotocol; send text frames")
            try:
                obj = json.loads(data)
            except ValueError as exc:
                raise BadRequest(f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise BadRequest("a frame must be a map with a string field 'type'")
        return obj


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
