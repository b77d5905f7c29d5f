"""Training snapshots of rated and chosen exchanges, kept in Redis for export.

docs/protocol.md addition 20: each rating (``feedback``) and each ``turn.select``
keeps a snapshot of the exchange (the prompt the model saw, every alternative
reply, which one the user chose), so ``rapport export`` can write training data
even after history was trimmed or the turn records expired.

Layout (see :mod:`sessions.keys`)::

    P{u:U}:train:X   hash  snapshot    JSON of the newest ExchangeSnapshot
                           rating:<T>  JSON {"rating", "reason", "at"} for alternative T
                           created_at  ms of the first write
                           updated_at  ms of the newest write
    Ptraining        zset  "user\\0exchange" -> updated_at of every snapshot

The hash carries the user's hash tag, the index none, so on Redis Cluster they
live in different slots: no script may touch both. They are written in one
pipeline (hash first, index second); on a cluster, whose pipelines refuse
scripts (see :mod:`sessions.cluster`), in two round trips in the same order. The index is never cleaned when a user is
erased (``DELETE /v1/users/me`` removes only keys under the user's tag), so
readers skip members whose hash is gone.

The snapshot is replaced on every write: the newest one knows every
alternative generated so far and the current choice; ratings are kept per
alternative and a new rating of the same alternative replaces the old one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol.errors import BadRequest
from protocol.frames import MAX_FEEDBACK_REASON_CHARS
from sessions.cluster import is_cluster
from sessions.keys import KeySpace
from sessions.messages import ChatMessage
from sessions.store import redis_guarded

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("rapport.training")

__all__ = [
    "MAX_RATINGS_PER_EXCHANGE",
    "MAX_REASON_CHARS",
    "Alternative",
    "ExchangeSnapshot",
    "Rating",
    "TrainingLog",
    "TrainingRecord",
    "record_from_hash",
    "snapshot_from_json",
    "snapshot_to_json",
]

#: The contract's bound on ``feedback.reason`` (addition 20).
MAX_REASON_CHARS = MAX_FEEDBACK_REASON_CHARS
#: Ratings one exchange keeps. A rating names one of the exchange's alternatives,
#: and every alternative is a turn the rate limit counted, so this is only a
#: backstop against a snapshot hash growing without end.
MAX_RATINGS_PER_EXCHANGE = 64
#: Index members read per round trip while exporting.
EXPORT_BATCH = 200
#: Separates the user id from the exchange id in an index member. Exchange ids
#: are turn ids the server made, so the member is split at its last separator.
MEMBER_SEPARATOR = "\0"
#: Version of the snapshot JSON, so a later layout can still read this one.
SNAPSHOT_VERSION = 1

_RATING_PREFIX = "rating:"

# record_rating's write of the hash: one key, so it runs on Cluster.
# KEYS: 1 the training hash.
# ARGV: 1 snapshot JSON, 2 now_ms, 3 rating field, 4 rating JSON, 5 cap.
# Returns "ok" | "full" (a new alternative's rating over the cap: nothing written).
RECORD_RATING_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0 then
  local n = 0
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 7) == 'rating:' then n = n + 1 end
  end
  if n >= tonumber(ARGV[5]) then return 'full' end
end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[1], 'updated_at', ARGV[2], ARGV[3], ARGV[4])
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[2])
return 'ok'
"""


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alternative:
    """One reply of an exchange: its own turn, its final text and how it ended."""

    turn_id: str
    text: str
    finish_reason: str


@dataclass(frozen=True, slots=True)
class ExchangeSnapshot:
    """One user message and its alternative replies, as the model saw and produced them.

    ``prompt``: what the model saw for this exchange (system/persona, history,
    the user message, post-history instructions). ``alternatives``: in the
    order they were generated. ``selected``: the turn id the user chose with
    ``turn.select``, or None when they never chose explicitly.
    """

    user_id: str
    conversation_id: str
    exchange_id: str
    character_id: str | None
    prompt: tuple[ChatMessage, ...]
    alternatives: tuple[Alternative, ...]
    selected: str | None

    def alternative(self, turn_id: str) -> Alternative | None:
        for alt in self.alternatives:
            if alt.turn_id == turn_id:
                return alt
        return None


@dataclass(frozen=True, slots=True)
class Rating:
    rating: int  # -1 or 1
    reason: str | None
    at_ms: int


@dataclass(frozen=True, slots=True)
class TrainingRecord:
    """A stored snapshot with its ratings (turn id -> rating), as the export reads it."""

    snapshot: ExchangeSnapshot
    ratings: Mapping[str, Rating]
    created_at_ms: int
    updated_at_ms: int


