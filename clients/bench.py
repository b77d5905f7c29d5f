"""``rapport bench``: a load generator that measures what users feel.

Many simulated users, each on its own WebSocket, hold multi-turn conversations
with think time between turns::

    rapport bench --url ws://127.0.0.1:8000/v1/ws --dev-users --users 200 --turns 5 \\
        --think-ms 3000 --ramp-s 10 --processes 2 --json out.json --plot ttft.png

Users are split over ``--processes`` worker processes; each runs one uvloop
event loop and a lean protocol loop (``websockets`` plus the server's own
:class:`protocol.codec.Codec`, nothing else) so the client is not the bottleneck.
``--idle N`` also opens N connections that only answer pings (the
many-idle-connections measurement).

Every figure is taken on the client's monotonic clock:

* time to first token: from sending the ``turn.start`` that was accepted to
  receiving the first ``turn.delta`` (a ``busy`` answer is retried after its
  ``retry_after_ms``, as an app would; the time including those retries is
  reported too);
* gap between deltas (not across a reconnect), and turn time (``turn.start``
  to ``turn.end``);
* the server's own ``turn.end.timings`` and client-minus-server TTFT.

Correctness is checked on every turn: seq starts at 1 and grows by 1 (gaps and
duplicates are counted), the deltas concatenate to ``turn.end.text``, and the
deltas received add up to the ``turn.end`` seqs (every generated delta
delivered). ``--drop-rate`` cuts the socket mid-turn and resumes with
``turn.resume`` after the last seq held, which must yield exactly the missing
deltas.

Exit status: 0, or 1 when a protocol check failed (gap, duplicate, text
mismatch, missing delta) or no turn completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import random
import sys
import time
import traceback
import uuid
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, Codec

__all__ = ["add_bench_arguments", "bench_command", "main", "percentile", "percentiles", "summarize"]

DEFAULT_URL = "ws://127.0.0.1:8000/v1/ws"
CLIENT_NAME = "rapport-bench"

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

# Latency series collected per turn (milliseconds).
SERIES = ("ttft", "ttft_with_retries", "gap", "turn", "server_ttft", "server_queue", "server_total",
          "ttft_diff")
SERIES_LABELS = {
    "ttft": "time to first token",
    "ttft_with_retries": "  incl. busy retries",
    "gap": "gap between deltas",
    "turn": "turn time",
    "server_ttft": "server timings.ttft_ms",
    "server_queue": "server timings.queue_ms",
    "server_total": "server timings.total_ms",
    "ttft_diff": "client - server TTFT",
}
COUNTS = (
    "turns_planned", "turns_started", "turns_completed", "turns_failed", "busy", "rate_limited",
    "gave_up", "errors", "interrupted", "budget_misses", "dropped", "resumed", "connection_lost",
    "deltas_received", "end_seq_total", "seq_gaps", "seq_duplicates", "text_mismatches",
    "connects", "connect_failures", "closed_4429", "idle_open", "idle_failed", "idle_lost",
    "pings_answered",
)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float, *, presorted: bool = False) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks.

    The same definition as NumPy's default (``linear``): the value at rank
    ``(n - 1) * q / 100`` of the sorted values. None for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    n = len(values)
    if n == 0:
        return None
    s = values if presorted else sorted(values)
    rank = (n - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(s[lo]) + (float(s[hi]) - float(s[lo])) * frac


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    s = sorted(values)
    return {f"p{q:g}": percentile(s, q, presorted=True) for q in qs}


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, min, mean, p50, p95, p99, max of ``values`` (None where empty)."""
    s = sorted(values)
    n = len(s)
    out: dict[str, float | int | None] = {"count": n}
    out["min"] = float(s[0]) if n else None
    out["mean"] = sum(s) / n if n else None
    for q in (50, 95, 99):
        out[f"p{q}"] = percentile(s, q, presorted=True)
    out["max"] = float(s[-1]) if n else None
    return out


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class BenchConfig:
    url: str = DEFAULT_URL
    users: int = 10
    turns: int = 3
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


def normalize_url(url: str) -> str:
    """Accept ``http(s)://host:port`` or a ws URL without path; answer the ``/v1/ws`` URL."""
    if url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    elif "://" not in url:
        url = "ws://" + url
    scheme, rest = url.split("://", 1)
    if "/" not in rest:
        rest += "/v1/ws"
    elif rest.endswith("/"):
        rest += "v1/ws"
    return f"{scheme}://{rest}"


