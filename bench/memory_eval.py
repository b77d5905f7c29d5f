"""Conversation memory, with and without: two gateways, one eval, the columns side by side.

The memory issue asks for recall far outside the prompt window, measured with
memory and without. This script starts two ``rapport serve`` gateways on the
same engine kind, both with a short window (``--max-history-turns 8``):

* **with memory**: ``--memory-summaries`` (turns the window drops are folded
  into a running summary, server/summaries.py), and the eval pins each
  scenario's ``remember`` facts with ``memory.add`` (docs/protocol.md,
  addition 22);
* **without memory**: ``--no-memory-summaries``, and the eval sends the same
  facts as the conversation's first user messages (``rapport eval --memory
  off``), so they live only in history.

Then it plays ``fact-recall-32`` (facts in turn 1, asked 32 turns later) and
``pinned-facts`` (three remembered facts, twelve turns of small talk, one
question per fact) on both at temperature 0 (``clients.eval``; targets one
after the other, so they never compete for the hardware), prints the table
and the failing checks, and stops the servers (deleting their Redis keys).

Usage::

    python bench/memory_eval.py                                  # vLLM, the small CPU model
    python bench/memory_eval.py --model Qwen/Qwen3-8B --max-model-len 8192   # on a GPU
    python bench/memory_eval.py --engine simulated --sim-echo    # plumbing dry run, seconds

Each vLLM gateway loads its own copy of the model (both run at once), so a
GPU must hold two: add ``--serve-arg=--vllm-arg=gpu_memory_utilization=0.45``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.eval import EvalConfig, TargetSpec, render_failures, render_table, report_to_dict, run_eval
from clients.eval_scenarios import load_scenarios
from testkit.redis_prefix import DEFAULT_REDIS_URL, clean_prefix
from testkit.servers import ServerProcess, running

DEFAULT_SCENARIOS = ("fact-recall-32", "pinned-facts")
WITH_MEMORY = "with memory"
WITHOUT_MEMORY = "without memory"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("vllm", "simulated"), default="vllm",
                   help="engine of both gateways (default vllm; simulated for a dry run)")
    p.add_argument("--model", default=None, help="--model of both gateways (default: the small CPU model)")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--kv-cache-gib", default="1", help="vLLM's CPU KV cache per gateway (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--sim-echo", action="store_true", help="simulated engine: replies repeat the user's message")
    p.add_argument("--max-history-turns", type=int, default=8, help="both gateways' prompt window (default 8)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply length of every turn (options.max_tokens; default: the server's)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                   help="one more `rapport serve` argument for both gateways (repeatable; "
                        "write --serve-arg=--flag=value)")
    p.add_argument("--scenario", action="append", default=None,
                   help=f"scenario name or file (repeatable; default {' '.join(DEFAULT_SCENARIOS)})")
    p.add_argument("--repeat", type=int, default=1, help="play each scenario N times per gateway")
    p.add_argument("--turn-timeout-s", type=float, default=600.0, help="give up on a turn after this long")
    p.add_argument("--startup-timeout-s", type=float, default=600.0, help="wait this long for a gateway to load")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--log-dir", default=None, help="gateway logs (default: a new temporary directory)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the eval report")
    return p.parse_args(argv)


def serve_flags(args: argparse.Namespace, *, memory: bool) -> list[str]:
    """One gateway's flags: the same for both but for --(no-)memory-summaries."""
    flags = ["--engine", args.engine, "--auth", "dev", "--default-temperature", "0",
             "--max-history-turns", str(args.max_history_turns),
             # A slow CPU is measured, not refused: the eval counts TTFT over its budget itself.
             "--ttft-budget-ms", "600000", "--hard-deadline-ms", "600000",
             "--turns-per-minute", "100000",
             "--memory-summaries" if memory else "--no-memory-summaries"]
    if args.engine == "vllm":
        if args.model:
            flags += ["--model", args.model]
        if args.max_model_len:
            flags += ["--max-model-len", str(args.max_model_len)]
    elif args.sim_echo:
        flags.append("--sim-echo")
    return [*flags, *args.serve_arg]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = load_scenarios(args.scenario or list(DEFAULT_SCENARIOS))
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="rapport-memory-eval-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)} if args.engine == "vllm" else None
    servers = {
        memory: ServerProcess(prefix=f"rapport-memory-eval:{run_id}:{int(memory)}:", redis_url=args.redis_url,
                              extra=serve_flags(args, memory=memory), env=env, log_dir=log_dir,
                              name=f"rapport-memory-{'on' if memory else 'off'}")
        for memory in (True, False)
    }
    for memory, server in servers.items():
        print(f"{WITH_MEMORY if memory else WITHOUT_MEMORY}: rapport serve "
              f"{shlex.join(server.extra)}  (log {server.log_path})", file=sys.stderr)
    started = time.monotonic()
    try:
        with running(*servers.values(), timeout=args.startup_timeout_s):
            print(f"gateways ready after {time.monotonic() - started:.0f} s", file=sys.stderr)
            cfg = EvalConfig(
                targets=[TargetSpec(servers[True].ws_url, WITH_MEMORY, memory=True),
                         TargetSpec(servers[False].ws_url, WITHOUT_MEMORY, memory=False)],
                scenarios=scenarios, repeat=args.repeat, max_tokens=args.max_tokens, dev_users=True,
                turn_timeout_s=args.turn_timeout_s,
                progress=lambda line: print(line, file=sys.stderr, flush=True))
            report = asyncio.run(run_eval(cfg))
    finally:
        for server in servers.values():
            clean_prefix(server.prefix, args.redis_url)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report_to_dict(report), ensure_ascii=False, indent=2) + "\n",
                                        encoding="utf-8")
    print(render_table(report.summaries))
    print()
    print(render_failures(report.failures()))
    print(f"\n(eval {report.duration_s:.0f} s, {time.monotonic() - started:.0f} s in all; "
          f"--max-history-turns {args.max_history_turns}, engine {args.engine})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
