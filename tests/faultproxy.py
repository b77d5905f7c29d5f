"""A small fault-injecting TCP proxy for end-to-end tests (asyncio, loopback).

It listens on 127.0.0.1, forwards every accepted connection to one of its
upstreams, and can break connections the way mobile networks do::

    proxy = FaultProxy([server_a.port, server_b.port])   # round-robin by default
    await proxy.start()
    ws_url = f"ws://127.0.0.1:{proxy.port}/v1/ws"
    ...
    conn = proxy.find(peer_port=client_local_port)        # which proxied connection is mine?
    proxy.cut(conn, "rst")                                 # both sides get a TCP RST
    proxy.cut(conn, "close")                               # both sides get a FIN (no WebSocket close)
    proxy.cut_after(conn, 100)                             # forward 100 more server bytes, then cut
    proxy.stall(conn)                                      # stop forwarding, keep the sockets open
    proxy.cut_all()
    proxy.stats                                            # what it did, as counts

Upstream choice, per accepted connection: ``"round_robin"`` cycles through the
upstreams, ``"fixed"`` always uses ``upstreams[0]``, or pass ``choose`` (a
callable ``(connection_index) -> upstream index``). :meth:`pin_next` forces
the upstream of the next accepted connection once. ``cut_after_server_bytes``
(an int, or a callable ``(ProxiedConnection) -> int | None``) arms every new
connection to be cut after that many bytes from the upstream.

Everything runs on the event loop that called :meth:`start`; methods are not
thread-safe. :class:`BackgroundFaultProxy` runs one on its own thread for
synchronous tests (browsers, say) and forwards calls to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Upstream = tuple[str, int]
CUT_MODES = ("rst", "close")
_CHUNK = 65536


def _as_upstream(u: int | Upstream) -> Upstream:
    return ("127.0.0.1", u) if isinstance(u, int) else (u[0], int(u[1]))


def _set_rst(writer: asyncio.StreamWriter) -> None:
    """Make the next close of this socket send RST instead of FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass(eq=False)
class ProxiedConnection:
    """One accepted client connection and its upstream connection."""

    index: int
    upstream_index: int
    upstream: Upstream
    peer: Upstream  # the client's address as seen by the proxy
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    cut_after_down: int | None = None  # cut once bytes_down reaches this
    cut_after_mode: str = "close"
    cut_mode: str | None = None  # how we cut it, if we did
    closed: bool = False
    stalled: bool = False
    _client_w: asyncio.StreamWriter | None = field(default=None, repr=False)
    _server_w: asyncio.StreamWriter | None = field(default=None, repr=False)
    _resume: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    @property
    def peer_port(self) -> int:
        return self.peer[1]