def mint_token(user: str, secret: str, ttl_s: int = 86_400) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


# ---------------------------------------------------------------------------
# Worker side: one process, one event loop, many users
# ---------------------------------------------------------------------------

class Stats:
    """One worker's measurements: latency series (ms) and counters."""

    def __init__(self) -> None:
        self.series: dict[str, array] = {name: array("d") for name in SERIES}
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()
        self.active = 0
        self._fresh_ttft: list[float] = []

    def add(self, name: str, value: float) -> None:
        self.series[name].append(value)
        if name == "ttft":
            self._fresh_ttft.append(value)

    def error(self, code: str) -> None:
        self.errors[code] += 1
        self.counts["errors"] += 1

    def progress(self) -> dict[str, Any]:
        fresh, self._fresh_ttft = self._fresh_ttft, []
        c = self.counts
        return {"done": c["turns_completed"], "active": self.active, "busy": c["busy"],
                "rate_limited": c["rate_limited"], "errors": c["errors"], "ttft": fresh}

    def export(self) -> dict[str, Any]:
        return {"series": {k: v.tobytes() for k, v in self.series.items()}, "counts": dict(self.counts),
                "errors": dict(self.errors), "finish": dict(self.finish)}


class Lost(Exception):
    """The socket closed (or was cut) while we needed it."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(f"connection closed ({code})")
        self.code = code


class UserConn:
    """One WebSocket: send and receive protocol frames, answer pings on the way."""

    __slots__ = ("ws", "codec", "stats")

    def __init__(self, ws: Any, codec: Codec, stats: Stats) -> None:
        self.ws = ws
        self.codec = codec
        self.stats = stats

    async def send(self, frame: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self.ws.send(self.codec.encode(frame))
        except ConnectionClosed as exc:
            raise Lost(exc.rcvd.code if exc.rcvd else None) from None

    async def recv(self, timeout: float) -> dict[str, Any]:
        """The next frame other than a ping (answered here); TimeoutError, Lost."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                async with asyncio.timeout(timeout):
                    data = await self.ws.recv()
            except ConnectionClosed as exc:
                raise Lost(exc.rcvd.code if exc.rcvd else None) from None
            frame = self.codec.decode(data)
            if frame.get("type") == "ping":
                self.stats.counts["pings_answered"] += 1
                pong: dict[str, Any] = {"type": "pong"}
                if "t" in frame:
                    pong["t"] = frame["t"]
                await self.send(pong)
                continue
            return frame

    async def idle(self, seconds: float, ping_every_s: float = 15.0) -> None:
        """Wait ``seconds`` while answering server pings and pinging now and then."""
        deadline = time.monotonic() + seconds
        next_ping = time.monotonic() + ping_every_s
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            if now >= next_ping:
                await self.send({"type": "ping", "t": int(time.time() * 1000)})
                next_ping = now + ping_every_s
            try:
                await self.recv(min(deadline, next_ping) - now)
            except TimeoutError:
                pass

    def abort(self) -> None:
        """Cut the socket without a closing handshake (a phone losing its network)."""
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 2.0)
        except Exception:  # noqa: BLE001 - closing is best effort
            self.abort()


