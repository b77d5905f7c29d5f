"""The reconnecting client: :class:`ResilientClient` and its :class:`ResilientTurn`.

Hides a flaky network from the application (protocol guarantees 1-3, 7):
reconnects with exponential backoff and full jitter (:mod:`clients.retry`),
heartbeats, resumes every followed turn with the last seq it holds, re-sends
an unacknowledged ``turn.start`` with the same ``client_turn_id`` and drops
the replayed duplicates by seq. The app sees one uninterrupted stream per turn::

    async with ResilientClient(url, token=jwt) as client:
        async for delta in client.send("hi", conversation_id="default"):
            print(delta["text"], end="", flush=True)

Every task this module creates is owned (named ``rapport:*``), cancelled and
awaited on ``close()``: the supervisor, and the short helper tasks that
deliver a cancel or recover an expired resume.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from protocol import client_frames, close_codes
from protocol.codec import JSON_SUBPROTOCOL
from protocol.frames import DEFAULT_CONVERSATION

from .connection import DEFAULT_MAX_SIZE, RapportConnection
from .errors import (
    AuthenticationError,
    ClientError,
    ConnectionLost,
    ProtocolViolation,
    ServerError,
    credentials_refused,
)
from .retry import BACKOFF_BASE_S, BACKOFF_CAP_S, backoff_delay, retry
from .turn_stream import BaseTurnStream

__all__ = ["ResilientClient", "ResilientTurn"]

log = logging.getLogger("rapport.client")


class _GaveUp(Exception):
    """max_attempts consecutive connection attempts failed; ``error`` is what the app sees."""

    def __init__(self, error: ConnectionLost) -> None:
        super().__init__(str(error))
        self.error = error


class ResilientTurn(BaseTurnStream):
    """One turn followed across reconnects; the app sees each delta exactly once.

    Returned un-sent by :meth:`ResilientClient.send` (iterating sends it) and
    sent by :meth:`ResilientClient.start_turn`.
    """

    strict = False

    def __init__(self, client: ResilientClient, start_frame: dict[str, Any] | None, *,
                 turn_id: str | None = None, after_seq: int = 0,
                 conversation_id: str | None = None) -> None:
        super().__init__(
            turn_id=turn_id,
            client_turn_id=start_frame["client_turn_id"] if start_frame else None,
            conversation_id=start_frame["conversation_id"] if start_frame else conversation_id,
            after_seq=after_seq,
        )
        self._client = client
        self._start_frame = start_frame
        self._conn: RapportConnection | None = None
        self._sends = 0
        self._submitted = False
        self._cancel_requested = False
        self._recovering = False

    async def submit(self) -> None:
        if not self._submitted:
            self._submitted = True
            await self._client._submit(self)

    def cancel(self) -> None:
        """Request cancellation (safe from sync UI callbacks); delivered even across reconnects."""
        self._client._spawn(self._client.cancel(self))

    async def _before_read(self) -> None:
        await self.submit()

    def _on_lost(self, exc: ClientError) -> None:
        pass  # still followed: the client resumes or re-sends it on the next connection

    def _dropped(self) -> None:
        self._client.duplicates_dropped += 1

    def _on_accepted(self, frame: dict[str, Any]) -> None:
        super()._on_accepted(frame)
        if self._cancel_requested:
            self._client._spawn(self._client._deliver_cancel(self))

    def _on_error(self, frame: dict[str, Any]) -> None:
        if frame.get("code") == "resume_expired" and self.turn_id is not None:
            self._recovering = True
            self._client._spawn(self._client._recover_expired(self, frame))
            return
        super()._on_error(frame)

    def _finish_with_text(self, text: str, finish_reason: Any, source: str) -> None:
        """End the turn from a final text obtained outside the delta stream."""
        if self._start_seq == 0:
            held = self.text
            if not text.startswith(held):
                self._fail(ProtocolViolation("the final text does not extend the deltas already delivered"))
                return
            if len(text) > len(held):
                self._push({"type": "turn.delta", "turn_id": self.turn_id, "seq": self.last_seq + 1,
                            "text": text[len(held):], "catch_up": True})
        self._finish({"type": "turn.end", "turn_id": self.turn_id, "seq": self.last_seq,
                      "finish_reason": finish_reason if isinstance(finish_reason, str) else "unknown",
                      "text": text, "usage": None, "timings": None, "recovered_from": source})

    def _done_hook(self) -> None:
        self._client._turns.pop(self, None)


class ResilientClient:
    """A Rapport client that reconnects, heartbeats and resumes on its own.

    ``token`` may be a string or a (sync or async) callable returning one,
    called before every connection attempt. ``rng``/``sleep`` are injectable
    for tests; ``heartbeat_interval``/``heartbeat_timeout`` (seconds) override
    the ``ready`` frame's. ``max_attempts`` bounds consecutive failed
    connection attempts (None: forever).
    """

    def __init__(self, url: str, *, token: str | Callable[[], str | Awaitable[str]] | None = None,
                 user: str | None = None, subprotocol: str = JSON_SUBPROTOCOL,
                 token_in_header: bool = True, client_name: str = "rapport-python",
                 open_timeout: float = 10.0, close_timeout: float = 2.0,
                 max_size: int | None = DEFAULT_MAX_SIZE,
                 backoff_base: float = BACKOFF_BASE_S, backoff_cap: float = BACKOFF_CAP_S,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 max_attempts: int | None = None,
                 heartbeat_interval: float | None = None, heartbeat_timeout: float | None = None,
                 on_state: Callable[[str], Any] | None = None) -> None:
        self.url = url
        self._token = token
        self._open_kwargs: dict[str, Any] = dict(user=user, subprotocol=subprotocol, token_in_header=token_in_header,
                                 client_name=client_name, open_timeout=open_timeout,
                                 close_timeout=close_timeout, max_size=max_size)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._max_attempts = max_attempts
        self._hb_interval = heartbeat_interval
        self._hb_timeout = heartbeat_timeout
        self._on_state = on_state

        self._turns: dict[ResilientTurn, None] = {}  # followed turns, in start order
        self._conn: RapportConnection | None = None
        self._ready: dict[str, Any] | None = None
        self._changed = asyncio.Event()  # replaced on every change: a broadcast
        self._fatal: BaseException | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

        self.state = "idle"
        self.active_turns: list[dict[str, Any]] = []  # server-reported turns this client does not follow
        self.connect_attempts = 0
        self.reconnects = 0  # connections that reached ready after the first one
        self.resumes = 0  # turn.resume frames sent
        self.resends = 0  # turn.start frames sent again (same client_turn_id)
        self.duplicates_dropped = 0
        self.dead_connections = 0  # connections abandoned for server silence

    # -------------------------------------------------- lifecycle

    @property
    def ready(self) -> dict[str, Any] | None:
        return self._ready

    @property
    def connection(self) -> RapportConnection | None:
        return self._conn

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> dict[str, int]:
        return {"connect_attempts": self.connect_attempts, "reconnects": self.reconnects,
                "resumes": self.resumes, "resends": self.resends,
                "duplicates_dropped": self.duplicates_dropped, "dead_connections": self.dead_connections}

    def start(self) -> None:
        if self._closed:
            raise ClientError("client closed")
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._run(), name="rapport:supervisor")

    async def connect(self, timeout: float | None = None) -> dict[str, Any]:
        """Start (if needed) and wait for a ready connection; returns the ``ready`` frame."""
        self.start()
        return await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            await self._live_connection()
        assert self._ready is not None
        return self._ready

    async def _live_connection(self) -> RapportConnection:
        while True:
            if self._fatal is not None:
                raise self._fatal
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:  # a UI callback must not kill the connection machinery
                log.exception("on_state callback failed")

    async def __aenter__(self) -> ResilientClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop everything: the supervisor, helper tasks, the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._fatal is None:
            self._fatal = ClientError("client closed")
        tasks = [t for t in [self._supervisor, *self._tasks] if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        for turn in list(self._turns):
            turn._fail(ConnectionLost("client closed"))
        self._notify()
        self._set_state("closed")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name="rapport:task")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("client task failed", exc_info=task.exception())

    def _fail(self, exc: BaseException) -> None:
        """A fatal condition: every followed turn and waiter gets ``exc``."""
        if self._fatal is None:
            self._fatal = exc
        for turn in list(self._turns):
            turn._fail(exc)
        self._notify()
        self._set_state("closed")

    # -------------------------------------------------- the supervisor

    def _delay(self, attempt: int) -> float:
        return backoff_delay(attempt, base=self._backoff_base, cap=self._backoff_cap, rng=self._rng)

    async def _run(self) -> None:
        try:
            await self._supervise()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surface to the app instead of dying silently
            log.exception("rapport client stopped")
            self._fail(exc)

    async def _open(self) -> RapportConnection:
        # A callable token is asked again before every attempt: it may have been refreshed.
        source = self._token
        token = source() if callable(source) else source
        if inspect.isawaitable(token):
            token = await token
        return await RapportConnection.open(self.url, token=token, **self._open_kwargs)

    async def _supervise(self) -> None:
        exponent = 0  # backoff exponent of the next failed attempt; reset by every ready
        first = True
        while True:
            try:
                conn = await self._connect_with_backoff(first, exponent)
            except AuthenticationError as exc:
                self._fail(exc)
                return
            except ServerError as exc:
                if exc.code != "unauthorized":
                    raise
                self._fail(AuthenticationError(f"hello refused: {exc.message}"))
                return
            except _GaveUp as exc:
                self._fail(exc.error)
                return

            exponent = 0
            if not first:
                self.reconnects += 1
            first = False
            try:
                await self._attach(conn)
                await self._watch(conn)
            finally:
                if self._conn is conn:
                    self._conn = None
                    self._notify()
                await conn.close()
            code = conn.close_code
            if code == close_codes.UNAUTHORIZED:
                self._fail(ConnectionLost.from_close(code, conn.close_reason))
                return
            if code in (close_codes.TOO_MANY_CONNECTIONS, close_codes.POLICY):
                exponent = 3  # the server pushed back: wait longer (up to a 4 s window)
            log.info("connection lost (close %s); reconnecting", code)
            self._set_state("reconnecting")
            await self._sleep(self._delay(exponent))
            exponent += 1

    async def _connect_with_backoff(self, first: bool, exponent: int) -> RapportConnection:
        """Open a connection, retrying with backoff from ``exponent`` up to ``max_attempts`` times.

        Refused credentials are final (AuthenticationError, or a ServerError
        answering the hello); so is any error that is not about the
        connection. Giving up raises :class:`_GaveUp`.
        """
        failures = 0  # consecutive failed attempts, for max_attempts

        async def attempt() -> RapportConnection:
            nonlocal failures
            self._set_state("connecting" if first else "reconnecting")
            self.connect_attempts += 1
            try:
                return await self._open()
            except (ConnectionLost, ServerError) as exc:
                if not credentials_refused(exc):
                    failures += 1  # includes 4429/1008 before ready: plain backoff
                    log.info("connection attempt %d failed: %s", failures, exc)
                raise

        def backoff(exc: Exception, retries: int) -> float | None:
            if not isinstance(exc, (ConnectionLost, ServerError)) or credentials_refused(exc):
                return None
            return self._delay(exponent + retries)

        max_retries = None if self._max_attempts is None else max(self._max_attempts - 1, 0)
        try:
            return await retry(attempt, delay=backoff, max_retries=max_retries, sleep=self._sleep)
        except (ConnectionLost, ServerError) as exc:
            if credentials_refused(exc):
                raise
            raise _GaveUp(ConnectionLost(f"gave up after {failures} attempts: {exc}",
                                         close_code=getattr(exc, "close_code", None))) from exc

    async def _attach(self, conn: RapportConnection) -> None:
        self._conn = conn
        self._ready = conn.ready
        followed = {t.turn_id for t in self._turns if t.turn_id}
        reported = conn.ready.get("active_turns")
        self.active_turns = [t for t in reported if isinstance(t, dict) and t.get("turn_id") not in followed] \
            if isinstance(reported, list) else []
        self._notify()
        self._set_state("ready")
        for turn in list(self._turns):
            await self._attach_turn(turn, conn)

    async def _attach_turn(self, turn: ResilientTurn, conn: RapportConnection) -> None:
        """Start, re-send or resume ``turn`` on ``conn`` (at most once per connection)."""
        if turn.done or turn._recovering or turn._conn is conn or conn.closed:
            return
        turn._conn = conn
        turn._since_attach = 0
        try:
            if turn.turn_id is None:
                assert turn._start_frame is not None
                if turn._sends:
                    self.resends += 1
                turn._sends += 1
                await conn._start_with_sink(turn._start_frame, turn)  # the SAME frame every time
            else:
                self.resumes += 1
                await conn._resume_with_sink(turn.turn_id, turn.last_seq, turn)
                if turn._cancel_requested:
                    await conn.cancel(turn.turn_id)
        except ConnectionLost:
            pass  # the next connection attaches it again

    async def _watch(self, conn: RapportConnection) -> None:
        """Heartbeat ``conn`` until it closes or the server falls silent too long."""
        loop = asyncio.get_running_loop()
        beat = conn.ready.get("heartbeat")
        beat = beat if isinstance(beat, dict) else {}
        interval = self._hb_interval if self._hb_interval is not None else _seconds(beat.get("interval_ms"), 15.0)
        timeout = self._hb_timeout if self._hb_timeout is not None else _seconds(beat.get("timeout_ms"), 45.0)
        dead_after = interval + timeout
        next_ping = loop.time() + interval
        while not conn.closed:
            now = loop.time()
            if now - conn.last_received >= dead_after:
                self.dead_connections += 1
                log.warning("no frame from the server for %.1f s; dropping the connection", now - conn.last_received)
                conn.abort()
                await conn.wait_closed()
                return
            if now >= next_ping:
                try:
                    async with asyncio.timeout(dead_after):
                        await conn.send_heartbeat()
                except (ConnectionLost, TimeoutError):
                    pass  # the loop notices the closed or silent connection
                next_ping = loop.time() + interval
                continue
            try:
                async with asyncio.timeout(min(next_ping, conn.last_received + dead_after) - now):
                    await conn.wait_closed()
            except TimeoutError:
                pass

    # -------------------------------------------------- turns

    def send(self, text: str, *, conversation_id: str = DEFAULT_CONVERSATION,
             client_turn_id: str | None = None, options: dict[str, Any] | None = None) -> ResilientTurn:
        """A turn to iterate: ``async for delta in client.send(text)``; sent on first read."""
        frame = client_frames.turn_start(text, client_turn_id=client_turn_id, conversation_id=conversation_id,
                                         options=options)
        return ResilientTurn(self, frame)

    async def start_turn(self, text: str, *, conversation_id: str = DEFAULT_CONVERSATION,
                         client_turn_id: str | None = None,
                         options: dict[str, Any] | None = None) -> ResilientTurn:
        turn = self.send(text, conversation_id=conversation_id, client_turn_id=client_turn_id, options=options)
        await turn.submit()
        return turn

    def regenerate(self, *, conversation_id: str = DEFAULT_CONVERSATION, exchange_id: str | None = None,
                   client_turn_id: str | None = None, options: dict[str, Any] | None = None) -> ResilientTurn:
        """Another reply to the newest exchange (a swipe), with every guarantee of a turn."""
        frame = client_frames.turn_regenerate(client_turn_id=client_turn_id, conversation_id=conversation_id,
                                              exchange_id=exchange_id, options=options)
        return ResilientTurn(self, frame)

    def edit(self, text: str, *, exchange_id: str, conversation_id: str = DEFAULT_CONVERSATION,
             client_turn_id: str | None = None, options: dict[str, Any] | None = None) -> ResilientTurn:
        """Replace the newest user message (exchange ``exchange_id``) and stream the reply to ``text``."""
        frame = client_frames.turn_edit(text, exchange_id=exchange_id, client_turn_id=client_turn_id,
                                        conversation_id=conversation_id, options=options)
        return ResilientTurn(self, frame)

    async def follow(self, turn_id: str, *, after_seq: int = 0,
                     conversation_id: str | None = None) -> ResilientTurn:
        """Follow a turn started elsewhere (e.g. one of ``ready.active_turns``)."""
        for turn in self._turns:
            if turn.turn_id == turn_id:
                return turn
        turn = ResilientTurn(self, None, turn_id=turn_id, after_seq=after_seq, conversation_id=conversation_id)
        await turn.submit()
        return turn

    async def _submit(self, turn: ResilientTurn) -> None:
        if self._fatal is not None:
            raise self._fatal
        self.start()
        self._turns[turn] = None
        conn = self._conn
        if conn is not None and not conn.closed:
            await self._attach_turn(turn, conn)
        # otherwise the supervisor attaches it once a connection is ready

    async def cancel(self, turn: ResilientTurn | str) -> None:
        """Cancel a turn (object or turn_id). Delivered once accepted, also after a reconnect."""
        if isinstance(turn, str):
            found = next((t for t in self._turns if t.turn_id == turn), None)
            if found is None:
                await self._call(lambda conn: conn.cancel(turn), 30.0)  # type: ignore[arg-type]
                return
            turn = found
        if turn.done:
            return
        turn._cancel_requested = True
        if not turn._submitted:  # never sent: nothing to abort on the server
            turn._submitted = True
            turn._finish({"type": "turn.end", "turn_id": None, "seq": 0, "finish_reason": "cancelled",
                          "text": "", "usage": None, "timings": None})
            return
        await self._deliver_cancel(turn)

    async def _deliver_cancel(self, turn: ResilientTurn) -> None:
        conn = self._conn
        if turn.turn_id is None or conn is None or turn._conn is not conn or turn.done:
            return  # sent on turn.accepted or after the next resume
        try:
            await conn.cancel(turn.turn_id)
        except ConnectionLost:
            pass  # re-sent after the resume on the next connection

    async def _recover_expired(self, turn: ResilientTurn, frame: dict[str, Any]) -> None:
        """``resume_expired``: finish from the server's final text if we can get it, else raise."""
        try:
            text = frame.get("text")
            if isinstance(text, str):
                turn._finish_with_text(text, frame.get("finish_reason"), "error")
                return
            if turn.conversation_id is not None:
                try:
                    page = await self.history(turn.conversation_id, limit=100)
                except (ClientError, TimeoutError) as exc:
                    log.info("history lookup after resume_expired failed: %s", exc)
                    page = {}
                messages = page.get("messages")
                for msg in reversed(messages if isinstance(messages, list) else []):
                    if (isinstance(msg, dict) and msg.get("turn_id") == turn.turn_id
                            and msg.get("role") == "assistant" and isinstance(msg.get("text"), str)):
                        turn._finish_with_text(msg["text"], msg.get("status"), "history")
                        return
            turn._fail(ServerError(frame))
        finally:
            turn._recovering = False

    # -------------------------------------------------- request/response

    async def _call(self, fn: Callable[[RapportConnection], Awaitable[Any]], timeout: float | None) -> Any:
        """Run an idempotent request on the live connection, retrying across reconnects."""
        async with asyncio.timeout(timeout):
            while True:
                conn = await self._live_connection()
                try:
                    return await fn(conn)
                except ConnectionLost:
                    if self._fatal is not None:
                        raise
                    await conn.wait_closed()  # then wait for the supervisor's next connection

    async def history(self, conversation_id: str = DEFAULT_CONVERSATION, limit: int = 50,
                      before: str | None = None, *, timeout: float | None = 30.0) -> dict[str, Any]:
        return await self._call(lambda conn: conn.history(conversation_id, limit, before, timeout=None), timeout)

    async def clear_history(self, conversation_id: str = DEFAULT_CONVERSATION, *,
                            timeout: float | None = 30.0) -> dict[str, Any]:
        return await self._call(lambda conn: conn.clear_history(conversation_id, timeout=None), timeout)

    async def select(self, turn_id: str, conversation_id: str = DEFAULT_CONVERSATION, *,
                     timeout: float | None = 30.0) -> dict[str, Any]:
        """``turn.select`` (idempotent, so retried across reconnects)."""
        return await self._call(lambda conn: conn.select(turn_id, conversation_id, timeout=None), timeout)

    async def feedback(self, turn_id: str, rating: int, reason: str | None = None, *,
                       timeout: float | None = 30.0) -> dict[str, Any]:
        """Rate a reply; rating again replaces the rating, so a retry is harmless."""
        return await self._call(lambda conn: conn.feedback(turn_id, rating, reason, timeout=None), timeout)

    async def memory_add(self, text: str, *, timeout: float | None = 30.0) -> dict[str, Any]:
        """Pin a fact; the same text twice is pinned once, so a retry is harmless."""
        return await self._call(lambda conn: conn.memory_add(text, timeout=None), timeout)

    async def memory_list(self, *, timeout: float | None = 30.0) -> dict[str, Any]:
        return await self._call(lambda conn: conn.memory_list(timeout=None), timeout)

    async def memory_delete(self, fact_id: str, *, timeout: float | None = 30.0) -> dict[str, Any]:
        """Unpin a fact. A retry after a lost answer may hear ``not_found``: the first try did it."""
        return await self._call(lambda conn: conn.memory_delete(fact_id, timeout=None), timeout)

    async def ping(self, *, timeout: float | None = 10.0) -> float:
        return await self._call(lambda conn: conn.ping(timeout=None), timeout)


def _seconds(ms: Any, default: float) -> float:
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0:
        return ms / 1000.0
    return default
