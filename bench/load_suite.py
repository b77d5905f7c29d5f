"""Load suite: the latency budget, admission control and the gateway measured at
thousands of users, on one machine, against ONE gateway process running the
SIMULATED engine (a timing simulation of a continuously batching engine, not a
model; ``--sim-ttft-ms 40 --sim-itl-ms 20``, GPU-like speed).

Every scenario starts its own gateway (``python -m rapport.cli serve --engine
simulated --auth dev ...``, per-user limits raised far out of the way:
``--turns-per-minute 1000000 --max-connections-per-user 100000``), drives it
from worker processes (uvloop + :class:`clients.driver.Driver`, one event loop
each), prints its figures, and stops everything it started. Scenarios run one after the other in
one invocation; ``--only NAME`` runs some of them, ``--quick`` is a small smoke
run (numbers from it mean nothing), ``--json PATH`` writes every figure.

    python bench/load_suite.py --json results.json
    python bench/load_suite.py --only streaming --only overload
    python bench/load_suite.py --quick

Before each scenario the suite waits (at most ``--load-wait-s``) for the
1-minute load average to fall to ``--max-load``, and reports the load average at
the start and end of every measured window next to its figures: the client and
the server share the machine's cores, and anything else running there shows up
in the numbers.

Scenarios
---------

``streaming`` -- 1,000 concurrent streaming conversations.
    1,000 users connect (each its own WebSocket, all open for the whole run) and
    hold a 3-turn conversation with ~3 s think time (uniform 0.5x..1.5x), first
    turns spread over 5 s; replies are exactly 40 tokens
    (``--sim-reply-tokens 40``), ``max_num_seqs`` 256. A ``busy`` answer is
    retried after its ``retry_after_ms`` like an app would (counted).

    The figure, **gateway overhead** per turn::

        overhead = client TTFT - timings.engine_ttft_ms

    * client TTFT: the client's monotonic clock, from sending the accepted
      ``turn.start`` to receiving the first ``turn.delta``;
    * ``timings.queue_ms`` (turn.end): from the gateway's receipt of
      turn.start to handing the request to the engine (rate limit, admission,
      history read, accept write);
    * ``timings.ttft_ms``: from receipt to the first delta reaching the turn.

    ``ttft_ms - queue_ms`` is the time the engine held the turn before its
    first token (engine queue + prefill step): the engine's own time to first
    token as far as the wire can tell. The overhead is therefore everything the
    gateway and the network add: client->server transit and receive,
    admission and Redis before the engine, and fan-out, outbox, socket and
    client decode after the first token. Two parts are reported separately:
    ``client TTFT - timings.ttft_ms`` (network + socket + client) and
    ``queue_ms`` (gateway before the engine).

    ``timings.engine_ttft_ms`` is the engine's own time from submission to
    the step that produced the first token. Against a server that does not
    report it, the script falls back to ``ttft_ms - queue_ms``, which also
    counts the wake-up of the turn's task after the engine step as engine time
    (flattering the overhead).

    Also checked: every generated delta delivered (deltas received == sum of
    turn.end seq), zero seq gaps / duplicates, deltas concatenate to the
    turn.end text; and whether every turn completed (a turn refused with
    anything but ``busy`` is not retried; the error messages are counted).

    Diagnostics: a table per 5 s window of turn.start time (overhead p50/p99,
    queue_ms p99, busy answers, gateway CPU, the engine's running / waiting
    counts from /metrics) shows whether the overhead comes from a saturated
    gateway and whether ``busy`` was answered while the engine had room; the
    turns at or above the p99 overhead are split into their parts.

``idle`` -- 10,000 idle connections with heartbeats, held by one process.
    10,000 WebSockets (distinct users) say hello and then only answer pings;
    the gateway pings every 5 s (``--heartbeat-interval-ms 5000``, timeout
    15 s), so heartbeats flow for the whole hold (20 s). Memory per connection
    = (server RSS at the end of the hold - RSS before opening) / connections
    open, RSS from /proc/PID/status VmRSS. The baseline is taken after a warm-up
    of 100 connections opened and closed (one-time allocations: code paths,
    Redis pool) -- the RSS right after start is reported too. The suite raises
    its own RLIMIT_NOFILE soft limit to the hard limit; the gateway inherits it.

``overload`` -- offered load at twice the engine's capacity.
    ``max_num_seqs`` 32 (not 256: the client stays cheap and leaves the cores
    to the gateway), replies 40 tokens, itl 20 ms. Nominal capacity =
    max_num_seqs / (reply tokens x itl) = 32 / (40 x 20 ms) = 40 turns/s;
    offered = 2 x that = 80 turn.starts/s, Poisson arrivals for 30 s, each a
    new conversation on an idle connection from a pre-opened pool. A refused
    turn is not retried (a retry would be more offered load). The engine
    really serves less than nominal (steps that admit new sequences are longer,
    batch slowdown), so the real overload is above 2x; the served rate is
    reported. Figures: share of ACCEPTED turns whose client TTFT <= 2 s (the
    server's own timings.ttft_ms, which starts at receipt, is reported too),
    and for REFUSED turns the time from sending turn.start to receiving
    ``busy``: p50/p99/max and how many took more than 50 ms.

``stuck`` -- a stuck client while 200 others stream.
    Two phases on one gateway (``--stuck-timeout-ms 10000``), 25 s each: 200
    users in closed loop (turn, ~0.5 s think, repeat), plus one extra client
    that at t = 3 s starts 100 turns in 100 conversations over 0.5 s (enough replies to
    fill the kernel buffers: ~100 KB x 2 of socket buffers plus uvloop's write
    buffer). Control phase: that client reads everything. Stuck phase: its
    socket has a 4 KB receive buffer and it never reads again after sending
    the turn.starts (it asked for merged deltas, ``hello.coalesce``, like the
    project's own clients). Compared: the 200 users' TTFT and inter-delta
    gaps, control vs stuck (and within the stuck window); when the gateway
    closed the stuck socket (``rapport_slow_consumer_closes_total`` polled
    every 0.25 s, and the gateway's own log line); the TCP state of the stuck
    socket as the client's kernel sees it; when the gateway's fd for it is
    actually released (its fd count drops; the stuck client keeps its end
    open until the phase ends, like a phone that stays on the network);
    gateway RSS and open fds over time.
    The goals of this scenario are the suite's own (the issue gives none):
    the others' p99 TTFT and p99 gap within max(10 ms, 25 %) of the control,
    the socket closed within stuck-timeout + 3 s of the client going silent,
    and the RSS growth over the control phase under 20 MB.

Server CPU is the gateway process's utime+stime (/proc/PID/stat) over the
measured window, in % of one core; client CPU likewise for the worker
processes. Percentiles are NumPy's default (linear) definition
(:func:`clients.percentiles.percentile`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import random
import re
import resource
import signal
import socket
import struct
import sys
import tempfile
import termios
import time
import traceback
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Runnable as `python bench/load_suite.py` from a checkout: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from clients.bench import PROMPTS
from clients.driver import Driver
from clients.errors import ClientError, ConnectionLost
from clients.percentiles import summarize
from protocol import client_frames
from testkit.metrics import scrape
from testkit.redis_prefix import clean_prefix
from testkit.servers import ServerProcess

SUITE = "rapport-load-suite"
SCENARIOS = ("streaming", "idle", "overload", "stuck")

# The simulated engine's timing for every scenario (GPU-like speed).
SIM_TTFT_MS = 40
SIM_ITL_MS = 20
REPLY_TOKENS = 40
BUDGET_MS = 2000
LIMIT_FLAGS = ["--turns-per-minute", "1000000", "--max-connections-per-user", "100000"]

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


# ===========================================================================
# Small helpers (both sides)
# ===========================================================================

def _now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on the machine."""
    return time.monotonic()


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def stats(values: Iterable[float]) -> dict[str, float | int | None]:
    return summarize([v for v in values if not math.isnan(v)])


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_dist(s: dict[str, Any], unit: str = "ms") -> str:
    return (f"p50 {fmt(s['p50'])} / p95 {fmt(s['p95'])} / p99 {fmt(s['p99'])} / max {fmt(s['max'])} {unit}"
            f" (n={s['count']})")


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


# ===========================================================================
# Worker side: one process, one event loop, many sockets
# ===========================================================================

class Recorder:
    """One worker's measurements: float columns and counters.

    Per-turn columns are appended together in :meth:`turn`, so that merged
    workers stay aligned row by row.
    """

    TURN_COLS = ("t_sent", "ttft", "ttft_retries", "s_ttft", "s_queue", "s_engine", "s_total", "turn_ms", "end_seq",
                 "received")

    def __init__(self) -> None:
        self.cols: dict[str, array] = {}
        self.counts: Counter[str] = Counter()

    def col(self, name: str) -> array:
        c = self.cols.get(name)
        if c is None:
            c = self.cols[name] = array("d")
        return c

    def turn(self, **values: float) -> None:
        for name in self.TURN_COLS:
            self.col(name).append(values.get(name, math.nan))

    def export(self) -> dict[str, Any]:
        return {"cols": {k: v.tobytes() for k, v in self.cols.items()}, "counts": dict(self.counts)}


