"""CPU per delivered delta: Rapport's gateway beside the fan-out limit of its own stack.

Wall-clock latency on a shared 2-core machine moves with whatever else runs;
the CPU a process spends per unit of work barely does. So this script reads
each server process's own CPU counters (utime + stime from ``/proc/PID/stat``)
over the load window and divides by what the client counted as delivered:

- **plain**: ``bench/plain_fanout.py``, Starlette + uvicorn (uvloop,
  websockets-sansio) that only JSON-encodes and sends small delta frames on
  the same step schedule: the floor for this stack (the "physical limit").
- **rapport json** / **rapport msgpack**: ``rapport serve --engine simulated
  --auth dev`` (per-user limits raised out of the way), the whole process
  counted: simulated engine, turn machine, fan-out, outbox, sender, metrics,
  delta-log writes and the Redis client.
- **redis**: the Redis server's own CPU over each window (its ``process_id``
  from ``INFO server``), per delta. Redis is shared: anything else using it
  during the window is counted too.

Load: ``clients.bench.run_bench`` (worker processes of uvloop + the lean
driver), ``--users`` users on their own sockets, ``--turns`` turns each with
think time; replies of ``--reply-tokens`` tokens at 40 ms / 20 ms per step,
``max_num_seqs`` 256. Every server gets a short warm-up run first; the window
runs from the moment every worker is connected to the end of the last turn.

    .venv/bin/python bench/cpu_cost.py
    .venv/bin/python bench/cpu_cost.py --users 1000 --json cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.bench import BenchConfig, RunHooks, run_bench  # noqa: E402
from testkit.ports import free_port  # noqa: E402
from testkit.procstats import cpu_seconds  # noqa: E402
from testkit.redis_prefix import DEFAULT_REDIS_URL, clean_prefix  # noqa: E402
from testkit.servers import ChildServer, ServerProcess  # noqa: E402

SIM_TTFT_MS = 40
SIM_ITL_MS = 20
MAX_NUM_SEQS = 256
LIMIT_FLAGS = ["--turns-per-minute", "1000000", "--max-connections-per-user", "100000"]


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def user_system_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process: what it ran itself, and what the kernel ran for it (socket writes)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def redis_pid(url: str) -> int | None:
    """The Redis server's pid, when it runs on this machine (its /proc entry is readable)."""
    r = redis.Redis.from_url(url)
    try:
        pid = int(r.info("server")["process_id"])
    finally:
        r.close()
    return pid if os.path.exists(f"/proc/{pid}/stat") else None


def redis_commands(url: str) -> int:
    """Commands the Redis server has processed since it started (every client's)."""
    r = redis.Redis.from_url(url)
    try:
        return int(r.info("stats")["total_commands_processed"])
    finally:
        r.close()


class Window:
    """CPU of the server (and Redis) from the moment the workers go to the end of the run."""

    def __init__(self, server_pid: int, redis_pid: int | None, redis_url: str) -> None:
        self.server_pid = server_pid
        self.redis_pid = redis_pid
        self.redis_url = redis_url
        self.commands0 = 0
        self.t0 = self.cpu0 = self.redis0 = self.sys0 = 0.0
        self.la0 = 0.0

    def start(self, _t0: float) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = cpu_seconds(self.server_pid)
        self.sys0 = user_system_s(self.server_pid)[1]
        self.redis0 = cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        self.la0 = loadavg()
        self.commands0 = redis_commands(self.redis_url)

    def end(self) -> dict[str, Any]:
        return {"wall_s": round(time.monotonic() - self.t0, 3),
                "server_cpu_s": round(cpu_seconds(self.server_pid) - self.cpu0, 3),
                "server_sys_s": round(user_system_s(self.server_pid)[1] - self.sys0, 3),
                "redis_cpu_s": (round(cpu_seconds(self.redis_pid) - self.redis0, 3) if self.redis_pid else None),
                "redis_commands": redis_commands(self.redis_url) - self.commands0,
                "loadavg_start": self.la0, "loadavg_end": loadavg()}


