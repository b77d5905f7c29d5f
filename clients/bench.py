"""``rapport bench``: a load generator that measures what users feel.

Many simulated users, each on its own WebSocket, hold multi-turn conversations
with think time between turns::

    rapport bench --url ws://127.0.0.1:8000/v1/ws --dev-users --users 200 --turns 5 \\
        --think-ms 3000 --ramp-s 10 --processes 2 --json out.json --plot ttft.png

Users are split over ``--processes`` worker processes (:mod:`clients.bench_workers`);
each runs one uvloop event loop and one lean :class:`clients.driver.Driver` per
user (no background task per connection) so the client is not the bottleneck.
This module is the command line and the parent process; the figures and the
table are :mod:`clients.bench_report`'s.
``--idle N`` also opens N connections that only answer pings (the
many-idle-connections measurement). ``--open-loop-rate R`` replaces the
users' closed loop by Poisson arrivals at R turn.starts/s over a pool of
``--users`` connections, each turn a new conversation, a refusal not retried
(the overload measurement: offered load that does not slow down when the
server does). ``--turn-rows`` puts one row per completed turn in the JSON
(send time, client and server TTFTs, turn time, deltas), with the moment of
every gap and refusal, for analyses over time.

A program can drive a run itself: :func:`run_bench` takes :class:`RunHooks`,
told when the workers start and called periodically in the parent while they
run (to sample the server, or to end an idle hold).

Every figure is taken on the client's monotonic clock:

* time to first token: from sending the ``turn.start`` that was accepted to
  receiving the first ``turn.delta`` (a ``busy`` answer is retried after its
  ``retry_after_ms``, as an app would; the time including those retries is
  reported too);
* gap between deltas (not across a reconnect), and turn time (``turn.start``
  to ``turn.end``);
* the server's own ``turn.end.timings``, client-minus-server TTFT and the
  gateway's overhead: client TTFT minus the engine's own
  (``timings.engine_ttft_ms``);
* how long a ``busy`` / ``rate_limited`` answer took, and each worker's
  event-loop lag (a saturated client inflates its own figures).

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
import json
import multiprocessing as mp
import queue as queue_mod
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .bench_report import (
    PlotUnavailable,
    build_report,
    check_plotting,
    finite_or_none,
    format_table,
    histogram,
    progress_line,
    write_plot,
)
from .bench_stats import merge_results
from .bench_workers import DEFAULT_URL, PROMPTS, BenchConfig, worker_main
from .target import default_jwt_secret, normalize_url

# PROMPTS and normalize_url stay importable from here for the scripts under bench/.
__all__ = ["PROMPTS", "BenchConfig", "RunHooks", "add_bench_arguments", "bench_command", "config_from_args",
           "main", "normalize_url", "run_bench"]


@dataclass
class RunHooks:
    """What a program driving :func:`run_bench` is told, in the parent process."""

    #: Called once, with the monotonic time the workers were told to go (every connection open).
    on_start: Callable[[float], None] | None = None
    #: Called every ``tick_s`` while the workers run, with the seconds since the start; True ends the
    #: run (the users start no new turn, idle connections are closed): the end of an idle hold.
    on_tick: Callable[[float], bool | None] | None = None
    tick_s: float = 1.0


def run_bench(cfg: BenchConfig, *, err: Any = None, hooks: RunHooks | None = None) -> dict[str, Any]:
    """Run the benchmark; the report (as written with --json)."""
    err = err or sys.stderr
    hooks = hooks or RunHooks()
    ctx = mp.get_context("spawn")
    report = ctx.Queue()
    go = ctx.Event()
    stop = ctx.Event()
    n = max(1, cfg.processes)
    assignments = [list(range(w, cfg.users, n)) for w in range(n)]
    idles = [cfg.idle // n + (1 if w < cfg.idle % n else 0) for w in range(n)]
    procs = [ctx.Process(target=worker_main, args=(asdict(cfg), w, assignments[w], idles[w], report, go, stop),
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
    last_line = last_tick = 0.0
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
                    if hooks.on_start is not None:
                        hooks.on_start(started)
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
            if (hooks.on_tick is not None and started is not None and not stop.is_set()
                    and now - last_tick >= hooks.tick_s):
                last_tick = now
                if hooks.on_tick(now - started):
                    stop.set()
            if cfg.progress and started is not None and now - last_line >= 1.0:
                last_line = now
                line = progress_line(now - started, snaps, ttfts)
                err.write(("\r" + line) if tty else (line + "\n"))
                err.flush()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        go.set()
        stop.set()
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
    merged = merge_results([results[w] for w in sorted(results)])
    return build_report(cfg, elapsed, merged, failed_workers=len(failures), start=started,
                        setup_s=None if started is None else started - t_setup)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--url", default=DEFAULT_URL, help=f"server WebSocket URL, or http://host:port (default {DEFAULT_URL})")
    a("--users", type=int, default=10, help="simulated users, each on its own connection (default 10)")
    a("--turns", type=int, default=3, help="turns per user; 0: until --duration-s (default 3)")
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
    a("--open-loop-rate", type=float, default=None, metavar="PER_S",
      help="open loop: turn.starts arrive at this rate (Poisson) for --duration-s over a pool of --users "
           "connections, each a new conversation; a refusal is not retried")
    a("--turn-rows", action="store_true",
      help="put one row per completed turn, and when each gap and refusal happened, in the JSON")
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
    if args.users < 0 or args.turns < 0 or args.processes < 1 or args.idle < 0:
        raise ValueError("--users, --turns and --idle must be >= 0, --processes >= 1")
    if (args.turns == 0 or args.open_loop_rate) and not args.duration_s:
        raise ValueError("--turns 0 and --open-loop-rate need --duration-s")
    if args.open_loop_rate is not None and (args.open_loop_rate <= 0 or args.users < 1):
        raise ValueError("--open-loop-rate must be > 0, over a pool of --users >= 1 connections")
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
        secret = default_jwt_secret()
    prefix = args.user_prefix if args.user_prefix is not None else f"bench-{uuid.uuid4().hex[:6]}-"
    return BenchConfig(
        url=args.url, users=args.users, turns=args.turns, think_ms=args.think_ms, ramp_s=args.ramp_s,
        duration_s=args.duration_s, max_tokens=args.max_tokens, msgpack=args.msgpack,
        drop_rate=args.drop_rate, user_prefix=prefix, token=args.token, jwt_secret=secret,
        dev_users=args.dev_users, processes=args.processes, idle=args.idle, budget_ms=args.budget_ms,
        conversation_id=args.conversation_id, turn_timeout_s=args.turn_timeout_s,
        max_retries=args.max_retries, deflate=args.deflate, seed=args.seed, progress=args.progress,
        open_loop_rate=args.open_loop_rate, turn_rows=args.turn_rows,
    )


def bench_command(args: argparse.Namespace) -> int:
    """Entry point for the ``rapport bench`` subcommand; returns the exit code."""
    try:
        cfg = config_from_args(args)
        if args.plot_path:
            check_plotting()  # before the run, not after it
    except (ValueError, PlotUnavailable) as exc:
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
        report["ttft_histogram_ms"] = histogram(samples["ttft"])
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(finite_or_none(report), f, indent=2)
            f.write("\n")
    completed = report["counts"]["turns_completed"]
    if not report["protocol_ok"] or (cfg.users and completed == 0) or report["failed_workers"]:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_bench_arguments(argparse.ArgumentParser(
        prog="rapport bench", description="Load generator: simulated users chatting over the WebSocket protocol."))
    return bench_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
