"""Running the app under uvicorn with the settings the protocol needs.

uvicorn bounds a keep-alive connection's idle time but nothing a client holds
before its first request is complete, so a silent TCP connection, headers
trickled one byte at a time or a body that never ends would each keep a file
descriptor forever. The two protocol classes here are uvicorn's own (its
httptools HTTP/1.1 parser and its websockets-sansio WebSocket framing), with:

- a deadline on a request's headers (from the connection, or from the first
  byte of a later request on a keep-alive connection) and on its body, answered
  408 (RFC 9110 section 15.5.9) and closed;
- a cap on the size of a request's headers, answered 431 (RFC 6585 section 5);
- a deadline from the WebSocket upgrade to ``ready`` (the gateway's own hello
  timeout closes with 4401 first; this one catches a client that does not even
  take its close frame);
- a per-process cap on connections that have not authenticated yet (waiting
  for their request, their body or their ``hello``, or idle between requests):
  over it the oldest is closed, so that a flood of silent sockets cannot keep
  the process from accepting the clients it serves;
- the refusals websockets writes for a bad upgrade (431 for an over-long
  header line) actually sent, and the socket closed;
- an invalid-UTF-8 text frame logged as one line (RFC 6455 section 8.1 still
  closes it with 1007);
- WebSockets closed with 1001 at shutdown, as the contract says, not 1012.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState, ProtocolError

from protocol import close_codes

from .app import create_app
from .config import Settings
from .dev_link import announce_development_link
from .gateway import SOCKET_EXTENSION, close_reason
from .metrics import Metrics
from .runtime import Runtime

log = logging.getLogger("rapport")

#: Request headers (request line included) beyond this many bytes are refused
#: with 431. websockets itself allows 8 KiB per line for an upgrade.
MAX_HEADER_BYTES = 64 * 1024

#: The response header naming the worker process that answered (``--workers``).
WORKER_HEADER = "X-Rapport-Worker"

#: How long a connection being closed may take to flush its last bytes (an
#: error response, a close frame) before it is aborted.
CLOSE_GRACE_S = 2.0

#: Added to the hello timeout for the upgrade's own deadline: time for the
#: gateway to finish a hello that came just in time (it asks Redis) or to send
#: its error frame and close 4401 first.
HELLO_DEADLINE_MARGIN_S = 3.0



def shut_down_writing(transport: asyncio.Transport) -> None:
    """Send what is queued, then FIN, and go on reading what the peer still sends.

    Closing a socket whose input was not all read makes the kernel answer with
    RST, which can destroy the response before the client reads it (RFC 7230
    section 6.6: close the sending half first, keep reading for a while). The
    caller discards whatever is read and aborts the transport after a grace.
    """
    transport.resume_reading()
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()


def default_unauthenticated_cap() -> int:
    """A quarter of this process's file-descriptor limit: the rest stays for the
    clients it serves, Redis and the engine."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(16, min(10_000, soft // 4))


class UnauthenticatedConnections:
    """The connections of this process that have not authenticated yet, oldest first.

    Keyed by transport (an HTTP connection keeps its transport when it becomes
    a WebSocket), each with how to close it. Over ``cap`` the oldest is closed:
    refusing the newest instead would let an attacker who got there first
    keep everyone else out.
    """

    def __init__(self, cap: int, metrics: Metrics) -> None:
        if cap < 1:
            raise ValueError("the cap on unauthenticated connections must be at least 1")
        self.cap = cap
        self.metrics = metrics
        self._pending: dict[object, Callable[[], None]] = {}

    def enter(self, key: object, evict: Callable[[], None]) -> None:
        # A key already present keeps its place: its age counts from the TCP connect.
        self._pending[key] = evict
        while len(self._pending) > self.cap:
            oldest = next(iter(self._pending))
            evict_oldest = self._pending.pop(oldest)
            self.metrics.unauthenticated_closed("evicted")
            evict_oldest()
        self.metrics.unauthenticated.set(len(self._pending))

    def reassign(self, key: object, evict: Callable[[], None]) -> None:
        """A new way to close ``key``, if it is still counted (its place is kept)."""
        if key in self._pending:
            self._pending[key] = evict

    def leave(self, key: object) -> None:
        if self._pending.pop(key, None) is not None:
            self.metrics.unauthenticated.set(len(self._pending))

    def __len__(self) -> int:
        return len(self._pending)


