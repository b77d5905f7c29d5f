"""The fault-injecting proxy itself, against two tiny TCP servers."""

from __future__ import annotations

import asyncio

import pytest
from faultproxy import BackgroundFaultProxy, FaultProxy


class Upstream:
    """Sends its name, then echoes; ``blob`` makes it send that many bytes on request."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(self.name + b"\n")
        try:
            while data := await r.read(1024):
                if data.startswith(b"blob"):
                    w.write(b"x" * int(data[4:]))
                else:
                    w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def upstreams():
    ups = [await Upstream(b"A").start(), await Upstream(b"B").start()]
    yield ups
    for u in ups:
        await u.close()


async def dial(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    name = (await asyncio.wait_for(r.readline(), 5)).strip()
    return r, w, name


async def test_round_robin_pinning_and_lookup(upstreams):
    async with FaultProxy([u.port for u in upstreams]) as proxy:
        names = []
        for _ in range(4):
            r, w, name = await dial(proxy)
            names.append(name)
            w.close()
        assert names == [b"A", b"B", b"A", b"B"]
        proxy.pin_next(1)
        r, w, name = await dial(proxy)
        assert name == b"B"
        conn = proxy.find(peer_port=w.get_extra_info("sockname")[1])
        assert conn is not None and conn.upstream_index == 1
        w.write(b"hello")
        assert await asyncio.wait_for(r.readexactly(5), 5) == b"hello"
        assert conn.bytes_up == 5 and conn.bytes_down == 2 + 5
        w.close()
        assert proxy.stats["accepted"] == 5


async def test_cuts(upstreams):
    async with FaultProxy([upstreams[0].port], policy="fixed") as proxy:
        r, w, _ = await dial(proxy)
        proxy.cut(proxy.open_connections()[0], "rst")
        with pytest.raises(ConnectionResetError):
            while await asyncio.wait_for(r.read(1024), 5):
                pass
        w.close()

        r, w, _ = await dial(proxy)
        proxy.cut(proxy.open_connections()[0], "close")
        assert await asyncio.wait_for(r.read(1024), 5) == b""  # a clean EOF, nothing else
        w.close()

        r, w, _ = await dial(proxy)
        conn = proxy.open_connections()[0]
        proxy.cut_after(conn, 100)
        w.write(b"blob1000")
        data = b""
        while chunk := await asyncio.wait_for(r.read(4096), 5):
            data += chunk
        assert data == b"x" * 100
        w.close()

        _, w1, _ = await dial(proxy)
        _, w2, _ = await dial(proxy)
        assert proxy.cut_all() == 2
        assert proxy.stats["cuts"] == 5
        assert proxy.stats["cuts_rst"] == 3 and proxy.stats["cuts_close"] == 1
        assert proxy.stats["cuts_after_bytes"] == 1
        for w_ in (w1, w2):
            w_.close()


async def test_stall_holds_data_until_released(upstreams):
    async with FaultProxy([upstreams[0].port]) as proxy:
        r, w, _ = await dial(proxy)
        conn = proxy.open_connections()[0]
        proxy.stall(conn)
        w.write(b"ping")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r.read(4), 0.3)
        proxy.unstall(conn)
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        w.close()


def test_background_proxy_for_synchronous_code():
    import socket
    import socketserver
    import threading

    class Hello(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"hi\n")

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hello) as upstream:
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        try:
            with BackgroundFaultProxy([upstream.server_address[1]]) as bg:
                with socket.create_connection(("127.0.0.1", bg.port), timeout=5) as s:
                    assert s.recv(3) == b"hi\n"
                assert bg.call(lambda p: p.stats["accepted"]) == 1
                with socket.create_connection(("127.0.0.1", bg.port), timeout=5) as s:
                    assert s.recv(3) == b"hi\n"
                    assert bg.call(lambda p: p.cut_all("rst")) in (0, 1)
        finally:
            upstream.shutdown()
