"""Single-node Redis durability: what a crash of the only Redis costs, with AOF
``appendfsync everysec`` and ``always``.

For each mode: a private ``redis-server`` with an append-only file in a
directory of its own, one ``rapport serve`` gateway on it (simulated engine,
short replies), and ``--users`` clients that each run turns in a loop. After
``--kill-after`` seconds the Redis server is SIGKILLed and at once restarted on
the same port and directory (it replays its AOF); the clients keep going,
retrying with a short backoff on ``error`` frames and lost sockets (a turn
whose socket dropped is resumed from the last seq held), until ``--seconds``.
Then, from the restarted Redis:

* ``acked``: turns whose ``turn.end`` a client received;
* ``acked lost``: of those, turns whose user message, or whose assistant
  message with the ``turn.end`` text, is missing from the user's history;
* ``deltas lost`` / ``deltas dup``: seq gaps and repeats in the deltas a client
  received for a turn it followed to its end (including ``turn.end.seq``);
* ``recovery s``: from the kill to the first ``turn.end`` received after the
  restarted Redis answered; ``new turn s``: from the kill to the first
  ``turn.end`` of a turn accepted after the restart (a complete new turn).

Usage::

    python bench/redis_durability.py --users 50 --mode both --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Runnable as `python bench/redis_durability.py` from a checkout: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from clients.driver import Driver
from clients.errors import ClientError
from protocol import client_frames
from sessions.keys import KeySpace
from sessions.store import ConversationStore
from testkit.redis_server import RedisServer
from testkit.servers import ServerProcess


@dataclass
class Acked:
    user: str
    turn_id: str
    message: str
    reply: str
    finish_reason: str


@dataclass
class Tally:
    acked: list[Acked] = field(default_factory=list)
    deltas_lost: int = 0
    deltas_dup: int = 0
    turns_followed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    # (time turn.end arrived, time its turn.accepted arrived)
    ends: list[tuple[float, float]] = field(default_factory=list)


async def user_loop(url: str, user: str, tally: Tally, stop_at: list[float], args: argparse.Namespace) -> None:
    driver: Driver | None = None
    n = 0
    try:
        while time.monotonic() < stop_at[0]:
            n += 1
            message = f"{user} message {n}"
            cid = client_frames.new_client_turn_id()
            turn_id: str | None = None
            accepted_at = 0.0
            last = 0
            lost = dup = 0
            while time.monotonic() < stop_at[0] + args.grace:
                try:
                    if driver is None:
                        driver = await Driver.open(url, user=user, open_timeout=10)
                    if turn_id is None:
                        await driver.send(client_frames.turn_start(message, client_turn_id=cid))
                    else:
                        await driver.send(client_frames.turn_resume(turn_id, last))
                    retry = False
                    while not retry:
                        frame = await driver.recv(timeout=30)
                        kind = frame["type"]
                        if kind == "turn.accepted":
                            turn_id = frame["turn_id"]
                            accepted_at = time.monotonic()
                        elif kind == "turn.delta":
                            seq = int(frame["seq"])
                            if seq <= last:
                                dup += 1
                            else:
                                lost += seq - last - 1
                                last = seq
                        elif kind == "turn.end":
                            if turn_id is None:  # a replayed end answers the re-sent turn.start
                                turn_id = frame["turn_id"]
                            end_seq = int(frame.get("seq") or 0)
                            if not frame.get("replayed") and end_seq > last:
                                lost += end_seq - last
                            tally.acked.append(Acked(user, str(frame["turn_id"]), message,
                                                     str(frame.get("text", "")), str(frame.get("finish_reason"))))
                            tally.ends.append((time.monotonic(), accepted_at))
                            tally.deltas_lost += lost
                            tally.deltas_dup += dup
                            tally.turns_followed += 1
                            break
                        elif kind == "error":
                            code = str(frame.get("code"))
                            tally.errors[code] = tally.errors.get(code, 0) + 1
                            retry = True
                        elif kind == "ping":
                            await driver.send(client_frames.pong(frame.get("t")))
                    if not retry:
                        break  # the turn ended
                except (ClientError, TimeoutError, OSError) as exc:
                    name = type(exc).__name__
                    tally.errors[name] = tally.errors.get(name, 0) + 1
                    if driver is not None:
                        driver.abort()
                        driver = None
                    tally.reconnects += 1
                await asyncio.sleep(args.backoff_ms / 1000.0)
    finally:
        if driver is not None:
            driver.abort()


async def count_lost(redis_url: str, prefix: str, acked: list[Acked]) -> int:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        store = ConversationStore(client, KeySpace(prefix))
        lost = 0
        by_user: dict[str, list[Acked]] = {}
        for a in acked:
            by_user.setdefault(a.user, []).append(a)
        for user, turns in by_user.items():
            history = await store.history(user_id=user, conversation_id="default", limit=1000)
            users = {(m.turn_id, m.text) for m in history if m.role == "user"}
            replies = {(m.turn_id, m.text) for m in history if m.role == "assistant"}
            for a in turns:
                if (a.turn_id, a.message) not in users or (a.turn_id, a.reply) not in replies:
                    lost += 1
        return lost
    finally:
        await client.aclose()


async def run_load(gateway: ServerProcess, redis_server: RedisServer, args: argparse.Namespace,
                   tag: str) -> dict[str, Any]:
    tally = Tally()
    started = time.monotonic()
    stop_at = [started + args.seconds]
    users = [f"dur-{tag}-{i}" for i in range(args.users)]
    tasks = [asyncio.create_task(user_loop(gateway.ws_url, u, tally, stop_at, args)) for u in users]
    await asyncio.sleep(args.kill_after)
    acked_before = len(tally.acked)
    killed_at = time.monotonic()
    redis_server.kill()
    await asyncio.to_thread(redis_server.start)  # same port, same directory: replays the AOF
    restarted_at = time.monotonic()
    done, pending = await asyncio.wait(tasks, timeout=args.seconds + args.grace + 40)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    after = [t for t, _ in tally.ends if t >= restarted_at]
    new = [t for t, acc in tally.ends if acc >= restarted_at]
    lost = await count_lost(redis_server.url, gateway.prefix, tally.acked)
    return {
        "mode": args.current_mode,
        "acked": len(tally.acked),
        "acked_before_kill": acked_before,
        "acked_lost": lost,
        "deltas_lost": tally.deltas_lost,
        "deltas_dup": tally.deltas_dup,
        "restart_s": restarted_at - killed_at,
        "recovery_s": (min(after) - killed_at) if after else None,
        "new_turn_s": (min(new) - killed_at) if new else None,
        "errors": tally.errors,
        "reconnects": tally.reconnects,
        "finish_reasons": _count(a.finish_reason for a in tally.acked),
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def one_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    args.current_mode = mode
    redis_server = RedisServer(appendfsync=mode)
    gateway: ServerProcess | None = None
    try:
        redis_server.start()
        tag = uuid.uuid4().hex[:6]
        gateway = ServerProcess(prefix=f"rapport-bench:{tag}:", redis_url=redis_server.url,
                                extra=SERVER_FLAGS + ["--sim-itl-ms", str(args.itl_ms),
                                                      "--sim-reply-tokens", str(args.reply_tokens)],
                                name="rapport-durability-gateway")
        gateway.start(timeout=90)
        print(f"  {mode}: redis on port {redis_server.port}, gateway on {gateway.port} "
              f"(log {gateway.log_path})", file=sys.stderr)
        return asyncio.run(run_load(gateway, redis_server, args, tag))
    finally:
        if gateway is not None:
            gateway.stop()
        redis_server.cleanup()


SERVER_FLAGS = ["--auth", "dev", "--engine", "simulated", "--sim-ttft-ms", "20",
                "--turns-per-minute", "1000000", "--max-connections-per-user", "64"]


def _s(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:10.2f}"


def report(rows: list[dict[str, Any]]) -> None:
    print()
    print(f"{'mode':9} {'acked':>7} {'acked lost':>10} {'deltas lost':>11} {'deltas dup':>10}"
          f" {'recovery s':>10} {'new turn s':>10}")
    for r in rows:
        print(f"{r['mode']:9} {r['acked']:7d} {r['acked_lost']:10d} {r['deltas_lost']:11d} {r['deltas_dup']:10d}"
              f" {_s(r['recovery_s'])} {_s(r['new_turn_s'])}")
    for r in rows:
        print(f"{r['mode']}: {r['acked_before_kill']} acked before the kill; redis back in {r['restart_s']:.2f} s;"
              f" finish reasons {r['finish_reasons']}; client errors {r['errors']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--mode", choices=["everysec", "always", "both"], default="both")
    p.add_argument("--seconds", type=float, default=20.0, help="load per mode, from its start")
    p.add_argument("--kill-after", type=float, default=5.0, help="seconds of load before the SIGKILL")
    p.add_argument("--grace", type=float, default=10.0, help="seconds a turn in flight may finish after --seconds")
    p.add_argument("--backoff-ms", type=float, default=100.0, help="pause before a retry")
    p.add_argument("--reply-tokens", type=int, default=20)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    modes = ["everysec", "always"] if args.mode == "both" else [args.mode]
    rows = [one_mode(mode, args) for mode in modes]
    report(rows)
    if args.json:
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
