"""``rapport export`` end to end: snapshots written through TrainingLog into the real
Redis, the command run as a subprocess, its JSON Lines loaded with the ``datasets``
library the way TRL's trainers load a local dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from server.config import ConfigError
from server.export import parse_since
from sessions.keys import KeySpace
from sessions.messages import ChatMessage
from sessions.store import ConversationStore
from sessions.training import Alternative, ExchangeSnapshot, TrainingLog
from testkit.redis_prefix import clean_prefix

REDIS_URL = "redis://127.0.0.1:6379/0"
RAPPORT = Path(sys.executable).with_name("rapport")
DAY_MS = 86_400_000


def snapshot(user: str, exchange: str, texts: list[str], *, character: str | None, selected: int | None = None,
             ) -> ExchangeSnapshot:
    return ExchangeSnapshot(
        user_id=user, conversation_id="c", exchange_id=exchange, character_id=character,
        prompt=(ChatMessage("system", f"You are {character}."), ChatMessage("user", f"{user} asks {exchange} «ü»")),
        alternatives=tuple(Alternative(turn_id=f"{exchange}-{i}", text=t, finish_reason="stop")
                           for i, t in enumerate(texts)),
        selected=None if selected is None else f"{exchange}-{selected}",
    )


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"rapport-test:{uuid4().hex}:"
    yield value
    clean_prefix(value, REDIS_URL)


@pytest.fixture
async def log(prefix: str) -> AsyncIterator[TrainingLog]:
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield TrainingLog(redis, KeySpace(prefix))
    finally:
        await redis.aclose()


def now_ms() -> int:
    return int(time.time() * 1000)


async def write_fixture(log: TrainingLog) -> None:
    """Four exchanges: two give DPO rows, one gives only an SFT row, one belongs to an erased user."""
    t = now_ms()
    # luna, 10 days ago: t0 +1, t1 -1, t2 unrated (no explicit choice): one pair.
    old = snapshot("alice", "a1", ["warm reply", "cold reply", "other"], character="luna")
    await log.record_rating(old, "a1-0", 1, None, t - 10 * DAY_MS)
    await log.record_rating(old, "a1-1", -1, "rude", t - 10 * DAY_MS)
    # max, an hour ago: b1 selected explicitly, so b0 and b2 are rejected: two pairs.
    await log.record_selection(snapshot("bob", "b1", ["x", "chosen one", "z"], character="max", selected=1),
                               t - 3_600_000)
    # luna, a minute ago: only a +1, no rejected side: no DPO row, one SFT row.
    await log.record_rating(snapshot("carol", "c1", ["lovely", "fine"], character="luna"), "c1-0", 1, None,
                            t - 60_000)
    # Erased user: the index member dangles.
    await log.record_rating(snapshot("dave", "d1", ["p", "q"], character="luna"), "d1-0", 1, None, t - 1_000)
    await log.record_rating(snapshot("dave", "d1", ["p", "q"], character="luna"), "d1-1", -1, None, t - 1_000)
    await ConversationStore(log.redis, log.keys).delete_user(user_id="dave")


def run_export(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RAPPORT), "export", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, encoding="utf-8")


def load(path: Path, cache: Path) -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))


async def test_dpo_export_loads_as_a_conversational_preference_dataset(log: TrainingLog, prefix: str,
                                                                       tmp_path: Path) -> None:
    await write_fixture(log)
    out = tmp_path / "dpo.jsonl"
    done = run_export("--format", "dpo", "--output", str(out), "--redis-url", REDIS_URL, "--redis-prefix", prefix)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "3 dpo rows from 2 exchanges (3 read)" in done.stderr

    data = load(out, tmp_path / "cache")
    assert sorted(data.column_names) == ["chosen", "prompt", "rejected"]
    assert data.num_rows == 3
    rows = data.to_list()
    # Oldest update first; within an exchange, generation order.
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("warm reply", "cold reply"), ("chosen one", "x"), ("chosen one", "z")]
    assert rows[0]["prompt"] == [{"role": "system", "content": "You are luna."},
                                 {"role": "user", "content": "alice asks a1 «ü»"}]
    for r in rows:
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
    # No temporary file is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["dpo.jsonl"]


async def test_sft_export_to_stdout_with_filters_from_the_environment(log: TrainingLog, prefix: str,
                                                                      tmp_path: Path) -> None:
    await write_fixture(log)
    env = {"RAPPORT_REDIS_URL": REDIS_URL, "RAPPORT_REDIS_PREFIX": prefix}
    done = run_export("--format", "sft", env=env)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["messages"][-1] for row in lines] == [{"role": "assistant", "content": "warm reply"},
                                                      {"role": "assistant", "content": "chosen one"},
                                                      {"role": "assistant", "content": "lovely"}]
    assert "3 sft rows from 3 exchanges" in done.stderr

    luna_recent = run_export("--format", "sft", "--character", "luna", "--since", "7d", env=env)
    assert luna_recent.returncode == 0, luna_recent.stderr
    assert [json.loads(line)["messages"][-1]["content"] for line in luna_recent.stdout.splitlines()] == ["lovely"]

    path = tmp_path / "sft.jsonl"
    path.write_text(done.stdout, encoding="utf-8")
    data = load(path, tmp_path / "cache")
    assert data.column_names == ["messages"]
    assert data.num_rows == 3
    assert data[2]["messages"][-1] == {"role": "assistant", "content": "lovely"}


async def test_since_takes_an_iso_date(log: TrainingLog, prefix: str) -> None:
    await write_fixture(log)
    yesterday = datetime.fromtimestamp(time.time() - 86_400, UTC).date().isoformat()
    done = run_export("--format", "dpo", "--since", yesterday, "--redis-url", REDIS_URL, "--redis-prefix", prefix)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["chosen"][0]["content"] for line in done.stdout.splitlines()] == [
        "chosen one", "chosen one"]


def test_nothing_stored_writes_an_empty_file(prefix: str, tmp_path: Path) -> None:
    out = tmp_path / "empty.jsonl"
    done = run_export("--format", "dpo", "-o", str(out), "--redis-url", REDIS_URL, "--redis-prefix", prefix)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b""
    assert "0 dpo rows from 0 exchanges" in done.stderr


def test_bad_arguments_and_an_unreachable_redis_fail_clearly(prefix: str, tmp_path: Path) -> None:
    bad_since = run_export("--format", "dpo", "--since", "last tuesday", "--redis-prefix", prefix)
    assert bad_since.returncode == 2
    assert "--since 'last tuesday'" in bad_since.stderr
    bad_format = run_export("--format", "kto", "--redis-prefix", prefix)
    assert bad_format.returncode == 2 and "invalid choice" in bad_format.stderr

    out = tmp_path / "never.jsonl"
    nowhere = run_export("--format", "dpo", "-o", str(out), "--redis-url", "redis://127.0.0.1:1/0",
                         "--redis-prefix", prefix)
    assert nowhere.returncode == 1
    assert "cannot export from redis://127.0.0.1:1/0" in nowhere.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, expected", [
    ("7d", 1_000_000_000_000 - 7 * DAY_MS),
    ("12h", 1_000_000_000_000 - 12 * 3_600_000),
    ("30M", 1_000_000_000_000 - 30 * 60_000),
    ("2w", 1_000_000_000_000 - 14 * DAY_MS),
    ("45s", 1_000_000_000_000 - 45_000),
    ("2026-01-31", int(datetime(2026, 1, 31, tzinfo=UTC).timestamp() * 1000)),
    ("2026-01-31T12:30:00Z", int(datetime(2026, 1, 31, 12, 30, tzinfo=UTC).timestamp() * 1000)),
    ("2026-01-31T12:30:00+02:00", int(datetime(2026, 1, 31, 10, 30, tzinfo=UTC).timestamp() * 1000)),
])
def test_parse_since(value: str, expected: int) -> None:
    assert parse_since(value, 1_000_000_000_000) == expected


@pytest.mark.parametrize("value", ["", "7", "d", "-7d", "7 days", "2026-13-01", "yesterday"])
def test_parse_since_refuses_what_it_cannot_read(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_since(value, 1_000_000_000_000)