def gateway_overhead(client_ttft: float, s_ttft: float, s_queue: float, s_engine: float) -> float:
    """Client TTFT minus the engine's own TTFT (``timings.engine_ttft_ms`` when the
    server reports it; otherwise the approximation ``ttft_ms - queue_ms``)."""
    if not math.isnan(s_engine):
        return client_ttft - s_engine
    return client_ttft - (s_ttft - s_queue)


def _opt(v: Any) -> float:
    return math.nan if v is None else float(v)


async def answer_ping(driver: Driver, frame: dict[str, Any], rec: Recorder | None = None) -> None:
    await driver.send(client_frames.pong(frame.get("t")))
    if rec is not None:
        rec.counts["pings_answered"] += 1


async def open_driver(url: str, user: str, *, coalesce: bool = False, sock: socket.socket | None = None,
                      max_queue: int = 16, timeout: float = 60.0, rec: Recorder | None = None) -> Driver:
    """Connect, hello, wait for ready; the open connection.

    An ``error`` frame before ``ready`` is counted (``hello_error_<code>``), not
    fatal: the gateway answers e.g. ``unavailable`` when it cannot list the
    user's active turns and still sends ``ready``; a refusal closes the socket.
    That is why the hello is sent here rather than by ``Driver.open``.
    """
    kwargs: dict[str, Any] = {"sock": sock} if sock is not None else {}
    driver = await Driver.open(url, hello=False, compression=None, open_timeout=timeout, close_timeout=2,
                               max_queue=max_queue, user_agent_header=SUITE, proxy=None, **kwargs)
    try:
        await driver.send(client_frames.hello(user=user, client={"name": SUITE, "version": "1"},
                                              coalesce=True if coalesce else None))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await driver.recv(timeout=None)
                    if frame["type"] == "ready":
                        return driver
                    if frame["type"] == "error" and rec is not None:
                        rec.counts[f"hello_error_{frame.get('code')}"] += 1
        except TimeoutError as exc:
            raise ConnectionLost(f"no 'ready' within {timeout} s") from exc
    except BaseException:
        driver.abort()
        raise


async def idle_for(driver: Driver, seconds: float, rec: Recorder) -> None:
    """Read for ``seconds``, answering pings (think time, waits before a retry)."""
    deadline = _now() + seconds
    while True:
        left = deadline - _now()
        if left <= 0:
            return
        try:
            frame = await driver.recv(timeout=left)
        except TimeoutError:
            return
        if frame["type"] == "ping":
            await answer_ping(driver, frame, rec)


async def run_turn(driver: Driver, rec: Recorder, t0: float, *, conversation: str, rng: random.Random,
                   retry: bool, max_retries: int = 30, timeout_s: float = 60.0) -> str:
    """One turn from turn.start to turn.end; 'ok', 'refused' or 'error'.

    Records one row of per-turn columns for a completed turn, and the latency
    of every refusal (``busy`` / ``rate_limited``) in ``refusal_ms``. With
    ``retry`` a refusal is retried after its ``retry_after_ms`` (x 1..1.25).
    Raises TimeoutError (no end in ``timeout_s``) and ConnectionLost.
    """
    ctid = "ls" + uuid.uuid4().hex
    start = client_frames.turn_start(PROMPTS[rng.randrange(len(PROMPTS))], client_turn_id=ctid,
                                     conversation_id=conversation)
    first_attempt: float | None = None
    retries = 0
    gap_col, gap_t = rec.col("gap"), rec.col("gap_t")
    while True:
        sent = _now()
        if first_attempt is None:
            first_attempt = sent
        await driver.send(start)
        turn_id: str | None = None
        last_seq = 0
        received = 0
        parts: list[str] = []
        first_at: float | None = None
        last_at = 0.0
        deadline = sent + timeout_s
        retry_after: float | None = None
        while retry_after is None:
            left = deadline - _now()
            if left <= 0:
                raise TimeoutError
            frame = await driver.recv(timeout=left)
            now = _now()
            kind = frame["type"]
            if kind == "turn.delta":
                if turn_id is None or frame.get("turn_id") != turn_id:
                    continue
                seq = frame["seq"]
                if seq <= last_seq:
                    rec.counts["seq_duplicates"] += 1
                    continue
                if frame.get("seq_start", seq) != last_seq + 1:
                    rec.counts["seq_gaps"] += 1
                received += seq - max(frame.get("seq_start", seq), last_seq + 1) + 1
                last_seq = seq
                parts.append(frame.get("text", ""))
                if first_at is None:
                    first_at = now
                else:
                    gap_col.append((now - last_at) * 1000.0)
                    gap_t.append(now - t0)
                last_at = now
            elif kind == "turn.accepted":
                if frame.get("client_turn_id") == ctid:
                    turn_id = frame.get("turn_id")
            elif kind == "turn.end":
                if turn_id is None or frame.get("turn_id") != turn_id:
                    continue
                end_seq = int(frame.get("seq") or 0)
                if last_seq != end_seq:
                    rec.counts["seq_gaps"] += 1
                if "".join(parts) != frame.get("text", ""):
                    rec.counts["text_mismatches"] += 1
                rec.counts[f"finish_{frame.get('finish_reason')}"] += 1
                tm = frame.get("timings") or {}
                rec.turn(t_sent=sent - t0,
                         ttft=(first_at - sent) * 1000.0 if first_at is not None else math.nan,
                         ttft_retries=(first_at - first_attempt) * 1000.0 if first_at is not None else math.nan,
                         s_ttft=_opt(tm.get("ttft_ms")), s_queue=_opt(tm.get("queue_ms")),
                         s_engine=_opt(tm.get("engine_ttft_ms")),
                         s_total=_opt(tm.get("total_ms")), turn_ms=(now - sent) * 1000.0,
                         end_seq=float(end_seq), received=float(received))
                rec.counts["retries"] += retries
                return "ok"
            elif kind == "ping":
                await answer_ping(driver, frame, rec)
            elif kind == "error":
                if frame.get("client_turn_id") not in (None, ctid):
                    continue
                code = str(frame.get("code"))
                if code in ("busy", "rate_limited") and turn_id is None:
                    rec.counts[code] += 1
                    rec.col("refusal_ms").append((now - sent) * 1000.0)
                    rec.col("refusal_t").append(sent - t0)
                    if not retry or retries >= max_retries:
                        rec.counts["refused_final"] += 1
                        return "refused"
                    retries += 1
                    retry_after = float(frame.get("retry_after_ms") or 1000) / 1000.0
                    continue
                rec.counts[f"error_{code}"] += 1
                # The message says why (digits dropped so that counts group).
                msg = re.sub(r"[0-9]+", "N", str(frame.get("message", "")))[:90]
                rec.counts[f"error_message: {code}: {msg}"] += 1
                return "error"
        await idle_for(driver, retry_after * rng.uniform(1.0, 1.25), rec)


async def wait_event(evt: Any, timeout: float | None = None) -> bool:
    """Wait for a multiprocessing Event without blocking the loop (polls every 10 ms)."""
    deadline = None if timeout is None else _now() + timeout
    while not evt.is_set():
        if deadline is not None and _now() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def lag_monitor(rec: Recorder, period: float = 0.05) -> None:
    """How late this worker's event loop wakes up (a saturated client inflates its own TTFT)."""
    col = rec.col("loop_lag")
    while True:
        t = _now()
        await asyncio.sleep(period)
        col.append((_now() - t - period) * 1000.0)


def count_connect_error(rec: Recorder, exc: ClientError) -> None:
    rec.counts["connect_retries"] += 1
    # The driver wraps what went wrong (refused, timed out, handshake rejected): count the cause.
    rec.counts[f"connect_error_{type(exc.__cause__ or exc).__name__}"] += 1


async def open_many(url: str, users: list[str], rec: Recorder, gate: int = 64) -> dict[str, Driver]:
    sem = asyncio.Semaphore(gate)
    conns: dict[str, Driver] = {}

    async def one(user: str) -> None:
        async with sem:
            for attempt in range(3):
                try:
                    conns[user] = await open_driver(url, user, rec=rec)
                    return
                except ClientError as exc:
                    count_connect_error(rec, exc)
                    await asyncio.sleep(0.2 * (attempt + 1))
            rec.counts["connect_failed"] += 1

    await asyncio.gather(*(one(u) for u in users))
    return conns


async def close_many(conns: Iterable[Driver], gate: int = 200) -> None:
    sem = asyncio.Semaphore(gate)

    async def one(driver: Driver) -> None:
        async with sem:
            try:
                await asyncio.wait_for(driver.close(), 3.0)
            except (TimeoutError, OSError):  # closing is best effort: drop the ones that do not answer
                driver.abort()

    await asyncio.gather(*(one(d) for d in conns))


