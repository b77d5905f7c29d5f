"""The ``rapport`` command line: serve, token, chat, prepare-model (and the tools
that later issues add: bench, eval)."""

from __future__ import annotations

import argparse
import sys

from server.config import ConfigError, add_arguments, settings_from


def _serve(args: argparse.Namespace) -> int:
    from server.serving import serve

    serve(settings_from(args))
    return 0


def _token(args: argparse.Namespace) -> int:
    from server.auth import Authenticator

    settings = settings_from(args)
    auth = Authenticator(secret=settings.jwt_secret, algorithm=settings.jwt_algorithm)
    print(auth.issue(args.user, ttl_s=args.ttl))
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from server.model_prep import prepare_default_model

    print(prepare_default_model())
    return 0


def _chat(args: argparse.Namespace) -> int:
    from clients.chat import chat_command

    return chat_command(args) or 0


def _bench(args: argparse.Namespace) -> int:
    from clients.bench import bench_command

    return bench_command(args)


def _eval(args: argparse.Namespace) -> int:
    from clients.eval import eval_command

    return eval_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapport", description="Rapport: real-time chat backend for AI companions")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="print a JWT for USER signed with the configured secret")
    token.add_argument("user")
    token.add_argument("--ttl", type=int, default=86400, help="lifetime in seconds (default 1 day)")
    add_arguments(token)
    token.set_defaults(func=_token)

    prep = sub.add_parser("prepare-model", help="convert the small CPU model shipped on PyPI, once")
    prep.set_defaults(func=_prepare_model)

    from clients.bench import add_bench_arguments
    from clients.chat import add_chat_arguments
    from clients.eval import add_eval_arguments

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    add_chat_arguments(chat)
    chat.set_defaults(func=_chat)

    bench = sub.add_parser("bench", help="load generator: many users chatting against a running server")
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    evaluate = sub.add_parser("eval", help="score scripted conversations against one or more servers")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"rapport: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