class Worker:
    """The users and idle connections of one process."""

    def __init__(self, cfg: BenchConfig, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.stats = Stats()
        self.codec = Codec(MSGPACK_SUBPROTOCOL if cfg.msgpack else JSON_SUBPROTOCOL)
        self.url = normalize_url(cfg.url)
        self.stop_at: float | None = None  # no new turns after this (monotonic)
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
        """Connect, hello, ready. Raises Lost (with 4429 / 4401 ...) or OSError-ish errors."""
        from websockets.asyncio.client import connect

        token, hello_user = self._credentials(user)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await connect(self.url, subprotocols=[self.codec.subprotocol], additional_headers=headers,
                           max_size=None, ping_interval=None, open_timeout=30,
                           compression="deflate" if self.cfg.deflate else None,
                           user_agent_header=CLIENT_NAME)
        conn = UserConn(ws, self.codec, self.stats)
        hello: dict[str, Any] = {"type": "hello", "client": {"name": CLIENT_NAME, "version": "1"}}
        if hello_user:
            hello["user"] = hello_user
        try:
            await conn.send(hello)
            while True:
                frame = await conn.recv(30.0)
                if frame.get("type") == "ready":
                    self.stats.counts["connects"] += 1
                    return conn
                if frame.get("type") == "error" and frame.get("code") == "unauthorized":
                    raise Lost(4401)
        except BaseException:
            conn.abort()
            raise

    async def connect_with_retry(self, user: str, rng: random.Random) -> UserConn | None:
        """Like an app: exponential backoff with full jitter (0.5 s doubling to 10 s), 6 tries."""
        delay = 0.5
        for attempt in range(6):
            try:
                return await self.open(user)
            except Lost as exc:
                if exc.code == 4429:
                    self.stats.counts["closed_4429"] += 1
                if exc.code == 4401:
                    self.stats.counts["connect_failures"] += 1
                    self.stats.error("unauthorized")
                    return None
            except (OSError, TimeoutError, Exception):  # noqa: BLE001
                pass
            self.stats.counts["connect_failures"] += 1
            if attempt < 5:
                await asyncio.sleep(rng.uniform(0, delay))
                delay = min(delay * 2, 10.0)
        self.stats.error("connect")
        return None

    # -- users -----------------------------------------------------------------

    def _past_stop(self) -> bool:
        return self.stop_at is not None and time.monotonic() >= self.stop_at

    async def run_user(self, i: int, start: float) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + i)
        user = f"{cfg.user_prefix}{i}"
        conversation = cfg.conversation_id if not cfg.token else f"{cfg.conversation_id}-{i}"
        if cfg.users > 1 and cfg.ramp_s > 0:
            await asyncio.sleep(max(0.0, start + cfg.ramp_s * i / cfg.users - time.monotonic()))
        conn: UserConn | None = None
        try:
            for k in range(cfg.turns):
                if self._past_stop():
                    break
                if k > 0 and cfg.think_ms > 0:
                    think = rng.uniform(0.5, 1.5) * cfg.think_ms / 1000.0
                    if conn is not None:
                        try:
                            await conn.idle(think)
                        except Lost:
                            conn = None
                    else:
                        await asyncio.sleep(think)
                    if self._past_stop():
                        break
                if conn is None:
                    conn = await self.connect_with_retry(user, rng)
                    if conn is None:
                        self.stats.counts["turns_failed"] += cfg.turns - k
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
                       k: int) -> UserConn | None:
        """One turn, start to end, with busy retries, drops and resumes; the socket to keep using."""
        cfg, st = self.cfg, self.stats
        ctid = f"b{uuid.uuid4().hex}"
        start: dict[str, Any] = {"type": "turn.start", "client_turn_id": ctid, "conversation_id": conversation,
                                 "text": f"{PROMPTS[rng.randrange(len(PROMPTS))]} ({k + 1})"}
        if cfg.max_tokens:
            start["options"] = {"max_tokens": cfg.max_tokens}
        drop_after = rng.randint(1, 4) if cfg.drop_rate > 0 and rng.random() < cfg.drop_rate else None
        first_attempt = time.monotonic()
        sent_at = first_attempt
        turn_id: str | None = None
        last_seq = 0
        received = 0
        parts: list[str] = []
        first_at: float | None = None
        last_delta_at: float | None = None
        retries = 0
        reconnects = 0
        need_send = True
        while True:
            try:
                if conn is None:
                    # Lost the socket: reconnect, then resume the turn or re-send its start.
                    reconnects += 1
                    if reconnects > 5:
                        st.error("connection_lost")
                        st.counts["turns_failed"] += 1
                        return None
                    conn = await self.connect_with_retry(user, rng)
                    if conn is None:
                        st.counts["turns_failed"] += 1
                        return None
                    if turn_id is not None:
                        await conn.send({"type": "turn.resume", "turn_id": turn_id, "after_seq": last_seq})
                        st.counts["resumed"] += 1
                        last_delta_at = None  # no gap across a reconnect
                    else:
                        need_send = True  # same client_turn_id: the server replays if it had it
                if need_send:
                    need_send = False
                    sent_at = time.monotonic()
                    await conn.send(start)
                frame = await conn.recv(cfg.turn_timeout_s)
            except Lost:
                if conn is not None:
                    conn.abort()
                conn = None
                st.counts["connection_lost"] += 1
                continue
            except TimeoutError:
                st.error("timeout")
                st.counts["turns_failed"] += 1
                if conn is not None:
                    conn.abort()
                return None
            kind = frame.get("type")
            if kind == "turn.delta":
                if frame.get("turn_id") != turn_id:
                    continue
                now = time.monotonic()
                seq = frame.get("seq", 0)
                if seq <= last_seq:
                    st.counts["seq_duplicates"] += 1
                    continue
                if seq != last_seq + 1:
                    st.counts["seq_gaps"] += 1
                last_seq = seq
                received += 1
                parts.append(frame.get("text", ""))
                if first_at is None:
                    first_at = now
                    ttft = (now - sent_at) * 1000.0
                    st.add("ttft", ttft)
                    st.add("ttft_with_retries", (now - first_attempt) * 1000.0)
                    if ttft > cfg.budget_ms:
                        st.counts["budget_misses"] += 1
                if last_delta_at is not None:
                    st.add("gap", (now - last_delta_at) * 1000.0)
                last_delta_at = now
                if drop_after is not None and received >= drop_after:
                    drop_after = None
                    st.counts["dropped"] += 1
                    conn.abort()
                    conn = None
                continue
            if kind == "turn.accepted":
                if frame.get("client_turn_id") == ctid:
                    if turn_id is None:
                        st.counts["turns_started"] += 1
                    turn_id = frame.get("turn_id")
                continue
            if kind == "turn.end":
                if frame.get("turn_id") != turn_id:
                    continue
                now = time.monotonic()
                st.add("turn", (now - sent_at) * 1000.0)
                end_seq = int(frame.get("seq") or 0)
                st.counts["deltas_received"] += received
                st.counts["end_seq_total"] += end_seq
                if last_seq != end_seq:
                    st.counts["seq_gaps"] += 1
                if "".join(parts) != frame.get("text", ""):
                    st.counts["text_mismatches"] += 1
                reason = str(frame.get("finish_reason"))
                st.finish[reason] += 1
                if reason == "interrupted":
                    st.counts["interrupted"] += 1
                timings = frame.get("timings") or {}
                s_ttft = timings.get("ttft_ms")
                if s_ttft is not None:
                    st.add("server_ttft", float(s_ttft))
                    if first_at is not None:
                        st.add("ttft_diff", (first_at - sent_at) * 1000.0 - float(s_ttft))
                if timings.get("queue_ms") is not None:
                    st.add("server_queue", float(timings["queue_ms"]))
                if timings.get("total_ms") is not None:
                    st.add("server_total", float(timings["total_ms"]))
                st.counts["turns_completed"] += 1
                return conn
            if kind == "error":
                code = str(frame.get("code"))
                if frame.get("client_turn_id") not in (None, ctid) or (
                        frame.get("turn_id") not in (None, turn_id)):
                    continue  # about something else
                if code in ("busy", "rate_limited") and turn_id is None:
                    st.counts[code] += 1
                    retries += 1
                    if retries > cfg.max_retries or self._past_stop():
                        st.counts["gave_up"] += 1
                        st.counts["turns_failed"] += 1
                        return conn
                    wait_ms = float(frame.get("retry_after_ms") or 1000)
                    need_send = True
                    # Jitter, so refused users do not come back all at once.
                    try:
                        await conn.idle(wait_ms / 1000.0 * rng.uniform(1.0, 1.25))
                    except Lost:
                        conn.abort()
                        conn = None
                        st.counts["connection_lost"] += 1
                    continue
                st.error(code)
                st.counts["turns_failed"] += 1
                return conn
            # history, pong, anything else: not ours to handle

    # -- idle connections --------------------------------------------------------

    async def hold_idle(self, j: int, opened: asyncio.Queue[bool]) -> None:
        """One connection that only answers pings until the run ends."""
        user = f"{self.cfg.user_prefix}idle-{self.index}-{j}"
        try:
            conn = await self.open(user)
        except Exception:  # noqa: BLE001 - counted
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
        except Lost:
            self.stats.counts["idle_lost"] += 1
        except asyncio.CancelledError:
            pass
        finally:
            await conn.close()

    # -- the whole worker ----------------------------------------------------------

    async def run(self, user_ids: list[int], idle: int, report: Any, go: Any) -> None:
        loop = asyncio.get_running_loop()
        reporter = loop.create_task(self._report(report))
        idle_tasks: list[asyncio.Task[None]] = []
        try:
            if idle:
                opened: asyncio.Queue[bool] = asyncio.Queue()
                gate = asyncio.Semaphore(200)  # connections being opened at once

                async def one(j: int) -> None:
                    async with gate:
                        t = loop.create_task(self.hold_idle(j, opened))
                        idle_tasks.append(t)
                        await opened.get()

                await asyncio.gather(*(one(j) for j in range(idle)))
            report.put(("ready", self.index, None))
            while not await loop.run_in_executor(None, go.wait, 1.0):
                pass
            start = time.monotonic()
            if self.cfg.duration_s:
                self.stop_at = start + self.cfg.duration_s
            self.stats.counts["turns_planned"] += len(user_ids) * self.cfg.turns
            await asyncio.gather(*(self.run_user(i, start) for i in user_ids))
            if not user_ids and idle and self.stop_at is not None:
                await asyncio.sleep(max(0.0, self.stop_at - time.monotonic()))
        finally:
            self._idle_stop.set()
            for t in idle_tasks:
                t.cancel()
            await asyncio.gather(*idle_tasks, return_exceptions=True)
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)

    async def _report(self, report: Any) -> None:
        while True:
            await asyncio.sleep(0.5)
            report.put(("progress", self.index, self.stats.progress()))