# ---------------------------------------------------------------- chat users

async def w_chat(p: dict[str, Any], index: int, report: Any, go: Any, stop: Any, t0v: Any) -> dict[str, Any]:
    """Users in closed loop: ``turns`` turns each (or until ``duration_s``), think time between."""
    rec = Recorder()
    conns = await open_many(p["url"], p["users"], rec)
    rec.counts["connected"] = len(conns)
    report.put(("ready", index, {"open": len(conns), "cpu_s": _self_cpu_s()}))
    await wait_event(go)
    t0 = t0v.value
    stop_at = t0 + p["duration_s"] if p.get("duration_s") else None
    lag = asyncio.get_running_loop().create_task(lag_monitor(rec))

    def past_stop() -> bool:
        return stop_at is not None and _now() >= stop_at

    async def user(name: str, driver: Driver) -> None:
        rng = random.Random(f"{p['seed']}:{name}")
        try:
            await idle_for(driver, max(0.0, t0 + rng.uniform(0.0, p["ramp_s"]) - _now()), rec)
            k = 0
            while (not p["turns"] or k < p["turns"]) and not past_stop():
                if k > 0 and p["think_ms"] > 0:
                    await idle_for(driver, rng.uniform(0.5, 1.5) * p["think_ms"] / 1000.0, rec)
                    if past_stop():
                        break
                rec.counts["turns_started"] += 1
                outcome = await run_turn(driver, rec, t0, conversation=p["conversation"], rng=rng, retry=True,
                                         timeout_s=p.get("turn_timeout_s", 60.0))
                rec.counts[f"turns_{outcome}"] += 1
                k += 1
        except TimeoutError:
            rec.counts["turn_timeouts"] += 1
            driver.abort()
        except ConnectionLost:
            rec.counts["connections_lost"] += 1

    await asyncio.gather(*(user(n, d) for n, d in conns.items()))
    lag.cancel()
    cpu = _self_cpu_s()
    await close_many(conns.values())
    return {**rec.export(), "cpu_end_s": cpu}


# ---------------------------------------------------------------- idle connections

async def w_idle(p: dict[str, Any], index: int, report: Any, go: Any, stop: Any, t0v: Any) -> dict[str, Any]:
    """Open connections that only answer pings until ``stop``."""
    rec = Recorder()
    conns: list[Driver] = []
    holders: list[asyncio.Task[None]] = []
    closing = False
    loop = asyncio.get_running_loop()

    async def hold(driver: Driver) -> None:
        try:
            while True:
                frame = await driver.recv(timeout=None)
                if frame["type"] == "ping":
                    await answer_ping(driver, frame, rec)
                else:
                    rec.counts["other_frames"] += 1
        except ConnectionLost as exc:
            if not closing:
                rec.counts["lost"] += 1
                rec.counts[f"lost_code_{exc.close_code}"] += 1

    sem = asyncio.Semaphore(p.get("gate", 100))
    t_open = _now()

    async def opener(user: str) -> None:
        async with sem:
            for attempt in range(3):
                try:
                    driver = await open_driver(p["url"], user, rec=rec)
                except ClientError as exc:
                    count_connect_error(rec, exc)
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
                conns.append(driver)
                holders.append(loop.create_task(hold(driver)))
                return
            rec.counts["connect_failed"] += 1

    await asyncio.gather(*(opener(u) for u in p["users"]))
    rec.counts["opened"] = len(conns)
    report.put(("ready", index, {"open": len(conns), "open_s": _now() - t_open, "cpu_s": _self_cpu_s()}))
    await wait_event(go)
    at_go = rec.counts["pings_answered"]
    await wait_event(stop)
    rec.counts["pings_during_hold"] = rec.counts["pings_answered"] - at_go
    rec.counts["open_at_end"] = sum(1 for t in holders if not t.done())
    cpu = _self_cpu_s()
    closing = True
    await close_many(conns)
    for t in holders:
        t.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
    return {**rec.export(), "cpu_end_s": cpu}


# ---------------------------------------------------------------- open-loop overload

async def w_overload(p: dict[str, Any], index: int, report: Any, go: Any, stop: Any, t0v: Any) -> dict[str, Any]:
    """Poisson arrivals of new conversations at ``rate``/s for ``duration_s``; refusals not retried."""
    from collections import deque

    rec = Recorder()
    conns = await open_many(p["url"], p["users"], rec)
    pool = deque(conns.values())
    report.put(("ready", index, {"open": len(conns), "cpu_s": _self_cpu_s()}))
    await wait_event(go)
    t0 = t0v.value
    loop = asyncio.get_running_loop()
    lag = loop.create_task(lag_monitor(rec))
    rng = random.Random(f"{p['seed']}:{index}")
    tasks: set[asyncio.Task[None]] = set()

    async def turn(driver: Driver, n: int) -> None:
        keep = True
        try:
            outcome = await run_turn(driver, rec, t0, conversation=f"o{index}-{n}", rng=rng, retry=False,
                                     timeout_s=30.0)
            rec.counts[f"turns_{outcome}"] += 1
        except TimeoutError:
            rec.counts["turn_timeouts"] += 1
            driver.abort()
            keep = False
        except ConnectionLost:
            rec.counts["connections_lost"] += 1
            keep = False
        if keep:
            pool.append(driver)

    next_at = t0
    end = t0 + p["duration_s"]
    n = 0
    while True:
        next_at += rng.expovariate(p["rate"])
        if next_at >= end:
            break
        delay = next_at - _now()
        if delay > 0:
            await asyncio.sleep(delay)
        rec.counts["arrivals"] += 1
        if not pool:
            rec.counts["no_free_connection"] += 1
            continue
        n += 1
        task = loop.create_task(turn(pool.popleft(), n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    rec.counts["arrival_window_ms"] = int((_now() - t0) * 1000)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=p.get("drain_s", 30.0))
        rec.counts["unfinished"] = len(pending)
        for t in pending:
            t.cancel()
    lag.cancel()
    cpu = _self_cpu_s()
    await close_many(conns.values())
    return {**rec.export(), "cpu_end_s": cpu}


# ---------------------------------------------------------------- the extra client of "stuck"

def _tcp_state(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return info[0]


def _unread_bytes(sock: socket.socket) -> int:
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return struct.unpack("i", buf)[0]


async def w_extra(p: dict[str, Any], index: int, report: Any, go: Any, stop: Any, t0v: Any) -> dict[str, Any]:
    """One client with ``turns`` turns in as many conversations: it reads them all, or is stuck.

    Stuck: a ``rcvbuf``-byte receive buffer and, after sending the turn.starts,
    no read at all (the library stops reading once one message is queued); the
    socket's TCP state and unread bytes are watched from a duplicate fd.
    """
    stuck = p["mode"] == "stuck"
    host, port = p["addr"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, p["rcvbuf"])
    sock.connect((host, port))
    sock.setblocking(False)
    probe = socket.socket(fileno=os.dup(sock.fileno()))
    driver = await open_driver(p["url"], p["user"], coalesce=True, sock=sock, max_queue=1 if stuck else 16)
    report.put(("ready", index, {"open": 1, "cpu_s": _self_cpu_s()}))
    await wait_event(go)
    t0 = t0v.value
    await asyncio.sleep(max(0.0, t0 + p["start_at_s"] - _now()))
    out: dict[str, Any] = {"mode": p["mode"], "rcvbuf_effective": probe.getsockopt(socket.SOL_SOCKET,
                                                                                  socket.SO_RCVBUF)}
    sent_at = _now()
    for i in range(p["turns"]):
        start = client_frames.turn_start(PROMPTS[i % len(PROMPTS)], client_turn_id=f"x{i}-{uuid.uuid4().hex[:8]}",
                                         conversation_id=f"x{i}")
        await driver.send(start)
        await asyncio.sleep(p["spread_s"] / p["turns"])
    out["sent_at_s"] = sent_at - t0
    out["sent_all_at_s"] = _now() - t0
    end = t0 + p["phase_s"]
    if not stuck:
        ends = deltas = refused = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, end - _now())):
                while ends + refused < p["turns"]:
                    frame = await driver.recv(timeout=None)
                    kind = frame["type"]
                    if kind == "turn.delta":
                        deltas += frame["seq"] - frame.get("seq_start", frame["seq"]) + 1
                    elif kind == "turn.end":
                        ends += 1
                    elif kind == "error":
                        refused += 1
                    elif kind == "ping":
                        await answer_ping(driver, frame)
        out.update(ends=ends, refused=refused, deltas=deltas, done_at_s=_now() - t0)
        await close_many([driver])
    else:
        states: list[tuple[float, str]] = []
        last = None
        max_unread = 0
        while _now() < end and not stop.is_set():
            state = _tcp_state(probe)
            unread = _unread_bytes(probe)
            max_unread = max(max_unread, unread)
            if state != last:
                states.append((round(_now() - t0, 3), TCP_STATES.get(state, str(state))))
                last = state
            await asyncio.sleep(0.05)
        out.update(tcp_states=states, max_unread_bytes=max_unread, aborted_at_s=_now() - t0)
        driver.abort()
    probe.close()
    return out


