"""``rapport export``: the stored training snapshots as JSON Lines TRL's trainers read.

    rapport export --format dpo|sft [--since 2026-01-31 | 7d] [--character ID] [--output FILE]

It reads Redis directly (the gateways' ``--redis-url`` and ``--redis-prefix``,
or ``RAPPORT_REDIS_URL`` / ``RAPPORT_REDIS_PREFIX``), so no server needs to run.
Rows go to ``--output`` (written to a temporary file beside it and renamed at
the end, so a failed export never leaves half a file) or to stdout; a summary
goes to stderr. Which replies become rows: :mod:`sessions.training_export`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from protocol.errors import RapportError
from sessions.keys import KeySpace
from sessions.training import TrainingLog, TrainingRecord
from sessions.training_export import dpo_rows, sft_rows

from .config import ConfigError, Settings
from .redis_clients import async_client

__all__ = ["ExportSummary", "add_export_arguments", "export_command", "parse_since", "write_rows"]

FORMATS: dict[str, Callable[[TrainingRecord], list[dict[str, Any]]]] = {"dpo": dpo_rows, "sft": sft_rows}

_DURATION = re.compile(r"\A\s*(\d{1,9})\s*([smhdw])\s*\Z", re.IGNORECASE)
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


@dataclass(frozen=True, slots=True)
class ExportSummary:
    rows: int
    exchanges: int  # exchanges that gave at least one row
    records: int  # exchanges read


def parse_since(value: str, now_ms: int) -> int:
    """``--since``: a duration back from now (``90m``, ``12h``, ``7d``, ``2w``) or an ISO-8601
    date or date-time (UTC unless it names an offset); milliseconds since the epoch."""
    duration = _DURATION.match(value)
    if duration is not None:
        return now_ms - int(duration.group(1)) * _UNIT_MS[duration.group(2).lower()]
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(f"--since {value!r} is neither an ISO-8601 date (2026-01-31, "
                          "2026-01-31T12:00:00Z) nor a duration (30m, 12h, 7d, 2w)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


async def write_rows(log: TrainingLog, out: TextIO, *, fmt: str, since_ms: int | None,
                     character_id: str | None) -> ExportSummary:
    """Write one JSON line per row of every matching record to ``out``."""
    make_rows = FORMATS[fmt]
    rows = exchanges = records = 0
    async for record in log.iter_records(since_ms=since_ms, character_id=character_id):
        records += 1
        made = make_rows(record)
        if made:
            exchanges += 1
        for row in made:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows += 1
    return ExportSummary(rows=rows, exchanges=exchanges, records=records)


async def _export(redis_url: str, prefix: str, out: TextIO, *, fmt: str, since_ms: int | None,
                  character_id: str | None) -> ExportSummary:
    # One server or a Redis Cluster, as the URL says.
    client = async_client(redis_url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=30.0)
    try:
        return await write_rows(TrainingLog(client, KeySpace(prefix)), out, fmt=fmt, since_ms=since_ms,
                                character_id=character_id)
    finally:
        await client.aclose()


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="dpo: preference pairs (TRL DPOTrainer); sft: chosen conversations (TRL SFTTrainer)")
    parser.add_argument("--since", help="only exchanges rated or chosen since: an ISO-8601 date or date-time "
                                        "(UTC unless an offset is given) or a duration back from now (7d, 12h)")
    parser.add_argument("--character", help="only exchanges of conversations bound to this character id")
    parser.add_argument("--output", "-o", help="write the JSON Lines here (default: stdout)")
    parser.add_argument("--redis-url", default=os.environ.get("RAPPORT_REDIS_URL", Settings().redis_url),
                        help="the Redis the gateways use (env RAPPORT_REDIS_URL)")
    parser.add_argument("--redis-prefix", default=os.environ.get("RAPPORT_REDIS_PREFIX", Settings().redis_prefix),
                        help="the gateways' key prefix (env RAPPORT_REDIS_PREFIX)")


def export_command(args: argparse.Namespace) -> int:
    if not args.redis_prefix:
        raise ConfigError("--redis-prefix must not be empty")
    since_ms = parse_since(args.since, int(time.time() * 1000)) if args.since else None
    run = _export_to_file if args.output else _export_to_stdout
    try:
        summary = run(args, since_ms)
    except (RapportError, OSError) as exc:
        message = exc.message if isinstance(exc, RapportError) else str(exc)
        print(f"rapport export: cannot export from {args.redis_url}: {message}", file=sys.stderr)
        return 1
    where = args.output or "stdout"
    print(f"rapport export: {summary.rows} {args.format} rows from {summary.exchanges} exchanges "
          f"({summary.records} read) to {where}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace, since_ms: int | None, out: TextIO) -> ExportSummary:
    return asyncio.run(_export(args.redis_url, args.redis_prefix, out, fmt=args.format, since_ms=since_ms,
                               character_id=args.character))


def _export_to_stdout(args: argparse.Namespace, since_ms: int | None) -> ExportSummary:
    summary = _run(args, since_ms, sys.stdout)
    sys.stdout.flush()
    return summary


def _export_to_file(args: argparse.Namespace, since_ms: int | None) -> ExportSummary:
    target = Path(args.output)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            summary = _run(args, since_ms, out)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return summary