# ---------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def snapshot_to_json(snapshot: ExchangeSnapshot) -> str:
    return _dumps({
        "v": SNAPSHOT_VERSION,
        "user_id": snapshot.user_id,
        "conversation_id": snapshot.conversation_id,
        "exchange_id": snapshot.exchange_id,
        "character_id": snapshot.character_id,
        "prompt": [{"role": m.role, "content": m.content} for m in snapshot.prompt],
        "alternatives": [{"turn_id": a.turn_id, "text": a.text, "finish_reason": a.finish_reason}
                         for a in snapshot.alternatives],
        "selected": snapshot.selected,
    })


def _str_field(obj: Mapping[str, Any], name: str, *, optional: bool = False) -> Any:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"snapshot field {name!r} is not a string")
    return value


def snapshot_from_json(raw: str) -> ExchangeSnapshot:
    """Parse :func:`snapshot_to_json`'s output; ValueError when it is not one."""
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("the snapshot is not a JSON object")
    prompt = obj.get("prompt")
    alternatives = obj.get("alternatives")
    if not isinstance(prompt, list) or not isinstance(alternatives, list):
        raise ValueError("the snapshot has no prompt or alternatives list")
    for item in (*prompt, *alternatives):
        if not isinstance(item, dict):
            raise ValueError("a prompt message or alternative is not an object")
    return ExchangeSnapshot(
        user_id=_str_field(obj, "user_id"),
        conversation_id=_str_field(obj, "conversation_id"),
        exchange_id=_str_field(obj, "exchange_id"),
        character_id=_str_field(obj, "character_id", optional=True),
        prompt=tuple(ChatMessage(role=_str_field(m, "role"), content=_str_field(m, "content")) for m in prompt),
        alternatives=tuple(Alternative(turn_id=_str_field(a, "turn_id"), text=_str_field(a, "text"),
                                       finish_reason=_str_field(a, "finish_reason")) for a in alternatives),
        selected=_str_field(obj, "selected", optional=True),
    )


def _rating_from_json(raw: str) -> Rating:
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("a rating is not a JSON object")
    rating, reason, at = obj.get("rating"), obj.get("reason"), obj.get("at")
    if isinstance(rating, bool) or rating not in (-1, 1):
        raise ValueError(f"a rating is {rating!r}, not -1 or 1")
    if reason is not None and not isinstance(reason, str):
        raise ValueError("a rating's reason is not a string")
    if isinstance(at, bool) or not isinstance(at, int):
        raise ValueError("a rating's time is not an integer")
    return Rating(rating=rating, reason=reason, at_ms=at)


def record_from_hash(fields: Mapping[str, str]) -> TrainingRecord | None:
    """The record a training hash holds; None for a missing (empty) hash; ValueError when malformed."""
    if not fields:
        return None
    if "snapshot" not in fields:
        raise ValueError("the training hash has no snapshot")
    snapshot = snapshot_from_json(fields["snapshot"])
    ratings = {name.removeprefix(_RATING_PREFIX): _rating_from_json(value)
               for name, value in fields.items() if name.startswith(_RATING_PREFIX)}
    return TrainingRecord(
        snapshot=snapshot,
        ratings=ratings,
        created_at_ms=int(fields.get("created_at") or 0),
        updated_at_ms=int(fields.get("updated_at") or 0),
    )


def index_member(user_id: str, exchange_id: str) -> str:
    return f"{user_id}{MEMBER_SEPARATOR}{exchange_id}"


def split_member(member: str) -> tuple[str, str] | None:
    user_id, sep, exchange_id = member.rpartition(MEMBER_SEPARATOR)
    if not sep or not exchange_id:
        return None
    return user_id, exchange_id


# ---------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------


