"""Moderation: input checks and a streaming-safe output filter. Pure: no I/O, no ``await``.

A *block list* holds terms (words and phrases) and patterns (regular
expressions). The gateway asks it two things: whether a user's message is
blocked (before anything is stored), and, for every reply, an
:class:`OutputFilter` that sits between the engine's deltas and everything a
client can see.

Matching
--------
Text and terms are compared after :func:`normalize`, the eval harness's
normalisation done one code point at a time so that it works on a stream:
compatibility decomposition (NFKD: full-width ``Ｂａｄ`` is ``bad``, and a
composed ``é`` equals ``e`` + U+0301; equality under NFKD is equality under
the harness's NFKC), case folded, dash-like characters as ``-``, every run of
whitespace as one space, and invisible format characters (zero-width space,
joiners) dropped.

Word boundaries: a term matches only as a whole word on each side where it
begins or ends with a word character of a script written with spaces (Latin,
Cyrillic, Greek, ...): ``ass`` does not match ``class``. A term side that ends
in a letter of a script written without spaces (Chinese, Japanese, Korean,
Thai, ...) matches inside words, since those scripts have no spaces to find
words by. A ``*`` at the start or the end of a term removes the boundary on
that side (``kill*`` matches ``killing``).

Patterns (``re:`` entries) are Python regular expressions searched in the
normalised text with ``IGNORECASE`` (so write them in lower case). To keep the
hold-back bounded a pattern must have a bounded longest match
(:data:`MAX_PATTERN_CHARS` at most: no ``*``, ``+`` or ``{n,}``) and may not
use lookaround or backreferences; ``\\b`` is allowed (``^`` and ``$`` are
not useful: a reply is searched piece by piece).

The hold-back rule
------------------
The filter never sends text and then takes it back. After each delta it
releases the longest prefix of the unreleased text that can no longer be part
of a blocked match, whatever comes next, and holds the rest:

* the tail that is a proper prefix of a term (where that term's left boundary
  holds) is held: ``... ba`` waits while ``badword`` is on the list;
* a complete match that ends at the very end of the text so far is held too:
  the next character decides its right word boundary (``ass`` + ``et``);
* for a pattern, a tail from which the pattern could still complete a match
  (a partial match, found by walking the parsed pattern) is held; this is at
  most the pattern's longest match minus one character.

A pattern that can begin with any letter (an e-mail address, say) therefore
holds the last word of every delta until the next one shows it is not a match,
and walking it costs more CPU per delta than a thousand terms; prefer patterns
that begin with something rarer (a digit, ``@``).

So what is held is never longer than the longest entry, and text that cannot
start a blocked entry goes out with the delta that brought it: the filter adds
at most one engine step to the time to first token, and only when a reply
begins with what could be the start of a blocked entry.

A match that is complete and followed by at least one more character (or by
the end of the reply) blocks: the text before the match is released, the match
and everything after it never are, and :meth:`OutputFilter.feed` says
``blocked``. At the natural end of a reply :meth:`OutputFilter.finish` decides
the held tail with the end of text as its boundary, releasing it if clean.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: The longest match a pattern may declare, in normalised characters.
MAX_PATTERN_CHARS = 256

# The internals of ``re`` that parse a pattern into its tree; used to refuse
# unbounded patterns and to find partial matches, which ``re`` cannot.
_PARSER: Any = importlib.import_module("re._parser")
_COMPILER: Any = importlib.import_module("re._compiler")

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63"), "-")
_WORD = re.compile(r"\w")
# Scripts written without spaces between words: a term edge in one of them
# matches inside a word (see "Word boundaries").
_UNSPACED = ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "HANGUL", "THAI", "LAO", "KHMER",
             "MYANMAR", "TIBETAN", "IDEOGRAPHIC")


class ModerationListError(ValueError):
    """A block list that cannot be used; the message names the line."""


# ---------------------------------------------------------------- normalisation


def normalize_char(ch: str, after_space: bool) -> str:
    """One code point's normalised text; a whitespace after a whitespace is empty."""
    if ch.isspace():
        return "" if after_space else " "
    if unicodedata.category(ch) == "Cf":
        # Invisible format characters (zero-width space, joiners, direction
        # marks) would otherwise hide a term from the match: ``bad\u200bword``.
        return ""
    # Decompose, fold case, decompose again: folding can produce composed forms.
    out = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", ch).casefold())
    # A compatibility decomposition can itself contain spaces (U+00A8 -> " \u0308").
    return re.sub(r"\s+", " ", out.translate(_DASHES))


