"""Resume latency: how long a client that lost its socket mid-reply waits for the
first delta it is missing.

Starts two gateway processes sharing one Redis (simulated engine at GPU-like
speed), then performs forced drops in parallel groups. For each drop a client
streams a turn, aborts its socket right after delta ``k`` (no close frame, as
when a phone changes networks), reconnects -- to the same process for half of
the drops, to the other process for the other half -- and sends
``turn.resume`` with ``after_seq = k``. Measured, per drop:

* ``reconnect``: from starting the reconnect (opening the socket) to receiving
  the first missing delta (seq k+1): TCP + WebSocket handshake + hello/ready +
  resume + delivery;
* ``resume``: from sending ``turn.resume`` to receiving that delta.

A missing delta may not exist yet when the resume arrives: the engine makes
one every ``--itl-ms``. Two modes separate that from the server's own work:

* ``backlog`` (the headline number): the client waits ``--wait-tokens`` inter-
  token intervals before reconnecting, so the deltas it misses are already in
  the turn's log; the latency is the server's resume path alone.
* ``live``: the client reconnects at once. Some first missing deltas are then
  generated after the resume arrived, and the latency includes up to one
  inter-token interval of engine time. Those cases are counted (estimated from
  the delta cadence seen before the drop: delta k+1 is due one interval after
  delta k arrived) and the percentiles are also given without them.

Usage::

    python bench/resume_latency.py                      # 1000 drops in each mode
    python bench/resume_latency.py --drops 200 --mode backlog --json out.json

The goal stated for this path is p99 under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Runnable as `python bench/resume_latency.py` from a checkout: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.driver import Driver
from clients.percentiles import summarize
from protocol import client_frames
from testkit.servers import ServerProcess, gateways_sharing_prefix

# ---------------------------------------------------------------- one drop


@dataclass
class Drop:
    mode: str
    target: str  # "same" or "cross"
    after_seq: int
    reconnect_ms: float  # socket open -> first missing delta
    resume_ms: float  # turn.resume sent -> first missing delta
    upgrade_ms: float  # of reconnect_ms: TCP connect + WebSocket upgrade
    hello_ms: float  # of reconnect_ms: hello -> ready
    engine_wait: bool  # the first missing delta was (estimated) generated after the resume arrived
    engine_wait_ms: float  # estimated part of resume_ms spent waiting for the engine


async def open_ready(url: str, user: str, marks: list[float] | None = None) -> Driver:
    """A socket past hello/ready; ``marks`` gets the time the WebSocket upgrade completed."""
    if marks is None:
        return await Driver.open(url, user=user, open_timeout=30)
    driver = await Driver.open(url, hello=False, open_timeout=30)
    marks.append(time.perf_counter())
    await driver.send(client_frames.hello(user=user))
    await driver.recv_until("ready", timeout=30)
    return driver


async def next_of(driver: Driver, kinds: tuple[str, ...]) -> tuple[dict, float]:
    """The next frame of one of ``kinds`` and when it arrived; an ``error`` frame raises."""
    while True:
        frame = await driver.recv(timeout=None)
        t = time.perf_counter()
        if frame["type"] in kinds:
            return frame, t
        if frame["type"] == "error":
            raise RuntimeError(frame)


async def one_drop(index: int, mode: str, gateways: list[ServerProcess], user: str, args: argparse.Namespace,
                   rng: random.Random) -> Drop:
    origin = index % 2
    cross = (index // 2) % 2 == 1
    target = 1 - origin if cross else origin
    k = rng.randint(args.min_seq, args.max_seq)
    first = await open_ready(gateways[origin].ws_url, user)
    await first.send(client_frames.turn_start(f"drop {index}: tell me about your day",
                                              options={"max_tokens": args.max_seq + 20}))
    accepted, _ = await next_of(first, ("turn.accepted",))
    turn_id = accepted["turn_id"]
    arrivals: list[float] = []
    while len(arrivals) < k:
        delta, t = await next_of(first, ("turn.delta",))
        assert delta["seq"] == len(arrivals) + 1, delta
        arrivals.append(t)
    first.abort()  # the network drops: no close frame
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    cadence = statistics.median(gaps) if gaps else args.itl_ms / 1000.0
    next_due = arrivals[-1] + cadence  # when delta k+1 would have arrived without the drop
    if mode == "backlog":
        await asyncio.sleep(args.wait_tokens * args.itl_ms / 1000.0)

    t_open = time.perf_counter()
    marks: list[float] = []
    again = await open_ready(gateways[target].ws_url, user, marks)
    t_resume = time.perf_counter()
    await again.send(client_frames.turn_resume(turn_id, k))
    missing, t_first = await next_of(again, ("turn.delta", "turn.end"))
    if missing["type"] != "turn.delta" or missing["seq"] != k + 1:
        raise RuntimeError(f"resume after {k} answered {missing}")
    # Let the turn go: cancel it and wait for its end, so the conversation is free.
    await again.send(client_frames.turn_cancel(turn_id))
    await next_of(again, ("turn.end",))
    await again.close()
    wait = max(0.0, next_due - t_resume)
    return Drop(mode=mode, target="cross" if cross else "same", after_seq=k,
                reconnect_ms=(t_first - t_open) * 1000.0, resume_ms=(t_first - t_resume) * 1000.0,
                upgrade_ms=(marks[0] - t_open) * 1000.0, hello_ms=(t_resume - marks[0]) * 1000.0,
                engine_wait=next_due > t_resume, engine_wait_ms=wait * 1000.0)


async def run_mode(mode: str, gateways: list[ServerProcess], args: argparse.Namespace) -> list[Drop]:
    rng = random.Random(args.seed)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.drops):
        queue.put_nowait(i)
    out: list[Drop] = []
    tag = uuid.uuid4().hex[:6]

    async def worker(w: int) -> None:
        user = f"bench-{tag}-{w}"
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            out.append(await one_drop(i, mode, gateways, user, args, rng))
            done = len(out)
            if done % 100 == 0:
                print(f"  {mode}: {done}/{args.drops} drops", file=sys.stderr)

    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    return out


# ---------------------------------------------------------------- report


def report(drops: list[Drop], args: argparse.Namespace) -> dict:
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "modes": {}}
    rows = []
    for mode in sorted({d.mode for d in drops}):
        mode_out: dict = {}
        for target in ("same", "cross"):
            ds = [d for d in drops if d.mode == mode and d.target == target]
            if not ds:
                continue
            waited = [d for d in ds if d.engine_wait]
            entry = {
                "drops": len(ds),
                "reconnect_ms": summarize([d.reconnect_ms for d in ds]),
                "resume_ms": summarize([d.resume_ms for d in ds]),
                "upgrade_ms": summarize([d.upgrade_ms for d in ds]),
                "hello_ready_ms": summarize([d.hello_ms for d in ds]),
                "engine_wait_cases": len(waited),
                "engine_wait_ms_mean": statistics.fmean([d.engine_wait_ms for d in waited]) if waited else 0.0,
                "resume_ms_without_engine_wait": summarize([d.resume_ms for d in ds if not d.engine_wait]),
            }
            mode_out[target] = entry
            rows.append((mode, target, "reconnect→delta", entry["reconnect_ms"], len(waited)))
            rows.append((mode, target, "  of which TCP+upgrade", entry["upgrade_ms"], len(waited)))
            rows.append((mode, target, "  of which hello→ready", entry["hello_ready_ms"], len(waited)))
            rows.append((mode, target, "resume→delta", entry["resume_ms"], len(waited)))
            if mode == "live":
                rows.append((mode, target, "resume→delta, no engine wait",
                             entry["resume_ms_without_engine_wait"], 0))
        result["modes"][mode] = mode_out

    print()
    print(f"{'mode':8} {'process':8} {'measure':30} {'n':>5} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}"
          f" {'engine-wait':>11}")
    for mode, target, measure, s, waited in rows:
        print(f"{mode:8} {target:8} {measure:30} {s['count']:5d} {_ms(s['p50'])} {_ms(s['p95'])} {_ms(s['p99'])}"
              f" {_ms(s['max'])} {waited:11d}")
    print("(milliseconds; engine-wait: drops whose first missing delta was due after the resume was sent)")
    return result


def _ms(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:8.2f}"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drops", type=int, default=1000, help="forced drops per mode")
    p.add_argument("--concurrency", type=int, default=16, help="drops in flight at once")
    p.add_argument("--mode", choices=["backlog", "live", "both"], default="both")
    p.add_argument("--ttft-ms", type=float, default=40.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--wait-tokens", type=float, default=3.0,
                   help="backlog mode: inter-token intervals to wait before reconnecting")
    p.add_argument("--min-seq", type=int, default=2, help="drop after a delta seq in [min, max]")
    p.add_argument("--max-seq", type=int, default=8)
    p.add_argument("--redis-url", default=os.environ.get("RAPPORT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


SERVER_FLAGS = ["--auth", "dev", "--engine", "simulated", "--sim-reply-tokens", "1000",
                "--turns-per-minute", "1000000", "--max-connections-per-user", "64"]


async def measure(args: argparse.Namespace, gateways: list[ServerProcess]) -> dict[str, Any]:
    modes = ["backlog", "live"] if args.mode == "both" else [args.mode]
    drops: list[Drop] = []
    for mode in modes:
        started = time.monotonic()
        drops += await run_mode(mode, gateways, args)
        print(f"  {mode}: {args.drops} drops in {time.monotonic() - started:.1f} s", file=sys.stderr)
    result = report(drops, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    flags = [*SERVER_FLAGS, "--sim-ttft-ms", str(args.ttft_ms), "--sim-itl-ms", str(args.itl_ms)]
    with gateways_sharing_prefix(2, prefix=f"rapport-bench:{uuid.uuid4().hex[:8]}:", redis_url=args.redis_url,
                                 extra=flags, name="rapport-resume-gateway", timeout=90) as gateways:
        print(f"two gateways on ports {gateways[0].port} and {gateways[1].port} "
              f"(simulated engine: ttft {args.ttft_ms} ms, itl {args.itl_ms} ms); "
              f"logs in {gateways[0].log_path} and {gateways[1].log_path}", file=sys.stderr)
        try:
            import uvloop  # the client side should add as little as it can to what is measured
        except ImportError:
            asyncio.run(measure(args, gateways))
        else:
            uvloop.run(measure(args, gateways))


if __name__ == "__main__":
    main()