class TrainingLog:
    """Writes training snapshots and reads them back for export.

    ``redis`` must be created with ``decode_responses=True``. Connectivity
    failures are raised as :class:`protocol.errors.Unavailable` (see
    :func:`sessions.store.redis_guarded`).
    """

    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self._record_rating = redis.register_script(RECORD_RATING_LUA)

    @redis_guarded
    async def record_rating(self, snapshot: ExchangeSnapshot, turn_id: str, rating: int, reason: str | None,
                            now_ms: int) -> None:
        """Keep ``snapshot`` and the user's ``rating`` of its alternative ``turn_id`` (replacing an earlier one).

        BadRequest when the rating is not -1 or 1, the reason is too long, the
        turn is not one of the snapshot's alternatives, or the exchange already
        holds :data:`MAX_RATINGS_PER_EXCHANGE` ratings of other alternatives.
        """
        if isinstance(rating, bool) or rating not in (-1, 1):
            raise BadRequest("'rating' must be -1 or 1")
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            raise BadRequest(f"'reason' is longer than {MAX_REASON_CHARS} characters")
        if snapshot.alternative(turn_id) is None:
            raise BadRequest(f"turn '{turn_id}' is not a reply of exchange '{snapshot.exchange_id}'")
        key = self.keys.training(snapshot.user_id, snapshot.exchange_id)
        value = _dumps({"rating": rating, "reason": reason, "at": now_ms})
        args: list[str | int] = [snapshot_to_json(snapshot), now_ms, _RATING_PREFIX + turn_id, value,
                                 MAX_RATINGS_PER_EXCHANGE]
        index_entry = {index_member(snapshot.user_id, snapshot.exchange_id): now_ms}
        if is_cluster(self.redis):
            # redis-py's cluster pipeline refuses scripts: the hash, then the index, one after the other.
            outcome = await self._record_rating(keys=[key], args=args)
            await self.redis.zadd(self.keys.training_index(), index_entry)
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._record_rating(keys=[key], args=args, client=pipe)
                pipe.zadd(self.keys.training_index(), index_entry)
                outcome, _ = await pipe.execute()
        if outcome == "full":
            raise BadRequest(f"exchange '{snapshot.exchange_id}' already holds "
                             f"{MAX_RATINGS_PER_EXCHANGE} ratings")

    @redis_guarded
    async def record_selection(self, snapshot: ExchangeSnapshot, now_ms: int) -> None:
        """Keep ``snapshot`` after a ``turn.select``; its ratings stay as they are."""
        key = self.keys.training(snapshot.user_id, snapshot.exchange_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={"snapshot": snapshot_to_json(snapshot), "updated_at": now_ms})
            pipe.hsetnx(key, "created_at", now_ms)
            pipe.zadd(self.keys.training_index(), {index_member(snapshot.user_id, snapshot.exchange_id): now_ms})
            await pipe.execute()

    @redis_guarded
    async def get(self, user_id: str, exchange_id: str) -> TrainingRecord | None:
        """The record of one exchange, or None."""
        fields: dict[str, str] = await self.redis.hgetall(  # type: ignore[assignment]
            self.keys.training(user_id, exchange_id))
        return record_from_hash(fields)

    async def iter_records(self, *, since_ms: int | None = None,
                           character_id: str | None = None) -> AsyncIterator[TrainingRecord]:
        """Every stored record updated at or after ``since_ms`` (of ``character_id``), oldest update first.

        Index members whose hash is gone (an erased user) and hashes that do
        not parse are skipped (the latter logged). A record updated while the
        export runs moves to the end of the index; it is yielded once.
        """
        index = self.keys.training_index()
        # Paged by score, not by offset: a member updated meanwhile moves to the
        # end, which would shift every offset behind it and skip a member.
        # ``skip`` counts the members already read at exactly ``cursor``.
        cursor: float | str = "-inf" if since_ms is None else since_ms
        skip = 0
        seen: set[str] = set()
        while True:
            rows = await self._page(index, cursor, skip)
            if not rows:
                return
            last = rows[-1][1]
            if last == cursor:
                skip += len(rows)
            else:
                cursor, skip = last, sum(1 for _, score in rows if score == last)
            wanted = [(member, parts) for member, _ in rows
                      if member not in seen and (parts := split_member(member)) is not None]
            seen.update(member for member, _ in rows)
            records = await self._read([parts for _, parts in wanted])
            for (_, parts), record in zip(wanted, records, strict=True):
                if record is None:
                    continue  # erased user: the index member dangles
                if (record.snapshot.user_id, record.snapshot.exchange_id) != parts:
                    log.warning("training hash of exchange %r holds another exchange's snapshot; skipped", parts[1])
                    continue
                if character_id is not None and record.snapshot.character_id != character_id:
                    continue
                yield record

    @redis_guarded
    async def _page(self, index: str, low: float | str, skip: int) -> list[tuple[str, float]]:
        rows: list[Any] = await self.redis.zrangebyscore(index, low, "+inf", start=skip, num=EXPORT_BATCH,
                                                          withscores=True)
        return [(str(member), float(score)) for member, score in rows]

    @redis_guarded
    async def _read(self, pairs: list[tuple[str, str]]) -> list[TrainingRecord | None]:
        if not pairs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id, exchange_id in pairs:
                pipe.hgetall(self.keys.training(user_id, exchange_id))
            answers = await pipe.execute()
        records: list[TrainingRecord | None] = []
        for (user_id, exchange_id), fields in zip(pairs, answers, strict=True):
            try:
                records.append(record_from_hash(fields))
            except (ValueError, TypeError) as exc:
                log.warning("training snapshot of user %r exchange %r is malformed (%s); skipped",
                            user_id, exchange_id, exc)
                records.append(None)
        return records
