"""Lorebooks: a character card's ``character_book`` entries, chosen by the recent turns.

Character Card V2 (and V3, which keeps the same book) lets a card carry a
lorebook: entries of background text, each with keywords; an entry whose
keyword appears in the recent conversation is shown to the model. This module
is pure (no I/O, no ``await``): it reads the book as stored verbatim in
:attr:`sessions.characters.Character.character_book` and returns the text to
insert; where it goes is ``sessions.prompt.Context.lore``.

Why the lore sits right before the newest user message, not in the system
message: which entries are active can change on any turn. vLLM's prefix cache
reuses the longest unchanged beginning of a prompt, so text that changes
often belongs as late as possible; placed at the tail, a new set of entries
costs only the tokens after it, while the system message and the whole
history before it stay cached.

What is read (V2 spec, ``character_book``; unknown fields are ignored):

- book: ``entries`` (list), ``scan_depth``, ``token_budget``,
  ``recursive_scanning``;
- entry: ``keys`` (list of strings), ``content``, ``enabled``,
  ``insertion_order``, ``case_sensitive``, ``priority``, ``selective`` with
  ``secondary_keys``, ``constant``, ``position``, ``name``, ``id``.

Choices where the spec leaves room, each stated so a card author can predict it:

- Activation: an enabled entry is active when it is ``constant`` or one of its
  ``keys`` appears in the last ``scan_depth`` messages; a ``selective`` entry
  also needs one of its ``secondary_keys`` there (a selective entry without
  secondary keys acts on its keys alone). Matching ignores case unless
  ``case_sensitive`` is true. A key that begins (ends) with a letter or digit
  must begin (end) a word (``art`` does not fire on "party"), except in
  scripts written without spaces (Chinese, Japanese, Thai...), where it may
  stand anywhere. Runs of whitespace count as one space, in keys and text.
- Regular expressions are not supported: a key in ``/.../`` form and the V3
  ``use_regex`` flag are ignored, and the key is matched as literal text.
  Untrusted cards must not be able to run arbitrary patterns on every turn.
- ``recursive_scanning`` is ignored: entries' content is never scanned for
  further keys (one pass keeps the work bounded and the choice easy to follow).
- ``position`` (``before_char``/``after_char``) does not move an entry: the
  server inserts all lore in one place, for the prefix cache's sake (above).
- Order: active entries are inserted by ``insertion_order`` ascending (the
  spec: lower values are inserted higher), ties by ``priority`` (higher first),
  then by their position in the book.
- Budget (``token_budget``, else the caller's default, never above the
  caller's ``max_budget``): the spec says "if token budget reached, lower
  priority value entries are discarded first". So entries are admitted in
  order of ``priority`` descending (a missing priority counts as 0; ties:
  the one inserted earlier wins), each while it still fits; an entry that does
  not fit is dropped and a smaller one of lower priority may still fit. The
  admitted entries are then written in insertion order. Only the entries'
  content is counted, not the blank lines between them.
- Macros (``{{char}}``, ``{{user}}``) are left as they are: the caller applies
  them like for the rest of the card.

Bounds: at most :data:`MAX_ENTRIES` entries, :data:`MAX_KEYS_PER_ENTRY` keys
of at most :data:`MAX_KEY_CHARS` characters each, :data:`MAX_SCAN_DEPTH`
messages and :data:`MAX_SCAN_CHARS` characters of them (the newest first) are
looked at. A book or an entry of the wrong shape is skipped, never raised on:
this runs on every turn.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_SCAN_DEPTH",
    "LoreBook",
    "LoreEntry",
    "MAX_ENTRIES",
    "MAX_SCAN_CHARS",
    "active_entries",
    "lore_block",
    "parse_book",
]

DEFAULT_SCAN_DEPTH = 4
DEFAULT_BUDGET = 400
#: Most entries of one book that are looked at (the rest are ignored).
MAX_ENTRIES = 500
#: Most keys (and, separately, secondary keys) of one entry.
MAX_KEYS_PER_ENTRY = 64
#: Longer keys are skipped: no real keyword is this long.
MAX_KEY_CHARS = 200
#: Most recent messages a book may ask to be scanned.
MAX_SCAN_DEPTH = 100
#: Most characters of the recent messages scanned, the newest kept.
MAX_SCAN_CHARS = 20_000
#: The largest budget a book may ask for unless the caller allows more.
DEFAULT_MAX_BUDGET = 2048


@dataclass(frozen=True, slots=True)
class LoreEntry:
    content: str
    keys: tuple[str, ...]
    secondary_keys: tuple[str, ...] = ()
    enabled: bool = True
    constant: bool = False
    selective: bool = False
    case_sensitive: bool = False
    insertion_order: int = 0
    priority: int = 0
    index: int = 0  # position in the book's entries list
    position: str = ""  # "before_char" | "after_char" | "" (not used for placement)
    name: str = ""


@dataclass(frozen=True, slots=True)
class LoreBook:
    entries: tuple[LoreEntry, ...]
    scan_depth: int | None = None
    token_budget: int | None = None


def _int(value: Any) -> int | None:
    # bool is an int subclass; true is not a number in a card.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return None


def _bool(value: Any, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def _keys(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    out: list[str] = []
    for key in value[:MAX_KEYS_PER_ENTRY]:
        if isinstance(key, str) and key.strip() and len(key) <= MAX_KEY_CHARS:
            out.append(" ".join(key.split()))
    return tuple(out)


def _entry(raw: Any, index: int) -> LoreEntry | None:
    if not isinstance(raw, Mapping):
        return None
    content = raw.get("content")
    if not isinstance(content, str) or not content.strip():
        return None
    position = raw.get("position")
    name = raw.get("name")
    return LoreEntry(
        content=content.strip(),
        keys=_keys(raw.get("keys")),
        secondary_keys=_keys(raw.get("secondary_keys")),
        enabled=_bool(raw.get("enabled"), True),
        constant=_bool(raw.get("constant"), False),
        selective=_bool(raw.get("selective"), False),
        case_sensitive=_bool(raw.get("case_sensitive"), False),
        insertion_order=_int(raw.get("insertion_order")) or 0,
        priority=_int(raw.get("priority")) or 0,
        index=index,
        position=position if position in ("before_char", "after_char") else "",
        name=name if isinstance(name, str) else "",
    )


def parse_book(book: Any) -> LoreBook:
    """The usable part of a ``character_book`` map; anything else gives an empty book."""
    if not isinstance(book, Mapping):
        return LoreBook(entries=())
    raw_entries = book.get("entries")
    entries: list[LoreEntry] = []
    if isinstance(raw_entries, list):
        for index, raw in enumerate(raw_entries[:MAX_ENTRIES]):
            entry = _entry(raw, index)
            if entry is not None:
                entries.append(entry)
    depth = _int(book.get("scan_depth"))
    budget = _int(book.get("token_budget"))
    return LoreBook(
        entries=tuple(entries),
        scan_depth=depth if depth is not None and depth >= 0 else None,
        token_budget=budget if budget is not None and budget > 0 else None,
    )


# Scripts written without spaces between words: a key there may match inside a
# "word", since the text has no word edges to look for.
_UNSPACED_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x9FFF),  # CJK radicals, kana, CJK ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width katakana
    (0x20000, 0x3FFFF),  # CJK extensions
)


def _is_word_char(ch: str) -> bool:
    """A letter, digit or ``_`` of a script that separates words with spaces."""
    if not (ch.isalnum() or ch == "_"):
        return False
    code = ord(ch)
    return not any(lo <= code <= hi for lo, hi in _UNSPACED_RANGES)


def _occurs(key: str, text: str) -> bool:
    """``key`` in ``text``, beginning and ending on word edges where the key does."""
    check_start = _is_word_char(key[0])
    check_end = _is_word_char(key[-1])
    start = text.find(key)
    while start != -1:
        end = start + len(key)
        if (not check_start or start == 0 or not _is_word_char(text[start - 1])) and \
                (not check_end or end == len(text) or not _is_word_char(text[end])):
            return True
        start = text.find(key, start + 1)
    return False


class _Scan:
    """The recent messages, once as written and once case-folded (made on demand)."""

    def __init__(self, recent_texts: Sequence[str], depth: int) -> None:
        texts = [t for t in recent_texts if isinstance(t, str)][-depth:] if depth > 0 else []
        kept: list[str] = []
        room = MAX_SCAN_CHARS
        for text in reversed(texts):  # the newest first, so they are never cut off
            if room <= 0:
                break
            kept.append(text[-room:] if len(text) > room else text)
            room -= len(kept[-1])
        # Whitespace runs as one space (keys too); messages joined by a
        # newline, so a key never spans two of them.
        self.exact = "\n".join(" ".join(text.split()) for text in reversed(kept))
        self._folded: str | None = None

    def folded(self) -> str:
        if self._folded is None:
            self._folded = self.exact.casefold()
        return self._folded

    def any_of(self, keys: Sequence[str], case_sensitive: bool) -> bool:
        if case_sensitive:
            return any(_occurs(key, self.exact) for key in keys)
        folded = self.folded()
        return any(_occurs(key.casefold(), folded) for key in keys)


def _is_active(entry: LoreEntry, scan: _Scan) -> bool:
    if not entry.enabled:
        return False
    if entry.constant:
        return True
    if not entry.keys or not scan.any_of(entry.keys, entry.case_sensitive):
        return False
    if entry.selective and entry.secondary_keys:
        return scan.any_of(entry.secondary_keys, entry.case_sensitive)
    return True


def _insertion_key(entry: LoreEntry) -> tuple[int, int, int]:
    return entry.insertion_order, -entry.priority, entry.index


def active_entries(book: LoreBook, recent_texts: Sequence[str], *, default_scan_depth: int = DEFAULT_SCAN_DEPTH
                   ) -> list[LoreEntry]:
    """The entries the recent messages activate, in insertion order (before any budget)."""
    depth = book.scan_depth if book.scan_depth is not None else default_scan_depth
    scan = _Scan(recent_texts, max(0, min(depth, MAX_SCAN_DEPTH)))
    return sorted((e for e in book.entries if _is_active(e, scan)), key=_insertion_key)


def lore_block(book: Mapping[str, Any] | None, recent_texts: Sequence[str], *,
               count_tokens: Callable[[str], int], default_scan_depth: int = DEFAULT_SCAN_DEPTH,
               default_budget: int = DEFAULT_BUDGET, max_budget: int = DEFAULT_MAX_BUDGET) -> str:
    """The lore the model sees: active entries' content within the token budget,
    in insertion order, joined by blank lines; "" when none.

    ``recent_texts`` are the conversation's messages oldest first, the new user
    message last; the last ``scan_depth`` of them (the book's, else
    ``default_scan_depth``) are scanned. ``count_tokens`` measures one entry's
    content in the model's tokens.
    """
    parsed = parse_book(book)
    if not parsed.entries:
        return ""
    active = active_entries(parsed, recent_texts, default_scan_depth=default_scan_depth)
    if not active:
        return ""
    budget = min(parsed.token_budget if parsed.token_budget is not None else default_budget, max_budget)
    # Admission by priority (higher first; ties: the one inserted earlier), each while it fits.
    admitted: set[int] = set()
    used = 0
    for entry in sorted(active, key=lambda e: (-e.priority, e.insertion_order, e.index)):
        cost = count_tokens(entry.content)
        if used + cost <= budget:
            admitted.add(entry.index)
            used += cost
    return "\n\n".join(entry.content for entry in active if entry.index in admitted)
