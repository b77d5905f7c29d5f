"""The chat page at ``GET /``: a small, dependency-free client of the WebSocket protocol.

The page and its assets are package data (``server/static/``), read through
:mod:`importlib.resources` so they work from a wheel as well as a checkout.
``GET /v1/page-config`` tells the page how to sign in (``dev``: a user name in
``hello.user``; ``jwt``: a token in ``hello.token``) and which model answers.

Every page response carries a strict Content-Security-Policy: scripts, styles
and images only from this origin, sockets only to ``ws:``/``wss:``, no inline
code, no framing.
"""

from __future__ import annotations

import hashlib
import posixpath
from functools import lru_cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; "
    "script-src 'self'; "
    "style-src 'self'; "
    "img-src 'self'; "
    "connect-src 'self' ws: wss:; "
    "base-uri 'none'; "
    "form-action 'self'; "
    "frame-ancestors 'none'; "
    "object-src 'none'"
)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@lru_cache(maxsize=64)
def _asset(name: str) -> tuple[bytes, str] | None:
    """The bytes and ETag of ``static/<name>``, or None when there is no such file.

    Only plain file names directly in the folder are served: no sub-paths, no
    dot files, no extension we do not know a content type for.
    """
    if not name or name != posixpath.basename(name) or name.startswith(".") or "\\" in name:
        return None
    if posixpath.splitext(name)[1].lower() not in CONTENT_TYPES:
        return None
    ref = resources.files("server").joinpath("static").joinpath(name)
    if not ref.is_file():
        return None
    data = ref.read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _serve(request: Request, name: str) -> Response:
    found = _asset(name)
    if found is None:
        return Response("not found\n", status_code=404, media_type="text/plain; charset=utf-8",
                        headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})
    data, etag = found
    headers = {"Cache-Control": "no-cache", "ETag": etag, **SECURITY_HEADERS}
    content_type = CONTENT_TYPES[posixpath.splitext(name)[1].lower()]
    if etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else data
    response = Response(body, headers=headers, media_type=content_type)
    if request.method == "HEAD":
        response.headers["content-length"] = str(len(data))
    return response


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",") if part.strip()}


async def index(request: Request) -> Response:
    return _serve(request, "index.html")


async def static_asset(request: Request) -> Response:
    return _serve(request, request.path_params["name"])


async def favicon(request: Request) -> Response:
    return _serve(request, "icon.svg")


async def page_config(request: Request) -> Response:
    runtime = request.app.state.runtime
    s = runtime.settings
    return JSONResponse(
        {
            "auth": s.auth,
            "model": runtime.engine.model_name,
            "protocol": "rapport.v1",
            "ws_path": "/v1/ws",
            "conversation_id": "default",
            "max_input_chars": s.max_input_chars,
        },
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


routes: list[BaseRoute] = [
    Route("/", index, methods=["GET", "HEAD"]),
    Route("/static/{name}", static_asset, methods=["GET", "HEAD"]),
    Route("/favicon.ico", favicon, methods=["GET", "HEAD"]),
    Route("/v1/page-config", page_config, methods=["GET"]),
]
