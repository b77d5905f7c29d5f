"""Load suite: the latency budget, admission control and the gateway measured at
thousands of users, on one machine, against ONE gateway process running the
SIMULATED engine (a timing simulation of a continuously batching engine, not a
model; ``--sim-ttft-ms 40 --sim-itl-ms 20``, GPU-like speed).

Every scenario starts its own gateway (``python -m rapport.cli serve --engine
simulated --auth dev ...``, per-user limits raised far out of the way:
``--turns-per-minute 1000000 --max-connections-per-user 100000``), drives it
with ``rapport bench``'s load generator (:func:`clients.bench.run_bench`: worker
processes of uvloop + :class:`clients.driver.Driver`, per-turn rows, open-loop
arrivals, a sampling hook in this process), prints its figures, and stops
everything it started. Scenarios run one after the other in
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
import os
import re
import resource
import signal
import socket
import struct
import sys
import tempfile
import termios
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Runnable as `python bench/load_suite.py` from a checkout: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from clients.bench import PROMPTS, BenchConfig, RunHooks, run_bench
from clients.bench_report import finite_or_none
from clients.driver import Driver
from clients.errors import ClientError
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
ENGINE_METRICS = ("rapport_engine_running_requests", "rapport_engine_waiting_requests")

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


# ===========================================================================
# Small helpers
# ===========================================================================

def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (the gateway inherits it); the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def stats(values: Iterable[float | None]) -> dict[str, float | int | None]:
    return summarize([v for v in values if v is not None and not math.isnan(v)])


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_dist(s: dict[str, Any], unit: str = "ms") -> str:
    return (f"p50 {fmt(s['p50'])} / p95 {fmt(s['p95'])} / p99 {fmt(s['p99'])} / max {fmt(s['max'])} {unit}"
            f" (n={s['count']})")


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def engine_ttft(turns: dict[str, list[float]], i: int) -> float:
    """The engine's own TTFT of turn ``i``: ``timings.engine_ttft_ms``, else ``ttft_ms - queue_ms``."""
    e = turns["server_engine_ttft"][i]
    return e if not math.isnan(e) else turns["server_ttft"][i] - turns["server_queue"][i]


def bench_config(gw: ServerProcess, args: argparse.Namespace, name: str, **kwargs: Any) -> BenchConfig:
    """The load generator's settings for one scenario: development users on ``gw``, one row per turn."""
    settings: dict[str, Any] = {"processes": max(1, args.processes), "turn_rows": True}
    return BenchConfig(url=gw.ws_url, dev_users=True, user_prefix=f"ls-{name}-{uuid.uuid4().hex[:6]}-",
                       seed=args.seed, progress=False, deflate=False, conversation_id="chat",
                       **{**settings, **kwargs})


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
        self.t0 = time.monotonic()
        self.metric_names = metric_names
        self.rows: list[dict[str, float]] = []

    def __call__(self) -> None:
        row: dict[str, float] = {"t": round(time.monotonic() - self.t0, 3), "rss_kb": self.gw.rss_kb(),
                                 "fds": self.gw.fds(), "cpu_s": round(self.gw.cpu_s(), 2),
                                 "loadavg": loadavg()}
        if self.metric_names:
            m = scrape(self.gw.base)
            for name in self.metric_names:
                row[name] = m.get(name, 0.0)
        self.rows.append(row)