# ---------------------------------------------------------------- the process

WORKERS: dict[str, Callable[..., Any]] = {"chat": w_chat, "idle": w_idle, "overload": w_overload, "extra": w_extra}


def _worker_main(kind: str, params: dict[str, Any], index: int, report: Any, go: Any, stop: Any,
                 t0v: Any) -> None:
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            out = runner.run(WORKERS[kind](params, index, report, go, stop, t0v))
        out.setdefault("cpu_end_s", _self_cpu_s())
        report.put(("result", index, out))
    except BaseException:  # noqa: BLE001 - the parent reports it
        report.put(("failed", index, traceback.format_exc()))


# ===========================================================================
# Parent side
# ===========================================================================

class Workers:
    """Worker processes of one measured run, sharing a go / stop event and a start time."""

    def __init__(self, specs: list[tuple[str, dict[str, Any]]]) -> None:
        ctx = mp.get_context("spawn")
        self.report = ctx.Queue()
        self.go = ctx.Event()
        self.stop = ctx.Event()
        self.t0v = ctx.Value("d", 0.0, lock=False)
        self.kinds = [k for k, _ in specs]
        self.procs = [ctx.Process(target=_worker_main, args=(k, prm, i, self.report, self.go, self.stop, self.t0v),
                                  name=f"{SUITE}-{k}-{i}", daemon=True) for i, (k, prm) in enumerate(specs)]
        self.ready: dict[int, dict[str, Any]] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, str] = {}
        for proc in self.procs:
            proc.start()

    def _pump(self, timeout: float) -> None:
        try:
            kind, i, payload = self.report.get(timeout=timeout)
        except queue_mod.Empty:
            for i, proc in enumerate(self.procs):
                if not proc.is_alive() and i not in self.results and i not in self.failed:
                    proc.join(0.1)
                    if self.report.empty():
                        self.failed[i] = f"worker exited with {proc.exitcode}"
            return
        {"ready": self.ready, "result": self.results, "failed": self.failed}[kind][i] = payload

    def _wait(self, done: Callable[[], bool], timeout: float, tick: Callable[[], None] | None,
              every: float) -> bool:
        deadline = _now() + timeout
        last = 0.0
        while not done():
            if self.failed:
                i, tb = next(iter(self.failed.items()))
                raise RuntimeError(f"worker {i} ({self.kinds[i]}) failed:\n{tb}")
            if _now() > deadline:
                return False
            self._pump(0.05)
            if tick is not None and _now() - last >= every:
                last = _now()
                tick()
        return True

    def wait_ready(self, timeout: float, tick: Callable[[], None] | None = None, every: float = 0.5) -> None:
        if not self._wait(lambda: len(self.ready) == len(self.procs), timeout, tick, every):
            raise RuntimeError(f"workers not ready after {timeout:.0f} s")

    def start(self) -> float:
        self.t0v.value = _now()
        self.go.set()
        return self.t0v.value

    def wait_results(self, timeout: float, tick: Callable[[], None] | None = None, every: float = 0.5) -> bool:
        return self._wait(lambda: len(self.results) == len(self.procs), timeout, tick, every)

    def sleep(self, seconds: float, tick: Callable[[], None] | None = None, every: float = 0.5) -> None:
        """Wait ``seconds`` (collecting messages, calling ``tick``), failing fast if a worker died."""
        end = _now() + seconds
        self._wait(lambda: _now() >= end, seconds + 1.0, tick, every)

    def client_cpu_s(self) -> float:
        """Worker CPU between ready and the end of the run (seconds)."""
        return sum(r.get("cpu_end_s", 0.0) - self.ready.get(i, {}).get("cpu_s", 0.0)
                   for i, r in self.results.items())

    def close(self) -> None:
        self.go.set()
        self.stop.set()
        for proc in self.procs:
            proc.join(5)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)


def merge(results: Iterable[dict[str, Any]]) -> tuple[dict[str, list[float]], Counter[str]]:
    cols: dict[str, list[float]] = {}
    counts: Counter[str] = Counter()
    for r in results:
        for name, raw in r.get("cols", {}).items():
            a = array("d")
            a.frombytes(raw)
            cols.setdefault(name, []).extend(a)
        counts.update(r.get("counts", {}))
    return cols, counts


def start_gateway(name: str, flags: list[str], args: argparse.Namespace, log_dir: str,
                  log_level: str = "warning") -> ServerProcess:
    """One scenario's gateway: the simulated engine in development auth, on its own Redis key prefix."""
    gw = ServerProcess(prefix=f"{SUITE}:{uuid.uuid4().hex[:8]}:", redis_url=args.redis_url,
                       extra=["--engine", "simulated", "--auth", "dev", *flags], log_level=log_level,
                       name=f"gateway-{name}", log_dir=log_dir)
    return gw.start()


def stop_gateway(gw: ServerProcess) -> None:
    gw.stop(timeout=30.0)
    try:
        clean_prefix(gw.prefix, gw.redis_url)
    except redis.RedisError as exc:
        print(f"  (could not clean Redis keys {gw.prefix}*: {exc})")


class Sampler:
    """Gateway RSS / CPU / fds (and optionally metrics) over time, relative to ``t0``."""

    def __init__(self, gw: ServerProcess, *, metric_names: tuple[str, ...] = ()) -> None:
        self.gw = gw
        self.t0 = _now()
        self.metric_names = metric_names
        self.rows: list[dict[str, float]] = []

    def __call__(self) -> None:
        row: dict[str, float] = {"t": round(_now() - self.t0, 3), "rss_kb": self.gw.rss_kb(),
                                 "fds": self.gw.fds(), "cpu_s": round(self.gw.cpu_s(), 2),
                                 "loadavg": loadavg()}
        if self.metric_names:
            m = scrape(self.gw.base)
            for name in self.metric_names:
                row[name] = m.get(name, 0.0)
        self.rows.append(row)


ENGINE_METRICS = ("rapport_engine_running_requests", "rapport_engine_waiting_requests")


def per_window(cols: dict[str, list[float]], series: list[dict[str, float]], width: float) -> list[dict[str, Any]]:
    """Per ``width``-second window of turn.start send time: overhead, queue_ms, busy answers,
    gateway CPU and the engine's running / waiting counts (from /metrics samples)."""
    t_sent = cols.get("t_sent", [])
    if not t_sent:
        return []
    ttft, s_ttft, s_queue = cols["ttft"], cols["s_ttft"], cols["s_queue"]
    s_engine = cols.get("s_engine", [math.nan] * len(ttft))
    refusal_t = cols.get("refusal_t", [])
    out = []
    end = max(t_sent)
    k = 0
    while k * width <= end:
        lo, hi = k * width, (k + 1) * width
        idx = [i for i, t in enumerate(t_sent) if lo <= t < hi]
        over = [gateway_overhead(ttft[i], s_ttft[i], s_queue[i], s_engine[i]) for i in idx]
        rows = [r for r in series if lo <= r["t"] < hi]
        cpu = None
        if len(rows) >= 2 and rows[-1]["t"] > rows[0]["t"]:
            cpu = round((rows[-1]["cpu_s"] - rows[0]["cpu_s"]) / (rows[-1]["t"] - rows[0]["t"]) * 100.0)
        o = stats(over)
        q = stats(s_queue[i] for i in idx)
        out.append({"from_s": lo, "turns": len(idx), "overhead_p50": o["p50"], "overhead_p99": o["p99"],
                    "queue_p99": q["p99"], "busy": sum(1 for t in refusal_t if lo <= t < hi),
                    "server_cpu_pct": cpu,
                    "engine_running_max": max((r.get(ENGINE_METRICS[0], 0) for r in rows), default=None),
                    "engine_waiting_max": max((r.get(ENGINE_METRICS[1], 0) for r in rows), default=None)})
        k += 1
    return out


def print_windows(rows: list[dict[str, Any]]) -> None:
    print("  per 5 s window of turn.start:   turns  overhead p50/p99 ms  queue_ms p99  busy  gateway CPU %"
          "  engine running/waiting max")
    for r in rows:
        print(f"    {r['from_s']:5.0f} s {r['turns']:>22}  {fmt(r['overhead_p50']):>8} / {fmt(r['overhead_p99']):<8}"
              f"  {fmt(r['queue_p99']):>11}  {r['busy']:>4}  {fmt(r['server_cpu_pct'], 0):>13}"
              f"  {fmt(r['engine_running_max'], 0):>8} / {fmt(r['engine_waiting_max'], 0)}")
    sys.stdout.flush()