def normalize(text: str) -> str:
    """The normalised text :func:`normalize_char` gives, for whole texts (terms, input)."""
    out: list[str] = []
    after_space = False
    for ch in text:
        n = normalize_char(ch, after_space)
        if n:
            after_space = n.endswith(" ")
        out.append(n)
    return "".join(out)


def _is_word(ch: str) -> bool:
    return bool(_WORD.match(ch))


def _needs_boundary(ch: str) -> bool:
    return _is_word(ch) and not unicodedata.name(ch, "").startswith(_UNSPACED)


# ---------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class Term:
    text: str  # normalised
    left: bool  # a word boundary is required before it
    right: bool  # ... and after it

    @classmethod
    def parse(cls, raw: str) -> Term:
        free_left, free_right = raw.startswith("*"), raw.endswith("*")
        text = normalize(raw.strip("*")).strip()
        if not text:
            raise ModerationListError("an empty term")
        return cls(text, not free_left and _needs_boundary(text[0]),
                   not free_right and _needs_boundary(text[-1]))

    def left_ok(self, s: str, i: int) -> bool:
        """Whether this term, found at ``s[i:]``, has its left word boundary."""
        return not (self.left and i > 0 and _is_word(s[i - 1]))

    def right_ok(self, s: str, end: int) -> bool:
        """... and its right one, where it ends at ``end`` (the end of ``s`` counts as one)."""
        return not (self.right and end < len(s) and _is_word(s[end]))


_SINGLE = frozenset({"LITERAL", "NOT_LITERAL", "ANY", "IN", "CATEGORY"})
_GROUPS = frozenset({"SUBPATTERN", "ATOMIC_GROUP"})
_REPEATS = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})
_SUPPORTED = _SINGLE | _GROUPS | _REPEATS | {"BRANCH", "AT"}


@dataclass(eq=False, slots=True)
class Pattern:
    source: str
    regex: re.Pattern[str]
    longest: int
    _tree: Any
    _tests: dict[int, Callable[[str], bool]] = field(default_factory=dict)
    _starts: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def parse(cls, source: str) -> Pattern:
        flags = re.IGNORECASE
        try:
            regex = re.compile(source, flags)
            tree = _PARSER.parse(source, flags)
        except re.error as exc:
            raise ModerationListError(f"not a regular expression ({exc})") from None
        _check_supported(tree)
        lo, hi = tree.getwidth()
        if hi > MAX_PATTERN_CHARS:
            raise ModerationListError(
                f"a pattern needs a bounded longest match of at most {MAX_PATTERN_CHARS} characters "
                "(no *, + or {n,}): the filter holds back up to that much text")
        if hi == 0:
            raise ModerationListError("a pattern must match at least one character")
        return cls(source, regex, hi, tree)

    def could_continue(self, text: str) -> bool:
        """Whether some text starting with ``text`` has a match starting at its start that
        does not end before ``text`` does (a partial match: ``re`` has none, so the parsed
        pattern is walked here)."""
        n = len(text)

        def seq(items: Sequence[Any], k: int, pos: int, cont: Callable[[int], bool]) -> bool:
            if pos == n:
                return True  # the text ran out inside the pattern: it may still continue
            if k == len(items):
                return cont(pos)
            op, av = items[k]
            name = str(op)

            def after(q: int) -> bool:
                return seq(items, k + 1, q, cont)

            if name in _SINGLE:
                return self._test(items[k])(text[pos]) and after(pos + 1)
            if name == "AT":
                # Anchors and \b are zero-width; assuming they hold only holds back more.
                return after(pos)
            if name in _GROUPS:
                return seq(av[-1].data, 0, pos, after)
            if name == "BRANCH":
                return any(seq(alt.data, 0, pos, after) for alt in av[1])
            lo, hi, sub = av  # a repeat

            def rep(count: int, p: int) -> bool:
                if count >= lo and after(p):
                    return True
                # q > p: a repetition that consumed nothing cannot loop forever.
                return count < hi and seq(sub.data, 0, p, lambda q: q > p and rep(count + 1, q))

            return rep(0, pos)

        return seq(self._tree.data, 0, 0, lambda q: False)

    def can_start(self, ch: str) -> bool:
        """Whether a match can begin with ``ch`` (memoised: most characters cannot)."""
        known = self._starts.get(ch)
        if known is None:
            known = self._starts[ch] = self.could_continue(ch)
        return known

    def _test(self, item: Any) -> Callable[[str], bool]:
        """The exact test of one single-character item, compiled by ``re`` itself."""
        test = self._tests.get(id(item))
        if test is None:
            sub = _PARSER.SubPattern(self._tree.state, [item])
            compiled = _COMPILER.compile(sub, self.regex.flags)

            def test(ch: str, _m: Callable[[str], Any] = compiled.fullmatch) -> bool:
                return _m(ch) is not None

            self._tests[id(item)] = test
        return test