class MeasuredRun:
    """One ``run_bench`` against a gateway: samples it while the workers run, and times the window."""

    def __init__(self, gw: ServerProcess, sampler: Sampler, *, tick_s: float = 1.0,
                 on_start: Callable[[], None] | None = None, stop_when: Callable[[float], bool] | None = None):
        self.gw = gw
        self.sampler = sampler
        self.tick_s = tick_s
        self._on_start = on_start
        self._stop_when = stop_when
        self.t0 = self.wall0 = self.cpu0 = self.la0 = 0.0

    def run(self, cfg: BenchConfig) -> dict[str, Any]:
        report = run_bench(cfg, hooks=RunHooks(on_start=self._started, on_tick=self._tick, tick_s=self.tick_s))
        if report["failed_workers"]:
            raise RuntimeError(f"{report['failed_workers']} load generator worker(s) failed")
        return report

    def _started(self, t0: float) -> None:
        self.t0, self.wall0, self.cpu0, self.la0 = t0, time.time(), self.gw.cpu_s(), loadavg()
        self.sampler.t0 = t0
        if self._on_start is not None:
            self._on_start()

    def _tick(self, elapsed: float) -> bool:
        self.sampler()
        return self._stop_when is not None and self._stop_when(elapsed)

    def window(self, report: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """Wall time, gateway CPU and load average from the start to now (and the workers' CPU)."""
        wall = time.monotonic() - self.t0
        win = {"wall_s": round(wall, 2), "server_cpu_pct": round((self.gw.cpu_s() - self.cpu0) / wall * 100.0, 1),
               "loadavg_start": self.la0, "loadavg_end": loadavg(), **extra}
        if report is not None:
            win["client_cpu_pct"] = round(report["client_cpu_s"] / wall * 100.0, 1)
        return win


def per_window(turns: dict[str, list[float]], busy_at: list[float], series: list[dict[str, float]],
               width: float) -> list[dict[str, Any]]:
    """Per ``width``-second window of turn.start send time: overhead, queue_ms, busy answers,
    gateway CPU and the engine's running / waiting counts (from /metrics samples)."""
    sent = turns["sent_s"]
    out = []
    k = 0
    while sent and k * width <= max(sent):
        lo, hi = k * width, (k + 1) * width
        idx = [i for i, t in enumerate(sent) if lo <= t < hi]
        rows = [r for r in series if lo <= r["t"] < hi]
        cpu = None
        if len(rows) >= 2 and rows[-1]["t"] > rows[0]["t"]:
            cpu = round((rows[-1]["cpu_s"] - rows[0]["cpu_s"]) / (rows[-1]["t"] - rows[0]["t"]) * 100.0)
        o = stats(turns["ttft"][i] - engine_ttft(turns, i) for i in idx)
        q = stats(turns["server_queue"][i] for i in idx)
        out.append({"from_s": lo, "turns": len(idx), "overhead_p50": o["p50"], "overhead_p99": o["p99"],
                    "queue_p99": q["p99"], "busy": sum(1 for t in busy_at if lo <= t < hi),
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


def wait_for_load(args: argparse.Namespace, label: str) -> float:
    """Wait (bounded) until the 1-minute load average is at most --max-load; the load then."""
    la = loadavg()
    if args.quick or la <= args.max_load:
        return la
    print(f"  load average {la} > {args.max_load}: waiting up to {args.load_wait_s:.0f} s before {label}",
          flush=True)
    deadline = time.monotonic() + args.load_wait_s
    while time.monotonic() < deadline:
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


def error_counts(report: dict[str, Any]) -> dict[str, int]:
    """Errors by code, and by message (digits masked), as the load generator counted them."""
    return {**{f"error_{k}": v for k, v in report["errors"].items()},
            **{f"error_message: {k}": v for k, v in report["error_messages"].items()}}


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
    try:
        sampler = Sampler(gw, metric_names=ENGINE_METRICS)
        t_conn = time.monotonic()
        run = MeasuredRun(gw, sampler, on_start=lambda: print(
            f"  connections open in {time.monotonic() - t_conn:.1f} s (incl. worker start); "
            f"gateway RSS {gw.rss_kb() / 1024:.0f} MB", flush=True))
        rep = run.run(bench_config(gw, args, "streaming", users=users, turns=turns, think_ms=think, ramp_s=ramp,
                                   turn_timeout_s=60.0))
        win = run.window(rep, loadavg_before_wait=la0)
        final_metrics = scrape(gw.base)
    finally:
        stop_gateway(gw)

    c, lat, t = rep["counts"], rep["latency_ms"], rep["turns"]
    n = len(t["ttft"])
    overhead = [t["ttft"][i] - engine_ttft(t, i) for i in range(n)]
    wire = [t["ttft"][i] - t["server_ttft"][i] for i in range(n)]
    engine = [engine_ttft(t, i) for i in range(n)]
    completed, planned = c["turns_completed"], users * turns
    received, end_seq = c["deltas_received"], c["end_seq_total"]
    o = stats(overhead)
    tail: dict[str, Any] = {}
    if o["p99"] is not None:
        worst = [i for i, v in enumerate(overhead) if not math.isnan(v) and v >= o["p99"]]
        tail = {"turns": len(worst),
                "mean_network_client_ms": round(sum(wire[i] for i in worst) / len(worst), 1),
                "mean_queue_ms": round(sum(t["server_queue"][i] for i in worst) / len(worst), 1),
                "mean_engine_ttft_ms": round(sum(engine[i] for i in worst) / len(worst), 1),
                "t_sent_range_s": [round(min(t["sent_s"][i] for i in worst), 1),
                                   round(max(t["sent_s"][i] for i in worst), 1)]}
    res: dict[str, Any] = {
        "config": {"users": users, "turns": turns, "think_ms": think, "ramp_s": ramp, "client_processes": procs,
                   "max_num_seqs": 256, "reply_tokens": REPLY_TOKENS, "sim_ttft_ms": SIM_TTFT_MS,
                   "sim_itl_ms": SIM_ITL_MS, "connected": c["connects"]},
        "window": win,
        "latency_ms": {
            "overhead (client TTFT - engine TTFT)": o,
            "client TTFT": stats(t["ttft"]),
            "client TTFT incl. busy retries": stats(t["ttft_with_retries"]),
            "client TTFT - timings.ttft_ms (network+client)": stats(wire),
            "timings.queue_ms (gateway before engine)": stats(t["server_queue"]),
            "timings.ttft_ms - queue_ms (engine TTFT)": stats(engine),
            "timings.ttft_ms": stats(t["server_ttft"]),
            "inter-delta gap": lat["gap"],
            "turn time": stats(t["turn"]),
            "busy answer latency": lat["busy_latency"],
            "client event-loop lag": lat["loop_lag"],
        },
        "overhead_tail_p99_and_above": tail,
        "counts": {"turns_planned": planned, **{k: v for k, v in sorted(c.items()) if v},
                   **error_counts(rep)},
        "throughput": {"turns_per_s": round(completed / win["wall_s"], 1),
                       "deltas_per_s": round(received / win["wall_s"], 1)},
        "per_window": per_window(t, rep["timed"]["busy_latency"]["at_s"], sampler.rows, width=5.0),
        "server_rss_mb": {"peak": round(max((r["rss_kb"] for r in sampler.rows), default=0) / 1024, 1)},
        "server_metrics": {k: v for k, v in final_metrics.items()
                           if k.startswith(("rapport_admissions_refused_total", "rapport_ttft_budget_misses",
                                            "rapport_turns_total", "rapport_slow_consumer"))},
        "all_deltas_delivered": rep["protocol_ok"] and completed == planned,
        "admission_note": "busy while the engine had free slots points at the admission prediction",
    }
    print_block({k: v for k, v in res.items() if k != "per_window"})
    print_windows(res["per_window"])
    res["server_series"] = sampler.rows
    p99 = o["p99"]
    res["rows"] = [
        row("streaming", f"client TTFT - engine TTFT (gateway overhead), {users:,} users",
            "p99 <= 25 ms", f"p50 {fmt(o['p50'])} / p95 {fmt(o['p95'])} / p99 {fmt(p99)} ms",
            None if p99 is None else p99 <= 25.0),
        row("streaming", "every generated delta delivered, no gap / duplicate",
            "all, 0 / 0", f"{received:,}/{end_seq:,} deltas, gaps {c['seq_gaps']}, dups {c['seq_duplicates']}",
            rep["protocol_ok"]),
        row("streaming", "turns completed (busy retried like an app)", "all",
            f"{completed:,}/{planned:,}; busy answers {c['busy']:,}"
            + "".join(f", {k} {v}" for k, v in sorted(rep["errors"].items())),
            completed == planned),
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
    try:
        rss_ready = gw.rss_kb()
        # Warm-up: one-time allocations (code paths, Redis pool) do not belong to the per-connection cost.
        warm = bench_config(gw, args, "warm", users=0, idle=100, processes=1, turn_rows=False)
        run_bench(warm, hooks=RunHooks(on_tick=lambda elapsed: True, tick_s=0.0))
        time.sleep(2.0)
        rss_base = gw.rss_kb()
        sampler = Sampler(gw)
        at_open: dict[str, float] = {}
        at_hold_end: dict[str, Any] = {}
        t_open = time.monotonic()

        def opened() -> None:
            at_open.update(open_s=time.monotonic() - t_open, rss=gw.rss_kb())
            print(f"  {scrape(gw.base).get('rapport_connections_open', 0):.0f} connections open in "
                  f"{at_open['open_s']:.1f} s; gateway RSS {at_open['rss'] / 1024:.1f} MB "
                  f"(base {rss_base / 1024:.1f} MB)", flush=True)

        def hold_over(elapsed: float) -> bool:
            if elapsed < hold_s:
                return False
            # The end of the hold: read the gateway before the connections close.
            at_hold_end.update(rss=gw.rss_kb(), metrics=scrape(gw.base), fds=gw.fds(),
                               window=run.window(loadavg_before_wait=la0))
            return True

        run = MeasuredRun(gw, sampler, tick_s=0.25, on_start=opened, stop_when=hold_over)
        rep = run.run(bench_config(gw, args, "idle", users=0, idle=n))
        win = at_hold_end["window"]
        win["client_cpu_pct"] = round(rep["client_cpu_s"] / max(1e-9, time.monotonic() - run.t0) * 100.0, 1)
        time.sleep(3.0)
        rss_closed = gw.rss_kb()
    finally:
        stop_gateway(gw)

    c = rep["counts"]
    opened_n, open_s, rss_hold = c["idle_open"], at_open["open_s"], at_hold_end["rss"]
    per_conn_kb = (rss_hold - rss_base) / opened_n if opened_n else math.nan
    hold_rss = [r["rss_kb"] for r in sampler.rows if r["t"] <= hold_s]
    res: dict[str, Any] = {
        "config": {"connections": n, "hold_s": hold_s, "heartbeat_interval_ms": beat_ms,
                   "heartbeat_timeout_ms": beat_ms * 3, "client_processes": procs,
                   "rlimit_nofile": [soft, hard]},
        "window": win,
        "opened": opened_n, "open_s": round(open_s, 1), "connect_rate_per_s": round(opened_n / open_s, 1),
        "server_rss_kb": {"after_start": rss_ready, "base_after_warmup": rss_base, "all_open": at_open["rss"],
                          "end_of_hold": rss_hold, "peak_during_hold": max(hold_rss, default=rss_hold),
                          "3s_after_close": rss_closed},
        "server_fds_during_hold": at_hold_end["fds"],
        "memory_per_connection_kb": round(per_conn_kb, 2),
        "memory_per_connection_kb_from_start": round((rss_hold - rss_ready) / opened_n, 2) if opened_n else None,
        "server_connections_open_metric": at_hold_end["metrics"].get("rapport_connections_open"),
        "pings_answered_during_hold": c["pings_answered_in_run"],
        "app_pings_expected_during_hold": round(opened_n * hold_s / (beat_ms / 1000.0)),
        "lost_during_run": c["idle_lost"],
        "open_at_end_of_hold": c["idle_open_at_end"],
        "counts": {**{k: v for k, v in sorted(c.items()) if v}, **error_counts(rep)},
        "rss_series": sampler.rows,
    }
    print_block({k: v for k, v in res.items() if k != "rss_series"})
    held = c["idle_open_at_end"] == n and c["idle_lost"] == 0
    res["rows"] = [
        row("idle", f"gateway memory per idle connection ({n:,} held, pings every {beat_ms / 1000:g} s)",
            "<= 30 KB", f"{per_conn_kb:.1f} KB (RSS {rss_base / 1024:.0f} -> {rss_hold / 1024:.0f} MB)",
            per_conn_kb <= 30.0),
        row("idle", "connections held through heartbeats", f"{n:,} open, 0 lost",
            f"{c['idle_open_at_end']:,} open, {c['idle_lost']} lost, {c['pings_answered_in_run']:,} pings answered",
            held),
        row("idle", f"gateway CPU holding them (pings every {beat_ms / 1000:g} s); connect rate",
            "(no goal)", f"{win['server_cpu_pct']:.0f} % of a core; {opened_n / open_s:.0f} connections/s opened",
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
    # Connections enough for 6 s of one process's arrivals: a turn in flight holds its connection.
    pool = math.ceil(offered / procs * 6.0) + 20
    print(f"\n== overload: max_num_seqs {seqs}, nominal capacity {nominal:.1f} turns/s "
          f"(saturated, every step admitting: {low:.1f}), offered {offered:.1f} turn.starts/s "
          f"(Poisson) for {duration:g} s, {procs} client processes x {pool} pooled connections", flush=True)
    la0 = wait_for_load(args, "overload")
    gw = start_gateway("overload", sim_flags(seqs), args, log_dir)
    try:
        sampler = Sampler(gw, metric_names=ENGINE_METRICS)
        run = MeasuredRun(gw, sampler)
        rep = run.run(bench_config(gw, args, "overload", users=pool * procs, open_loop_rate=offered,
                                   duration_s=duration, turn_timeout_s=30.0))
        win = run.window(rep, loadavg_before_wait=la0)
        m = scrape(gw.base)
    finally:
        stop_gateway(gw)

    c, t, lat = rep["counts"], rep["turns"], rep["latency_ms"]
    busy = rep["timed"]["busy_latency"]
    ttft, s_ttft, refusal = t["ttft"], t["server_ttft"], busy["ms"]
    accepted = c["turns_started"]
    in_budget = sum(1 for v in ttft if not math.isnan(v) and v <= BUDGET_MS)
    in_budget_server = sum(1 for v in s_ttft if not math.isnan(v) and v <= BUDGET_MS)
    share = in_budget / accepted if accepted else math.nan
    share_server = in_budget_server / accepted if accepted else math.nan
    over50 = sum(1 for v in refusal if v > 50.0)
    r = lat["busy_latency"]
    served = len(ttft) / duration
    res: dict[str, Any] = {
        "config": {"max_num_seqs": seqs, "reply_tokens": REPLY_TOKENS, "sim_itl_ms": SIM_ITL_MS,
                   "sim_ttft_ms": SIM_TTFT_MS, "nominal_capacity_turns_per_s": round(nominal, 1),
                   "saturated_capacity_every_step_admitting": round(low, 1),
                   "offered_turns_per_s": round(offered, 1), "duration_s": duration,
                   "client_processes": procs, "pool_per_process": pool, "budget_ms": BUDGET_MS},
        "window": win,
        "arrivals": c["arrivals"], "offered_measured_per_s": round(c["arrivals"] / duration, 1),
        "no_free_connection": c["no_free_connection"], "unfinished": c["unfinished"],
        "accepted": accepted, "completed": len(ttft), "accepted_failed": accepted - len(ttft),
        "refused_busy": c["busy"], "refused_rate_limited": c["rate_limited"],
        "served_turns_per_s": round(served, 1),
        "offered_over_served": round(c["arrivals"] / duration / served, 2) if served else None,
        "accepted_within_budget_share": round(share, 4),
        "accepted_within_budget_share_server_timings": round(share_server, 4),
        "latency_ms": {"client TTFT (accepted)": stats(ttft), "timings.ttft_ms (accepted)": stats(s_ttft),
                       "busy answer latency": r, "inter-delta gap": lat["gap"],
                       "client event-loop lag": lat["loop_lag"]},
        "refusals_over_50ms": over50,
        "refusals_over_50ms_at_s": sorted(round(at, 2) for v, at in zip(refusal, busy["at_s"], strict=True)
                                          if v > 50.0)[:20],
        "engine_waiting_max": max((s[ENGINE_METRICS[1]] for s in sampler.rows), default=None),
        "server_metrics": {k: v for k, v in m.items()
                           if k.startswith(("rapport_admissions_refused_total", "rapport_ttft_budget_misses",
                                            "rapport_turns_total"))},
        "counts": {**{k: v for k, v in sorted(c.items()) if v}, **error_counts(rep)},
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


# ---------------------------------------------------------------- stuck

def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0]


def _unread_bytes(sock: socket.socket) -> int:
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return struct.unpack("i", buf)[0]


class ExtraClient(threading.Thread):
    """The stuck scenario's extra client: ``turns`` turns in as many conversations, read (control) or never read.

    One socket on its own event loop in a thread of this process, beside the
    load generator's workers. Stuck: a ``rcvbuf``-byte receive buffer and,
    after sending the turn.starts, no read at all (the library stops reading
    once one message is queued); the socket's TCP state and unread bytes are
    watched from a duplicate fd. Connected before the run; :meth:`begin`
    starts it, :meth:`cancel` ends it early.
    """

    def __init__(self, gw: ServerProcess, user: str, *, stuck: bool, turns: int, start_at_s: float,
                 phase_s: float, rcvbuf: int = 4096, spread_s: float = 0.5) -> None:
        super().__init__(name=f"{SUITE}-extra-client", daemon=True)
        self.gw, self.user, self.stuck, self.turns = gw, user, stuck, turns
        self.start_at_s, self.phase_s, self.rcvbuf, self.spread_s = start_at_s, phase_s, rcvbuf, spread_s
        self.connected = threading.Event()
        self._go = threading.Event()
        self._t0: float | None = None
        self.result: dict[str, Any] = {}
        self.failure: str | None = None

    def begin(self, t0: float) -> None:
        self._t0 = t0
        self._go.set()

    def cancel(self) -> None:
        self._go.set()  # with no start time: close and return

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except (ClientError, OSError, TimeoutError):
            self.failure = traceback.format_exc()
        finally:
            self.connected.set()  # never leave the suite waiting for a client that failed to connect

    async def _main(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.connect(("127.0.0.1", self.gw.port))
        sock.setblocking(False)
        probe = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            driver = await Driver.open(self.gw.ws_url, user=self.user, coalesce=True, sock=sock,
                                       max_queue=1 if self.stuck else 16, compression=None, open_timeout=60,
                                       close_timeout=2, user_agent_header=SUITE, proxy=None,
                                       client={"name": SUITE, "version": "1"})
            self.connected.set()
            await asyncio.get_running_loop().run_in_executor(None, self._go.wait)
            if self._t0 is None:
                driver.abort()
                return
            await self._play(driver, probe, self._t0)
        finally:
            probe.close()

    async def _play(self, driver: Driver, probe: socket.socket, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + self.start_at_s - time.monotonic()))
        out = self.result
        out.update(mode="stuck" if self.stuck else "reader",
                   rcvbuf_effective=probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                   sent_at_s=time.monotonic() - t0)
        for i in range(self.turns):
            await driver.send(client_frames.turn_start(PROMPTS[i % len(PROMPTS)], conversation_id=f"x{i}",
                                                       client_turn_id=f"x{i}-{uuid.uuid4().hex[:8]}"))
            await asyncio.sleep(self.spread_s / self.turns)
        out["sent_all_at_s"] = time.monotonic() - t0
        end = t0 + self.phase_s
        if not self.stuck:
            ends = deltas = refused = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.1, end - time.monotonic())):
                    while ends + refused < self.turns:
                        frame = await driver.recv(timeout=None)
                        kind = frame["type"]
                        if kind == "turn.delta":
                            deltas += frame["seq"] - frame.get("seq_start", frame["seq"]) + 1
                        elif kind == "turn.end":
                            ends += 1
                        elif kind == "error":
                            refused += 1
                        elif kind == "ping":
                            await driver.send(client_frames.pong(frame.get("t")))
            out.update(ends=ends, refused=refused, deltas=deltas, done_at_s=time.monotonic() - t0)
            try:
                await asyncio.wait_for(driver.close(), 3.0)
            except (TimeoutError, OSError, ClientError):
                driver.abort()
            return
        states: list[tuple[float, str]] = []
        last = None
        max_unread = 0
        while time.monotonic() < end:
            state = _tcp_state(probe)
            max_unread = max(max_unread, _unread_bytes(probe))
            if state != last:
                states.append((round(time.monotonic() - t0, 3), TCP_STATES.get(state, str(state))))
                last = state
            await asyncio.sleep(0.05)
        out.update(tcp_states=states, max_unread_bytes=max_unread, aborted_at_s=time.monotonic() - t0)
        driver.abort()


STUCK_CLOSE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*session (\S+): "
                            r"(nothing sent for ([0-9.]+)s; closing the stuck socket|client stopped reading)")


def stuck_phase(gw: ServerProcess, args: argparse.Namespace, phase: str, *, users: int, phase_s: float,
                turns: int, start_at: float, la0: float) -> dict[str, Any]:
    """One phase of ``stuck``: the users in closed loop for ``phase_s`` beside the extra client."""
    extra = ExtraClient(gw, f"ls-stuck-{uuid.uuid4().hex[:6]}-{phase}-extra", stuck=phase == "stuck",
                        turns=turns, start_at_s=start_at, phase_s=phase_s)
    extra.start()
    try:
        if not extra.connected.wait(120) or extra.failure:
            raise RuntimeError(f"the extra client could not connect:\n{extra.failure}")
        sampler = Sampler(gw, metric_names=("rapport_slow_consumer_closes_total", "rapport_connections_open"))
        sampler()
        run = MeasuredRun(gw, sampler, tick_s=0.25, on_start=lambda: extra.begin(run.t0))
        rep = run.run(bench_config(gw, args, f"stuck-{phase}", users=users, turns=0, think_ms=500.0, ramp_s=1.0,
                                   duration_s=phase_s, turn_timeout_s=30.0))
        win = run.window(rep, loadavg_before_wait=la0)
        extra.join(phase_s + 30.0)
        if extra.failure or extra.is_alive():
            raise RuntimeError(f"the extra client did not finish its {phase} phase:\n{extra.failure or ''}")
        time.sleep(2.0)
        sampler()
    finally:
        extra.cancel()
        extra.join(10.0)
    return {"t0": run.t0, "wall0": run.wall0, "window": win, "report": rep, "extra": extra.result,
            "series": sampler.rows}


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
        for phase in ("control", "stuck"):
            la0 = la_first if phase == "control" else wait_for_load(args, "the stuck phase")
            phases[phase] = stuck_phase(gw, args, phase, users=users, phase_s=phase_s, turns=k, start_at=start_at,
                                        la0=la0)
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
        rep, c = ph["report"], ph["report"]["counts"]
        rss = [r_["rss_kb"] for r_ in ph["series"]]
        fds = [r_["fds"] for r_ in ph["series"]]
        cmp[phase] = {
            "window": ph["window"],
            "turns_completed": c["turns_completed"],
            "TTFT": stats(rep["turns"]["ttft"]),
            "gap": rep["latency_ms"]["gap"],
            "deltas_delivered": rep["protocol_ok"],
            "errors": {**{f"error_{k_}": v for k_, v in rep["errors"].items()},
                       **{k_: c[k_] for k_ in ("busy", "connection_lost") if c[k_]}},
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
    # When the gateway really let go of the socket: its fd count drops (the users' sockets stay put).
    release_t = None
    if close_t is not None:
        series = stuck_ph["series"]
        before = [r_["fds"] for r_ in series if r_["t"] <= close_t]
        if before:
            release_t = next((r_["t"] for r_ in series if r_["t"] > close_t and r_["fds"] < before[-1]), None)
    cmp["stuck"]["close"].update(fd_released_at_s=release_t, client_aborted_at_s=extra.get("aborted_at_s"))
    # The others during the stuck window only (from the stuck client's silence to its close).
    if close_t is not None and silent_at is not None:
        rep = stuck_ph["report"]
        in_win = [v for v, t in zip(rep["turns"]["ttft"], rep["turns"]["sent_s"], strict=True)
                  if silent_at <= t <= close_t]
        gaps = rep["timed"]["gap"]
        gaps_win = [v for v, t in zip(gaps["ms"], gaps["at_s"], strict=True) if silent_at <= t <= close_t]
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
        t = time.monotonic()
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
        res["elapsed_s"] = round(time.monotonic() - t, 1)
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
            json.dump(finite_or_none(report), f, indent=2, default=str)
            f.write("\n")
        print(f"{SUITE}: wrote {args.json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
