"""The worker side of ``rapport bench``: one process, one event loop, many simulated users.

Each user is a :class:`clients.driver.Driver` (a lean socket, no background
task per connection) driven by :meth:`Worker.run_turn`, which measures every
turn on the client's monotonic clock and checks the protocol's guarantees on
it (seq without gaps or duplicates, deltas concatenating to ``turn.end.text``,
every generated delta delivered). The parent process (:mod:`clients.bench`)
starts the workers and merges what they measured (:mod:`clients.bench_stats`).

Load comes in two shapes: closed loop (each user waits for its reply and
thinks before the next turn) or, with ``open_loop_rate``, open loop (turns
arrive as a Poisson process whatever the server does, each a new conversation
on a free connection of the pool, a refusal not retried), the shape that
shows what admission control does under overload.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from protocol import client_frames, close_codes
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL

from .bench_stats import Stats
from .driver import Driver
from .errors import ClientError, ConnectionLost, credentials_refused
from .retry import advised_delay, backoff_delay, retry
from .target import mint_token, normalize_url

__all__ = ["DEFAULT_URL", "PROMPTS", "BenchConfig", "UserConn", "Worker", "worker_main"]

DEFAULT_URL = "ws://127.0.0.1:8000/v1/ws"
CLIENT_NAME = "rapport-bench"
CONNECT_TRIES = 6  # an app's patience: 0.5 + 1 + 2 + 4 + 8 s of backoff windows at most
RECONNECTS_PER_TURN = 5
OPENING_AT_ONCE = 200  # idle or pooled connections being opened at once
LAG_PERIOD_S = 0.05  # how often the event loop's lateness is sampled

PROMPTS = (
    "I had a long day at work. Can you cheer me up a little?",
    "What should I cook tonight? Something warm and simple.",
    "I couldn't sleep last night, my mind kept racing.",
    "Tell me something nice about the rain.",
    "My friend didn't answer my message today and I feel a bit left out.",
    "I went for a walk by the river this morning, it was beautiful.",
    "Do you remember what I told you about my sister?",
    "I'm nervous about my exam next week.",
    "Let's plan a small trip for the weekend.",
    "What's a good book to read on a quiet evening?",
)

@dataclass(slots=True)
class BenchConfig:
    url: str = DEFAULT_URL
    users: int = 10
    turns: int = 3  # per user; 0: until duration_s
    think_ms: float = 1000.0
    ramp_s: float = 0.0
    duration_s: float | None = None
    max_tokens: int | None = None
    msgpack: bool = False
    drop_rate: float = 0.0
    user_prefix: str = ""
    token: str | None = None
    jwt_secret: str | None = None
    dev_users: bool = False
    processes: int = 1
    idle: int = 0
    budget_ms: float = 2000.0
    conversation_id: str = "bench"
    turn_timeout_s: float = 120.0
    max_retries: int = 20
    deflate: bool = True
    seed: int = 0
    progress: bool = True
    #: Turn starts per second over the whole run (Poisson), on a pool of ``users`` connections.
    open_loop_rate: float | None = None
    #: Put one row per completed turn in the report.
    turn_rows: bool = False


class UserConn:
    """One user's socket: a :class:`Driver` that answers the server's pings while the user reads or waits."""

    __slots__ = ("driver", "stats")

    def __init__(self, driver: Driver, stats: Stats) -> None:
        self.driver = driver
        self.stats = stats

    async def send(self, frame: dict[str, Any]) -> None:
        await self.driver.send(frame)

    async def recv(self, timeout: float) -> dict[str, Any]:
        """The next frame other than a ping (answered here); TimeoutError, ConnectionLost."""
        while True:
            frame = await self.driver.recv(timeout)
            if frame["type"] == "ping":
                self.stats.counts["pings_answered"] += 1
                await self.send(client_frames.pong(frame.get("t")))
                continue
            return frame

    async def idle(self, seconds: float, ping_every_s: float = 15.0) -> None:
        """Wait ``seconds`` while answering server pings and pinging now and then (guarantee 7)."""
        deadline = time.monotonic() + seconds
        next_ping = time.monotonic() + ping_every_s
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            if now >= next_ping:
                await self.send(client_frames.ping(int(time.time() * 1000)))
                next_ping = now + ping_every_s
            try:
                await self.recv(min(deadline, next_ping) - now)
            except TimeoutError:
                pass

    def abort(self) -> None:
        """Cut the socket without a closing handshake (a phone losing its network)."""
        self.driver.abort()

    async def close(self) -> None:
        """Close politely if the server answers within 2 s, else cut the socket."""
        try:
            await asyncio.wait_for(self.driver.close(), 2.0)
        except (TimeoutError, OSError, ClientError):
            self.abort()


class _Refused(Exception):
    """``busy`` or ``rate_limited`` before the turn was accepted: send it again later."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(str(frame.get("code")))
        self.retry_after_ms = frame.get("retry_after_ms")