def _check_supported(tree: Any) -> None:
    for op, av in tree.data:
        name = str(op)
        if name not in _SUPPORTED:
            raise ModerationListError(f"patterns may not use {name.lower()} (lookaround, backreferences)")
        if name in _GROUPS:
            _check_supported(av[-1])
        elif name == "BRANCH":
            for alt in av[1]:
                _check_supported(alt)
        elif name in _REPEATS:
            _check_supported(av[2])


# ---------------------------------------------------------------- the filter


class OutputFilter(Protocol):
    """What sits between an engine and a client: every text goes through it in order."""

    def feed(self, text: str) -> tuple[str, bool]:
        """Take the next generated text; the text now safe to send, and whether the reply is blocked.

        Once blocked, the reply is over: later calls release nothing.
        """
        ...

    def finish(self) -> tuple[str, bool]:
        """The reply ended naturally: the held text if it is clean, and whether it is blocked."""
        ...


class Moderator(Protocol):
    """A moderation policy: what ``--moderation module:callable`` returns."""

    def input_blocked(self, text: str) -> bool:
        """Whether a user's message is refused."""
        ...

    def output_filter(self) -> OutputFilter:
        """A fresh filter for one reply."""
        ...


@dataclass(frozen=True, slots=True)
class Blocklist:
    """The terms and patterns of one direction."""

    terms: tuple[Term, ...] = ()
    patterns: tuple[Pattern, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.terms or self.patterns)

    def compile(self) -> _Compiled:
        return _Compiled(self)

    def blocked(self, text: str) -> bool:
        """Whether ``text``, taken whole, holds a blocked match."""
        f = StreamFilter(self.compile())
        return f.feed(text)[1] or f.finish()[1]


@dataclass(eq=False, slots=True)
class _Compiled:
    """What a stream filter needs of a block list, built once and shared by all replies.

    Terms are looked up by their text in a dict, one slice per start position
    and term length, rather than searched as one alternation: Python's ``re``
    tries the alternatives one by one, which costs hundreds of microseconds a
    delta with a thousand terms.
    """

    patterns: tuple[Pattern, ...]
    terms: dict[str, tuple[Term, ...]]
    lengths: tuple[int, ...]  # the distinct term lengths, longest first
    bounded_prefixes: frozenset[str]  # proper prefixes of terms that need a left boundary
    free_prefixes: frozenset[str]  # ... of terms that do not
    longest_term: int

    def __init__(self, blocklist: Blocklist) -> None:
        self.patterns = blocklist.patterns
        self.terms = {}
        for t in blocklist.terms:
            self.terms[t.text] = (*self.terms.get(t.text, ()), t)
        self.lengths = tuple(sorted({len(t) for t in self.terms}, reverse=True))
        terms = blocklist.terms
        self.bounded_prefixes = frozenset(t.text[:k] for t in terms if t.left for k in range(1, len(t.text)))
        self.free_prefixes = frozenset(t.text[:k] for t in terms if not t.left for k in range(1, len(t.text)))
        self.longest_term = max(self.lengths, default=0)


