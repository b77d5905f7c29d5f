"""Character cards inside PNG images: reading and writing the card's text chunk.

Pure functions over bytes, no I/O and no image library: a card only needs the
PNG container (ISO/IEC 15948, the W3C PNG specification), which is an 8-byte
signature followed by chunks of ``length`` (4 bytes, big-endian), ``type``
(4 ASCII letters), ``data``, and a CRC-32 over type and data.

The ecosystem's convention (Character Card V2 and V3 specs): the card's JSON,
UTF-8 and then base64, is the text of a ``tEXt`` chunk whose keyword is
``chara`` (V2) or ``ccv3`` (V3). A reader prefers ``ccv3`` when both exist; a
V3 writer adds a V2 ``chara`` too so older apps still read the card. ``iTXt``
and ``zTXt`` chunks with those keywords are read as well, since a few tools
re-save images with compressed text.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from protocol.errors import BadRequest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 8 * 1024 * 1024
#: The largest card JSON accepted, in UTF-8 bytes, wherever it comes from.
MAX_CARD_JSON_BYTES = 1_048_576
#: The spec's bound on a chunk's length field (2^31 - 1).
_MAX_CHUNK_LENGTH = 2**31 - 1
#: Base64 of the largest card, with slack for line breaks some tools insert.
_MAX_CARD_TEXT_BYTES = (MAX_CARD_JSON_BYTES + 2) // 3 * 4 + 65_536
#: Keywords in order of preference.
CARD_KEYWORDS = ("ccv3", "chara")
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
#: The default image when a card is written without one: 32x32, 8-bit grey.
_DEFAULT_SIZE = 32
_DEFAULT_GREY = 0x80


def decode_card_json(raw: bytes, what: str) -> Any:
    """UTF-8 JSON (a BOM tolerated) to a value; BadRequest naming ``what`` otherwise.

    NaN and Infinity, which Python's json accepts but JSON does not, are
    refused, and so is nesting too deep to parse.
    """
    if len(raw) > MAX_CARD_JSON_BYTES:
        raise BadRequest(f"{what} is larger than {MAX_CARD_JSON_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"JSON has no {name}")


# ---------------------------------------------------------------- chunks


def _chunks(data: bytes) -> Iterator[tuple[bytes, bytes, int, int]]:
    """Every chunk up to and including IEND: (type, data, start offset, end offset).

    Checks what a corrupt or hostile file can get wrong: the signature, lengths
    that run past the end, CRCs, IHDR first, and IEND present.
    """
    if len(data) > MAX_PNG_BYTES:
        raise BadRequest(f"the PNG is larger than {MAX_PNG_BYTES} bytes")
    if not data.startswith(PNG_SIGNATURE):
        raise BadRequest("not a PNG: the file does not start with the PNG signature")
    offset = len(PNG_SIGNATURE)
    first = True
    while True:
        if offset + 12 > len(data):
            raise BadRequest("the PNG is truncated: it ends before its IEND chunk")
        length, chunk_type = struct.unpack_from(">I4s", data, offset)
        if length > _MAX_CHUNK_LENGTH:
            raise BadRequest(f"the PNG has a chunk of impossible length {length}")
        end = offset + 12 + length
        if end > len(data):
            raise BadRequest(f"the PNG is truncated inside a {_type_name(chunk_type)} chunk")
        body = data[offset + 8: offset + 8 + length]
        (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
        if zlib.crc32(chunk_type + body) != crc:
            raise BadRequest(f"the PNG's {_type_name(chunk_type)} chunk fails its CRC check")
        if first and chunk_type != b"IHDR":
            raise BadRequest("not a PNG: the first chunk is not IHDR")
        first = False
        yield chunk_type, body, offset, end
        if chunk_type == b"IEND":
            return
        offset = end


def _type_name(chunk_type: bytes) -> str:
    return chunk_type.decode("latin-1").encode("unicode_escape").decode("ascii")


def _chunk(chunk_type: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))


def _keyword(body: bytes) -> str | None:
    """The keyword of a tEXt/zTXt/iTXt chunk (Latin-1, 1 to 79 bytes before a NUL)."""
    keyword, sep, _ = body.partition(b"\0")
    if not sep or not 1 <= len(keyword) <= 79:
        return None
    return keyword.decode("latin-1")


def _inflate(compressed: bytes, what: str) -> bytes:
    """zlib data, refusing more than the largest card's text once inflated (a zip bomb)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(compressed, _MAX_CARD_TEXT_BYTES + 1)
    except zlib.error as exc:
        raise BadRequest(f"{what} is not valid zlib data: {exc}") from None
    if len(out) > _MAX_CARD_TEXT_BYTES:
        raise BadRequest(f"{what} inflates to more than {_MAX_CARD_TEXT_BYTES} bytes")
    if not inflater.eof:
        raise BadRequest(f"{what} is truncated zlib data")
    return out


