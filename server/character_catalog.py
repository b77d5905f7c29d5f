"""The characters one server process reads on every turn, cached briefly per id.

Every ``turn.start`` of a conversation bound to a character needs the character
(docs/protocol.md, addition 18); reading Redis for each would put a round trip
on every turn's path. :class:`CharacterCatalog` keeps what it read for
``ttl_s`` (2 s by default), so an edit reaches every process within that time,
and the process that made the edit (through this catalog) sees it at once.

Kept apart from the REST routes (:mod:`server.characters`), which import the
HTTP layer: the runtime holds a catalog, and the HTTP layer refers back to the
runtime.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sessions.character_store import KEEP_AVATAR, CharacterStore, KeepAvatar, PutOutcome
from sessions.characters import Character

__all__ = ["DEFAULT_CATALOG_ENTRIES", "DEFAULT_CATALOG_TTL_S", "CharacterCatalog"]

DEFAULT_CATALOG_TTL_S = 2.0
#: Ids remembered per process, found or not; past it the oldest entry goes,
#: so a client naming random unknown ids cannot grow the cache without bound.
DEFAULT_CATALOG_ENTRIES = 20_000


@dataclass(slots=True)
class _Entry:
    character: Character | None
    expires_at: float


class CharacterCatalog:
    """The characters a process reads on every turn, cached for ``ttl_s`` per id.

    :meth:`get` reads Redis at most once per ``ttl_s`` for each id: unknown ids
    are remembered too, and concurrent misses for one id share one read. Writes
    made through this catalog update the local cache at once; other processes
    see them when their entry expires, so a character edit reaches every
    process within ``ttl_s``.
    """

    def __init__(self, store: CharacterStore, ttl_s: float = DEFAULT_CATALOG_TTL_S, *,
                 max_entries: int = DEFAULT_CATALOG_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl_s >= 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.store = store
        self.ttl_s = float(ttl_s)
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[str, asyncio.Task[Character | None]] = {}
        # Bumped by every local write of an id: a read that began before the
        # write must not put its older answer back into the cache.
        self._writes: dict[str, int] = {}
        #: Reads that went to Redis (for tests and metrics).
        self.loads = 0

    async def get(self, character_id: str) -> Character | None:
        entry = self._entries.get(character_id)
        if entry is not None and entry.expires_at > self._clock():
            return entry.character
        task = self._loading.get(character_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(character_id),
                                                          name=f"character load {character_id}")
            task.add_done_callback(_retrieve)
            self._loading[character_id] = task
        # Shielded: one caller giving up (its turn cancelled) must not fail the others.
        return await asyncio.shield(task)

    async def _load(self, character_id: str) -> Character | None:
        generation = self._writes.get(character_id, 0)
        self.loads += 1
        try:
            character = await self.store.get(character_id)
        finally:
            if self._loading.get(character_id) is asyncio.current_task():
                del self._loading[character_id]
        if self._writes.get(character_id, 0) == generation:
            self._remember(character_id, character)
        return character

    def _remember(self, character_id: str, character: Character | None) -> None:
        self._entries[character_id] = _Entry(character, self._clock() + self.ttl_s)
        self._entries.move_to_end(character_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, character_id: str) -> None:
        """Forget what this process knows of ``character_id``; the next get reads Redis."""
        self._writes[character_id] = self._writes.get(character_id, 0) + 1
        self._entries.pop(character_id, None)
        self._loading.pop(character_id, None)

    async def put(self, character: Character, *, create: bool,
                  avatar: bytes | None | KeepAvatar = KEEP_AVATAR) -> PutOutcome:
        """:meth:`CharacterStore.write`, then this process sees the new character at once."""
        self.invalidate(character.id)
        outcome = await self.store.write(character, create=create, avatar=avatar)
        self.invalidate(character.id)
        self._remember(character.id, outcome.character)
        return outcome

    async def delete(self, character_id: str) -> bool:
        self.invalidate(character_id)
        deleted = await self.store.delete(character_id)
        self.invalidate(character_id)
        self._remember(character_id, None)
        return deleted


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every waiter may have been cancelled; read the outcome so asyncio does not
    # log "exception was never retrieved" for a Redis error someone already saw.
    if not task.cancelled():
        task.exception()