def _raise_nofile() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, ValueError, OSError):
        pass


def _worker_main(cfg_dict: dict[str, Any], index: int, user_ids: list[int], idle: int, report: Any,
                 go: Any) -> None:
    """Entry point of a worker process."""
    _raise_nofile()
    cfg = BenchConfig(**cfg_dict)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()

    async def run() -> Stats:
        worker = Worker(cfg, index)
        await worker.run(user_ids, idle, report, go)
        return worker.stats

    try:
        with runner:
            stats = runner.run(run())
        report.put(("result", index, stats.export()))
    except KeyboardInterrupt:
        report.put(("failed", index, "interrupted"))
    except BaseException:  # noqa: BLE001 - the parent reports it
        report.put(("failed", index, traceback.format_exc()))


# ---------------------------------------------------------------------------
# Parent side: start workers, show progress, merge, report
# ---------------------------------------------------------------------------

def _merge(results: list[dict[str, Any]]) -> tuple[dict[str, array], Counter[str], Counter[str], Counter[str]]:
    series = {name: array("d") for name in SERIES}
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    finish: Counter[str] = Counter()
    for r in results:
        for name, raw in r["series"].items():
            a = array("d")
            a.frombytes(raw)
            series[name].extend(a)
        counts.update(r["counts"])
        errors.update(r["errors"])
        finish.update(r["finish"])
    return series, counts, errors, finish


