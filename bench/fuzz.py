"""A long fuzz run against one gateway: malformed frames on both subprotocols and
malformed requests to the OpenAI endpoint, with the server's memory before and after.

Starts ``rapport serve`` (simulated engine, development auth, the per-socket
frame rate raised out of reach so the frames reach the parsers), then runs
``--concurrency`` fuzzing sockets at once until ``--frames`` frames are sent
or ``--seconds`` have passed, with one OpenAI request per ``--frames-per-request``
frames and an honest client completing a turn every ``--honest-every``
sessions and at the end. The generator and the checks are
``testkit.fuzzing``'s, shared with ``tests/test_fuzz.py``.

Usage::

    python bench/fuzz.py --frames 20000 --seconds 600
    python bench/fuzz.py --frames 2000 --seed 7          # reproduce a run

Prints RSS before and after, frames sent, answers by kind, closes by code,
HTTP statuses and every violation (a traceback in the server's log counts as
one); exits 1 on a violation.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from pathlib import Path

# Runnable as `python bench/fuzz.py` from a checkout: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from clients.target import mint_token
from testkit import fuzzing
from testkit.redis_prefix import DEFAULT_REDIS_URL, clean_prefix
from testkit.servers import ServerProcess

JWT_SECRET = "fuzz-bench-secret-" + "x" * 32
SERVER_FLAGS = ["--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "5", "--sim-reply-tokens", "8",
                "--auth", "dev", "--frames-per-second", "1000000", "--frame-burst", "1000000"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=20_000, help="stop after this many WebSocket frames")
    p.add_argument("--seconds", type=float, default=600.0, help="stop after this long, whatever was sent")
    p.add_argument("--concurrency", type=int, default=4, help="fuzzing sockets open at once")
    p.add_argument("--max-frames-per-session", type=int, default=40)
    p.add_argument("--frames-per-request", type=int, default=20,
                   help="one OpenAI request per this many frames (0: none)")
    p.add_argument("--honest-every", type=int, default=100, help="an honest turn every this many sessions")
    p.add_argument("--seed", type=int, default=None, help="seed of the whole run (default: random, printed)")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--log-dir", default=None, help="where the server's log goes")
    return p.parse_args(argv)


async def fuzz(server: ServerProcess, args: argparse.Namespace, seed: int, tally: fuzzing.Tally) -> None:
    deadline = time.monotonic() + args.seconds
    # Every session and request has a seed of its own, printed with a violation.
    seeds = random.Random(seed)
    requests_due = 0.0

    def more() -> bool:
        return tally.frames_sent < args.frames and time.monotonic() < deadline

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal requests_due
        while more():
            session_seed = seeds.getrandbits(64)
            rng = random.Random(session_seed)
            plan = fuzzing.session_plan(rng, max_frames=args.max_frames_per_session, jwt_secret=JWT_SECRET)
            report = await fuzzing.run_session(server.ws_url, plan)
            tally.add_session(report, lambda s=session_seed, p=plan.subprotocol: f"[session seed {s}, {p}] ")
            if args.frames_per_request:
                requests_due += report.frames_sent / args.frames_per_request
                while requests_due >= 1:
                    requests_due -= 1
                    request_seed = rng.getrandbits(64)
                    token = mint_token(f"fuzz-http-{request_seed}", JWT_SECRET)
                    request = fuzzing.completion_request(random.Random(request_seed), token, JWT_SECRET)
                    tally.add_request(await fuzzing.send_request(client, server.base, request),
                                      lambda s=request_seed: f"[request seed {s}] ")
            if args.honest_every and tally.sessions % args.honest_every == 0:
                await honest(server, tally)

    async with httpx.AsyncClient(timeout=60.0) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    await honest(server, tally)


async def honest(server: ServerProcess, tally: fuzzing.Tally) -> None:
    for subprotocol in fuzzing.SUBPROTOCOLS:
        problem = await fuzzing.honest_turn(server.ws_url, subprotocol)
        if problem is not None:
            tally.violations.append(f"[honest client, {subprotocol}] {problem}")


def print_counter(title: str, counter: dict[str, int]) -> None:
    print(f"{title}:")
    for key, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:>8}  {key}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    prefix = f"rapport-fuzz:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=SERVER_FLAGS, redis_url=args.redis_url, jwt_secret=JWT_SECRET,
                           name="rapport-fuzz", log_dir=args.log_dir)
    tally = fuzzing.Tally()
    try:
        server.start()
        # One honest turn first, so "before" is a warm server, not one that has not imported its engine path.
        asyncio.run(honest(server, tally))
        rss_before = server.rss_kb()
        started = time.monotonic()
        asyncio.run(fuzz(server, args, seed, tally))
        elapsed = time.monotonic() - started
        rss_after = server.rss_kb()
        alive = server.alive()
    finally:
        server.stop()
        clean_prefix(prefix, args.redis_url)
    if not alive:
        tally.violations.append("the server process died")
    # An exception some task swallowed without breaking a socket still shows in the log.
    tracebacks = server.log(None).count("Traceback")
    if tracebacks:
        tally.violations.append(f"the server logged {tracebacks} traceback(s)")

    print(f"seed {seed}: {tally.sessions} sessions, {tally.frames_sent} frames, {tally.requests} OpenAI requests "
          f"in {elapsed:.1f} s ({tally.frames_sent / max(elapsed, 1e-9):.0f} frames/s)")
    print(f"server RSS: {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after "
          f"({(rss_after - rss_before) / 1024:+.1f} MiB)")
    print_counter("answers by kind", tally.answers)
    print_counter("closes by code (open: the server kept the socket; the client closed it)", tally.closes)
    print_counter("OpenAI answers by status", tally.statuses)
    print(f"violations: {len(tally.violations)}")
    for violation in tally.violations[:50]:
        print(f"  {violation}")
    if len(tally.violations) > 50:
        print(f"  ... and {len(tally.violations) - 50} more")
    if tally.violations:
        print(f"server log: {server.log_path}")
    return 1 if tally.violations else 0


if __name__ == "__main__":
    sys.exit(main())
