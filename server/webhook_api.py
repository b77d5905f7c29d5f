"""A user's own webhook URL over REST (docs/protocol.md addition 23).

    PUT    /v1/users/me/webhook   {"url"}  ->  200 {"url"}
    GET    /v1/users/me/webhook            ->  200 {"url"}, or 404 not_found when none is registered
    DELETE /v1/users/me/webhook            ->  204

Auth and errors follow :mod:`server.rest`: a Bearer JWT, errors as
``{"error": {"code", "message"}}``. The URL must pass
:func:`server.webhooks.check_user_url` (https; no credentials; off loopback no
address of this machine or a private network), else ``400 bad_request``. It
is kept under the user's hash tag, so ``DELETE /v1/users/me`` removes it, and
takes precedence over the deployment's ``--webhook-url``. Events are signed
with the deployment's ``--webhook-secret``; a server without one sends no
webhooks and refuses a registration with ``400``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from protocol.errors import BadRequest, NotFound

from .request_body import read_json_object
from .rest import _handled, _user
from .webhooks import MAX_URL_CHARS, check_user_url

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["MAX_BODY_BYTES", "routes"]

#: A URL of at most MAX_URL_CHARS characters (up to 12 bytes each as JSON escapes) and its key.
MAX_BODY_BYTES = MAX_URL_CHARS * 12 + 64


@_handled
async def put_webhook(request: Request) -> Response:
    user_id = await _user(request)
    body = await read_json_object(request, MAX_BODY_BYTES)
    rt: Runtime = request.app.state.runtime
    if not rt.webhooks.enabled:
        raise BadRequest("this server sends no webhooks (it has no --webhook-secret)")
    url = body.get("url")
    if not isinstance(url, str) or not url:
        raise BadRequest("field 'url' must be a non-empty string")
    url = check_user_url(url, server_host=rt.settings.host)
    await rt.webhooks.registrations.put(user_id, url)
    return JSONResponse({"url": url})


@_handled
async def get_webhook(request: Request) -> Response:
    user_id = await _user(request)
    rt: Runtime = request.app.state.runtime
    url = await rt.webhooks.registrations.get(user_id)
    if url is None:
        raise NotFound("no webhook registered")
    return JSONResponse({"url": url})


@_handled
async def delete_webhook(request: Request) -> Response:
    user_id = await _user(request)
    rt: Runtime = request.app.state.runtime
    # Idempotent: deleting what is not there leaves the same state behind.
    await rt.webhooks.registrations.delete(user_id)
    return Response(status_code=204)


routes: list[BaseRoute] = [
    Route("/v1/users/me/webhook", put_webhook, methods=["PUT"]),
    Route("/v1/users/me/webhook", get_webhook, methods=["GET"]),
    Route("/v1/users/me/webhook", delete_webhook, methods=["DELETE"]),
]