def split(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i::n] for i in range(n)]


def wait_for_load(args: argparse.Namespace, label: str) -> float:
    """Wait (bounded) until the 1-minute load average is at most --max-load; the load then."""
    la = loadavg()
    if args.quick or la <= args.max_load:
        return la
    print(f"  load average {la} > {args.max_load}: waiting up to {args.load_wait_s:.0f} s before {label}",
          flush=True)
    deadline = _now() + args.load_wait_s
    while _now() < deadline:
        time.sleep(5)
        la = loadavg()
        if la <= args.max_load:
            print(f"  load average {la}: starting", flush=True)
            return la
    print(f"  load average still {la} after {args.load_wait_s:.0f} s: measuring anyway (noted)", flush=True)
    return la


def sim_flags(max_num_seqs: int) -> list[str]:
    return ["--sim-ttft-ms", str(SIM_TTFT_MS), "--sim-itl-ms", str(SIM_ITL_MS),
            "--sim-max-num-seqs", str(max_num_seqs), "--sim-reply-tokens", str(REPLY_TOKENS),
            "--ttft-budget-ms", str(BUDGET_MS), *LIMIT_FLAGS]


def row(scenario: str, figure: str, goal: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"scenario": scenario, "figure": figure, "goal": goal, "measured": measured, "met": met}


def window(gw: ServerProcess, t0: float, cpu0: float, la0: float) -> dict[str, Any]:
    wall = _now() - t0
    return {"wall_s": round(wall, 2), "server_cpu_pct": round((gw.cpu_s() - cpu0) / wall * 100.0, 1),
            "loadavg_start": la0, "loadavg_end": loadavg()}


# ===========================================================================
# Scenarios
# ===========================================================================