def config(url: str, args: argparse.Namespace, *, msgpack: bool, users: int, turns: int) -> BenchConfig:
    return BenchConfig(url=url, users=users, turns=turns, think_ms=args.think_ms, ramp_s=args.ramp_s,
                       msgpack=msgpack, dev_users=True, user_prefix=f"cpu-{uuid.uuid4().hex[:6]}-",
                       processes=args.processes, progress=False, deflate=False, conversation_id="chat",
                       seed=args.seed)


def measure(name: str, server: ChildServer, args: argparse.Namespace, rpid: int | None, *,
            msgpack: bool) -> dict[str, Any]:
    # A short warm-up: imports, caches and the first connections are not what is measured.
    run_bench(config(server.base.replace("http", "ws") + "/v1/ws", args, msgpack=msgpack,
                     users=min(20, args.users), turns=1))
    window = Window(server.pid, rpid, args.redis_url)
    report = run_bench(config(server.base.replace("http", "ws") + "/v1/ws", args, msgpack=msgpack,
                              users=args.users, turns=args.turns),
                       hooks=RunHooks(on_start=window.start))
    win = window.end()
    c = report["counts"]
    deltas, turns = c["deltas_received"], c["turns_completed"]
    row: dict[str, Any] = {
        "name": name, **win, "deltas": deltas, "turns": turns, "protocol_ok": report["protocol_ok"],
        "failed_turns": c.get("turns_failed", 0), "client_cpu_s": round(report["client_cpu_s"], 3),
        "us_per_delta": win["server_cpu_s"] / deltas * 1e6 if deltas else None,
        "us_per_turn": win["server_cpu_s"] / turns * 1e6 if turns else None,
        "redis_us_per_delta": (win["redis_cpu_s"] / deltas * 1e6 if deltas and win["redis_cpu_s"] is not None
                               else None),
    }
    print(f"  {name}: {deltas} deltas, {turns} turns in {win['wall_s']:.1f} s; server CPU {win['server_cpu_s']:.2f} s"
          f" ({row['us_per_delta'] or 0:.1f} us/delta, {win['server_sys_s']:.2f} s of it system); "
          f"{win['redis_commands'] / max(turns, 1):.1f} Redis commands per turn; "
          f"load average {win['loadavg_start']}-{win['loadavg_end']}",
          flush=True)
    return row


def run_plain(args: argparse.Namespace, rpid: int | None) -> dict[str, Any]:
    port = free_port()
    server = ChildServer([sys.executable, str(ROOT / "bench" / "plain_fanout.py"), "--port", str(port),
                          "--ttft-ms", str(SIM_TTFT_MS), "--itl-ms", str(SIM_ITL_MS),
                          "--reply-tokens", str(args.reply_tokens)],
                         port=port, ready_path="/readyz", name="plain-fanout", log_dir=args.log_dir)
    server.start()
    try:
        return measure("plain", server, args, rpid, msgpack=False)
    finally:
        server.stop()