class StreamFilter:
    """The built-in :class:`OutputFilter` for one reply (see "The hold-back rule")."""

    __slots__ = ("_c", "_raw", "_norm", "_map", "_ctx", "_after_space", "_blocked")

    def __init__(self, compiled: _Compiled) -> None:
        self._c = compiled
        self._raw = ""  # unreleased text as generated
        self._norm = ""  # its normalisation
        self._map: list[int] = []  # for each normalised character, the index in _raw it came from
        self._ctx = ""  # the last released normalised character: the left boundary's context
        self._after_space = False
        self._blocked = False

    @property
    def held(self) -> str:
        """The text held back so far."""
        return self._raw

    def feed(self, text: str) -> tuple[str, bool]:
        if self._blocked:
            return "", True
        for ch in text:
            n = normalize_char(ch, self._after_space)
            if n:
                self._after_space = n.endswith(" ")
                self._map.extend([len(self._raw)] * len(n))
                self._norm += n
            self._raw += ch
        return self._decide(final=False)

    def finish(self) -> tuple[str, bool]:
        if self._blocked:
            return "", True
        return self._decide(final=True)

    def _decide(self, *, final: bool) -> tuple[str, bool]:
        s = self._ctx + self._norm
        base = len(self._ctx)
        n = len(s)
        # A match that ends at the very end of the text so far is undecided: the
        # next character decides (a word boundary, a longer match); it is held.
        # The earliest decided match blocks.
        hold = blocked = n
        terms = self._c.terms
        for i in range(base, n):
            for length in self._c.lengths:
                end = i + length
                if end > n:
                    continue
                for term in terms.get(s[i:end], ()):
                    if not term.left_ok(s, i):
                        continue
                    if end == n and not final:
                        hold = min(hold, i)
                    elif term.right_ok(s, end):
                        blocked = i
                        break
                if blocked < n:
                    break
            if blocked < n:
                break
        for p in self._c.patterns:
            start = base
            while (m := p.regex.search(s, start)) is not None and m.start() < blocked:
                if m.end() < n or final:
                    blocked = m.start()
                    break
                hold = min(hold, m.start())
                start = m.start() + 1
        if blocked < n:
            # Nothing from an undecided match on goes out either.
            return self._block(min(blocked, hold) - base)
        if not final:
            hold = min(hold, self._prefix_hold(s, base), self._pattern_hold(s, base))
        return self._release(hold - base), False

    def _prefix_hold(self, s: str, base: int) -> int:
        """Where the longest tail that is a proper prefix of a term begins (len(s): none)."""
        n = len(s)
        for k in range(min(self._c.longest_term - 1, n - base), 0, -1):
            i = n - k
            tail = s[i:]
            if tail in self._c.free_prefixes:
                return i
            if tail in self._c.bounded_prefixes and (i == 0 or not _is_word(s[i - 1])):
                return i
        return n

    def _pattern_hold(self, s: str, base: int) -> int:
        n = len(s)
        hold = n
        for p in self._c.patterns:
            for i in range(max(base, n - p.longest + 1), hold):
                if p.can_start(s[i]) and p.could_continue(s[i:]):
                    hold = i
                    break
        return hold

    def _cut(self, k: int) -> str:
        """Release the raw text behind the first ``k`` normalised characters."""
        if k >= len(self._norm):
            raw_cut, norm_cut = len(self._raw), len(self._norm)
        else:
            # One code point can normalise to several characters (ß -> ss): the
            # whole code point stays while any of its characters must.
            raw_cut = self._map[k]
            norm_cut = k
            while norm_cut > 0 and self._map[norm_cut - 1] == raw_cut:
                norm_cut -= 1
        out = self._raw[:raw_cut]
        if norm_cut > 0:
            self._ctx = self._norm[norm_cut - 1]
        self._raw = self._raw[raw_cut:]
        self._norm = self._norm[norm_cut:]
        self._map = [i - raw_cut for i in self._map[norm_cut:]]
        return out

    def _release(self, k: int) -> str:
        return self._cut(k)

    def _block(self, k: int) -> tuple[str, bool]:
        out = self._cut(max(k, 0))
        self._blocked = True
        self._raw, self._norm, self._map = "", "", []
        return out, True


