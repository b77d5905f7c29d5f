"""Pinned facts: short notes a user asks every character to remember (docs/protocol.md addition 22).

Facts belong to the user, not to a conversation: one Redis hash under the
user's hash tag (``sessions.keys.KeySpace.facts``) maps a fact id to
``"<created_at_ms>:<text>"``. One hash keeps the read on the turn path a
single ``HGETALL`` that the caller queues on a pipeline it sends anyway
(:meth:`FactStore.queue_read`), so memory costs a turn no round trip of its
own; at most ``max_facts`` entries keep that read small. Since the hash lives
under the user's tag, ``ConversationStore.delete_user`` removes it with
everything else.

Adding is one Lua script, so two sockets adding at once can neither pass the
cap together nor store the same text twice: the script checks the count and
the texts and writes in one step.

The model sees the facts in creation order (ties by id): a fixed order keeps
the system message byte-identical from turn to turn, which keeps vLLM's
prefix cache valid, and a new fact only changes the end of the block.

A fact is user text that ends up inside a system message, so it is cleaned
when stored and again when rendered: control characters (newlines included)
become spaces, so a fact can never start a line of its own that looks like a
new message or a new instruction block.
"""

from __future__ import annotations

import builtins
import secrets
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from protocol.errors import BadRequest, RapportError
from protocol.frames import MAX_FACT_CHARS

from .keys import KeySpace
from .store import redis_guarded

__all__ = ["DEFAULT_MAX_FACTS", "Fact", "FactStore", "clean_fact_text", "facts_block", "parse_facts"]

#: How many facts one user may pin.
DEFAULT_MAX_FACTS = 50

#: The heading of the block the model sees.
FACTS_HEADING = "Things the user asked you to remember:"

# add_fact: store a fact unless its text is already pinned or the user is at the cap.
# KEYS: 1 the user's facts hash.
# ARGV: 1 new fact id, 2 cleaned text, 3 now_ms, 4 most facts.
# Values are "<created_at_ms>:<text>".
# Returns {"exists", id, created_at} | {"full", count} | {"taken"} (id collision: retry)
#       | {"added"}.
ADD_FACT_LUA = """
local all = redis.call('HGETALL', KEYS[1])
local count = 0
for i = 1, #all, 2 do
  local value = all[i + 1]
  local sep = string.find(value, ':', 1, true)
  if sep and string.sub(value, sep + 1) == ARGV[2] then
    return {'exists', all[i], string.sub(value, 1, sep - 1)}
  end
  count = count + 1
end
if count >= tonumber(ARGV[4]) then return {'full', tostring(count)} end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3] .. ':' .. ARGV[2]) == 0 then return {'taken'} end
return {'added'}
"""

_ID_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class Fact:
    id: str  # "f_" and 16 hex digits
    text: str
    created_at: int  # ms since epoch

    def wire(self) -> dict[str, Any]:
        """The fact as the ``memory`` frame and REST carry it."""
        return {"id": self.id, "text": self.text, "created_at": self.created_at}


def clean_fact_text(text: str) -> str:
    """``text`` on one line: control and separator characters (newlines, tabs,
    U+2028/U+2029, escapes) become spaces, runs of whitespace one space, ends trimmed."""
    out: list[str] = []
    for ch in text:
        category = unicodedata.category(ch)
        # Cc: C0/C1 controls (\\n, \\r, \\t, ESC...); Zl/Zp: line and paragraph
        # separators, which some renderers and tokenizers treat as line breaks.
        out.append(" " if category in ("Cc", "Zl", "Zp") or ch.isspace() else ch)
    return " ".join("".join(out).split())


def _sort_key(fact: Fact) -> tuple[int, str]:
    return fact.created_at, fact.id


def facts_block(facts: Sequence[Fact]) -> str:
    """The text the model sees for ``facts``: a heading and one ``- `` line per
    fact, oldest first (ties by id); "" when there are none."""
    lines = [f"- {text}" for text in (clean_fact_text(f.text) for f in sorted(facts, key=_sort_key)) if text]
    if not lines:
        return ""
    return FACTS_HEADING + "\n" + "\n".join(lines)


