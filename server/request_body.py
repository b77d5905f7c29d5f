"""Reading an HTTP request body within a bound, for every JSON and upload endpoint.

The body is counted while it streams in, so a client that declares nothing (or
lies in ``Content-Length``) still cannot make the server hold more than the
bound: the request is refused with ``413`` as soon as it passes it (RFC 9110
section 15.5.14). JSON bodies are decoded by the protocol's own codec, so a
body meets exactly the refusals a WebSocket frame meets (deep nesting, NaN,
escaped lone surrogates, invalid UTF-8).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from protocol.codec import JSON_SUBPROTOCOL, codec_for
from protocol.errors import BadRequest, TooLarge

__all__ = ["BodyTooLarge", "read_bounded", "read_json_object"]

_JSON = codec_for(JSON_SUBPROTOCOL)


class BodyTooLarge(TooLarge):
    """A request body over its endpoint's bound: ``too_large`` with HTTP status 413."""

    http_status = 413


async def read_bounded(request: Request, limit: int, what: str = "the request body") -> bytes:
    """The body's bytes; BodyTooLarge as soon as more than ``limit`` arrived (or were declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"{what} is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"{what} is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, limit: int, what: str = "the request body") -> dict[str, Any]:
    """The body as a JSON object (UTF-8), bounded; BadRequest naming what is wrong."""
    raw = await read_bounded(request, limit, what)
    if not raw.strip():
        raise BadRequest(f"{what} is empty; send a JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not valid UTF-8") from None
    if not text.lstrip().startswith("{"):
        raise BadRequest(f"{what} must be a JSON object")
    try:
        return _JSON.decode(text)
    except BadRequest as exc:
        # The codec speaks of frames; here it is a body.
        raise BadRequest(f"{what} is not valid JSON: {exc.message.removeprefix('invalid JSON: ')}") from None
