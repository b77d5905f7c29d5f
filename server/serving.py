"""Running the app under uvicorn with the settings the protocol needs."""

from __future__ import annotations

import gc
import logging
import socket

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
    # Fewer, larger young-generation collections: a streaming server allocates
    # many short-lived frames, and each collection pauses every socket at once.
    gc.set_threshold(50_000, 20, 100)
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
        # permessage-deflate keeps two zlib contexts per socket (tens of KB);
        # chat deltas are small, and thousands of idle phones must stay cheap.
        ws_per_message_deflate=False,
        # WebSocket-level pings too, for proxies that only see control frames.
        ws_ping_interval=settings.heartbeat_interval_ms / 1000.0,
        ws_ping_timeout=settings.heartbeat_timeout_ms / 1000.0,
        lifespan="on",
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_drain_s) + 2),
    )
    GatewayServer(config, app.state.runtime).run(sockets=[listening_socket(settings)])


def listening_socket(settings: Settings) -> socket.socket:
    """The listening socket, with a bounded kernel send buffer for every connection.

    Accepted sockets inherit the listener's SO_SNDBUF (Linux clones it). Left
    to autotuning, the kernel would queue megabytes of stale per-token frames
    for a phone that stopped reading; bounded, the backlog stays in the app,
    where the outbox can merge it and notice the phone is stuck.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.socket_send_buffer > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer)
    sock.bind((settings.host.strip("[]"), settings.port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