@dataclass(frozen=True, slots=True)
class Guard:
    """What every connection of one process shares: the cap and the deadlines."""

    pending: UnauthenticatedConnections
    metrics: Metrics
    header_timeout_s: float
    body_timeout_s: float
    hello_deadline_s: float
    #: Bytes queued in a WebSocket's transport beyond which its peer counts as
    #: not reading (the gateway's own frames wait for the transport to drain;
    #: this bounds what the WebSocket layer queues by itself, such as pongs).
    max_write_buffer: int

    @classmethod
    def of(cls, settings: Settings, metrics: Metrics) -> Guard:
        cap = settings.max_unauthenticated_connections or default_unauthenticated_cap()
        return cls(pending=UnauthenticatedConnections(cap, metrics), metrics=metrics,
                   header_timeout_s=settings.request_header_timeout_ms / 1000.0,
                   body_timeout_s=settings.request_body_timeout_ms / 1000.0,
                   hello_deadline_s=settings.hello_timeout_ms / 1000.0 + HELLO_DEADLINE_MARGIN_S,
                   # Legitimately the transport holds its high-water mark plus
                   # one frame, and the largest (a history page) is a few MB.
                   max_write_buffer=max(settings.outbox_max_bytes, 16 * 1024 * 1024))


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines and a size cap on what comes before a response."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, guard: Guard) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self._deadline: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # receiving a request line and headers
        self._head_bytes = 0  # raw bytes received while in the head
        self._head_size = 0  # the parsed head: URL, names and values
        self._oversized = False  # the head passed MAX_HEADER_BYTES: it is refused, not served
        self._request_begun = False  # a byte of the current request arrived: it is owed an answer
        self._upgraded = False
        self._closing = False  # refused: what still arrives is read and dropped
        self._lost = False

    # -- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.pending.enter(transport, self._evict)
        self._arm(self.guard.header_timeout_s, 408, "header_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        if not self._upgraded:
            self.guard.pending.leave(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._in_head and data:
            self._request_begun = True
        super().data_received(data)
        if self._upgraded or self._closing or self.transport.is_closing():
            return
        if self._in_head:
            # The parser keeps a header it has not seen the end of to itself, so
            # the raw bytes are what bounds it. Counted after parsing, so that a
            # chunk which completes the head is not refused for its body bytes.
            self._head_bytes += len(data)
            self._oversized = self._oversized or self._head_bytes > MAX_HEADER_BYTES
        if self._oversized:
            self._refuse(431, "headers_too_large")

    def handle_websocket_upgrade(self) -> None:
        if self._oversized:
            return
        # From here the WebSocket protocol owns the transport, its deadline and
        # its place among the unauthenticated connections.
        self._disarm()
        self._upgraded = True
        super().handle_websocket_upgrade()

    # -- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._head_size = 0
        self._request_begun = True
        if self._deadline is None:
            # The next request on a keep-alive connection: its headers get the same time.
            self.guard.pending.enter(self.transport, self._evict)
            self._arm(self.guard.header_timeout_s, 408, "header_timeout")

    def on_url(self, url: bytes) -> None:
        self._grow_head(len(url))
        if not self._oversized:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head that arrives whole in one chunk is measured here, field by field
        # (+4 for ": " and CRLF), and stops being kept once over the cap.
        self._grow_head(len(name) + len(value) + 4)
        if not self._oversized:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        if self._oversized:
            return  # refused with 431 once the parser returns; the app never sees it
        super().on_headers_complete()
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._arm(self.guard.body_timeout_s, 408, "body_timeout")

    def on_body(self, body: bytes) -> None:
        if not self._oversized:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._oversized:
            return
        super().on_message_complete()
        if self._upgraded:
            return
        # The whole request is here: the app has it, and answers it in its own time.
        self._disarm()
        self._request_begun = False
        self.guard.pending.leave(self.transport)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._closing:
            # Idle between requests (uvicorn's keep-alive timeout closes it): it
            # holds a descriptor without having authenticated anything.
            self.guard.pending.enter(self.transport, self._evict)

    # -- deadlines and refusals

    def _grow_head(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEADER_BYTES:
            self._oversized = True

    def _arm(self, delay: float, status: int, reason: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, self._refuse, status, reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _evict(self) -> None:
        """Closed to make room (the cap already forgot it): released now, without an answer."""
        self._disarm()
        if self._lost:
            return
        if self._closing:
            self._abort()
        elif self._stop_app():
            self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        """A deadline passed or the head is too large: answer ``status`` if a request
        is owed an answer, and close the connection."""
        self._disarm()
        self.guard.metrics.unauthenticated_closed(reason)
        if self.transport.is_closing() or self._lost or self._closing:
            return
        if not self._stop_app():
            self.guard.pending.leave(self.transport)
            return
        # Nothing asked, or (a body that never came) already answered by the app:
        # nothing owed.
        answered = reason == "body_timeout" and self.cycle is not None and self.cycle.response_complete
        if not self._request_begun or answered:
            self.guard.pending.leave(self.transport)
            self.transport.close()
            return
        self._write_refusal(status)
        self._closing = True
        self.flow.resume_reading()
        shut_down_writing(self.transport)
        # Still counted among the unauthenticated until it is gone (making room
        # aborts it); a peer that neither reads nor closes is cut off after the grace.
        self.guard.pending.reassign(self.transport, self._evict)
        self._abort_timer = self.loop.call_later(CLOSE_GRACE_S, self._abort)

    def _stop_app(self) -> bool:
        """Detach the app from the request; False when it is answering and should finish."""
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            # The app is answering already (without waiting for the whole body):
            # let it finish, then close instead of keeping the connection alive.
            cycle.keep_alive = False
            return False
        if cycle is not None and not cycle.response_complete:
            # The app waits for a body that will not come: it hears a disconnect,
            # and anything it still sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        return True

    def _abort(self) -> None:
        self._abort_timer = None
        if not self._lost:
            self.transport.abort()

    def _write_refusal(self, status: int) -> None:
        body = HTTPStatus(status).phrase.encode("ascii") + b"\n"
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: text/plain; charset=utf-8\r\n",
                 b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                 b"connection: close\r\n"]
        if status == 503:
            head.append(b"retry-after: 1\r\n")
        self.transport.write(b"".join([*head, b"\r\n", body]))


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, with a deadline until the gateway says
    the client authenticated, and a close that does not wait on flow control.

    The gateway reaches it through the scope extension :data:`SOCKET_EXTENSION`:
    ``authenticated()`` once it answered ``ready``, ``close_now(code, reason,
    grace_s)`` for a socket that must go even though it does not read.
    """

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, guard: Guard) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self._deadline: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._closing = False  # closed by us: what still arrives is read and dropped

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.guard.pending.enter(transport, self._evict)
        self._deadline = self.loop.call_later(self.guard.hello_deadline_s, self._hello_deadline_passed)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._deadline, self._abort_timer):
            if timer is not None:
                timer.cancel()
        self._deadline = self._abort_timer = None
        self.guard.pending.leave(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        super().data_received(data)
        if self.transport.is_closing() or self._closing:
            return
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets refused the upgrade request (431 for an over-long header
            # line, nothing for one it cannot parse) into its output buffer, which
            # uvicorn only writes for requests it accepts.
            self.guard.metrics.unauthenticated_closed("bad_upgrade")
            self.transport.write(b"".join(self.conn.data_to_send()))
            self._close_transport()
        elif self.transport.get_write_buffer_size() > self.guard.max_write_buffer:
            # Answers the WebSocket layer writes by itself (pongs to a ping
            # flood) pile up here when the peer does not read.
            log.info("%s: not reading what the WebSocket layer answers; dropping it", self._peer())
            self.transport.abort()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:
            extensions: dict[str, Any] = self.scope["extensions"]
            extensions[SOCKET_EXTENSION] = self

    def send_receive_event_to_app(self) -> None:
        # uvicorn's own, except that a client's invalid UTF-8 is one line of log,
        # not a server error with a traceback.
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return
        if self.curr_msg_data_type == "text":
            try:
                text = data.decode()
            except UnicodeDecodeError:
                log.info("%s: invalid UTF-8 in a text frame; closing 1007", self._peer())
                # RFC 6455 section 8.1: fail the connection with 1007.
                self.conn.send_close(close_codes.INVALID_PAYLOAD, "invalid UTF-8 in a text frame")
                self.handle_parser_exception()
                return
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
        else:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def shutdown(self) -> None:
        # uvicorn closes open WebSockets with 1012 (service restart); the contract
        # promises 1001 (going away: reconnect, possibly elsewhere).
        if self._closing:
            self.transport.close()  # its close went out already; the abort timer still stands
            return
        if self.handshake_complete and not self.close_sent:
            self.close_now(close_codes.GOING_AWAY, "server shutting down")
            return
        super().shutdown()

    # -- for the gateway

    def authenticated(self) -> None:
        """The client is known: no more deadline, no longer among the unauthenticated."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.pending.leave(self.transport)

    def close_now(self, code: int, reason: str, grace_s: float = CLOSE_GRACE_S, *, linger: bool = True) -> None:
        """Close without waiting for the peer to read what is queued before.

        The close frame goes behind whatever the transport holds, and the
        transport closes once that is flushed; a peer that has not read it
        all within ``grace_s`` is dropped. The app hears the disconnect at once.
        Without ``linger`` the transport is closed at once instead of reading
        on until the peer closes (for a connection dropped to make room).
        """
        if self.transport.is_closing() or self.disconnected or self._closing:
            return
        if not self.handshake_complete:
            # Not accepted yet: an HTTP answer (RFC 6455 section 4.2.2).
            self.conn.send_response(self.conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, f"{reason}\n"))
            self.handshake_complete = True
        elif not self.close_sent:
            try:
                self.conn.fail(code, close_reason(reason))
            except (InvalidState, ProtocolError):
                pass  # the closing handshake had begun: just close
        if not self.close_sent:
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self._close_transport(grace_s, linger=linger)

    # -- internals

    def _close_transport(self, grace_s: float = CLOSE_GRACE_S, *, linger: bool = True) -> None:
        self._closing = True
        self.stop_keepalive()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.read_paused = False
        if not linger:
            self.transport.close()
        else:
            shut_down_writing(self.transport)
            # While it lingers it still counts among the unauthenticated, if it was
            # (making room aborts it).
            self.guard.pending.reassign(self.transport, self._abort)
        if self._abort_timer is None:
            self._abort_timer = self.loop.call_later(grace_s, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if not self.disconnected:
            self.transport.abort()

    def _evict(self) -> None:
        if self._closing:
            self._abort()
        else:
            self.close_now(close_codes.TRY_AGAIN_LATER, "too many connections waiting to authenticate; retry later",
                           linger=False)

    def _hello_deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._closing:
            return
        self.guard.metrics.unauthenticated_closed("hello_deadline")
        self.close_now(close_codes.UNAUTHORIZED, "no valid hello within the time allowed")

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


class GatewayServer(uvicorn.Server):
    """uvicorn's server, except that sockets close with 1001 (going away) at shutdown.

    uvicorn itself closes open WebSockets with 1012 before the app hears of the
    shutdown; the protocol promises 1001, so the app closes them first. And it
    stops listening first: a client told 1001 that reconnects must land on
    another process, not get ``ready`` here and then lose the socket again.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime, app_state: Any,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.app_state = app_state
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # uvicorn sets ``started`` once the lifespan startup passed and it listens;
        # a supervisor (server.workers) counts the worker as up from here.
        if self.started and not self.should_exit and self._on_started is not None:
            self._on_started()

    async def shutdown(self, sockets=None) -> None:
        # Connections already accepted but not yet through their hello are closed
        # 1001 by the gateway (it reads this flag); new ones are refused by the kernel.
        self.app_state.draining = True
        for server in getattr(self, "servers", []):
            server.close()
        await self.runtime.going_away()
        await super().shutdown(sockets)


def serve(settings: Settings, *, sock: socket.socket | None = None, worker: str | None = None,
          on_started: Callable[[], None] | None = None) -> None:
    """Run one gateway process until SIGTERM/SIGINT (then drain: 1001, turns finished or ended).

    ``sock``: a listening socket to serve on (a supervisor's, shared with its
    other workers; see server.workers) instead of binding ``settings.port``.
    ``worker``: this process's worker id, logged and sent in every HTTP
    response (the WebSocket upgrade included) as ``X-Rapport-Worker``.
    ``on_started``: called once the process accepts connections.
    """
    where = f" worker {worker}" if worker is not None else ""
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")
    if settings.engine == "simulated":
        log.warning("engine: SIMULATED (a timing simulation with made-up text, not a model); "
                    "use --engine vllm for real replies")
    if settings.auth == "dev":
        log.warning("auth: development mode, hello.user is trusted (loopback only)")
    # Fewer, larger young-generation collections: a streaming server allocates
    # many short-lived frames, and each collection pauses every socket at once.
    gc.set_threshold(50_000, 20, 100)
    app = create_app(settings)
    runtime: Runtime = app.state.runtime
    guard = Guard.of(settings, runtime.metrics)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # uvicorn's httptools and websockets-sansio protocols, with the guards above.
        http=functools.partial(GuardedHttpProtocol, guard=guard),  # type: ignore[arg-type]
        ws=functools.partial(GuardedWebSocketProtocol, guard=guard),  # type: ignore[arg-type]
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
        headers=[(WORKER_HEADER, worker)] if worker is not None else None,
    )
    log.info("unauthenticated connections: at most %d per process; request headers within %.1f s, "
             "bodies within %.1f s", guard.pending.cap, guard.header_timeout_s, guard.body_timeout_s)
    listener = sock if sock is not None else listening_socket(settings)
    if worker is None:
        # A single process announces its own sign-in link; workers leave it to their supervisor.
        on_started = _with_development_link(settings, int(listener.getsockname()[1]), on_started)
    GatewayServer(config, runtime, app.state, on_started).run(sockets=[listener])


def _with_development_link(settings: Settings, port: int,
                           then: Callable[[], None] | None) -> Callable[[], None]:
    """``then``, after printing the development sign-in link (protocol addition 21) where one is offered."""
    def started() -> None:
        announce_development_link(settings, port)
        if then is not None:
            then()
    return started


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