def scenario_streaming(args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    users = 100 if args.quick else args.users
    turns = 2 if args.quick else args.turns
    think = 1000.0 if args.quick else args.think_ms
    ramp = 2.0 if args.quick else args.ramp_s
    procs = max(1, args.processes)
    print(f"\n== streaming: {users} users x {turns} turns, think {think:g} ms, ramp {ramp:g} s, "
          f"{REPLY_TOKENS}-token replies, max_num_seqs 256, {procs} client processes", flush=True)
    la0 = wait_for_load(args, "streaming")
    gw = start_gateway("streaming", sim_flags(256), args, log_dir)
    workers: Workers | None = None
    try:
        tag = uuid.uuid4().hex[:6]
        names = [f"ls-{tag}-u{i}" for i in range(users)]
        specs = [("chat", {"url": gw.ws_url, "users": part, "turns": turns, "think_ms": think, "ramp_s": ramp,
                           "seed": args.seed, "conversation": "chat", "duration_s": None,
                           "turn_timeout_s": 60.0}) for part in split(names, procs)]
        t_conn = _now()
        workers = Workers(specs)
        workers.wait_ready(timeout=180)
        connected = sum(r["open"] for r in workers.ready.values())
        print(f"  {connected} connections open in {_now() - t_conn:.1f} s "
              f"(incl. worker start); gateway RSS {gw.rss_kb() / 1024:.0f} MB", flush=True)
        sampler = Sampler(gw, metric_names=ENGINE_METRICS)
        cpu0, la_go = gw.cpu_s(), loadavg()
        t0 = workers.start()
        sampler.t0 = t0
        limit = ramp + turns * (think * 1.5 / 1000.0 + 60.0) + 60.0
        finished = workers.wait_results(timeout=limit, tick=sampler, every=1.0)
        win = window(gw, t0, cpu0, la_go)
        win["loadavg_before_wait"] = la0
        if not finished:
            raise RuntimeError(f"streaming did not finish within {limit:.0f} s")
        cols, c = merge(workers.results.values())
        win["client_cpu_pct"] = round(workers.client_cpu_s() / win["wall_s"] * 100.0, 1)
        final_metrics = scrape(gw.base)
    finally:
        if workers is not None:
            workers.close()
        stop_gateway(gw)

    ttft, s_ttft, s_queue = cols.get("ttft", []), cols.get("s_ttft", []), cols.get("s_queue", [])
    s_engine = cols.get("s_engine", [math.nan] * len(ttft))
    overhead = [gateway_overhead(a, b, q, e) for a, b, q, e in zip(ttft, s_ttft, s_queue, s_engine, strict=True)]
    wire = [a - b for a, b in zip(ttft, s_ttft, strict=True)]
    engine = [e if not math.isnan(e) else b - q for b, q, e in zip(s_ttft, s_queue, s_engine, strict=True)]
    completed = c["turns_ok"]
    planned = users * turns
    received = int(sum(cols.get("received", [])))
    end_seq = int(sum(cols.get("end_seq", [])))
    delivered = (received == end_seq and c["seq_gaps"] == 0 and c["seq_duplicates"] == 0
                 and c["text_mismatches"] == 0 and completed == planned)
    o = stats(overhead)
    tail: dict[str, Any] = {}
    if o["p99"] is not None:
        worst = [i for i, v in enumerate(overhead) if not math.isnan(v) and v >= o["p99"]]
        tail = {"turns": len(worst),
                "mean_network_client_ms": round(sum(wire[i] for i in worst) / len(worst), 1),
                "mean_queue_ms": round(sum(s_queue[i] for i in worst) / len(worst), 1),
                "mean_engine_ttft_ms": round(sum(engine[i] for i in worst) / len(worst), 1),
                "t_sent_range_s": [round(min(cols["t_sent"][i] for i in worst), 1),
                                   round(max(cols["t_sent"][i] for i in worst), 1)]}
    res: dict[str, Any] = {
        "config": {"users": users, "turns": turns, "think_ms": think, "ramp_s": ramp, "client_processes": procs,
                   "max_num_seqs": 256, "reply_tokens": REPLY_TOKENS, "sim_ttft_ms": SIM_TTFT_MS,
                   "sim_itl_ms": SIM_ITL_MS, "connected": connected},
        "window": win,
        "latency_ms": {
            "overhead (client TTFT - engine TTFT)": o,
            "client TTFT": stats(ttft),
            "client TTFT incl. busy retries": stats(cols.get("ttft_retries", [])),
            "client TTFT - timings.ttft_ms (network+client)": stats(wire),
            "timings.queue_ms (gateway before engine)": stats(s_queue),
            "timings.ttft_ms - queue_ms (engine TTFT)": stats(engine),
            "timings.ttft_ms": stats(s_ttft),
            "inter-delta gap": stats(cols.get("gap", [])),
            "turn time": stats(cols.get("turn_ms", [])),
            "busy answer latency": stats(cols.get("refusal_ms", [])),
            "client event-loop lag": stats(cols.get("loop_lag", [])),
        },
        "overhead_tail_p99_and_above": tail,
        "counts": {"turns_planned": planned, "turns_completed": completed, "deltas_received": received,
                   "end_seq_total": end_seq, **{k: v for k, v in sorted(c.items())}},
        "throughput": {"turns_per_s": round(completed / win["wall_s"], 1),
                       "deltas_per_s": round(received / win["wall_s"], 1)},
        "per_window": per_window(cols, sampler.rows, width=5.0),
        "server_rss_mb": {"peak": round(max((r["rss_kb"] for r in sampler.rows), default=0) / 1024, 1)},
        "server_metrics": {k: v for k, v in final_metrics.items()
                           if k.startswith(("rapport_admissions_refused_total", "rapport_ttft_budget_misses",
                                            "rapport_turns_total", "rapport_slow_consumer"))},
        "all_deltas_delivered": delivered,
        "admission_note": "busy while the engine had free slots points at the admission prediction",
    }
    print_block({k: v for k, v in res.items() if k != "per_window"})
    print_windows(res["per_window"])
    res["server_series"] = sampler.rows
    p99 = o["p99"]
    failed = planned - completed
    res["rows"] = [
        row("streaming", f"client TTFT - engine TTFT (gateway overhead), {users:,} users",
            "p99 <= 25 ms", f"p50 {fmt(o['p50'])} / p95 {fmt(o['p95'])} / p99 {fmt(p99)} ms",
            None if p99 is None else p99 <= 25.0),
        row("streaming", "every generated delta delivered, no gap / duplicate",
            "all, 0 / 0", f"{received:,}/{end_seq:,} deltas, gaps {c['seq_gaps']}, dups {c['seq_duplicates']}",
            received == end_seq and c["seq_gaps"] == 0 and c["seq_duplicates"] == 0
            and c["text_mismatches"] == 0),
        row("streaming", "turns completed (busy retried like an app)", "all",
            f"{completed:,}/{planned:,}; busy answers {c['busy']:,}"
            + "".join(f", {k[6:]} {v}" for k, v in sorted(c.items())
                      if k.startswith("error_") and not k.startswith("error_message")),
            failed == 0),
    ]
    return res


def scenario_idle(args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    n = 500 if args.quick else args.idle_conns
    hold_s = 6.0 if args.quick else args.idle_hold_s
    beat_ms = 2000 if args.quick else args.heartbeat_ms
    procs = max(1, args.processes)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"\n== idle: {n} idle connections, heartbeat every {beat_ms} ms, hold {hold_s:g} s, "
          f"{procs} client processes (RLIMIT_NOFILE {soft}/{hard})", flush=True)
    if n + 200 > soft:
        raise RuntimeError(f"RLIMIT_NOFILE soft limit {soft} is too low for {n} connections")
    la0 = wait_for_load(args, "idle")
    flags = [*sim_flags(256), "--heartbeat-interval-ms", str(beat_ms),
             "--heartbeat-timeout-ms", str(beat_ms * 3)]
    gw = start_gateway("idle", flags, args, log_dir)
    workers: Workers | None = None
    try:
        rss_ready = gw.rss_kb()
        tag = uuid.uuid4().hex[:6]
        # Warm-up: one-time allocations (code paths, Redis pool) do not belong to the per-connection cost.
        warm = Workers([("idle", {"url": gw.ws_url, "users": [f"ls-{tag}-warm{i}" for i in range(100)]})])
        try:
            warm.wait_ready(timeout=60)
            warm.start()
            warm.stop.set()
            warm.wait_results(timeout=30)
        finally:
            warm.close()
        time.sleep(2.0)
        rss_base = gw.rss_kb()
        names = [f"ls-{tag}-idle{i}" for i in range(n)]
        sampler = Sampler(gw)
        t_open = _now()
        workers = Workers([("idle", {"url": gw.ws_url, "users": part}) for part in split(names, procs)])
        workers.wait_ready(timeout=300, tick=sampler, every=1.0)
        open_s = _now() - t_open
        opened = sum(r["open"] for r in workers.ready.values())
        rss_open = gw.rss_kb()
        print(f"  {opened} connections open in {open_s:.1f} s; gateway RSS {rss_open / 1024:.1f} MB "
              f"(base {rss_base / 1024:.1f} MB)", flush=True)
        la_go, cpu0 = loadavg(), gw.cpu_s()
        t0 = workers.start()
        hold_samples: list[int] = []

        def tick() -> None:
            sampler()
            hold_samples.append(sampler.rows[-1]["rss_kb"])

        workers.sleep(hold_s, tick=tick, every=1.0)
        rss_hold = gw.rss_kb()
        m = scrape(gw.base)
        win = window(gw, t0, cpu0, la_go)
        win["loadavg_before_wait"] = la0
        fds_hold = gw.fds()
        workers.stop.set()
        if not workers.wait_results(timeout=120):
            raise RuntimeError("idle workers did not close their connections within 120 s")
        win["client_cpu_pct"] = round(workers.client_cpu_s() / max(1e-9, _now() - t0) * 100.0, 1)
        time.sleep(3.0)
        rss_closed = gw.rss_kb()
        _, c = merge(workers.results.values())
    finally:
        if workers is not None:
            workers.close()
        stop_gateway(gw)

    per_conn_kb = (rss_hold - rss_base) / opened if opened else math.nan
    expected_pings = opened * hold_s / (beat_ms / 1000.0)
    res: dict[str, Any] = {
        "config": {"connections": n, "hold_s": hold_s, "heartbeat_interval_ms": beat_ms,
                   "heartbeat_timeout_ms": beat_ms * 3, "client_processes": procs,
                   "rlimit_nofile": [soft, hard]},
        "window": win,
        "opened": opened, "open_s": round(open_s, 1), "connect_rate_per_s": round(opened / open_s, 1),
        "server_rss_kb": {"after_start": rss_ready, "base_after_warmup": rss_base, "all_open": rss_open,
                          "end_of_hold": rss_hold, "peak_during_hold": max(hold_samples, default=rss_hold),
                          "3s_after_close": rss_closed},
        "server_fds_during_hold": fds_hold,
        "memory_per_connection_kb": round(per_conn_kb, 2),
        "memory_per_connection_kb_from_start": round((rss_hold - rss_ready) / opened, 2) if opened else None,
        "server_connections_open_metric": m.get("rapport_connections_open"),
        "pings_answered_during_hold": c["pings_during_hold"],
        "app_pings_expected_during_hold": round(expected_pings),
        "lost_during_run": c["lost"],
        "open_at_end_of_hold": c["open_at_end"],
        "counts": dict(sorted(c.items())),
        "rss_series": sampler.rows,
    }
    print_block({k: v for k, v in res.items() if k != "rss_series"})
    held = c["open_at_end"] == n and c["lost"] == 0
    res["rows"] = [
        row("idle", f"gateway memory per idle connection ({n:,} held, pings every {beat_ms / 1000:g} s)",
            "<= 30 KB", f"{per_conn_kb:.1f} KB (RSS {rss_base / 1024:.0f} -> {rss_hold / 1024:.0f} MB)",
            per_conn_kb <= 30.0),
        row("idle", "connections held through heartbeats", f"{n:,} open, 0 lost",
            f"{c['open_at_end']:,} open, {c['lost']} lost, {c['pings_during_hold']:,} pings answered", held),
        row("idle", f"gateway CPU holding them (pings every {beat_ms / 1000:g} s); connect rate",
            "(no goal)", f"{win['server_cpu_pct']:.0f} % of a core; {opened / open_s:.0f} connections/s opened",
            None),
    ]
    return res


def saturated_capacity(max_num_seqs: int, prompt_tokens: int = 40) -> float:
    """Turns/s the simulated engine serves with a full batch and every step admitting (lower bound)."""
    from server.engines.simulated import SimulatedEngine

    eng = SimulatedEngine(ttft_ms=SIM_TTFT_MS, itl_ms=SIM_ITL_MS, max_num_seqs=max_num_seqs)
    per_step = max_num_seqs / REPLY_TOKENS
    step = eng.step_time_ms(max_num_seqs, max(1, round(per_step)), round(per_step * prompt_tokens))
    return per_step / (step / 1000.0)


def scenario_overload(args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    seqs = args.overload_seqs
    duration = 8.0 if args.quick else args.overload_s
    procs = max(1, args.processes)
    nominal = seqs / (REPLY_TOKENS * SIM_ITL_MS / 1000.0)
    offered = args.overload_factor * nominal
    low = saturated_capacity(seqs)
    per_worker = offered / procs
    pool = math.ceil(per_worker * 6.0) + 20
    print(f"\n== overload: max_num_seqs {seqs}, nominal capacity {nominal:.1f} turns/s "
          f"(saturated, every step admitting: {low:.1f}), offered {offered:.1f} turn.starts/s "
          f"(Poisson) for {duration:g} s, {procs} client processes x {pool} pooled connections", flush=True)
    la0 = wait_for_load(args, "overload")
    gw = start_gateway("overload", sim_flags(seqs), args, log_dir)
    workers: Workers | None = None
    try:
        tag = uuid.uuid4().hex[:6]
        specs = [("overload", {"url": gw.ws_url, "users": [f"ls-{tag}-o{w}-{i}" for i in range(pool)],
                               "rate": per_worker, "duration_s": duration, "seed": args.seed,
                               "drain_s": 30.0}) for w in range(procs)]
        workers = Workers(specs)
        workers.wait_ready(timeout=120)
        sampler = Sampler(gw, metric_names=("rapport_engine_running_requests", "rapport_engine_waiting_requests"))
        la_go, cpu0 = loadavg(), gw.cpu_s()
        t0 = workers.start()
        if not workers.wait_results(timeout=duration + 60.0, tick=sampler, every=1.0):
            raise RuntimeError("overload did not finish in time")
        win = window(gw, t0, cpu0, la_go)
        win["loadavg_before_wait"] = la0
        win["client_cpu_pct"] = round(workers.client_cpu_s() / win["wall_s"] * 100.0, 1)
        cols, c = merge(workers.results.values())
        m = scrape(gw.base)
    finally:
        if workers is not None:
            workers.close()
        stop_gateway(gw)

    ttft = cols.get("ttft", [])
    s_ttft = cols.get("s_ttft", [])
    refusal = cols.get("refusal_ms", [])
    accepted_failed = c["turn_timeouts"] + sum(v for k, v in c.items() if k.startswith("error_")) \
        + c["connections_lost"]
    accepted = len(ttft) + accepted_failed
    in_budget = sum(1 for v in ttft if not math.isnan(v) and v <= BUDGET_MS)
    in_budget_server = sum(1 for v in s_ttft if not math.isnan(v) and v <= BUDGET_MS)
    share = in_budget / accepted if accepted else math.nan
    share_server = in_budget_server / accepted if accepted else math.nan
    over50 = sum(1 for v in refusal if v > 50.0)
    r = stats(refusal)
    served = len(ttft) / duration
    waits = [row_["rapport_engine_waiting_requests"] for row_ in sampler.rows]
    res: dict[str, Any] = {
        "config": {"max_num_seqs": seqs, "reply_tokens": REPLY_TOKENS, "sim_itl_ms": SIM_ITL_MS,
                   "sim_ttft_ms": SIM_TTFT_MS, "nominal_capacity_turns_per_s": round(nominal, 1),
                   "saturated_capacity_every_step_admitting": round(low, 1),
                   "offered_turns_per_s": round(offered, 1), "duration_s": duration,
                   "client_processes": procs, "pool_per_process": pool, "budget_ms": BUDGET_MS},
        "window": win,
        "arrivals": c["arrivals"], "offered_measured_per_s": round(c["arrivals"] / duration, 1),
        "no_free_connection": c["no_free_connection"],
        "accepted": accepted, "completed": len(ttft), "accepted_failed": accepted_failed,
        "refused_busy": c["busy"], "refused_rate_limited": c["rate_limited"],
        "served_turns_per_s": round(served, 1),
        "offered_over_served": round(c["arrivals"] / duration / served, 2) if served else None,
        "accepted_within_budget_share": round(share, 4),
        "accepted_within_budget_share_server_timings": round(share_server, 4),
        "latency_ms": {"client TTFT (accepted)": stats(ttft), "timings.ttft_ms (accepted)": stats(s_ttft),
                       "busy answer latency": r, "inter-delta gap": stats(cols.get("gap", [])),
                       "client event-loop lag": stats(cols.get("loop_lag", []))},
        "refusals_over_50ms": over50,
        "refusals_over_50ms_at_s": sorted(round(t, 2) for v, t in zip(refusal, cols.get("refusal_t", []), strict=True)
                                          if v > 50.0)[:20],
        "engine_waiting_max": max(waits, default=None),
        "server_metrics": {k: v for k, v in m.items()
                           if k.startswith(("rapport_admissions_refused_total", "rapport_ttft_budget_misses",
                                            "rapport_turns_total"))},
        "counts": dict(sorted(c.items())),
    }
    print_block(res)
    res["rows"] = [
        row("overload", f"accepted turns with client TTFT <= 2 s (2x nominal load, max_num_seqs {seqs})",
            ">= 99 %", f"{share * 100:.2f} % of {accepted} (server timings: {share_server * 100:.2f} %)",
            None if math.isnan(share) else share >= 0.99),
        row("overload", "busy answered within 50 ms of turn.start", "every one",
            f"p50 {fmt(r['p50'])} / p99 {fmt(r['p99'])} / max {fmt(r['max'])} ms, {over50} of {len(refusal)} > 50 ms",
            None if not refusal else over50 == 0),
    ]
    return res


STUCK_CLOSE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*session (\S+): "
                            r"(nothing sent for ([0-9.]+)s; closing the stuck socket|client stopped reading)")


def scenario_stuck(args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    users = 30 if args.quick else args.stuck_users
    phase_s = 10.0 if args.quick else args.stuck_phase_s
    stuck_ms = 3000 if args.quick else args.stuck_timeout_ms
    k = args.stuck_turns
    start_at = 2.0 if args.quick else 3.0
    procs = max(1, args.processes)
    print(f"\n== stuck: {users} users streaming for {phase_s:g} s per phase (think 500 ms); an extra client "
          f"starts {k} turns at t={start_at:g} s, reading them (control) or stuck (4 KB receive buffer, "
          f"never reads); --stuck-timeout-ms {stuck_ms}", flush=True)
    flags = [*sim_flags(256), "--stuck-timeout-ms", str(stuck_ms)]
    la_first = wait_for_load(args, "stuck")
    gw = start_gateway("stuck", flags, args, log_dir, log_level="info")
    phases: dict[str, dict[str, Any]] = {}
    try:
        tag = uuid.uuid4().hex[:6]
        for phase in ("control", "stuck"):
            la0 = la_first if phase == "control" else wait_for_load(args, "the stuck phase")
            names = [f"ls-{tag}-{phase}-u{i}" for i in range(users)]
            specs: list[tuple[str, dict[str, Any]]] = [
                ("chat", {"url": gw.ws_url, "users": part, "turns": 0, "think_ms": 500.0, "ramp_s": 1.0,
                          "seed": args.seed, "conversation": "chat", "duration_s": phase_s,
                          "turn_timeout_s": 30.0}) for part in split(names, procs)]
            specs.append(("extra", {"url": gw.ws_url, "addr": ("127.0.0.1", gw.port), "mode": "reader"
                                    if phase == "control" else "stuck", "user": f"ls-{tag}-{phase}-extra",
                                    "rcvbuf": 4096, "turns": k, "start_at_s": start_at, "phase_s": phase_s,
                                    "spread_s": 0.5}))
            workers = Workers(specs)
            try:
                workers.wait_ready(timeout=120)
                sampler = Sampler(gw, metric_names=("rapport_slow_consumer_closes_total",
                                                    "rapport_connections_open"))
                sampler()
                cpu0, la_go = gw.cpu_s(), loadavg()
                wall0 = time.time()
                t0 = workers.start()
                sampler.t0 = t0
                if not workers.wait_results(timeout=phase_s + 60.0, tick=sampler, every=0.25):
                    raise RuntimeError(f"stuck ({phase}) did not finish in time")
                win = window(gw, t0, cpu0, la_go)
                win["loadavg_before_wait"] = la0
                win["client_cpu_pct"] = round(workers.client_cpu_s() / win["wall_s"] * 100.0, 1)
                time.sleep(2.0)
                sampler()
                extra = workers.results[len(specs) - 1]
                cols, c = merge(r for i, r in workers.results.items() if i != len(specs) - 1)
            finally:
                workers.close()
            phases[phase] = {"t0": t0, "wall0": wall0, "window": win, "cols": cols, "counts": c, "extra": extra,
                             "series": sampler.rows}
        log = gw.log(chars=None).splitlines()
    finally:
        stop_gateway(gw)

    def close_events(ph: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        for line in log:
            mm = STUCK_CLOSE_RE.match(line)
            if not mm:
                continue
            when = dt.datetime.strptime(mm.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rel = when - ph["wall0"]
            if 0 <= rel <= phase_s + 60:
                events.append({"t_s": round(rel, 3), "how": "stuck timeout" if mm.group(4) else "outbox overflow",
                               "server_stall_s": float(mm.group(4)) if mm.group(4) else None})
        return events

    out: dict[str, Any] = {"config": {"users": users, "phase_s": phase_s, "stuck_timeout_ms": stuck_ms,
                                      "extra_turns": k, "extra_start_at_s": start_at, "client_processes": procs,
                                      "max_num_seqs": 256, "reply_tokens": REPLY_TOKENS}}
    cmp: dict[str, dict[str, Any]] = {}
    for phase, ph in phases.items():
        cols, c = ph["cols"], ph["counts"]
        rss = [r_["rss_kb"] for r_ in ph["series"]]
        fds = [r_["fds"] for r_ in ph["series"]]
        cmp[phase] = {
            "window": ph["window"],
            "turns_completed": c["turns_ok"],
            "TTFT": stats(cols.get("ttft", [])),
            "gap": stats(cols.get("gap", [])),
            "deltas_delivered": int(sum(cols.get("received", []))) == int(sum(cols.get("end_seq", [])))
            and c["seq_gaps"] == 0 and c["seq_duplicates"] == 0,
            "errors": {k_: v for k_, v in c.items() if k_.startswith(("error_", "turn_timeouts", "connections_lost",
                                                                       "busy"))},
            "rss_mb": {"start": round(rss[0] / 1024, 1), "peak": round(max(rss) / 1024, 1),
                       "end": round(rss[-1] / 1024, 1)},
            "fds": {"start": fds[0], "peak": max(fds), "end": fds[-1]},
            "extra_client": ph["extra"],
            "series": ph["series"],
        }
    stuck_ph = phases["stuck"]
    extra = stuck_ph["extra"]
    silent_at = extra.get("sent_all_at_s")
    closes = close_events(stuck_ph)
    base_closes = stuck_ph["series"][0]["rapport_slow_consumer_closes_total"]
    metric_close = next((r_["t"] for r_ in stuck_ph["series"]
                         if r_["rapport_slow_consumer_closes_total"] > base_closes), None)
    close_t = closes[0]["t_s"] if closes else metric_close
    cmp["stuck"]["close"] = {"client_silent_from_s": silent_at, "log_events": closes,
                             "metric_seen_at_s": metric_close,
                             "closed_after_silent_s": round(close_t - silent_at, 2)
                             if close_t is not None and silent_at is not None else None,
                             "client_tcp_states": extra.get("tcp_states"),
                             "client_max_unread_bytes": extra.get("max_unread_bytes")}
    # When the gateway really let go of the socket: its fd count drops (the 200 users' sockets stay put).
    release_t = None
    if close_t is not None:
        series = stuck_ph["series"]
        before = [r_["fds"] for r_ in series if r_["t"] <= close_t]
        if before:
            release_t = next((r_["t"] for r_ in series if r_["t"] > close_t and r_["fds"] < before[-1]), None)
    cmp["stuck"]["close"].update(fd_released_at_s=release_t, client_aborted_at_s=extra.get("aborted_at_s"))
    # The others during the stuck window only (from the stuck client's silence to its close).
    if close_t is not None and silent_at is not None:
        sc = stuck_ph["cols"]
        in_win = [v for v, t in zip(sc.get("ttft", []), sc.get("t_sent", []), strict=True) if silent_at <= t <= close_t]
        gaps_win = [v for v, t in zip(sc.get("gap", []), sc.get("gap_t", []), strict=True) if silent_at <= t <= close_t]
        cmp["stuck"]["during_stuck_window"] = {"TTFT": stats(in_win), "gap": stats(gaps_win)}
    out["phases"] = cmp
    print_block({ph: {k_: v for k_, v in d.items() if k_ != "series"} for ph, d in cmp.items()})

    a, b = cmp["control"], cmp["stuck"]

    def within(x: float | None, y: float | None) -> bool | None:
        if x is None or y is None:
            return None
        return y <= x + max(10.0, 0.25 * x)

    ttft_ok = within(a["TTFT"]["p99"], b["TTFT"]["p99"])
    gap_ok = within(a["gap"]["p99"], b["gap"]["p99"])
    closed_after = b["close"]["closed_after_silent_s"]
    close_goal = stuck_ms / 1000.0 + 3.0
    rss_growth = b["rss_mb"]["peak"] - a["rss_mb"]["peak"]
    out["rows"] = [
        row("stuck", f"others' TTFT p99 with vs without the stuck client ({users} users)",
            "within max(10 ms, 25 %)", f"{fmt(a['TTFT']['p99'])} -> {fmt(b['TTFT']['p99'])} ms "
                                       f"(p50 {fmt(a['TTFT']['p50'])} -> {fmt(b['TTFT']['p50'])})", ttft_ok),
        row("stuck", "others' inter-delta gap p99 with vs without", "within max(10 ms, 25 %)",
            f"{fmt(a['gap']['p99'])} -> {fmt(b['gap']['p99'])} ms (max {fmt(a['gap']['max'])} -> "
            f"{fmt(b['gap']['max'])})", gap_ok),
        row("stuck", f"stuck socket closed by the gateway (--stuck-timeout-ms {stuck_ms})",
            f"<= {close_goal:g} s after the client went silent",
            "never" if closed_after is None else
            f"{closed_after:.2f} s after ({closes[0]['how'] if closes else 'metric'}"
            + (f", server saw {closes[0]['server_stall_s']:g} s stalled" if closes and closes[0]['server_stall_s']
               else "") + ")",
            None if closed_after is None else closed_after <= close_goal),
        row("stuck", "gateway released the stuck socket's fd", "within 1 s of the close",
            "no close" if close_t is None else
            ("not before the run ended" if release_t is None else f"{release_t - close_t:.1f} s after the close")
            + (f" (the stuck client itself aborted {extra['aborted_at_s'] - close_t:.1f} s after the close)"
               if close_t is not None and extra.get("aborted_at_s") else ""),
            None if close_t is None else (release_t is not None and release_t - close_t <= 1.0)),
        row("stuck", "gateway RSS, stuck phase peak vs control peak", "< 20 MB more",
            f"{a['rss_mb']['peak']:.1f} -> {b['rss_mb']['peak']:.1f} MB ({rss_growth:+.1f})", rss_growth < 20.0),
    ]
    return out


# ===========================================================================
# Output
# ===========================================================================

def print_block(obj: Any, indent: int = 2) -> None:
    pad = " " * indent
    for key, value in obj.items():
        if isinstance(value, dict) and value and "p50" in value and "count" in value:
            print(f"{pad}{key:<48} {fmt_dist(value)}")
        elif isinstance(value, dict):
            print(f"{pad}{key}:")
            print_block(value, indent + 2)
        else:
            print(f"{pad}{key:<48} {value}")
    sys.stdout.flush()


def no_nan(obj: Any) -> Any:
    """NaN / infinity as null, so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [no_nan(v) for v in obj]
    return obj


def print_summary(rows: list[dict[str, Any]], loads: dict[str, str]) -> None:
    print("\n== summary")
    head = f"{'scenario':<10} {'figure':<68} {'goal':<30} {'measured':<64} {'load avg':<12} result"
    print(head)
    print("-" * len(head))
    for r in rows:
        met = "-" if r["met"] is None else ("met" if r["met"] else "MISSED")
        print(f"{r['scenario']:<10} {r['figure']:<68} {r['goal']:<30} {r['measured']:<64} "
              f"{loads.get(r['scenario'], ''):<12} {met}")


# ===========================================================================
# Command line
# ===========================================================================

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Rapport load suite (simulated engine, one gateway process).")
    a = ap.add_argument
    a("--only", action="append", default=None, metavar="NAME",
      help=f"run only this scenario (repeatable, or comma-separated): {', '.join(SCENARIOS)}")
    a("--quick", action="store_true", help="a small smoke run of every scenario (its numbers mean nothing)")
    a("--json", dest="json_path", default=None, metavar="PATH", help="write every figure as JSON")
    a("--redis-url", default=os.environ.get("RAPPORT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    a("--processes", type=int, default=2, help="client worker processes (default 2)")
    a("--max-load", type=float, default=2.0, help="wait for the 1-minute load average to fall to this (default 2)")
    a("--load-wait-s", type=float, default=240.0, help="longest wait for the load average (default 240)")
    a("--seed", type=int, default=0)
    a("--log-dir", default=None, help="where gateway logs go (default: a new temporary directory)")
    # streaming
    a("--users", type=int, default=1000)
    a("--turns", type=int, default=3)
    a("--think-ms", type=float, default=3000.0)
    a("--ramp-s", type=float, default=5.0)
    # idle
    a("--idle-conns", type=int, default=10_000)
    a("--idle-hold-s", type=float, default=20.0)
    a("--heartbeat-ms", type=int, default=5000)
    # overload
    a("--overload-seqs", type=int, default=32)
    a("--overload-factor", type=float, default=2.0)
    a("--overload-s", type=float, default=30.0)
    # stuck
    a("--stuck-users", type=int, default=200)
    a("--stuck-phase-s", type=float, default=25.0)
    a("--stuck-timeout-ms", type=int, default=10_000)
    a("--stuck-turns", type=int, default=100)
    args = ap.parse_args(argv)
    only: list[str] = []
    for item in args.only or []:
        only.extend(x.strip() for x in item.split(",") if x.strip())
    unknown = [x for x in only if x not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    args.only = only or list(SCENARIOS)
    return args


RUNNERS: dict[str, Callable[[argparse.Namespace, str], dict[str, Any]]] = {
    "streaming": scenario_streaming, "idle": scenario_idle, "overload": scenario_overload, "stuck": scenario_stuck,
}


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    nofile = raise_nofile()
    log_dir = args.log_dir or tempfile.mkdtemp(prefix=f"{SUITE}-")
    os.makedirs(log_dir, exist_ok=True)
    print(f"{SUITE}: scenarios {', '.join(args.only)}{' (quick)' if args.quick else ''}; "
          f"{os.cpu_count()} CPUs, RLIMIT_NOFILE {nofile[0]}/{nofile[1]}, load average {loadavg()}, "
          f"gateway logs in {log_dir}", flush=True)
    report: dict[str, Any] = {"suite": SUITE, "quick": args.quick, "cpus": os.cpu_count(),
                              "started": dt.datetime.now().isoformat(timespec="seconds"), "scenarios": {}}
    rows: list[dict[str, Any]] = []
    loads: dict[str, str] = {}
    failed = False
    for name in args.only:
        t = _now()
        try:
            res = RUNNERS[name](args, log_dir)
        except KeyboardInterrupt:
            print(f"\n{SUITE}: interrupted during {name}", flush=True)
            failed = True
            break
        except Exception as exc:  # noqa: BLE001 - report it, go on with the next scenario
            traceback.print_exc()
            report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append(row(name, "scenario failed", "-", f"{type(exc).__name__}: {exc}"[:64], False))
            failed = True
            continue
        res["elapsed_s"] = round(_now() - t, 1)
        rows.extend(res.get("rows", []))
        report["scenarios"][name] = res
        wins = [res.get("window")] if "window" in res else [p.get("window") for p in res.get("phases", {}).values()]
        loads[name] = "/".join(f"{w['loadavg_start']:.1f}-{w['loadavg_end']:.1f}" for w in wins if w)
    report["summary"] = rows
    report["loadavg_per_scenario"] = loads
    print_summary(rows, loads)
    print("(load avg: 1-minute load average at the start and end of each measured window)")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(no_nan(report), f, indent=2, default=str)
            f.write("\n")
        print(f"{SUITE}: wrote {args.json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