def _progress_line(elapsed: float, snaps: dict[int, dict[str, Any]], ttfts: list[float]) -> str:
    done = sum(s["done"] for s in snaps.values())
    active = sum(s["active"] for s in snaps.values())
    busy = sum(s["busy"] for s in snaps.values())
    limited = sum(s["rate_limited"] for s in snaps.values())
    errors = sum(s["errors"] for s in snaps.values())
    p50 = percentile(ttfts, 50)
    p50_s = f"{p50:7.1f} ms" if p50 is not None else "      - ms"
    return (f"[{elapsed:6.1f}s] turns done {done:6d}  active {active:5d}  p50 TTFT {p50_s}  "
            f"busy {busy:5d}  rate_limited {limited:4d}  errors {errors:4d}")


def run_bench(cfg: BenchConfig, *, out: Any = None, err: Any = None) -> dict[str, Any]:
    """Run the benchmark; the report (as written with --json)."""
    out = out or sys.stdout
    err = err or sys.stderr
    ctx = mp.get_context("spawn")
    report = ctx.Queue()
    go = ctx.Event()
    n = max(1, cfg.processes)
    assignments = [list(range(w, cfg.users, n)) for w in range(n)]
    idles = [cfg.idle // n + (1 if w < cfg.idle % n else 0) for w in range(n)]
    procs = [ctx.Process(target=_worker_main, args=(asdict(cfg), w, assignments[w], idles[w], report, go),
                         name=f"rapport-bench-{w}", daemon=True) for w in range(n)]
    for p in procs:
        p.start()
    tty = err.isatty() if hasattr(err, "isatty") else False
    snaps: dict[int, dict[str, Any]] = {}
    ttfts: list[float] = []
    results: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    ready: set[int] = set()
    started: float | None = None
    last_line = 0.0
    t_setup = time.monotonic()
    try:
        while len(results) + len(failures) < n:
            try:
                kind, w, payload = report.get(timeout=0.25)
            except queue_mod.Empty:
                kind = None
            if kind == "ready":
                ready.add(w)
                if len(ready) == n:
                    started = time.monotonic()
                    if cfg.progress:
                        err.write(f"rapport bench: {n} worker(s) ready in {started - t_setup:.1f} s"
                                  f"{f', {cfg.idle} idle connection(s) opened' if cfg.idle else ''}; "
                                  f"running {cfg.users} user(s) x {cfg.turns} turn(s)\n")
                    go.set()
            elif kind == "progress":
                ttfts.extend(payload.pop("ttft"))
                snaps[w] = payload
            elif kind == "result":
                results[w] = payload
            elif kind == "failed":
                failures[w] = payload
            if kind is None:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in results
                        and i not in failures]
                # A worker that died without a word (killed): give its queue a moment first.
                for i in dead:
                    procs[i].join(0.1)
                    if report.empty():
                        failures[i] = f"worker exited with {procs[i].exitcode}"
            now = time.monotonic()
            if cfg.progress and started is not None and now - last_line >= 1.0:
                last_line = now
                line = _progress_line(now - started, snaps, ttfts)
                err.write(("\r" + line) if tty else (line + "\n"))
                err.flush()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        go.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    elapsed = time.monotonic() - (started if started is not None else t_setup)
    if cfg.progress and tty:
        err.write("\n")
    for w, tb in sorted(failures.items()):
        err.write(f"rapport bench: worker {w} failed:\n{tb}\n")
    series, counts, errors, finish = _merge([results[w] for w in sorted(results)])
    return build_report(cfg, elapsed, series, counts, errors, finish, failed_workers=len(failures))


