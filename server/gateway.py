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

Nothing one socket sends or fails to read grows without bound: its outbox is
bounded in frames and bytes, its incoming frames go through a token bucket
(:class:`FrameRate`), and what it remembers per frame (the turns it touched)
only holds turns that exist.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from protocol import close_codes, frames
from protocol.codec import Codec, choose_subprotocol, codec_for
from protocol.errors import BadRequest, NotFound, RapportError, Unauthorized, Unavailable
from sessions.exchanges import wire_messages

from .auth import bearer_token
from .config import is_loopback
from .outbox import Outbox, OutboxOverflow
from .turns import DEFAULT_USER_NAME

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("rapport.gateway")

#: How long the handshake waits on Redis (the connection cap, the list of
#: running turns) before it goes on without it: well inside the deadline from
#: upgrade to `ready` (the hello timeout plus a few seconds, server.serving), so
#: a stalled Redis never costs a phone its connection.
HANDSHAKE_STORAGE_TIMEOUT_S = 1.5

#: The scope extension through which the server's WebSocket protocol offers
#: itself (``server.serving.GuardedWebSocketProtocol``); absent elsewhere.
SOCKET_EXTENSION = "rapport.socket"

#: Past this many remembered turns, those no longer running here are forgotten.
TOUCHED_PRUNE_AT = 64

#: The longest close reason RFC 6455 section 5.5 allows: a control frame's
#: payload is at most 125 bytes, two of which are the code.
MAX_CLOSE_REASON_BYTES = 123


class SocketControl(Protocol):
    """What the WebSocket protocol under a connection offers the gateway."""

    def authenticated(self) -> None: ...

    def close_now(self, code: int, reason: str, grace_s: float = ...) -> None: ...


class FrameRate:
    """A token bucket over one socket's incoming frames (every kind, ``hello`` included).

    ``burst`` frames may come at once, ``rate`` per second on average. A frame
    without a token is not processed; the caller answers it ``rate_limited``.
    ``refused`` counts refused frames since the bucket was last full: a client
    that waits as told refills it, one that keeps sending is :attr:`flooding`
    once it has sent another whole burst while refused.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "refused")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = float(rate)
        self.burst = int(burst)
        self.tokens = float(burst)
        self.stamp = now
        self.refused = 0

    def take(self, now: float) -> bool:
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= self.burst:
            self.refused = 0
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.refused += 1
        return False

    @property
    def flooding(self) -> bool:
        return self.refused > self.burst

    def retry_after_ms(self) -> int:
        """Until the next token."""
        return max(1, math.ceil((1.0 - self.tokens) / self.rate * 1000.0))


def origin_allowed(origin: str | None, host: str | None, allowlist: list[str], *,
                   loopback_only: bool = False) -> bool:
    """Browsers send Origin; native apps and servers usually do not.

    Same-origin pages (the chat page served by this server) are always allowed;
    other origins only when configured (a cross-site WebSocket hijacking guard).
    With ``loopback_only`` (the development mode, which trusts ``hello.user``)
    same-origin counts only for a loopback Host: a DNS-rebinding page (its own
    name made to resolve to 127.0.0.1) sends matching Host and Origin headers,
    both naming the attacker's domain.
    """
    if not origin:
        return True
    if "*" in allowlist or origin in allowlist:
        return True
    netloc = urlsplit(origin).netloc
    if not host or netloc != host:
        return False
    return not loopback_only or is_loopback(urlsplit("//" + host).hostname or "")


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame can carry, as valid UTF-8 (RFC 6455 section 5.5.1)."""
    raw = text.encode("utf-8", "replace")[:MAX_CLOSE_REASON_BYTES]
    return raw.decode("utf-8", "ignore")