def run_rapport(args: argparse.Namespace, rpid: int | None, *, msgpack: bool) -> dict[str, Any]:
    flags = ["--engine", "simulated", "--auth", "dev", "--sim-ttft-ms", str(SIM_TTFT_MS),
             "--sim-itl-ms", str(SIM_ITL_MS), "--sim-max-num-seqs", str(MAX_NUM_SEQS),
             "--sim-reply-tokens", str(args.reply_tokens), *LIMIT_FLAGS]
    server = ServerProcess(prefix=f"cpu-cost:{uuid.uuid4().hex[:8]}:", redis_url=args.redis_url, extra=flags,
                           name="gateway-cpu", log_dir=args.log_dir)
    server.start()
    try:
        return measure("rapport msgpack" if msgpack else "rapport json", server, args, rpid, msgpack=msgpack)
    finally:
        server.stop(timeout=30.0)
        clean_prefix(server.prefix, server.redis_url)


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One kind's rounds as one row: the median of each figure (a noisy neighbour inflates single rounds)."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key in ("server_cpu_s", "us_per_delta", "us_per_turn", "redis_us_per_delta"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["loadavg_start"] = min(r["loadavg_start"] for r in runs)
    out["loadavg_end"] = max(r["loadavg_end"] for r in runs)
    out["protocol_ok"] = all(r["protocol_ok"] for r in runs)
    return out


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    plain = next((r for r in rows if r["name"] == "plain"), None)
    base = plain["us_per_delta"] if plain else None
    lines = [f"{'run':<16} {'deltas':>8} {'turns':>6} {'CPU s':>7} {'us/delta':>9} {'us/turn':>9} "
             f"{'redis us/delta':>14} {'x plain':>8} {'load avg':>10} {'ok':>3}"]
    for r in rows:
        ratio = r["us_per_delta"] / base if base and r["us_per_delta"] else None
        lines.append(f"{r['name']:<16} {r['deltas']:>8} {r['turns']:>6} {r['server_cpu_s']:>7.2f} "
                     f"{fmt(r['us_per_delta']):>9} {fmt(r['us_per_turn'], 0):>9} {fmt(r['redis_us_per_delta']):>14} "
                     f"{fmt(ratio, 2):>8} {r['loadavg_start']:>4}-{r['loadavg_end']:<5} "
                     f"{'yes' if r['protocol_ok'] else 'NO':>3}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--users", type=int, default=300, help="users, each on its own socket (default 300)")
    p.add_argument("--turns", type=int, default=3, help="turns per user (default 3)")
    p.add_argument("--think-ms", type=float, default=1000.0, help="think time between turns (default 1000)")
    p.add_argument("--ramp-s", type=float, default=3.0, help="first turns spread over this (default 3)")
    p.add_argument("--reply-tokens", type=int, default=40, help="deltas per reply (default 40)")
    p.add_argument("--processes", type=int, default=2, help="load generator worker processes (default 2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of everything, alternating the order; the table shows each figure's median")
    p.add_argument("--only", action="append", choices=("plain", "json", "msgpack"),
                   help="run only these (repeatable; default all three)")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="where the servers' logs go (default: the temp dir)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write every figure as JSON")
    args = p.parse_args(argv)
    only = [k for k in ("plain", "json", "msgpack") if k in set(args.only or ("plain", "json", "msgpack"))]
    rpid = redis_pid(args.redis_url)
    print(f"cpu_cost: {args.users} users x {args.turns} turns, {args.reply_tokens} deltas per reply, "
          f"{args.processes} client processes, {os.cpu_count()} CPUs, load average {loadavg()}, "
          f"redis pid {rpid}, {args.repeat} round(s)", flush=True)
    runners = {"plain": lambda: run_plain(args, rpid), "json": lambda: run_rapport(args, rpid, msgpack=False),
               "msgpack": lambda: run_rapport(args, rpid, msgpack=True)}
    rounds: list[list[dict[str, Any]]] = []
    for i in range(args.repeat):
        # Every other round runs in reverse order, so load that drifts over the run hits each kind alike.
        order = only if i % 2 == 0 else only[::-1]
        done = {k: runners[k]() for k in order}
        rounds.append([done[k] for k in only])
    rows = [median_row([r[j] for r in rounds]) for j in range(len(only))]
    print()
    if args.repeat > 1:
        for i, r in enumerate(rounds):
            print(f"round {i + 1}\n{table(r)}\n")
        print(f"median of {args.repeat} rounds (per figure)")
    print(table(rows))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows, "rounds": rounds}, f, indent=2)
            f.write("\n")
    return 0 if all(r["protocol_ok"] and r["deltas"] for rr in rounds for r in rr) else 1


if __name__ == "__main__":
    sys.exit(main())