def build_report(cfg: BenchConfig, elapsed: float, series: dict[str, array], counts: Counter[str],
                 errors: Counter[str], finish: Counter[str], failed_workers: int = 0) -> dict[str, Any]:
    c = {name: int(counts.get(name, 0)) for name in COUNTS}
    protocol_ok = (c["seq_gaps"] == 0 and c["seq_duplicates"] == 0 and c["text_mismatches"] == 0
                   and c["deltas_received"] == c["end_seq_total"])
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("token", "jwt_secret")},
        "elapsed_s": elapsed,
        "latency_ms": {name: summarize(series[name]) for name in SERIES},
        "counts": c,
        "errors": dict(errors),
        "finish_reasons": dict(finish),
        "all_deltas_delivered": c["deltas_received"] == c["end_seq_total"],
        "protocol_ok": protocol_ok,
        "failed_workers": failed_workers,
        "throughput": {
            "turns_per_s": c["turns_completed"] / elapsed if elapsed > 0 else 0.0,
            "deltas_per_s": c["deltas_received"] / elapsed if elapsed > 0 else 0.0,
        },
        "_samples": {"ttft": list(series["ttft"]), "server_ttft": list(series["server_ttft"])},
    }


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}"


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    c = report["counts"]
    lines = [
        f"rapport bench: {cfg['users']} user(s) x {cfg['turns']} turn(s), {cfg['processes']} process(es), "
        f"{'msgpack' if cfg['msgpack'] else 'json'}, {report['elapsed_s']:.1f} s"
        + (f", {c['idle_open']} idle connection(s)" if cfg["idle"] else ""),
        "",
        f"{'milliseconds':<28}{'count':>8}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
    ]
    for name in SERIES:
        s = report["latency_ms"][name]
        lines.append(f"{SERIES_LABELS[name]:<28}{s['count']:>8}{_fmt(s['p50']):>10}{_fmt(s['p95']):>10}"
                     f"{_fmt(s['p99']):>10}{_fmt(s['max']):>10}")
    finish = ", ".join(f"{k} {v}" for k, v in sorted(report["finish_reasons"].items())) or "-"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(report["errors"].items()))
    delivered = "all delivered" if report["all_deltas_delivered"] else "MISSING DELTAS"
    rows = [
        ("turns completed", f"{c['turns_completed']} / {c['turns_planned']}  ({finish})"),
        (f"budget misses (> {cfg['budget_ms']:g} ms)", str(c["budget_misses"])),
        ("busy answers (retried)", f"{c['busy']}  (gave up: {c['gave_up']})"),
        ("rate_limited", str(c["rate_limited"])),
        ("errors", f"{c['errors']}" + (f"  ({errors})" if errors else "")),
        ("interrupted turns", str(c["interrupted"])),
        ("dropped / resumed", f"{c['dropped']} / {c['resumed']}  (connections lost: {c['connection_lost']})"),
        ("deltas received / end seq", f"{c['deltas_received']} / {c['end_seq_total']}  ({delivered})"),
        ("seq gaps / duplicates", f"{c['seq_gaps']} / {c['seq_duplicates']}"),
        ("text mismatches", str(c["text_mismatches"])),
        ("connects (failed, 4429)", f"{c['connects']} ({c['connect_failures']}, {c['closed_4429']})"),
        ("throughput", f"{report['throughput']['turns_per_s']:.2f} turns/s, "
                       f"{report['throughput']['deltas_per_s']:.1f} deltas/s"),
    ]
    if cfg["idle"]:
        rows.append(("idle connections", f"{c['idle_open']} open, {c['idle_failed']} failed, "
                                         f"{c['idle_lost']} lost"))
    lines.append("")
    lines.extend(f"{k:<28}{v}" for k, v in rows)
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: str) -> None:
    """A PNG: histogram and CDF of client TTFT (server TTFT on the CDF), budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft = sorted(report["_samples"]["ttft"])
    server = sorted(report["_samples"]["server_ttft"])
    budget = report["config"]["budget_ms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if ttft:
        ax1.hist(ttft, bins=min(60, max(10, len(ttft) // 5)), color="#4c72b0")
        ax2.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label="client", color="#4c72b0")
    if server:
        ax2.plot(server, [(i + 1) / len(server) for i in range(len(server))], label="server timings",
                 color="#dd8452", linestyle="--")
    top = max([*ttft[-1:], *server[-1:], 1.0])
    for ax in (ax1, ax2):
        # The budget line only when it is on the data's scale; otherwise it would squash the data.
        if budget <= top * 2:
            ax.axvline(budget, color="#c44e52", linewidth=1, label=f"budget {budget:g} ms")
            ax.set_xlim(0, max(top, budget) * 1.05)
        else:
            ax.set_xlim(0, top * 1.05)
            ax.text(0.98, 0.97, f"budget {budget:g} ms: off scale", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, color="#c44e52")
        ax.set_xlabel("time to first token (ms)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("turns")
    ax1.set_title("TTFT histogram (client)")
    ax2.set_ylabel("share of turns")
    ax2.set_ylim(0, 1.0)
    ax2.set_title("TTFT CDF")
    ax2.legend(loc="lower right")
    cfg = report["config"]
    fig.suptitle(f"rapport bench: {cfg['users']} users x {cfg['turns']} turns, {len(ttft)} first tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--url", default=DEFAULT_URL, help=f"server WebSocket URL, or http://host:port (default {DEFAULT_URL})")
    a("--users", type=int, default=10, help="simulated users, each on its own connection (default 10)")
    a("--turns", type=int, default=3, help="turns per user (default 3)")
    a("--think-ms", type=float, default=1000.0,
      help="think time between a user's turns; each pause is uniform in 0.5x..1.5x (default 1000)")
    a("--ramp-s", type=float, default=0.0, help="start users evenly over this many seconds (default 0)")
    a("--duration-s", type=float, default=None, help="start no new turn after this many seconds")
    a("--max-tokens", type=int, default=None, help="options.max_tokens of every turn (default: server's)")
    a("--msgpack", action="store_true", help="speak rapport.v1.msgpack instead of JSON")
    a("--drop-rate", type=float, default=0.0,
      help="probability of cutting a turn's socket mid-stream and resuming it (default 0)")
    a("--user-prefix", default=None, help="user ids are PREFIX0, PREFIX1, ... (default: bench-<random>-)")
    a("--token", default=None, help="one JWT for every user (all users are then one identity)")
    a("--jwt-secret", default=None,
      help="mint a JWT per user with this HMAC secret (default: $RAPPORT_JWT_SECRET, else the "
           "server's loopback development secret)")
    a("--dev-users", action="store_true", help="development mode: name users in hello.user, no token")
    a("--processes", type=int, default=1, help="worker processes the users are split over (default 1)")
    a("--idle", type=int, default=0, help="extra connections that only answer pings (default 0)")
    a("--budget-ms", type=float, default=2000.0, help="first-token budget to count misses against (default 2000)")
    a("--conversation-id", default="bench", help="conversation id the users talk in (default 'bench')")
    a("--turn-timeout-s", type=float, default=120.0, help="give up a turn silent this long (default 120)")
    a("--max-retries", type=int, default=20, help="busy / rate_limited retries per turn (default 20)")
    a("--no-deflate", dest="deflate", action="store_false",
      help="do not offer permessage-deflate (browsers do offer it)")
    a("--seed", type=int, default=0, help="seed of the users' random choices (default 0)")
    a("--no-progress", dest="progress", action="store_false", help="no live progress line on stderr")
    a("--json", dest="json_path", default=None, metavar="PATH", help="write every figure as JSON")
    a("--plot", dest="plot_path", default=None, metavar="PATH", help="write a PNG of the TTFT distribution")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.users < 0 or args.turns < 1 or args.processes < 1 or args.idle < 0:
        raise ValueError("--users and --idle must be >= 0, --turns and --processes >= 1")
    if not 0.0 <= args.drop_rate <= 1.0:
        raise ValueError("--drop-rate must be within 0..1")
    if args.users == 0 and not args.idle:
        raise ValueError("nothing to do: --users 0 and no --idle")
    if args.users == 0 and not args.duration_s:
        raise ValueError("--users 0 (idle connections only) needs --duration-s")
    if sum(bool(x) for x in (args.token, args.jwt_secret, args.dev_users)) > 1:
        raise ValueError("choose one of --token, --jwt-secret and --dev-users")
    secret = args.jwt_secret
    if not (args.token or args.dev_users or secret):
        from protocol.development import DEV_JWT_SECRET

        secret = os.environ.get("RAPPORT_JWT_SECRET") or DEV_JWT_SECRET
    prefix = args.user_prefix if args.user_prefix is not None else f"bench-{uuid.uuid4().hex[:6]}-"
    return BenchConfig(
        url=args.url, users=args.users, turns=args.turns, think_ms=args.think_ms, ramp_s=args.ramp_s,
        duration_s=args.duration_s, max_tokens=args.max_tokens, msgpack=args.msgpack,
        drop_rate=args.drop_rate, user_prefix=prefix, token=args.token, jwt_secret=secret,
        dev_users=args.dev_users, processes=args.processes, idle=args.idle, budget_ms=args.budget_ms,
        conversation_id=args.conversation_id, turn_timeout_s=args.turn_timeout_s,
        max_retries=args.max_retries, deflate=args.deflate, seed=args.seed, progress=args.progress,
    )


def bench_command(args: argparse.Namespace) -> int:
    """Entry point for the ``rapport bench`` subcommand; returns the exit code."""
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"rapport bench: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_bench(cfg)
    except KeyboardInterrupt:
        return 130
    print(format_table(report))
    if args.plot_path:
        write_plot(report, args.plot_path)
    samples = report.pop("_samples")
    if args.json_path:
        report["ttft_histogram_ms"] = _histogram(samples["ttft"])
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    completed = report["counts"]["turns_completed"]
    if not report["protocol_ok"] or (cfg.users and completed == 0) or report["failed_workers"]:
        return 1
    return 0


def _histogram(values: Sequence[float]) -> list[dict[str, float | int]]:
    """Counts of ``values`` in log-spaced millisecond buckets (for the JSON report)."""
    edges = [1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000,
             float("inf")]
    counts = [0] * len(edges)
    for v in values:
        for i, e in enumerate(edges):
            if v <= e:
                counts[i] += 1
                break
    return [{"le_ms": e if e != float("inf") else "inf", "count": n}  # type: ignore[dict-item]
            for e, n in zip(edges, counts)]


def main(argv: list[str] | None = None) -> int:
    parser = add_bench_arguments(argparse.ArgumentParser(
        prog="rapport bench", description="Load generator: simulated users chatting over the WebSocket protocol."))
    return bench_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
