"""Key naming: escaping, no collisions, one hash tag per user, SCAN patterns."""

from __future__ import annotations

import fnmatch
import itertools
import re

import pytest

# The project is not installed in the venv and pytest's config sets no
from sessions.keys import KeySpace, escape_id, glob_escape

IDS = [
    "",
    "bob",
    "bob2",
    "Bob",
    "bob:2",
    "bob}",
    "{bob}",
    "bo{b",
    "b*",
    "b?",
    "b[ab]",
    "b\\",
    "%62ob",  # looks like an escaped "bob"
    "b%",
    "bob ",
    "bob\n",
    "a.b_c-d",
    "a~b",
    "用户",
    "😀",
    "：",
]


def _hash_tag(key: str) -> str:
    """The part Redis Cluster hashes (first {...} with non-empty content)."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def _all_user_keys(ks: KeySpace, user: str, other: str) -> list[str]:
    return [
        ks.history(user, other),
        ks.conversations(user),
        ks.active(user),
        ks.idempotency(user, other),
        ks.turn(user, other),
        ks.delta_log(user, other),
        ks.user_key(user, "ratelimit"),
    ]


def test_escape_is_safe_and_injective() -> None:
    escaped = [escape_id(i) for i in IDS]
    assert len(set(escaped)) == len(IDS)
    for e in escaped:
        assert re.fullmatch(r"[A-Za-z0-9._%-]*", e), e
    assert escape_id("a.b_c-d") == "a.b_c-d"
    assert escape_id("a:b") == "a%3Ab"
    assert escape_id("%") == "%25"
    with pytest.raises(TypeError):
        escape_id(3)  # type: ignore[arg-type]


def test_every_key_starts_with_prefix_and_shares_the_user_tag() -> None:
    ks = KeySpace("pfx:")
    for user in IDS:
        tag = ks.user_tag(user)
        assert tag == "{u:" + escape_id(user) + "}"
        for key in _all_user_keys(ks, user, "x{y}z:*"):
            assert key.startswith("pfx:" + tag + ":")
            assert _hash_tag(key) == "u:" + escape_id(user)


def test_default_prefix() -> None:
    assert KeySpace().conversations("u").startswith("rapport:{u:u}:")


def test_no_collisions_between_kinds_or_ids() -> None:
    ks = KeySpace("p:")
    seen: dict[str, tuple] = {}
    for user, other in itertools.product(IDS, IDS):
        for n, key in enumerate(_all_user_keys(ks, user, other)):
            origin = (user, n, other if n in (0, 3, 4, 5) else None)
            assert seen.setdefault(key, origin) == origin, (key, origin, seen[key])


def test_braces_cannot_move_the_hash_tag() -> None:
    ks = KeySpace("p:")
    a = ks.history("alice", "}{u:bob}")
    b = ks.history("bob", "x")
    assert _hash_tag(a) == "u:alice"
    assert _hash_tag(b) == "u:bob"


def test_user_pattern_matches_own_keys_only() -> None:
    ks = KeySpace("pre*[x]:")
    for user in IDS:
        pattern = ks.user_pattern(user)
        # Redis glob and fnmatch agree once backslash escapes are translated.
        rx = _redis_glob_to_regex(pattern)
        for other in IDS:
            for key in _all_user_keys(ks, other, "c*:{z}"):
                assert bool(rx.fullmatch(key)) == (other == user), (pattern, key)


def _redis_glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A small Redis-glob translator (supports * ? [..] and backslash escapes)."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1 : j] + "]")
            i = j
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.S)


def test_glob_escape() -> None:
    assert glob_escape("a*b?c[d]e\\f{g}") == "a\\*b\\?c\\[d\\]e\\\\f{g}"
    # Sanity: without escaping, fnmatch would treat * as a wildcard.
    assert fnmatch.fnmatchcase("axb", "a*b")
