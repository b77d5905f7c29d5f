"""Running the app under uvicorn with the settings the protocol needs."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .config import Settings
from .runtime import Runtime

log = logging.getLogger("rapport")


class GatewayServer(uvicorn.Server):
    """uvicorn's server, except that sockets close with 1001 (going away) at shutdown.

    uvicorn itself closes open WebSockets with 1012 before the app hears of the
    shutdown; the protocol promises 1001, so the app closes them first.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    async def shutdown(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        await self.runtime.going_away()
        await super().shutdown(sockets)


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.engine == "simulated":
        log.warning("engine: SIMULATED (a timing simulation with made-up text, not a model); "
                    "use --engine vllm for real replies")
    if settings.auth == "dev":
        log.warning("auth: development mode, hello.user is trusted (loopback only)")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        # RFC 6455 section 7.4.1: 1009 for a message too big to process.
        ws_max_size=settings.max_frame_bytes,
        # WebSocket-level pings too, for proxies that only see control frames.
        ws_ping_interval=settings.heartbeat_interval_ms / 1000.0,
        ws_ping_timeout=settings.heartbeat_timeout_ms / 1000.0,
        lifespan="on",
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_drain_s) + 2),
    )
    GatewayServer(config, app.state.runtime).run()
