"""``POST /v1/feedback`` (docs/protocol.md addition 20): the WebSocket's ``feedback`` frame over REST.

    POST /v1/feedback   {"turn_id", "rating": -1 | 1, "reason"?}  ->  200 {"turn_id", "rating"}

Auth and errors follow :mod:`server.rest`: a Bearer JWT, errors as
``{"error": {"code", "message"}}``. A body that is not a JSON object with
those fields is ``400 bad_request`` naming the field; a body over
:data:`MAX_BODY_BYTES` is ``413 too_large``; a turn of another user ``404``
as if it did not exist; a turn still running ``400``. Rating a reply again
replaces the rating. The service behind it is :mod:`server.feedback`; it lives
apart from this route because the runtime holds the service and
:mod:`server.rest` refers to the runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from protocol.errors import BadRequest
from protocol.frames import MAX_ID_CHARS
from sessions.training import MAX_REASON_CHARS

from .request_body import read_json_object
from .rest import _handled, _user

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["MAX_BODY_BYTES", "routes"]

#: Largest body: a turn id and a 1,000-character reason (up to 12 bytes a
#: character as JSON surrogate-pair escapes) fit with room to spare.
MAX_BODY_BYTES = 16 * 1024


def _fields(body: dict[str, Any]) -> tuple[str, int, str | None]:
    turn_id = body.get("turn_id")
    if not isinstance(turn_id, str) or not turn_id:
        raise BadRequest("field 'turn_id' must be a non-empty string (the rated reply's turn id)")
    if len(turn_id) > MAX_ID_CHARS:
        raise BadRequest(f"field 'turn_id' is longer than {MAX_ID_CHARS} characters")
    rating = body.get("rating")
    # bool is an int subclass in Python; true/false is not a rating on the wire.
    if isinstance(rating, bool) or not isinstance(rating, int) or rating not in (-1, 1):
        raise BadRequest("field 'rating' must be -1 or 1")
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise BadRequest("field 'reason' must be a string")
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise BadRequest(f"field 'reason' is longer than {MAX_REASON_CHARS} characters")
    return turn_id, rating, reason


@_handled
async def post_feedback(request: Request) -> Response:
    user_id = await _user(request)
    turn_id, rating, reason = _fields(await read_json_object(request, MAX_BODY_BYTES))
    rt: Runtime = request.app.state.runtime
    return JSONResponse(await rt.feedback.rate(user_id, turn_id, rating, reason))


routes: list[BaseRoute] = [
    Route("/v1/feedback", post_feedback, methods=["POST"]),
]