class _TurnRun:
    """What one turn has seen so far, across busy retries, drops and reconnects."""

    __slots__ = ("conn", "ctid", "drop_after", "first_at", "first_attempt", "last_delta_at", "last_seq",
                 "parts", "received", "reconnects", "sent_at", "start", "turn_id")

    def __init__(self, conn: UserConn | None, start: dict[str, Any], drop_after: int | None) -> None:
        self.conn = conn
        self.start = start
        self.ctid: str = start["client_turn_id"]
        self.drop_after = drop_after
        self.first_attempt = time.monotonic()
        self.sent_at = self.first_attempt
        self.turn_id: str | None = None
        self.last_seq = 0
        self.received = 0
        self.parts: list[str] = []
        self.first_at: float | None = None
        self.last_delta_at: float | None = None
        self.reconnects = 0

    def lose(self) -> None:
        if self.conn is not None:
            self.conn.abort()
        self.conn = None


class Worker:
    """The users and idle connections of one process."""

    def __init__(self, cfg: BenchConfig, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.stats = Stats()
        self.subprotocol = MSGPACK_SUBPROTOCOL if cfg.msgpack else JSON_SUBPROTOCOL
        self.url = normalize_url(cfg.url)
        self.stop_at: float | None = None  # no new turns after this (monotonic)
        self._stopped = asyncio.Event()  # the parent asked the run to end
        self._idle_stop = asyncio.Event()

    # -- connecting ------------------------------------------------------------

    def _credentials(self, user: str) -> tuple[str | None, str | None]:
        """(bearer token, hello.user)."""
        cfg = self.cfg
        if cfg.dev_users:
            return None, user
        if cfg.token:
            return cfg.token, None
        return mint_token(user, cfg.jwt_secret or ""), None

    async def open(self, user: str) -> UserConn:
        """Connect, hello, ready. Raises ConnectionLost (close 4429, 4401...) or ServerError."""
        token, hello_user = self._credentials(user)
        driver = await Driver.open(
            self.url, subprotocol=self.subprotocol, header_token=token, user=hello_user,
            # No hello.coalesce: the bench counts every seq, so it wants one frame per delta.
            client={"name": CLIENT_NAME, "version": "1"},
            open_timeout=30, compression="deflate" if self.cfg.deflate else None,
            user_agent_header=CLIENT_NAME)
        self.stats.counts["connects"] += 1
        # An error before ready that did not stop the open (e.g. `unavailable`): a figure, not a failure.
        for frame in driver.pre_ready_errors:
            self.stats.counts["hello_errors"] += 1
            self.stats.errors[f"hello:{frame.get('code')}"] += 1
        return UserConn(driver, self.stats)

    async def connect_with_retry(self, user: str, rng: random.Random) -> UserConn | None:
        """Like an app: exponential backoff with full jitter (0.5 s doubling to 10 s), 6 tries."""
        counts = self.stats.counts

        async def attempt() -> UserConn:
            try:
                return await self.open(user)
            except Exception as exc:
                counts["connect_failures"] += 1
                if isinstance(exc, ConnectionLost) and exc.close_code == close_codes.TOO_MANY_CONNECTIONS:
                    counts["closed_4429"] += 1
                raise

        def backoff(exc: Exception, retries: int) -> float | None:
            return None if credentials_refused(exc) else backoff_delay(retries, rng=rng)

        try:
            return await retry(attempt, delay=backoff, max_retries=CONNECT_TRIES - 1)
        except Exception as exc:  # noqa: BLE001 - whatever stopped it, the user is counted, the run goes on
            self.stats.error("unauthorized" if credentials_refused(exc) else "connect")
            return None

    # -- users -----------------------------------------------------------------

    def _past_stop(self) -> bool:
        return self._stopped.is_set() or (self.stop_at is not None and time.monotonic() >= self.stop_at)

    async def run_user(self, i: int, start: float) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + i)
        user = f"{cfg.user_prefix}{i}"
        conversation = cfg.conversation_id if not cfg.token else f"{cfg.conversation_id}-{i}"
        if cfg.users > 1 and cfg.ramp_s > 0:
            await asyncio.sleep(max(0.0, start + cfg.ramp_s * i / cfg.users - time.monotonic()))
        conn: UserConn | None = None
        turns = range(cfg.turns) if cfg.turns else itertools.count()
        try:
            for k in turns:
                if self._past_stop():
                    break
                if k > 0 and cfg.think_ms > 0:
                    think = rng.uniform(0.5, 1.5) * cfg.think_ms / 1000.0
                    if conn is not None:
                        try:
                            await conn.idle(think)
                        except ConnectionLost:
                            conn = None
                    else:
                        await asyncio.sleep(think)
                    if self._past_stop():
                        break
                if conn is None:
                    conn = await self.connect_with_retry(user, rng)
                    if conn is None:
                        self.stats.counts["turns_failed"] += cfg.turns - k if cfg.turns else 1
                        return
                self.stats.active += 1
                try:
                    conn = await self.run_turn(conn, user, conversation, rng, k)
                except Exception as exc:  # noqa: BLE001 - one user's surprise must not end the run
                    self.stats.error(f"client:{type(exc).__name__}")
                    self.stats.counts["turns_failed"] += 1
                    if conn is not None:
                        conn.abort()
                    conn = None
                finally:
                    self.stats.active -= 1
        finally:
            if conn is not None:
                await conn.close()

    async def run_turn(self, conn: UserConn, user: str, conversation: str, rng: random.Random,
                       k: int, max_retries: int | None = None) -> UserConn | None:
        """One turn, start to end, with busy retries, drops and resumes; the socket to keep using.

        ``max_retries`` (default ``cfg.max_retries``) bounds the busy / rate_limited retries.
        """
        cfg, st = self.cfg, self.stats
        start = client_frames.turn_start(
            f"{PROMPTS[rng.randrange(len(PROMPTS))]} ({k + 1})", client_turn_id=f"b{uuid.uuid4().hex}",
            conversation_id=conversation,
            options=client_frames.turn_options(max_tokens=cfg.max_tokens) if cfg.max_tokens else None)
        drop_after = rng.randint(1, 4) if cfg.drop_rate > 0 and rng.random() < cfg.drop_rate else None
        run = _TurnRun(conn, start, drop_after)

        def after_refusal(exc: Exception, retries: int) -> float | None:
            if not isinstance(exc, _Refused) or self._past_stop():
                return None
            # Jitter, so refused users do not come back all at once.
            return advised_delay(exc.retry_after_ms, default=1.0, jitter=0.25, rng=rng)

        async def wait_on_the_socket(seconds: float) -> None:
            # Waiting for a retry still answers pings: an idle phone is not a dead one.
            if run.conn is None:
                return  # the next attempt reconnects
            try:
                await run.conn.idle(seconds)
            except ConnectionLost:
                run.lose()
                st.counts["connection_lost"] += 1

        try:
            return await retry(lambda: self._play_turn(run, user, rng), delay=after_refusal,
                               max_retries=cfg.max_retries if max_retries is None else max_retries,
                               sleep=wait_on_the_socket)
        except _Refused:
            st.counts["gave_up"] += 1
            st.counts["turns_failed"] += 1
            return run.conn

    async def _play_turn(self, run: _TurnRun, user: str, rng: random.Random) -> UserConn | None:
        """Send (or re-send) the turn and read it to its end; raises _Refused on busy / rate_limited."""
        cfg, st = self.cfg, self.stats
        need_send = True
        while True:
            try:
                if run.conn is None:
                    # Lost the socket: reconnect, then resume the turn or re-send its start.
                    run.reconnects += 1
                    if run.reconnects > RECONNECTS_PER_TURN:
                        st.error("connection_lost")
                        st.counts["turns_failed"] += 1
                        return None
                    run.conn = await self.connect_with_retry(user, rng)
                    if run.conn is None:
                        st.counts["turns_failed"] += 1
                        return None
                    if run.turn_id is not None:
                        await run.conn.send(client_frames.turn_resume(run.turn_id, run.last_seq))
                        st.counts["resumed"] += 1
                        run.last_delta_at = None  # no gap across a reconnect
                    else:
                        need_send = True  # same client_turn_id: the server replays if it had it
                if need_send:
                    need_send = False
                    run.sent_at = time.monotonic()
                    await run.conn.send(run.start)
                frame = await run.conn.recv(cfg.turn_timeout_s)
            except ConnectionLost:
                run.lose()
                st.counts["connection_lost"] += 1
                continue
            except TimeoutError:
                st.error("timeout")
                st.counts["turns_failed"] += 1
                run.lose()
                return None
            kind = frame["type"]
            if kind == "turn.delta":
                if frame.get("turn_id") == run.turn_id:
                    self._on_delta(run, frame)
                continue
            if kind == "turn.accepted":
                if frame.get("client_turn_id") == run.ctid:
                    if run.turn_id is None:
                        st.counts["turns_started"] += 1
                    run.turn_id = frame.get("turn_id")
                continue
            if kind == "turn.end":
                if frame.get("turn_id") != run.turn_id:
                    continue
                self._on_end(run, frame)
                return run.conn
            if kind == "error":
                code = str(frame.get("code"))
                if frame.get("client_turn_id") not in (None, run.ctid) or (
                        frame.get("turn_id") not in (None, run.turn_id)):
                    continue  # about something else
                if code in ("busy", "rate_limited") and run.turn_id is None:
                    st.counts[code] += 1
                    st.add("busy_latency", (time.monotonic() - run.sent_at) * 1000.0, at=run.sent_at)
                    raise _Refused(frame)
                st.error(code, str(frame.get("message", "")))
                st.counts["turns_failed"] += 1
                return run.conn
            # history, pong, anything else: not ours to handle

    def _on_delta(self, run: _TurnRun, frame: dict[str, Any]) -> None:
        cfg, st = self.cfg, self.stats
        now = time.monotonic()
        seq = frame.get("seq", 0)
        if seq <= run.last_seq:
            st.counts["seq_duplicates"] += 1
            return
        if seq != run.last_seq + 1:
            st.counts["seq_gaps"] += 1
        run.last_seq = seq
        run.received += 1
        run.parts.append(frame.get("text", ""))
        if run.first_at is None:
            run.first_at = now
            ttft = (now - run.sent_at) * 1000.0
            st.add("ttft", ttft)
            st.add("ttft_with_retries", (now - run.first_attempt) * 1000.0)
            if ttft > cfg.budget_ms:
                st.counts["budget_misses"] += 1
        if run.last_delta_at is not None:
            st.add("gap", (now - run.last_delta_at) * 1000.0, at=now)
        run.last_delta_at = now
        if run.drop_after is not None and run.received >= run.drop_after:
            # --drop-rate: cut the socket mid-turn; the next read reconnects and resumes.
            run.drop_after = None
            st.counts["dropped"] += 1
            run.lose()

    def _on_end(self, run: _TurnRun, frame: dict[str, Any]) -> None:
        st = self.stats
        now = time.monotonic()
        st.add("turn", (now - run.sent_at) * 1000.0)
        end_seq = int(frame.get("seq") or 0)
        st.counts["deltas_received"] += run.received
        st.counts["end_seq_total"] += end_seq
        if run.last_seq != end_seq:
            st.counts["seq_gaps"] += 1
        if "".join(run.parts) != frame.get("text", ""):
            st.counts["text_mismatches"] += 1
        reason = str(frame.get("finish_reason"))
        st.finish[reason] += 1
        if reason == "interrupted":
            st.counts["interrupted"] += 1
        timings = frame.get("timings") or {}
        server = {name: float(timings[key]) if timings.get(key) is not None else math.nan
                  for name, key in (("server_ttft", "ttft_ms"), ("server_queue", "queue_ms"),
                                    ("server_engine_ttft", "engine_ttft_ms"), ("server_total", "total_ms"))}
        for name, value in server.items():
            if not math.isnan(value):
                st.add(name, value)
        ttft = (run.first_at - run.sent_at) * 1000.0 if run.first_at is not None else math.nan
        if not math.isnan(ttft) and not math.isnan(server["server_ttft"]):
            st.add("ttft_diff", ttft - server["server_ttft"])
        # The gateway's overhead: what the user waited beyond the engine's own time to first token.
        # A server that does not report engine_ttft_ms: ttft_ms - queue_ms, which also counts the
        # wake-up of the turn's task after the engine step as engine time.
        engine = server["server_engine_ttft"]
        if math.isnan(engine):
            engine = server["server_ttft"] - server["server_queue"]
        if not math.isnan(ttft - engine):
            st.add("overhead", ttft - engine)
        st.turn_row(sent_at=run.sent_at, ttft=ttft,
                    ttft_with_retries=(run.first_at - run.first_attempt) * 1000.0 if run.first_at else math.nan,
                    turn=(now - run.sent_at) * 1000.0, end_seq=float(end_seq), received=float(run.received),
                    **server)
        st.counts["turns_completed"] += 1

    # -- idle connections --------------------------------------------------------

    async def hold_idle(self, j: int, opened: asyncio.Queue[bool]) -> None:
        """One connection that only answers pings until the run ends."""
        user = f"{self.cfg.user_prefix}idle-{self.index}-{j}"
        try:
            conn = await self.open(user)
        except Exception:  # noqa: BLE001 - counted; an idle connection that cannot open is a figure
            self.stats.counts["idle_failed"] += 1
            opened.put_nowait(False)
            return
        self.stats.counts["idle_open"] += 1
        opened.put_nowait(True)
        try:
            while not self._idle_stop.is_set():
                try:
                    await conn.recv(3600.0)
                except TimeoutError:
                    pass
        except ConnectionLost:
            self.stats.counts["idle_lost"] += 1
        except asyncio.CancelledError:
            pass  # the run is over: close below
        finally:
            await conn.close()

    async def _open_idle(self, idle: int, tasks: list[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Queue[bool] = asyncio.Queue()
        gate = asyncio.Semaphore(OPENING_AT_ONCE)

        async def one(j: int) -> None:
            async with gate:
                tasks.append(loop.create_task(self.hold_idle(j, opened), name=f"rapport-bench:idle-{j}"))
                await opened.get()

        await asyncio.gather(*(one(j) for j in range(idle)))

    # -- open loop ---------------------------------------------------------------

    async def _open_pool(self, user_ids: list[int]) -> deque[tuple[str, UserConn]]:
        """The open loop's connections, opened before the run starts."""
        gate = asyncio.Semaphore(OPENING_AT_ONCE)
        pool: deque[tuple[str, UserConn]] = deque()

        async def one(i: int) -> None:
            user = f"{self.cfg.user_prefix}{i}"
            async with gate:
                conn = await self.connect_with_retry(user, random.Random(self.cfg.seed * 1_000_003 + i))
            if conn is not None:
                pool.append((user, conn))

        await asyncio.gather(*(one(i) for i in user_ids))
        return pool

    async def run_open_loop(self, pool: deque[tuple[str, UserConn]], start: float) -> None:
        """Poisson arrivals until the stop, each a new conversation on a free connection, refusals not retried.

        An arrival that finds every connection busy is counted (``no_free_connection``),
        not queued: queuing would turn the open loop back into a closed one. Turns still
        running at the stop get ``turn_timeout_s`` to finish (``unfinished`` if not).
        """
        cfg, st = self.cfg, self.stats
        rate = (cfg.open_loop_rate or 0.0) / max(1, cfg.processes)
        arrivals = random.Random(cfg.seed * 1_000_003 + 7919 * (self.index + 1))
        prompts = random.Random(cfg.seed * 1_000_003 - self.index)
        running: set[asyncio.Task[None]] = set()

        async def one_turn(user: str, conn: UserConn, n: int) -> None:
            kept: UserConn | None = None
            st.active += 1
            try:
                kept = await self.run_turn(conn, user, f"{cfg.conversation_id}-o{self.index}-{n}", prompts, n,
                                           max_retries=0)
            except Exception as exc:  # noqa: BLE001 - one turn's surprise must not end the run
                st.error(f"client:{type(exc).__name__}")
                st.counts["turns_failed"] += 1
            finally:
                st.active -= 1
                if kept is not None:
                    pool.append((user, kept))
                else:
                    conn.abort()  # cancelled at the drain bound, or failed: the socket is not reusable

        next_at = start
        try:
            while rate > 0:
                next_at += arrivals.expovariate(rate)
                if self.stop_at is not None and next_at >= self.stop_at:
                    break
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                if self._past_stop():
                    break
                st.counts["arrivals"] += 1
                if not pool:
                    st.counts["no_free_connection"] += 1
                    continue
                user, conn = pool.popleft()
                st.counts["turns_planned"] += 1
                task = asyncio.get_running_loop().create_task(one_turn(user, conn, st.counts["arrivals"]))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                _, pending = await asyncio.wait(set(running), timeout=cfg.turn_timeout_s)
                st.counts["unfinished"] += len(pending)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    # -- the whole worker ----------------------------------------------------------

    async def run(self, user_ids: list[int], idle: int, report: Any, go: Any, stop: Any) -> None:
        """Open the idle (and pooled) connections, say ready, run from ``go`` until done or ``stop``."""
        loop = asyncio.get_running_loop()
        background = [loop.create_task(self._report(report), name="rapport-bench:progress")]
        idle_tasks: list[asyncio.Task[None]] = []
        pool: deque[tuple[str, UserConn]] = deque()
        try:
            if idle:
                await self._open_idle(idle, idle_tasks)
            if self.cfg.open_loop_rate:
                pool = await self._open_pool(user_ids)
            report.put(("ready", self.index, None))
            await _wait_for(go)
            start = time.monotonic()
            cpu_at_start = time.process_time()
            pings_at_start = self.stats.counts["pings_answered"]
            background += [loop.create_task(self._watch_stop(stop), name="rapport-bench:stop"),
                           loop.create_task(self._sample_loop_lag(), name="rapport-bench:loop-lag")]
            if self.cfg.duration_s:
                self.stop_at = start + self.cfg.duration_s
            if self.cfg.open_loop_rate:
                await self.run_open_loop(pool, start)
            else:
                self.stats.counts["turns_planned"] += len(user_ids) * self.cfg.turns
                await asyncio.gather(*(self.run_user(i, start) for i in user_ids))
                if not user_ids and idle:
                    await self._hold()
            # Readings of the run itself, before the connections are closed.
            c = self.stats.counts
            self.stats.cpu_s = time.process_time() - cpu_at_start
            c["pings_answered_in_run"] = c["pings_answered"] - pings_at_start
            c["idle_open_at_end"] = c["idle_open"] - c["idle_lost"]
        finally:
            self._idle_stop.set()
            for t in idle_tasks:
                t.cancel()
            await asyncio.gather(*idle_tasks, *(conn.close() for _, conn in pool), return_exceptions=True)
            for t in background:
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    async def _hold(self) -> None:
        """Idle connections only: hold them until the stop (the parent's, or duration_s)."""
        timeout = None if self.stop_at is None else max(0.0, self.stop_at - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout)

    async def _watch_stop(self, stop: Any) -> None:
        await _wait_for(stop)
        self._stopped.set()

    async def _sample_loop_lag(self) -> None:
        """How late this worker's event loop wakes up: a saturated client inflates its own TTFT."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(LAG_PERIOD_S)
            self.stats.add("loop_lag", (time.monotonic() - t - LAG_PERIOD_S) * 1000.0)

    async def _report(self, report: Any) -> None:
        while True:
            await asyncio.sleep(0.5)
            report.put(("progress", self.index, self.stats.progress()))


async def _wait_for(event: Any) -> None:
    """Wait for a multiprocessing.Event in a thread, never blocking the loop."""
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(None, event.wait, 0.5):
        pass


def _raise_nofile() -> None:
    """Thousands of sockets need file descriptors: lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, ValueError, OSError):
        pass


def worker_main(cfg_dict: dict[str, Any], index: int, user_ids: list[int], idle: int, report: Any,
                go: Any, stop: Any) -> None:
    """Entry point of a worker process: run its users, then put its Stats (or its traceback) on ``report``."""
    _raise_nofile()
    cfg = BenchConfig(**cfg_dict)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()

    async def run() -> Stats:
        worker = Worker(cfg, index)
        await worker.run(user_ids, idle, report, go, stop)
        return worker.stats

    try:
        with runner:
            stats = runner.run(run())
        report.put(("result", index, stats.export()))
    except KeyboardInterrupt:
        report.put(("failed", index, "interrupted"))
    except BaseException:  # noqa: BLE001 - the parent reports it
        report.put(("failed", index, traceback.format_exc()))
