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
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    def __init__(self, args: argparse.Namespace, prefix: str, log_dir: str) -> None:
        self.port = free_port()
        self.log_path = os.path.join(log_dir, f"gateway-{self.port}.log")
        self.cmd = [
            sys.executable, "-m", "rapport.cli", "serve", "--port", str(self.port),
            "--redis-url", args.redis_url, "--redis-prefix", prefix, "--auth", "dev",
            "--engine", "simulated", "--sim-ttft-ms", str(args.ttft_ms), "--sim-itl-ms", str(args.itl_ms),
            "--sim-reply-tokens", "1000", "--turns-per-minute", "1000000",
            "--max-connections-per-user", "64", "--log-level", "warning",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited; see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def clean_prefix(url: str, prefix: str) -> None:
    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])
    finally:
        r.close()


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


async def open_ready(url: str, user: str, marks: list[float] | None = None):
    ws = await connect(url, subprotocols=["rapport.v1.json"], max_size=None, ping_interval=None,
                       open_timeout=30)
    if marks is not None:
        marks.append(time.perf_counter())
    await ws.send(json.dumps({"type": "hello", "user": user}))
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "ready":
            return ws
        if frame["type"] == "error" and frame.get("code") == "unauthorized":
            raise RuntimeError(frame)


async def next_of(ws, kinds: tuple[str, ...]) -> tuple[dict, float]:
    while True:
        raw = await ws.recv()
        t = time.perf_counter()
        frame = json.loads(raw)
        if frame["type"] in kinds:
            return frame, t
        if frame["type"] == "error":
            raise RuntimeError(frame)


async def one_drop(index: int, mode: str, gateways: list[Gateway], user: str, args: argparse.Namespace,
                   rng: random.Random) -> Drop:
    origin = index % 2
    cross = (index // 2) % 2 == 1
    target = 1 - origin if cross else origin
    k = rng.randint(args.min_seq, args.max_seq)
    ws = await open_ready(gateways[origin].url, user)
    await ws.send(json.dumps({"type": "turn.start", "client_turn_id": uuid.uuid4().hex,
                              "text": f"drop {index}: tell me about your day",
                              "options": {"max_tokens": args.max_seq + 20}}))
    accepted, _ = await next_of(ws, ("turn.accepted",))
    turn_id = accepted["turn_id"]
    arrivals: list[float] = []
    while len(arrivals) < k:
        delta, t = await next_of(ws, ("turn.delta",))
        assert delta["seq"] == len(arrivals) + 1, delta
        arrivals.append(t)
    ws.transport.abort()  # the network drops: no close frame
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    cadence = statistics.median(gaps) if gaps else args.itl_ms / 1000.0
    next_due = arrivals[-1] + cadence  # when delta k+1 would have arrived without the drop
    if mode == "backlog":
        await asyncio.sleep(args.wait_tokens * args.itl_ms / 1000.0)

    t_open = time.perf_counter()
    marks: list[float] = []
    ws2 = await open_ready(gateways[target].url, user, marks)
    t_resume = time.perf_counter()
    await ws2.send(json.dumps({"type": "turn.resume", "turn_id": turn_id, "after_seq": k}))
    first, t_first = await next_of(ws2, ("turn.delta", "turn.end"))
    if first["type"] != "turn.delta" or first["seq"] != k + 1:
        raise RuntimeError(f"resume after {k} answered {first}")
    # Let the turn go: cancel it and wait for its end, so the conversation is free.
    await ws2.send(json.dumps({"type": "turn.cancel", "turn_id": turn_id}))
    await next_of(ws2, ("turn.end",))
    await ws2.close()
    wait = max(0.0, next_due - t_resume)
    return Drop(mode=mode, target="cross" if cross else "same", after_seq=k,
                reconnect_ms=(t_first - t_open) * 1000.0, resume_ms=(t_first - t_resume) * 1000.0,
                upgrade_ms=(marks[0] - t_open) * 1000.0, hello_ms=(t_resume - marks[0]) * 1000.0,
                engine_wait=next_due > t_resume, engine_wait_ms=wait * 1000.0)


async def run_mode(mode: str, gateways: list[Gateway], args: argparse.Namespace) -> list[Drop]:
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


def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100.0 * len(s)) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95), "p99": pct(values, 99),
            "max": max(values) if values else math.nan}


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
                "reconnect_ms": summary([d.reconnect_ms for d in ds]),
                "resume_ms": summary([d.resume_ms for d in ds]),
                "upgrade_ms": summary([d.upgrade_ms for d in ds]),
                "hello_ready_ms": summary([d.hello_ms for d in ds]),
                "engine_wait_cases": len(waited),
                "engine_wait_ms_mean": statistics.fmean([d.engine_wait_ms for d in waited]) if waited else 0.0,
                "resume_ms_without_engine_wait": summary([d.resume_ms for d in ds if not d.engine_wait]),
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
        print(f"{mode:8} {target:8} {measure:30} {s['n']:5d} {s['p50']:8.2f} {s['p95']:8.2f} {s['p99']:8.2f}"
              f" {s['max']:8.2f} {waited:11d}")
    print("(milliseconds; engine-wait: drops whose first missing delta was due after the resume was sent)")
    return result


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


async def amain(args: argparse.Namespace) -> dict:
    prefix = f"rapport-bench:{uuid.uuid4().hex[:8]}:"
    log_dir = tempfile.mkdtemp(prefix="rapport-bench-")
    gateways = [Gateway(args, prefix, log_dir) for _ in range(2)]
    try:
        for g in gateways:
            g.start()
        for g in gateways:
            await asyncio.to_thread(g.wait_ready)
        print(f"two gateways on ports {gateways[0].port} and {gateways[1].port} "
              f"(simulated engine: ttft {args.ttft_ms} ms, itl {args.itl_ms} ms); logs in {log_dir}",
              file=sys.stderr)
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
    finally:
        for g in gateways:
            g.stop()
        clean_prefix(args.redis_url, prefix)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop  # the client side should add as little as it can to what is measured
    except ImportError:
        asyncio.run(amain(args))
    else:
        uvloop.run(amain(args))


if __name__ == "__main__":
    main()