@dataclass(frozen=True, slots=True)
class ListModerator:
    """The built-in :class:`Moderator`: one block list for user messages, one for replies."""

    input: Blocklist
    output: Blocklist
    _in: _Compiled = field(init=False, repr=False, compare=False)
    _out: _Compiled = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Compiled once: every message and every reply shares them.
        object.__setattr__(self, "_in", self.input.compile())
        object.__setattr__(self, "_out", self.output.compile())

    def input_blocked(self, text: str) -> bool:
        if not self.input:
            return False
        f = StreamFilter(self._in)
        return f.feed(text)[1] or f.finish()[1]

    def output_filter(self) -> OutputFilter:
        return StreamFilter(self._out)


def parse_list(text: str, source: str = "the moderation list") -> ListModerator:
    """A list file: one entry a line; ``#`` starts a comment line; blank lines are skipped.

    An entry is a term, or ``re:`` and a pattern. It applies to both directions
    unless it starts with ``input:`` (user messages only) or ``output:`` (replies only).
    """
    entries: dict[str, tuple[list[Term], list[Pattern]]] = {"input": ([], []), "output": ([], [])}
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        directions: tuple[str, ...] = ("input", "output")
        for d in ("input", "output"):
            if entry.startswith(d + ":"):
                directions, entry = (d,), entry[len(d) + 1:].strip()
                break
        try:
            if entry.startswith("re:"):
                pattern = Pattern.parse(entry[3:])
                for d in directions:
                    entries[d][1].append(pattern)
            else:
                term = Term.parse(entry)
                for d in directions:
                    entries[d][0].append(term)
        except ModerationListError as exc:
            raise ModerationListError(f"{source}, line {number}: {exc}") from None
    return ListModerator(*(Blocklist(tuple(t), tuple(p)) for t, p in entries.values()))


# ---------------------------------------------------------------- several policies at once


class _ChainFilter:
    """Filters applied one after the other: each sees only what the one before released."""

    __slots__ = ("_filters",)

    def __init__(self, filters: Sequence[OutputFilter]) -> None:
        self._filters = tuple(filters)

    def feed(self, text: str) -> tuple[str, bool]:
        return self._run(text, final=False)

    def finish(self) -> tuple[str, bool]:
        return self._run("", final=True)

    def _run(self, text: str, *, final: bool) -> tuple[str, bool]:
        blocked = False
        for f in self._filters:
            text, b = f.feed(text)
            # After a block upstream, nothing more will come: what was released
            # before the block is the end of the reply for the filters below.
            if final or blocked or b:
                more, b2 = f.finish()
                text, b = text + more, b or b2
            blocked = blocked or b
        return text, blocked


@dataclass(frozen=True, slots=True)
class ChainModerator:
    """Several moderators: a message is refused if any refuses it; replies pass all filters."""

    moderators: tuple[Moderator, ...]

    def input_blocked(self, text: str) -> bool:
        return any(m.input_blocked(text) for m in self.moderators)

    def output_filter(self) -> OutputFilter:
        return _ChainFilter([m.output_filter() for m in self.moderators])
