"""The Redis store for characters (docs/protocol.md, addition 18).

Layout (see :mod:`sessions.keys`; ``P`` is the prefix, ``I`` the escaped id)::

    P{chars}:char:I          string  the character's storage JSON (Character.to_json)
    P{chars}:char:I:avatar   string  the PNG the character was uploaded as (raw bytes), if any
    P{chars}:index           zset    character id -> last update (ms, Redis' clock)

All three share the ``{chars}`` hash tag, so the scripts below, which write a
character, its avatar and the index in one step, run on Redis Cluster too. The
avatar key extends the character key with ``:avatar``; an escaped id never
holds ``:``, so it cannot collide with another character's key.

Why a separate avatar key: the character is read on every turn (through
``server.characters.CharacterCatalog``) and must stay small; the picture is
only read when a card is exported as PNG, so an operator who uploaded a PNG
gets their own image back rather than a placeholder.

Limits: at most ``max_characters`` characters per deployment (a create over it
is ``too_large``), a character's JSON at most ``max_json_bytes`` and an avatar
at most ``max_avatar_bytes`` (``bad_request``: the card is refused, nothing is
stored). Timestamps come from Redis' ``TIME`` inside the scripts, so "newest
update first" holds across processes whose clocks disagree.
"""

from __future__ import annotations

import builtins
import json
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import redis.asyncio as aioredis

from protocol.errors import BadRequest, Conflict, RapportError, TooLarge
from sessions.characters import CHARACTER_ID_PATTERN, Character
from sessions.keys import KeySpace
from sessions.store import redis_guarded

log = logging.getLogger("rapport.characters")

__all__ = [
    "AVATAR_SUFFIX",
    "DEFAULT_MAX_AVATAR_BYTES",
    "DEFAULT_MAX_CHARACTERS",
    "DEFAULT_MAX_JSON_BYTES",
    "KEEP_AVATAR",
    "CharacterStore",
    "KeepAvatar",
    "PutOutcome",
    "StoredCharacter",
]

DEFAULT_MAX_CHARACTERS = 10_000
#: A card's own fields are bounded by sessions.characters (64 KiB per text
#: field, 200 greetings, 2,000 lorebook entries...); this bounds their sum.
DEFAULT_MAX_JSON_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_AVATAR_BYTES = 8 * 1024 * 1024
AVATAR_SUFFIX = ":avatar"
#: Largest page :meth:`CharacterStore.list` answers.
MAX_PAGE = 1000

# put: write a character, its index entry and (optionally) its avatar at once.
# KEYS: 1 character, 2 index, 3 avatar.
# ARGV: 1 id, 2 storage JSON, 3 "create" | "upsert", 4 cap on characters,
#       5 avatar action "keep" | "set" | "del", 6 avatar bytes (for "set").
# Returns {"exists"} (create of a taken id) | {"full", count} (a new id over the
# cap) | {"created", now_ms} | {"updated", now_ms}. Refusals write nothing.
PUT_CHARACTER_LUA = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and ARGV[3] == 'create' then
  return {'exists'}
end
if not exists then
  local count = redis.call('ZCARD', KEYS[2])
  if redis.call('ZSCORE', KEYS[2], ARGV[1]) == false and count >= tonumber(ARGV[4]) then
    return {'full', tostring(count)}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
if ARGV[5] == 'set' then
  redis.call('SET', KEYS[3], ARGV[6])
elseif ARGV[5] == 'del' then
  redis.call('DEL', KEYS[3])
end
if exists then
  return {'updated', tostring(now)}