class FaultProxy:
    def __init__(self, upstreams: Sequence[int | Upstream], *, policy: str = "round_robin",
                 choose: Callable[[int], int] | None = None, start_index: int = 0,
                 cut_after_server_bytes: int | Callable[[ProxiedConnection], int | None] | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        if policy not in ("round_robin", "fixed"):
            raise ValueError(f"unknown policy {policy!r}")
        self.upstreams: list[Upstream] = [_as_upstream(u) for u in upstreams]
        self.policy = policy
        self._choose = choose
        self._rr = itertools.count(start_index)
        self._pinned: int | None = None
        self.cut_after_server_bytes = cut_after_server_bytes
        self.host = host
        self._port = port
        self._server: asyncio.base_events.Server | None = None
        self._indexes = itertools.count(1)
        self.connections: dict[int, ProxiedConnection] = {}  # every connection, open or not
        self.counts: Counter[str] = Counter()

    # ------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/v1/ws", scheme: str = "ws") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self._port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            self._teardown(conn, "close", count=False)
        tasks = [t for c in self.connections.values() for t in c._tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            # wait_closed() also waits for handlers; one stuck on a dead peer must not hang the test.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ routing

    def pin_next(self, upstream_index: int) -> None:
        """The next accepted connection goes to this upstream (once)."""
        self._pinned = upstream_index

    def _pick(self, index: int) -> int:
        if self._pinned is not None:
            chosen, self._pinned = self._pinned, None
        elif self._choose is not None:
            chosen = self._choose(index)
        elif self.policy == "fixed":
            chosen = 0
        else:
            chosen = next(self._rr) % len(self.upstreams)
        if not 0 <= chosen < len(self.upstreams):
            raise ValueError(f"no upstream {chosen}")
        return chosen

    # ------------------------------------------------------------ forwarding

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        index = next(self._indexes)
        up_index = self._pick(index)
        upstream = self.upstreams[up_index]
        peer = client_w.get_extra_info("peername") or ("?", 0)
        conn = ProxiedConnection(index=index, upstream_index=up_index, upstream=upstream,
                                 peer=(peer[0], peer[1]), _client_w=client_w)
        conn._resume.set()
        self.connections[index] = conn
        self.counts["accepted"] += 1
        self.counts[f"upstream_{up_index}"] += 1
        armed = self.cut_after_server_bytes
        conn.cut_after_down = armed(conn) if callable(armed) else armed
        try:
            server_r, server_w = await asyncio.open_connection(*upstream)
        except OSError:
            self.counts["upstream_refused"] += 1
            self._teardown(conn, "rst", count=False)
            return
        conn._server_w = server_w
        if conn.closed:  # cut while we were connecting
            self._teardown(conn, conn.cut_mode or "rst", count=False)
            return
        for sock_w in (client_w, server_w):
            sock = sock_w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        conn._tasks = [
            loop.create_task(self._pump(conn, client_r, server_w, upstream=True)),
            loop.create_task(self._pump(conn, server_r, client_w, upstream=False)),
        ]
        # The accept handler returns; the pumps own the connection from here.

    async def _pump(self, conn: ProxiedConnection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        try:
            while not conn.closed:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await conn._resume.wait()
                if conn.closed:
                    return
                if upstream:
                    conn.bytes_up += len(data)
                    self.counts["bytes_up"] += len(data)
                else:
                    limit = conn.cut_after_down
                    if limit is not None and conn.bytes_down + len(data) >= limit:
                        keep = max(0, limit - conn.bytes_down)
                        if keep:
                            writer.write(data[:keep])
                            conn.bytes_down += keep
                            self.counts["bytes_down"] += keep
                            # Let the kept bytes leave before the cut (abort drops buffers).
                            for _ in range(200):
                                if writer.transport.get_write_buffer_size() == 0:
                                    break
                                await asyncio.sleep(0.005)
                        self._cut(conn, conn.cut_after_mode, reason="cuts_after_bytes")
                        return
                    conn.bytes_down += len(data)
                    self.counts["bytes_down"] += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not conn.closed:
                # One side closed or failed: pass the close on as the network would (FIN).
                self.counts["closed_by_peer"] += 1
                self._teardown(conn, "close", count=False)

    # ------------------------------------------------------------ faults

    def _cut(self, conn: ProxiedConnection, mode: str, *, reason: str) -> None:
        if mode not in CUT_MODES:
            raise ValueError(f"cut mode must be one of {CUT_MODES}, not {mode!r}")
        if conn.closed:
            return
        self.counts[reason] += 1
        self.counts["cuts"] += 1
        self._teardown(conn, mode, count=True)

    def _teardown(self, conn: ProxiedConnection, mode: str, *, count: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        if count:
            conn.cut_mode = mode
        conn._resume.set()
        for w in (conn._client_w, conn._server_w):
            if w is None:
                continue
            if mode == "rst":
                _set_rst(w)
                w.transport.abort()
            else:
                # A transport already gone, or a loop shutting down: the socket is closed either way.
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()
        current = asyncio.current_task()
        for task in conn._tasks:
            if task is not current:
                task.cancel()

    def cut(self, conn: ProxiedConnection | int, mode: str = "rst") -> None:
        """Break one connection now: ``rst`` (TCP reset both ways) or ``close`` (FIN both ways)."""
        c = self.connections[conn] if isinstance(conn, int) else conn
        self._cut(c, mode, reason=f"cuts_{mode}")

    def cut_all(self, mode: str = "rst") -> int:
        """Break every open connection; how many were cut."""
        open_ = [c for c in self.connections.values() if not c.closed]
        for c in open_:
            self._cut(c, mode, reason=f"cuts_{mode}")
        return len(open_)

    def cut_after(self, conn: ProxiedConnection | int, server_bytes: int, mode: str = "close") -> None:
        """Forward ``server_bytes`` more bytes from the upstream, then cut (mid-frame, likely).

        ``close`` (the default) delivers exactly those bytes then a FIN; with
        ``rst`` the peer's kernel may discard some of them when the reset lands.
        """
        c = self.connections[conn] if isinstance(conn, int) else conn
        if mode not in CUT_MODES:
            raise ValueError(f"cut mode must be one of {CUT_MODES}, not {mode!r}")
        if c.closed:
            return
        c.cut_after_mode = mode
        c.cut_after_down = c.bytes_down + max(0, server_bytes)
        if server_bytes <= 0:
            self._cut(c, mode, reason="cuts_after_bytes")

    def stall(self, conn: ProxiedConnection | int) -> None:
        """Stop forwarding in both directions; the sockets stay open (a dead radio link)."""
        c = self.connections[conn] if isinstance(conn, int) else conn
        c.stalled = True
        c._resume.clear()
        self.counts["stalls"] += 1

    def unstall(self, conn: ProxiedConnection | int) -> None:
        c = self.connections[conn] if isinstance(conn, int) else conn
        c.stalled = False
        c._resume.set()

    # ------------------------------------------------------------ lookup

    def find(self, *, peer_port: int) -> ProxiedConnection | None:
        """The newest connection whose client used this local port."""
        for c in reversed(list(self.connections.values())):
            if c.peer_port == peer_port:
                return c
        return None

    def open_connections(self) -> list[ProxiedConnection]:
        return [c for c in self.connections.values() if not c.closed]

    @property
    def stats(self) -> dict[str, int]:
        return dict(self.counts)


class BackgroundFaultProxy:
    """A :class:`FaultProxy` on its own event loop thread, for synchronous code.

    ``with BackgroundFaultProxy([port]) as proxy: proxy.call(lambda p: p.cut_all())``
    """

    def __init__(self, upstreams: Sequence[int | Upstream], **kwargs: Any) -> None:
        self._args = (upstreams, kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self.proxy: FaultProxy | None = None

    def start(self) -> BackgroundFaultProxy:
        self._thread.start()
        upstreams, kwargs = self._args

        async def make() -> FaultProxy:
            return await FaultProxy(upstreams, **kwargs).start()

        self.proxy = asyncio.run_coroutine_threadsafe(make(), self._loop).result(10)
        return self

    @property
    def port(self) -> int:
        assert self.proxy is not None
        return self.call(lambda p: p.port)

    def call(self, fn: Callable[[FaultProxy], Any], timeout: float = 10.0) -> Any:
        """Run ``fn(proxy)`` on the proxy's loop and return its result."""
        assert self.proxy is not None
        proxy = self.proxy

        async def run() -> Any:
            return fn(proxy)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self) -> None:
        if self.proxy is not None:
            asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(10)
            self.proxy = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> BackgroundFaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
