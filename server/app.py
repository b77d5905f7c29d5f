"""The Starlette application: routes, lifespan, and the HTTP endpoints."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from . import admin, feedback_api, openai_api, page, rest, webhook_api
from .audit import bind_peer
from .characters import character_routes
from .config import Settings
from .engines.base import Engine
from .gateway import websocket_endpoint
from .runtime import Runtime


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks = await request.app.state.runtime.ready()
    ok = all(checks.values())
    return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    load = rt.engine.load()
    unfinished = getattr(rt.engine, "unfinished_requests", None)
    return Response(rt.metrics.render(load.running, load.waiting,
                                      unfinished() if callable(unfinished) else None),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


class RapportApp(Starlette):
    """Starlette, with the WebSocket gateway taken straight off the ASGI call.

    Each phone's socket lives for hours; going through Starlette's middleware
    stack would keep its frames (several KB) alive for every connection. The
    gateway handles its own errors, so it needs none of them.
    """

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            bind_peer(scope)  # the audit log's peer address for whatever this connection records
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            scope["app"] = self
            await websocket_endpoint(WebSocket(scope, receive, send))
            return
        await super().__call__(scope, receive, send)


WS_PATH = "/v1/ws"


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    runtime = Runtime(settings, engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.close()

    app = RapportApp(
        routes=[
            WebSocketRoute(WS_PATH, websocket_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            *openai_api.routes,
            *rest.routes,
            *feedback_api.routes,
            *webhook_api.routes,
            *admin.routes,
            *character_routes(),
            *page.routes,
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.audit = runtime.audit
    # Set by the server when it begins shutting down (server.serving.GatewayServer):
    # the gateway then closes new sockets 1001 instead of serving them.
    app.state.draining = False
    return app