def _chunk_text(chunk_type: bytes, body: bytes, keyword: str) -> bytes:
    """The text of a card chunk, as bytes (base64 is ASCII in every encoding)."""
    what = f"the PNG's '{keyword}' {_type_name(chunk_type)} chunk"
    rest = body.partition(b"\0")[2]
    if chunk_type == b"tEXt":
        return rest
    if chunk_type == b"zTXt":
        if not rest or rest[0] != 0:
            raise BadRequest(f"{what} uses an unknown compression method")
        return _inflate(rest[1:], what)
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, text.
    if len(rest) < 2:
        raise BadRequest(f"{what} is truncated")
    flag, method = rest[0], rest[1]
    parts = rest[2:].split(b"\0", 2)
    if len(parts) != 3:
        raise BadRequest(f"{what} is truncated")
    text = parts[2]
    if flag == 0:
        return text
    if flag != 1 or method != 0:
        raise BadRequest(f"{what} uses an unknown compression method")
    return _inflate(text, what)


# ---------------------------------------------------------------- reading


def read_card_png(data: bytes) -> dict[str, Any]:
    """The card JSON map inside a PNG; ``ccv3`` is preferred over ``chara``.

    BadRequest for: not a PNG, a truncated or oversized chunk, a CRC mismatch,
    no card chunk, bad base64, text that is not UTF-8 JSON, JSON not a map.
    """
    found: dict[str, tuple[bytes, bytes]] = {}
    for chunk_type, body, _, _ in _chunks(data):
        if chunk_type not in _TEXT_CHUNKS:
            continue
        keyword = _keyword(body)
        # SillyTavern compares keywords case-insensitively; so do we. The first wins.
        if keyword is not None and keyword.lower() in CARD_KEYWORDS:
            found.setdefault(keyword.lower(), (chunk_type, body))
    for keyword in CARD_KEYWORDS:
        if keyword in found:
            chunk_type, body = found[keyword]
            return _decode_card_text(_chunk_text(chunk_type, body, keyword), keyword)
    raise BadRequest("the PNG holds no character card (no 'chara' or 'ccv3' text chunk)")


def _decode_card_text(text: bytes, keyword: str) -> dict[str, Any]:
    what = f"the PNG's '{keyword}' card"
    if len(text) > _MAX_CARD_TEXT_BYTES:
        raise BadRequest(f"{what} is larger than {MAX_CARD_JSON_BYTES} bytes")
    # Line breaks and spaces are not base64, but some tools wrap long lines.
    compact = b"".join(text.split())
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None
    card = decode_card_json(raw, what)
    if not isinstance(card, dict):
        raise BadRequest(f"{what} is JSON but not an object")
    return card


# ---------------------------------------------------------------- writing


def _encode_card(card: dict[str, Any]) -> bytes:
    raw = json.dumps(card, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return base64.b64encode(raw)


def default_image() -> bytes:
    """A small valid PNG of its own: 32x32 pixels of mid grey, 8-bit greyscale."""
    ihdr = struct.pack(">IIBBBBB", _DEFAULT_SIZE, _DEFAULT_SIZE, 8, 0, 0, 0, 0)
    # Each scanline starts with its filter type (0, none).
    rows = (b"\0" + bytes([_DEFAULT_GREY]) * _DEFAULT_SIZE) * _DEFAULT_SIZE
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")


def write_card_png(*, v2: dict[str, Any] | None, v3: dict[str, Any] | None = None,
                   image: bytes | None = None) -> bytes:
    """``image`` (or a small grey PNG) with the card's text chunks before IEND.

    Existing ``chara``/``ccv3`` chunks of any text kind are removed first, so a
    re-exported card never carries a stale copy a reader might prefer.
    """
    if v2 is None and v3 is None:
        raise ValueError("write_card_png needs a V2 or a V3 card")
    source = default_image() if image is None else image
    kept: list[bytes] = []
    iend = b""
    for chunk_type, body, start, end in _chunks(source):
        if chunk_type == b"IEND":
            iend = source[start:end]
            continue
        if chunk_type in _TEXT_CHUNKS:
            keyword = _keyword(body)
            if keyword is not None and keyword.lower() in CARD_KEYWORDS:
                continue
        kept.append(source[start:end])
    cards: list[bytes] = []
    if v2 is not None:
        cards.append(_chunk(b"tEXt", b"chara\0" + _encode_card(v2)))
    if v3 is not None:
        cards.append(_chunk(b"tEXt", b"ccv3\0" + _encode_card(v3)))
    return PNG_SIGNATURE + b"".join(kept) + b"".join(cards) + iend
