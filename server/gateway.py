"""The WebSocket gateway at ``/v1/ws``: one :class:`Connection` per socket.

A connection is two owned pieces: the receive loop (the endpoint coroutine
itself) and a sender task draining a queue of frames; heartbeats are checked
for all connections by one sweeper task of the runtime. Turns
are not owned here (see :mod:`server.turns`): a connection only follows them,
so a dropped socket leaves its turns running for the detached grace period.

Frames go out through :meth:`Connection.push`, which never blocks: the engine's
fan-out must not wait on a slow phone. The queue coalesces deltas of one turn
when a socket lags and closes a socket that stays stuck (see
:class:`server.outbox.Outbox`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from protocol import close_codes, frames
from protocol.codec import Codec, choose_subprotocol, codec_for
from protocol.errors import BadRequest, RapportError, Unauthorized, Unavailable

from .auth import bearer_token
from .outbox import Outbox, OutboxOverflow

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("rapport.gateway")



def origin_allowed(origin: str | None, host: str | None, allowlist: list[str]) -> bool:
    """Browsers send Origin; native apps and servers usually do not.

    Same-origin pages (the chat page served by this server) are always allowed;
    other origins only when configured (a cross-site WebSocket hijacking guard).
    """
    if not origin:
        return True
    if "*" in allowlist or origin in allowlist:
        return True
    netloc = urlsplit(origin).netloc
    return bool(host) and netloc == host


class Connection:
    def __init__(self, ws: WebSocket, runtime: Runtime, codec: Codec) -> None:
        self.ws = ws
        self.runtime = runtime
        self.codec = codec
        self.user_id = ""
        self.session_id = "s_" + uuid.uuid4().hex[:16]
        s = runtime.settings
        self.outbox = Outbox(max_frames=s.outbox_max_frames)
        self._wakeup = asyncio.Event()
        self._last_rx = time.monotonic()
        self._touched: set[str] = set()  # turns this socket started, resumed or cancelled
        self._remote: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._close_code: int | None = None
        self._stuck = False
        self._beating = False  # heartbeats run once the handshake is done
        self._next_ping = 0.0
        self._main: asyncio.Task[Any] | None = None

    # ------------------------------------------------------------ Follower

    def push(self, frame: dict[str, Any], *, live: bool = False) -> None:
        try:
            self.outbox.put(frame, live=live)
        except OutboxOverflow:
            # A socket that stays stuck is closed; its turns stay resumable.
            log.info("session %s: client stopped reading; closing it", self.session_id)
            self.runtime.metrics.slow_consumer_closed()
            self._request_close(close_codes.POLICY)
        self._wakeup.set()

    # ------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        self._tasks.append(loop.create_task(self._send_loop(), name=f"send {self.session_id}"))
        try:
            if await self._handshake():
                self._next_ping = time.monotonic() + self.runtime.settings.heartbeat_interval_ms / 1000.0
                self._beating = True
                await self._receive_loop()
        except WebSocketDisconnect:
            pass
        except asyncio.CancelledError:
            if not self._stuck:
                raise
            # Our own cancellation of a stuck socket, not the server's shutdown.
            if self._main is not None:
                self._main.uncancel()
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        manager = self.runtime.manager
        for turn_id in self._touched:
            manager.leave(self, turn_id)
        tasks = [*self._tasks, *self._remote.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.user_id:
            await self.runtime.connection_closed(self)

    def _drop_stuck(self) -> None:
        """Give up on a socket that stopped reading.

        Its sender is blocked in a send that waits for the peer to read, so a
        close frame could never go out. Stop the sender and the receive loop;
        returning from the endpoint lets the server close the transport, and
        everything this connection held is released now.
        """
        self._close_code = close_codes.POLICY
        self._stuck = True
        for task in self._tasks:
            task.cancel()
        if self._main is not None:
            self._main.cancel()

    def _request_close(self, code: int) -> None:
        if self._close_code is None:
            self._close_code = code
            self._wakeup.set()

    async def _close(self, code: int, reason: str = "") -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            try:
                await self.ws.close(code=code, reason=reason[:120])
            except (RuntimeError, OSError):
                pass

    # ------------------------------------------------------------ receiving

    async def _receive(self) -> str | bytes | None:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        self._last_rx = time.monotonic()
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        return data if data is not None else b""

    async def _decode(self, data: str | bytes) -> frames.ClientFrame | None:
        """Parse one frame; on bad input answer an error frame and return None."""
        limit = self.runtime.settings.max_frame_bytes
        size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
        if size > limit:
            # The server's WebSocket layer enforces this too (RFC 6455 7.4.1, 1009);
            # this check covers layers that do not.
            self._request_close(close_codes.TOO_BIG)
            return None
        try:
            return frames.parse_client_frame(self.codec.decode(data),
                                             max_input_chars=self.runtime.settings.max_input_chars)
        except RapportError as exc:
            self.runtime.metrics.bad_frame(exc.code)
            self.push(frames.error_from(exc))
            return None

    async def _handshake(self) -> bool:
        """Wait for a valid ``hello``; answer ``ready`` or close 4401."""
        s = self.runtime.settings
        header_token = bearer_token(self.ws.headers.get("authorization"))
        try:
            async with asyncio.timeout(s.hello_timeout_ms / 1000.0):
                while True:
                    data = await self._receive()
                    if data is None:
                        return False
                    frame = await self._decode(data)
                    if frame is None:
                        continue
                    if not isinstance(frame, frames.Hello):
                        self.push(frames.error("unauthorized", "send hello first"))
                        continue
                    self.outbox.coalesce = frame.coalesce
                    try:
                        self.user_id = self.runtime.auth.identify(
                            header_token=header_token, hello_token=frame.token, hello_user=frame.user)
                    except Unauthorized as exc:
                        self.push(frames.error_from(exc))
                        await self._flush_then_close(close_codes.UNAUTHORIZED, exc.message)
                        return False
                    break
        except TimeoutError:
            self.push(frames.error("unauthorized", "no valid hello within the time allowed"))
            await self._flush_then_close(close_codes.UNAUTHORIZED, "hello timeout")
            return False
        refusal = await self.runtime.connection_opened(self)
        if refusal is not None:
            await self._flush_then_close(refusal, "too many connections for this user")
            return False
        try:
            active = await self.runtime.manager.active_turns(self.user_id)
        except Unavailable as exc:
            self.push(frames.error_from(exc))
            active = []
        self._touched.update(t["turn_id"] for t in active)
        self.push(frames.ready(
            session_id=self.session_id, user_id=self.user_id, model=self.runtime.engine.model_name,
            interval_ms=s.heartbeat_interval_ms, timeout_ms=s.heartbeat_timeout_ms,
            max_frame_bytes=s.max_frame_bytes, max_input_chars=s.max_input_chars,
            turns_per_minute=s.turns_per_minute, active_turns=active,
        ))
        return True

    async def _flush_then_close(self, code: int, reason: str) -> None:
        # Give the sender a moment to deliver the error frame before closing.
        for _ in range(20):
            if not self.outbox:
                break
            await asyncio.sleep(0.005)
        await self._close(code, reason)

    async def _receive_loop(self) -> None:
        while self._close_code is None:
            data = await self._receive()
            if data is None:
                return
            frame = await self._decode(data)
            if frame is None:
                continue
            try:
                await self._dispatch(frame)
            except RapportError as exc:
                self.push(frames.error_from(exc))

    async def _dispatch(self, frame: frames.ClientFrame) -> None:
        rt = self.runtime
        match frame:
            case frames.TurnStart():
                received = time.monotonic() * 1000.0
                try:
                    await rt.admit_turn(self.user_id, client_turn_id=frame.client_turn_id)
                    turn_id = await rt.manager.start(self, frame, received)
                except RapportError as exc:
                    exc.fields.setdefault("client_turn_id", frame.client_turn_id)
                    raise
                self._touched.add(turn_id)
            case frames.TurnCancel(turn_id=turn_id):
                self._touched.add(turn_id)
                await rt.manager.cancel(self, turn_id)
            case frames.TurnResume(turn_id=turn_id, after_seq=after_seq):
                self._touched.add(turn_id)
                task = await rt.manager.follow(self, turn_id, after_seq)
                rt.metrics.resumed()
                if task is not None:
                    self.adopt(turn_id, task)
            case frames.HistoryGet(conversation_id=conv, limit=limit, before=before):
                messages = await rt.store.history(user_id=self.user_id, conversation_id=conv,
                                                  limit=limit, before=before)
                self.push(frames.history(conv, [
                    {"id": m.id, "role": m.role, "text": m.text, "turn_id": m.turn_id,
                     "status": m.status, "created_at": m.created_at} for m in messages]))
            case frames.HistoryClear(conversation_id=conv):
                await rt.store.clear_history(user_id=self.user_id, conversation_id=conv)
                self.push(frames.history_cleared(conv))
            case frames.Ping(t=t):
                self.push(frames.pong(t))
            case frames.Pong():
                pass
            case frames.Hello():
                raise BadRequest("hello was already received")

    def adopt(self, turn_id: str, task: asyncio.Task[None]) -> None:
        old = self._remote.pop(turn_id, None)
        if old is not None:
            old.cancel()
        self._remote[turn_id] = task
        task.add_done_callback(lambda t, tid=turn_id: self._remote_done(tid, t))

    def _remote_done(self, turn_id: str, task: asyncio.Task[None]) -> None:
        if self._remote.get(turn_id) is task:
            del self._remote[turn_id]
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, RapportError):
            self.push(frames.error_from(exc))
        elif exc is not None:
            log.error("session %s: following %s failed: %r", self.session_id, turn_id, exc)
            self.push(frames.error("internal", "following the turn failed", turn_id=turn_id))

    # ------------------------------------------------------------ sending

    async def _send_loop(self) -> None:
        send_text, send_bytes = self.ws.send_text, self.ws.send_bytes
        binary = self.codec.binary
        try:
            while True:
                while not self.outbox:
                    if self._close_code is not None:
                        await self._close(self._close_code)
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                frame = self.outbox.get()
                data = self.codec.encode(frame)
                if binary:
                    await send_bytes(data)  # type: ignore[arg-type]
                else:
                    await send_text(data)  # type: ignore[arg-type]
                if self._close_code is not None and not self.outbox:
                    await self._close(self._close_code)
                    return
        except (WebSocketDisconnect, RuntimeError, OSError):
            return

    def beat(self, now: float) -> None:
        """One heartbeat check, called by the process's sweeper (``Runtime``).

        A shared sweeper rather than a task per socket: 10,000 idle phones
        would otherwise mean 10,000 sleeping tasks and as many wake-ups.
        """
        if not self._beating or self._close_code is not None:
            return
        s = self.runtime.settings
        if now - self._last_rx >= s.heartbeat_timeout_ms / 1000.0:
            self._beating = False
            self.runtime.metrics.heartbeat_timeout()
            log.info("session %s: silent for %.1fs; closing 4408", self.session_id, now - self._last_rx)
            self._request_close(close_codes.HEARTBEAT_TIMEOUT)
            return
        stalled = self.outbox.stalled_since
        if stalled is not None and now - stalled > s.stuck_timeout_ms / 1000.0:
            # Frames have waited this long with none taken: the phone stopped
            # reading. Close it; its turns stay resumable.
            self._beating = False
            log.info("session %s: nothing sent for %.1fs; closing the stuck socket",
                     self.session_id, now - stalled)
            self.runtime.metrics.slow_consumer_closed()
            self._drop_stuck()
            return
        if now >= self._next_ping:
            self.push(frames.ping(int(time.time() * 1000)))
            self._next_ping = now + s.heartbeat_interval_ms / 1000.0

    async def close_going_away(self) -> None:
        """Server shutdown: tell the client to reconnect, possibly elsewhere (1001)."""
        self._request_close(close_codes.GOING_AWAY)


async def websocket_endpoint(ws: WebSocket) -> None:
    runtime: Runtime = ws.app.state.runtime
    s = runtime.settings
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), s.allowed_origins):
        # Closing before accept makes the server answer the handshake with 403.
        await ws.close(code=close_codes.POLICY)
        return
    subprotocol = choose_subprotocol(list(ws.scope.get("subprotocols") or []))
    await ws.accept(subprotocol=subprotocol)
    conn = Connection(ws, runtime, codec_for(subprotocol))
    runtime.connections.add(conn)
    try:
        await conn.serve()
    finally:
        runtime.connections.discard(conn)