class Connection:
    def __init__(self, ws: WebSocket, runtime: Runtime, codec: Codec) -> None:
        self.ws = ws
        self.runtime = runtime
        self.codec = codec
        self.user_id = ""
        #: What a character calls this user (the token's ``name`` claim).
        self.display_name = DEFAULT_USER_NAME
        #: The roles the token granted (server.auth.ROLES); empty before hello.
        self.roles: frozenset[str] = frozenset()
        self.session_id = "s_" + uuid.uuid4().hex[:16]
        s = runtime.settings
        self.outbox = Outbox(max_frames=s.outbox_max_frames, max_bytes=s.outbox_max_bytes)
        self._wakeup = asyncio.Event()
        self._last_rx = time.monotonic()
        self._rate = FrameRate(s.frames_per_second, s.frame_burst, self._last_rx)
        # Turns this socket started, resumed or cancelled (to leave them when it
        # goes); only turns that exist, so made-up ids cannot grow it.
        self._touched: set[str] = set()
        self._remote: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._close_code: int | None = None
        self._close_reason = ""
        self._close_requested_at = 0.0
        self._close_sent = False
        self._dropped = False  # given up on: no more frames, tasks cancelled
        self._beating = False  # heartbeats run once the handshake is done
        self._next_ping = 0.0
        self._main: asyncio.Task[Any] | None = None
        extensions = ws.scope.get("extensions") or {}
        self._socket: SocketControl | None = extensions.get(SOCKET_EXTENSION)

    # ------------------------------------------------------------ Follower

    def push(self, frame: dict[str, Any], *, live: bool = False) -> None:
        if self._dropped:
            return  # nobody will read it; turns keep pushing until they notice we left
        try:
            self.outbox.put(frame, live=live)
        except OutboxOverflow as exc:
            # A socket that stays stuck is closed; its turns stay resumable.
            self._drop_slow_consumer(exc.message, close_codes.POLICY)
            return
        self._wakeup.set()

    # ------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        sender = loop.create_task(self._send_loop(), name=f"send {self.session_id}")
        self._tasks.append(sender)
        try:
            if await self._handshake():
                self._next_ping = time.monotonic() + self.runtime.settings.heartbeat_interval_ms / 1000.0
                self._beating = True
                await self._receive_loop()
            if self._close_code is not None and not sender.done():
                # A close was asked for (a flood, a frame too big, a shutdown): the
                # sender delivers what is queued, then the close frame. Teardown
                # cancels it, so wait for it here, as long as any frame may wait.
                stuck_s = self.runtime.settings.stuck_timeout_ms / 1000.0
                await asyncio.wait([sender], timeout=stuck_s)
                if not sender.done():
                    self._drop_slow_consumer(f"its close frame waited {stuck_s:.1f} s", self._close_code)
        except WebSocketDisconnect:
            pass
        except asyncio.CancelledError:
            if not self._dropped:
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

    def _drop_slow_consumer(self, why: str, code: int) -> None:
        """Give up on a socket that stopped reading: once, whatever keeps pushing.

        Its sender is blocked in a send that waits for the peer to read, so a
        close frame would never go out through it. The frames it still holds
        are dropped (they are what the memory bound is about); the close frame
        goes straight behind what the transport already holds, and a peer that
        does not take it within the stuck timeout is cut off, releasing the
        descriptor. The sender and the receive loop stop now, so the turns, the
        registry entry and the metrics gauge are released at once.
        """
        if self._dropped:
            return
        self._dropped = True
        self._beating = False
        log.info("session %s: client stopped reading (%s); closing it %d", self.session_id, why, code)
        self.runtime.metrics.slow_consumer_closed()
        self.outbox.clear()
        if self._close_code is None:
            self._close_code = code
        if self._socket is not None:
            self._socket.close_now(code, "client stopped reading",
                                   grace_s=self.runtime.settings.stuck_timeout_ms / 1000.0)
        for task in self._tasks:
            task.cancel()
        if self._main is not None:
            # Also when pushed from the receive loop itself: it stops at its next await.
            self._main.cancel()

    def _request_close(self, code: int, reason: str = "") -> None:
        if self._close_code is None:
            self._close_code = code
            self._close_reason = reason
            self._close_requested_at = time.monotonic()
            self._wakeup.set()

    async def _close(self, code: int, reason: str = "") -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            try:
                await self.ws.close(code=code, reason=close_reason(reason))
            except (RuntimeError, OSError):
                pass
        self._close_sent = True

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

    def _admit(self) -> bool:
        """Take a token for the frame just received; False when it must not be processed.

        A refused frame is answered ``rate_limited`` (at most ``frame_burst`` of
        those before the socket counts as flooding and is closed 1008), so every
        frame a client sends gets exactly one answer or the socket closes.
        """
        if self._rate.take(self._last_rx):
            return True
        self.runtime.metrics.frame_rate_limited()
        if self._rate.flooding:
            if self._close_code is None:
                log.info("session %s: over %d frames refused for the frame rate; closing 1008",
                         self.session_id, self._rate.burst)
                self.runtime.metrics.flood_closed()
                self._request_close(close_codes.POLICY, "too many frames; slow down")
            return False
        s = self.runtime.settings
        self.push(frames.error(
            "rate_limited", f"more than {s.frames_per_second:g} frames a second (bursts of {s.frame_burst}); "
                            "this frame was not processed", retry_after_ms=self._rate.retry_after_ms()))
        return False

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
                    if data is None or self._close_code is not None:
                        return False
                    if not self._admit():
                        continue
                    frame = await self._decode(data)
                    if frame is None:
                        continue
                    if not isinstance(frame, frames.Hello):
                        self.push(frames.error("unauthorized", "send hello first"))
                        continue
                    self.outbox.coalesce = frame.coalesce
                    try:
                        # Awaits the identity provider's keys when the token names a new one;
                        # refusals are audited by the authenticator (a reason code, never the token).
                        identity = await self.runtime.auth.resolve(
                            header_token=header_token, hello_token=frame.token, hello_user=frame.user)
                    except Unauthorized as exc:
                        self.push(frames.error_from(exc))
                        await self._flush_then_close(close_codes.UNAUTHORIZED, exc.message)
                        return False
                    self.user_id = identity.user_id
                    self.roles = identity.roles
                    self.display_name = identity.name or DEFAULT_USER_NAME
                    break
        except TimeoutError:
            self.push(frames.error("unauthorized", "no valid hello within the time allowed"))
            await self._flush_then_close(close_codes.UNAUTHORIZED, "hello timeout")
            return False
        refusal = await self.runtime.connection_opened(self, HANDSHAKE_STORAGE_TIMEOUT_S)
        if refusal is not None:
            await self._flush_then_close(refusal, "too many connections for this user")
            return False
        if self._close_code is not None:
            return False  # closed meanwhile (a shutdown): no ready for a socket on its way out
        try:
            async with asyncio.timeout(HANDSHAKE_STORAGE_TIMEOUT_S):
                active = await self.runtime.manager.active_turns(self.user_id)
        except Unavailable as exc:
            self.push(frames.error_from(exc))
            active = []
        except TimeoutError:
            # A stalled Redis (paused, or partitioned without a reset) answers
            # nothing at all; the phone still gets `ready`, told why its list
            # of running turns is empty and when to ask again.
            self.push(frames.error_from(Unavailable("storage unavailable; retry shortly")))
            active = []
        self._touched.update(t["turn_id"] for t in active)
        self.push(frames.ready(
            session_id=self.session_id, user_id=self.user_id, model=self.runtime.engine.model_name,
            interval_ms=s.heartbeat_interval_ms, timeout_ms=s.heartbeat_timeout_ms,
            max_frame_bytes=s.max_frame_bytes, max_input_chars=s.max_input_chars,
            turns_per_minute=s.turns_per_minute, active_turns=active,
        ))
        if self._socket is not None:
            self._socket.authenticated()
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
            if not self._admit():
                continue
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
            case frames.TurnStart() | frames.TurnRegenerate() | frames.TurnEdit():
                received = time.monotonic() * 1000.0
                try:
                    # A blocked message is refused before admission and before
                    # anything is stored (error content_filter).
                    if not isinstance(frame, frames.TurnRegenerate):
                        rt.moderation.check_input(frame.text, user_id=self.user_id)
                    await rt.admit_turn(self.user_id, client_turn_id=frame.client_turn_id)
                    turn_id = await rt.manager.start(self, frame, received, user_name=self.display_name)
                except RapportError as exc:
                    exc.fields.setdefault("client_turn_id", frame.client_turn_id)
                    raise
                self._touch(turn_id)
            case frames.TurnSelect(conversation_id=conv, turn_id=turn_id):
                exchange_id = await rt.manager.select(self.user_id, conv, turn_id)
                self.push(frames.turn_selected(conversation_id=conv, exchange_id=exchange_id, turn_id=turn_id))
                await rt.feedback.selected(self.user_id, turn_id)
            case frames.Feedback(turn_id=turn_id, rating=rating, reason=reason):
                answer = await rt.feedback.rate(self.user_id, turn_id, rating, reason)
                self.push(frames.feedback_recorded(turn_id=answer["turn_id"], rating=answer["rating"]))
            case frames.TurnCancel(turn_id=turn_id):
                # Remembered only once the turn turned out to exist: an id that is
                # not_found leaves nothing behind.
                await rt.manager.cancel(self, turn_id)
                self._touch(turn_id)
            case frames.TurnResume(turn_id=turn_id, after_seq=after_seq):
                task = await rt.manager.follow(self, turn_id, after_seq)
                rt.metrics.resumed()
                self._touch(turn_id)
                if task is not None:
                    self.adopt(turn_id, task)
            case frames.HistoryGet(conversation_id=conv, limit=limit, before=before):
                messages, meta = await rt.store.history_and_meta(user_id=self.user_id, conversation_id=conv,
                                                                 limit=limit, before=before)
                self.push(frames.history(conv, wire_messages(messages, meta),
                                         character_id=meta.get("character_id")))
            case frames.HistoryClear(conversation_id=conv):
                await rt.store.clear_history(user_id=self.user_id, conversation_id=conv)
                self.push(frames.history_cleared(conv))
            case frames.MemoryAdd(text=text):
                # A fact reaches the model like a message does: the same input check.
                rt.moderation.check_input(text, user_id=self.user_id)
                await rt.facts.add(self.user_id, text)
                self.push(frames.memory([f.wire() for f in await rt.facts.list(self.user_id)]))
            case frames.MemoryList():
                self.push(frames.memory([f.wire() for f in await rt.facts.list(self.user_id)]))
            case frames.MemoryDelete(id=fact_id):
                if not await rt.facts.delete(self.user_id, fact_id):
                    raise NotFound(f"no pinned fact '{fact_id}'")
                self.push(frames.memory([f.wire() for f in await rt.facts.list(self.user_id)]))
            case frames.Ping(t=t):
                self.push(frames.pong(t))
            case frames.Pong():
                pass
            case frames.Hello():
                raise BadRequest("hello was already received")

    def _touch(self, turn_id: str) -> None:
        self._touched.add(turn_id)
        if len(self._touched) > TOUCHED_PRUNE_AT:
            # Only turns running here need leaving; the others ended or live elsewhere.
            live = self.runtime.manager.live
            self._touched = {t for t in self._touched if t in live}

    def adopt(self, turn_id: str, task: asyncio.Task[None]) -> None:
        old = self._remote.pop(turn_id, None)
        if old is not None:
            old.cancel()
        self._remote[turn_id] = task
        task.add_done_callback(functools.partial(self._remote_done, turn_id))

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
        # Server frames take the codec's fast encoder (msgspec); its output decodes to the same maps.
        encode = self.codec.encode_frame
        outbox, wakeup = self.outbox, self._wakeup
        try:
            while True:
                while not outbox:
                    if self._close_code is not None:
                        await self._close(self._close_code, self._close_reason)
                        return
                    wakeup.clear()
                    await wakeup.wait()
                frame = outbox.get()
                data = encode(frame)
                if binary:
                    await send_bytes(data)  # type: ignore[arg-type]
                else:
                    await send_text(data)  # type: ignore[arg-type]
                if self._close_code is not None and not outbox:
                    await self._close(self._close_code, self._close_reason)
                    return
        except (WebSocketDisconnect, RuntimeError, OSError):
            return

    def beat(self, now: float) -> None:
        """One heartbeat check, called by the process's sweeper (``Runtime``).

        A shared sweeper rather than a task per socket: 10,000 idle phones
        would otherwise mean 10,000 sleeping tasks and as many wake-ups.
        """
        if self._dropped:
            return
        s = self.runtime.settings
        stuck_s = s.stuck_timeout_ms / 1000.0
        if self._close_code is not None:
            # A close was asked for (4408, a flood, a shutdown) and waits behind
            # frames the peer does not take: it gets the stuck timeout, like any frame.
            if not self._close_sent and now - self._close_requested_at > stuck_s:
                self._drop_slow_consumer(f"its close frame waited {now - self._close_requested_at:.1f} s",
                                         self._close_code)
            return
        if not self._beating:
            return
        if now - self._last_rx >= s.heartbeat_timeout_ms / 1000.0:
            self._beating = False
            self.runtime.metrics.heartbeat_timeout()
            log.info("session %s: silent for %.1fs; closing 4408", self.session_id, now - self._last_rx)
            self._request_close(close_codes.HEARTBEAT_TIMEOUT)
            return
        stalled = self.outbox.stalled_since
        if stalled is not None and now - stalled > stuck_s:
            # Frames have waited this long with none taken: the phone stopped
            # reading. Close it; its turns stay resumable.
            self._drop_slow_consumer(f"nothing sent for {now - stalled:.1f} s", close_codes.POLICY)
            return
        if now >= self._next_ping:
            self.push(frames.ping(int(time.time() * 1000)))
            self._next_ping = now + s.heartbeat_interval_ms / 1000.0

    async def close_going_away(self) -> None:
        """Server shutdown: tell the client to reconnect, possibly elsewhere (1001)."""
        self._request_close(close_codes.GOING_AWAY, "server shutting down")


async def websocket_endpoint(ws: WebSocket) -> None:
    runtime: Runtime = ws.app.state.runtime
    s = runtime.settings
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), s.allowed_origins,
                          loopback_only=s.auth == "dev"):
        # Closing before accept makes the server answer the handshake with 403.
        await ws.close(code=close_codes.POLICY)
        return
    subprotocol = choose_subprotocol(list(ws.scope.get("subprotocols") or []))
    try:
        await ws.accept(subprotocol=subprotocol)
    except (RuntimeError, OSError, WebSocketDisconnect):
        return  # closed before the app could accept (the server dropped it meanwhile)
    if getattr(ws.app.state, "draining", False):
        # The server is shutting down: a socket that got in during the drain is
        # told to go elsewhere, like every other (never ready and then 1012).
        try:
            await ws.close(code=close_codes.GOING_AWAY, reason="server shutting down")
        except (RuntimeError, OSError, WebSocketDisconnect):
            pass
        return
    conn = Connection(ws, runtime, codec_for(subprotocol))
    runtime.connections.add(conn)
    try:
        await conn.serve()
    finally:
        runtime.connections.discard(conn)
