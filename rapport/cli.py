"""The ``rapport`` command line: serve, token, chat, prepare-model, audit, export (and the
tools that later issues add: bench, eval)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from server.config import ConfigError, Settings, add_arguments, settings_from


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if settings.worker_count() > 1:
        from server.workers import run_workers

        return run_workers(settings)
    from server.serving import serve

    serve(settings)
    return 0


def _token(args: argparse.Namespace) -> int:
    from server.auth import Authenticator

    settings = settings_from(args)
    if settings.jwks_url:
        raise ConfigError("with --jwks-url tokens come from the identity provider; rapport token signs "
                          "with --jwt-secret only")
    auth = Authenticator(secret=settings.jwt_secret, algorithm=settings.jwt_algorithm,
                         roles_claim=settings.roles_claim, issuer=settings.jwt_issuer,
                         audience=tuple(settings.jwt_audience))
    print(auth.issue(args.user, ttl_s=args.ttl, roles=args.role or ()))
    return 0


def _audit_tail(args: argparse.Namespace) -> int:
    """Print the newest audit entries as JSON lines; with --follow, then every new one."""
    import redis

    from server.audit import entry_from
    from sessions.keys import KeySpace

    if args.count < 0:
        raise ConfigError("--count must be >= 0")
    if not args.redis_prefix:
        raise ConfigError("--redis-prefix must not be empty")
    key = KeySpace(args.redis_prefix).audit()
    from server.redis_clients import RedisUrlError, sync_client

    # One server or a Redis Cluster (redis+cluster://), as --redis-url says.
    try:
        client: Any = sync_client(args.redis_url, decode_responses=True, socket_connect_timeout=5.0,
                                  socket_timeout=30.0)
    except RedisUrlError as exc:
        raise ConfigError(exc.message) from None
    try:
        newest: list[Any] = client.xrevrange(key, count=max(1, args.count))
        rows = list(reversed(newest))[-args.count:] if args.count else []
        # Follow from the newest entry's id (not "$": entries appended between two reads must not be missed).
        last = newest[0][0] if newest else "0-0"
        for entry_id, fields in rows:
            _print_entry(entry_from(entry_id, fields), args.kind)
        while args.follow:
            answer = client.xread({key: last}, block=5000, count=100)
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    last = entry_id
                    _print_entry(entry_from(entry_id, fields), args.kind)
    except redis.RedisError as exc:
        print(f"rapport: cannot read the audit log at {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def _print_entry(entry: dict[str, str], kind: str | None) -> None:
    if kind is None or entry.get("kind") == kind:
        print(json.dumps(entry, ensure_ascii=False), flush=True)


def _prepare_model(args: argparse.Namespace) -> int:
    from server.model_prep import prepare_default_model

    print(prepare_default_model())
    return 0


def _prepare_lora(args: argparse.Namespace) -> int:
    from server.lora_prep import prepare_lora_command

    return prepare_lora_command(args)


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
    token.add_argument("--role", action="append", choices=["operator", "admin"],
                       help="put this role in the token's roles claim (repeatable)")
    add_arguments(token)
    token.set_defaults(func=_token)

    audit = sub.add_parser("audit", help="read the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    tail = audit_sub.add_parser("tail", help="print the newest audit entries as JSON lines")
    tail.add_argument("--redis-url", default=os.environ.get("RAPPORT_REDIS_URL", Settings().redis_url),
                      help="the Redis the gateways use (env RAPPORT_REDIS_URL)")
    tail.add_argument("--redis-prefix", default=os.environ.get("RAPPORT_REDIS_PREFIX", Settings().redis_prefix),
                      help="the gateways' key prefix (env RAPPORT_REDIS_PREFIX)")
    tail.add_argument("--count", "-n", type=int, default=20, help="newest entries to print first (default 20)")
    tail.add_argument("--kind", help="only entries of this kind (auth_failure, admin_action, ...)")
    tail.add_argument("--follow", "-f", action="store_true", help="then keep printing new entries")
    tail.set_defaults(func=_audit_tail)

    from server.export import add_export_arguments, export_command

    export = sub.add_parser("export", help="write rated and chosen replies as training data (TRL JSON Lines)")
    add_export_arguments(export)
    export.set_defaults(func=export_command)

    prep = sub.add_parser("prepare-model", help="convert the small CPU model shipped on PyPI, once")
    prep.set_defaults(func=_prepare_model)

    from server.lora_prep import add_prepare_lora_arguments

    prep_lora = sub.add_parser("prepare-lora", help="build a small LoRA adapter for the default model, once")
    add_prepare_lora_arguments(prep_lora)
    prep_lora.set_defaults(func=_prepare_lora)

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