def parse_facts(reply: Any) -> list[Fact]:
    """The facts in an ``HGETALL`` reply of the facts hash, oldest first.

    Entries that are not ``"<ms>:<text>"`` are skipped, never raised on: this
    runs on the turn path.
    """
    if not isinstance(reply, Mapping):
        return []
    facts: list[Fact] = []
    for fact_id, value in reply.items():
        if isinstance(fact_id, bytes):
            fact_id = fact_id.decode("utf-8", "replace")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(fact_id, str) or not isinstance(value, str):
            continue
        created, sep, text = value.partition(":")
        if not sep or not created.isdigit():
            continue
        facts.append(Fact(id=fact_id, text=text, created_at=int(created)))
    facts.sort(key=_sort_key)
    return facts


class FactStore:
    """A user's pinned facts in Redis; ``redis`` decodes responses (as every Rapport client does)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, *, max_facts: int = DEFAULT_MAX_FACTS,
                 max_chars: int = MAX_FACT_CHARS) -> None:
        for name, value in (("max_facts", max_facts), ("max_chars", max_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Any for the same reason as ConversationStore.redis: redis-py types
        # replies as bytes | str whatever the client's decode_responses.
        self.redis: Any = redis
        self.keys = keys
        self.max_facts = max_facts
        self.max_chars = max_chars
        self._add = redis.register_script(ADD_FACT_LUA)

    def _text(self, text: object) -> str:
        if not isinstance(text, str):
            raise BadRequest("a fact must be a string")
        cleaned = clean_fact_text(text)
        if not cleaned:
            raise BadRequest("a fact must not be empty")
        if len(cleaned) > self.max_chars:
            raise BadRequest(f"a fact is longer than {self.max_chars} characters")
        return cleaned

    @redis_guarded
    async def add(self, user_id: str, text: str, *, now_ms: int | None = None) -> Fact:
        """Pin ``text`` (cleaned: one line, trimmed). Pinning a text already
        pinned returns that fact; past ``max_facts`` it is BadRequest."""
        cleaned = self._text(text)
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        if isinstance(now_ms, bool) or not isinstance(now_ms, int) or now_ms < 0:
            raise ValueError(f"now_ms must be a non-negative int, got {now_ms!r}")
        key = self.keys.facts(user_id)
        for _ in range(_ID_ATTEMPTS):
            fact_id = "f_" + secrets.token_hex(8)
            res = await self._add(keys=[key], args=[fact_id, cleaned, str(now_ms), str(self.max_facts)])
            kind = res[0]
            if kind == "added":
                return Fact(id=fact_id, text=cleaned, created_at=now_ms)
            if kind == "exists":
                return Fact(id=str(res[1]), text=cleaned, created_at=int(res[2]))
            if kind == "full":
                raise BadRequest(f"you can pin at most {self.max_facts} facts; "
                                 "delete one (memory.delete) before adding another")
            if kind != "taken":
                raise RapportError(f"add_fact: unexpected script answer {kind!r}")
        raise RapportError("add_fact: could not find a free fact id")

    @redis_guarded
    async def list(self, user_id: str) -> builtins.list[Fact]:
        """The user's facts, oldest first: the order the model sees them in."""
        return parse_facts(await self.redis.hgetall(self.keys.facts(user_id)))

    @redis_guarded
    async def delete(self, user_id: str, fact_id: str) -> bool:
        """Unpin one fact; False when the user has no such fact."""
        if not isinstance(fact_id, str) or not fact_id:
            return False
        return bool(await self.redis.hdel(self.keys.facts(user_id), fact_id))

    def queue_read(self, pipe: Any, user_id: str) -> None:
        """Queue the read of the user's facts on the caller's pipeline; its reply goes to :func:`parse_facts`."""
        pipe.hgetall(self.keys.facts(user_id))