end
return {'created', tostring(now)}
"""

# delete: remove a character, its avatar and its index entry at once.
# KEYS: 1 character, 2 index, 3 avatar.  ARGV: 1 id.  Returns 1 if it existed, else 0.
DELETE_CHARACTER_LUA = """
local n = redis.call('DEL', KEYS[1], KEYS[3]) + redis.call('ZREM', KEYS[2], ARGV[1])
if n > 0 then return 1 end
return 0
"""


class KeepAvatar(Enum):
    """The type of :data:`KEEP_AVATAR`: a put that leaves the stored avatar as it is."""

    KEEP = "keep"


#: ``put(..., avatar=KEEP_AVATAR)``: a JSON update keeps the picture uploaded before.
KEEP_AVATAR: Final = KeepAvatar.KEEP


@dataclass(frozen=True, slots=True)
class StoredCharacter:
    character: Character
    #: When it was last written (ms since the epoch, Redis' clock).
    updated_at: int


@dataclass(frozen=True, slots=True)
class PutOutcome:
    character: Character
    #: False when an existing character was replaced.
    created: bool
    updated_at: int


class CharacterStore:
    """Characters in Redis, written atomically with their index entry.

    ``redis`` must decode responses (as every client of :mod:`server.runtime`
    does); avatars are read with decoding switched off for that one command.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        *,
        max_characters: int = DEFAULT_MAX_CHARACTERS,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
        max_avatar_bytes: int = DEFAULT_MAX_AVATAR_BYTES,
    ) -> None:
        for name, value in (("max_characters", max_characters), ("max_json_bytes", max_json_bytes),
                            ("max_avatar_bytes", max_avatar_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Any for the same reason as ConversationStore.redis: redis-py types
        # replies as bytes | str whatever the client decodes.
        self.redis: Any = redis
        self.keys = keys
        self.max_characters = max_characters
        self.max_json_bytes = max_json_bytes
        self.max_avatar_bytes = max_avatar_bytes
        self._put = redis.register_script(PUT_CHARACTER_LUA)
        self._delete = redis.register_script(DELETE_CHARACTER_LUA)

    def avatar_key(self, character_id: str) -> str:
        return self.keys.character(character_id) + AVATAR_SUFFIX

    def _keys(self, character_id: str) -> list[str]:
        return [self.keys.character(character_id), self.keys.character_index(), self.avatar_key(character_id)]

    # -- writes -------------------------------------------------------------

    async def put(self, character: Character, *, create: bool,
                  avatar: bytes | None | KeepAvatar = KEEP_AVATAR) -> Character:
        """Store ``character``; ``create=True`` refuses an id that exists (:class:`Conflict`).

        See :meth:`write` for ``avatar`` and the limits.
        """
        return (await self.write(character, create=create, avatar=avatar)).character

    @redis_guarded
    async def write(self, character: Character, *, create: bool,
                    avatar: bytes | None | KeepAvatar = KEEP_AVATAR) -> PutOutcome:
        """Store ``character`` and its index entry in one script.

        ``create=False`` replaces the character, or creates it if there is none
        (PUT semantics). ``avatar``: the PNG to keep for export, ``None`` to drop
        the stored one, :data:`KEEP_AVATAR` to leave it. Raises :class:`Conflict`
        (create of a taken id), :class:`TooLarge` (a new character over the
        deployment's cap) or :class:`BadRequest` (over the size limits).
        """
        character_id = _check_id(character.id)
        payload = json.dumps(character.to_json(), ensure_ascii=False, separators=(",", ":"))
        size = len(payload.encode("utf-8", "surrogatepass"))
        if size > self.max_json_bytes:
            raise BadRequest(f"the character is {size} bytes as JSON; this server stores at most "
                             f"{self.max_json_bytes}")
        if isinstance(avatar, bytes) and len(avatar) > self.max_avatar_bytes:
            raise BadRequest(f"the character's image is {len(avatar)} bytes; this server stores at most "
                             f"{self.max_avatar_bytes}")
        action = "keep" if avatar is KEEP_AVATAR else ("del" if avatar is None else "set")
        image = avatar if isinstance(avatar, bytes) else b""
        reply = await self._put(keys=self._keys(character_id),
                                args=[character_id, payload, "create" if create else "upsert",
                                      self.max_characters, action, image])
        kind = reply[0]
        if kind == "exists":
            raise Conflict(f"a character with id '{character_id}' already exists; "
                           f"replace it with PUT /v1/characters/{character_id} or choose another id")
        if kind == "full":
            raise TooLarge(f"this server holds its maximum of {self.max_characters} characters; "
                           "delete one before adding another")
        return PutOutcome(character=character, created=kind == "created", updated_at=int(reply[1]))

    @redis_guarded
    async def delete(self, character_id: str) -> bool:
        """Remove the character, its avatar and its index entry; False if there was none."""
        return bool(await self._delete(keys=self._keys(_check_id(character_id)), args=[character_id]))

    # -- reads --------------------------------------------------------------

    @redis_guarded
    async def get(self, character_id: str) -> Character | None:
        if not _valid_id(character_id):
            return None  # no such id can have been stored
        raw = await self.redis.get(self.keys.character(character_id))
        return None if raw is None else _decode(character_id, raw)

    @redis_guarded
    async def get_avatar(self, character_id: str) -> bytes | None:
        """The PNG the character was uploaded as, or None."""
        if not _valid_id(character_id):
            return None
        raw = await self.redis.execute_command("GET", self.avatar_key(character_id), NEVER_DECODE=True)
        return bytes(raw) if raw is not None else None

    @redis_guarded
    async def has_avatar(self, character_id: str) -> bool:
        return _valid_id(character_id) and bool(await self.redis.exists(self.avatar_key(character_id)))

    async def list(self, *, offset: int = 0, limit: int = 100) -> builtins.list[Character]:
        """One page of characters, the most recently updated first."""
        return [entry.character for entry in await self.entries(offset=offset, limit=limit)]

    @redis_guarded
    async def entries(self, *, offset: int = 0, limit: int = 100) -> builtins.list[StoredCharacter]:
        """:meth:`list` with each character's last update time."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise BadRequest("'offset' must be a non-negative integer")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise BadRequest(f"'limit' must be between 1 and {MAX_PAGE}")
        rows = await self.redis.zrevrange(self.keys.character_index(), offset, offset + limit - 1,
                                          withscores=True)
        if not rows:
            return []
        # One MGET: every key carries the {chars} tag, so Cluster serves it from one slot.
        values = await self.redis.mget([self.keys.character(cid) for cid, _ in rows])
        out: builtins.list[StoredCharacter] = []
        for (cid, score), raw in zip(rows, values, strict=True):
            if raw is not None:  # deleted between the two reads
                out.append(StoredCharacter(character=_decode(cid, raw), updated_at=int(score)))
        return out

    @redis_guarded
    async def count(self) -> int:
        return int(await self.redis.zcard(self.keys.character_index()))


def _valid_id(character_id: object) -> bool:
    return isinstance(character_id, str) and CHARACTER_ID_PATTERN.fullmatch(character_id) is not None


def _check_id(character_id: object) -> str:
    if not isinstance(character_id, str) or not _valid_id(character_id):
        raise BadRequest("a character id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'")
    return character_id


def _decode(character_id: str, raw: str) -> Character:
    try:
        return Character.from_json(json.loads(raw))
    except (ValueError, BadRequest) as exc:
        # Written by put() only; an unreadable value is corruption or a
        # downgrade, and must not read as "no such character".
        log.error("stored character %r cannot be read: %s", character_id, exc)
        raise RapportError(f"the stored character '{character_id}' cannot be read") from None
