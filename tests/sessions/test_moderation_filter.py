"""The pure moderation core (sessions/moderation.py): normalisation, matching, the hold-back.

The streaming properties are checked over every way of splitting a text into
deltas: whatever the split, the filter releases the same text as when the
whole reply arrives at once, never more than a prefix of the reply, never a
blocked match, and holds back no more than the longest entry.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from sessions.moderation import (
    MAX_PATTERN_CHARS,
    ChainModerator,
    ModerationListError,
    StreamFilter,
    normalize,
    parse_list,
)

LIST = """
# words and phrases
badword
kill yourself
ass
*坏蛋*
re:\\b\\d{3}-\\d{4}\\b
output:secret*
input:ssn
"""

MOD = parse_list(LIST)
LONGEST = max(len("kill yourself"), 8)  # the longest term; the pattern's longest match is 8


def splits(text: str, exhaustive_up_to: int = 10, max_cuts: int = 3) -> Iterator[list[str]]:
    """Ways to cut ``text`` into non-empty deltas: every one of the 2 ** (len - 1) for a
    short text, else every one with at most ``max_cuts`` cuts (kept fast)."""
    positions = range(1, len(text))
    counts = range(len(text)) if len(text) <= exhaustive_up_to else range(max_cuts + 1)
    for k in counts:
        for cuts in itertools.combinations(positions, k):
            bounds = (0, *cuts, len(text))
            yield [text[a:b] for a, b in itertools.pairwise(bounds)]
    yield list(text)  # one character a delta


def run(parts: list[str], moderator=MOD) -> tuple[list[str], bool, list[int]]:
    """Releases per feed (the last one is finish's), whether blocked, held sizes after each feed."""
    f = moderator.output_filter()
    released, held = [], []
    for p in parts:
        out, blocked = f.feed(p)
        released.append(out)
        if isinstance(f, StreamFilter):
            held.append(len(normalize(f.held)))
        if blocked:
            return released, True, held
    out, blocked = f.finish()
    released.append(out)
    return released, blocked, held


def whole(text: str, moderator=MOD) -> tuple[str, bool]:
    released, blocked, _ = run([text], moderator)
    return "".join(released), blocked


# ---------------------------------------------------------------- normalisation


def test_normalisation_folds_width_case_dashes_and_spaces() -> None:
    assert normalize("Ｂａｄ—Word") == "bad-word"
    assert normalize("KILL \n\t Yourself") == "kill yourself"
    assert normalize("Straße") == "strasse"
    # Composed and decomposed forms agree (NFKD), as they would under the harness's NFKC.
    assert normalize("caf\u00e9") == normalize("cafe\u0301")


def test_normalising_piece_by_piece_equals_normalising_whole() -> None:
    text = "Ａ  b\u00e9\tＣ—d"
    assert normalize(text) == "a b" + normalize("\u00e9") + " c-d"


# ---------------------------------------------------------------- matching


@pytest.mark.parametrize(("text", "blocked"), [
    ("you are a badword!", True),
    ("BADWORD", True),
    ("Ｂａｄｗｏｒｄ", True),  # full width
    ("badwords", False),  # word boundary on the right
    ("notbadword", False),  # ... and on the left
    ("kill   yourself", True),  # whitespace runs are one space
    ("kill\nyourself", True),
    ("killyourself", False),
    ("a class act", False),
    ("the ass.", True),
    ("assess", False),
    ("你这个坏蛋吗", True),  # no word boundaries in a script written without spaces
    ("call 555-1234 now", True),
    ("call 555-12345 now", False),
    ("call 555\u20131234", True),  # an en dash is a dash
    ("it is a secretly kept thing", True),  # secret* has no right boundary
    ("hello there", False),
])
def test_whole_texts(text: str, blocked: bool) -> None:
    assert whole(text)[1] is blocked
    # secret* is for replies only.
    assert MOD.input_blocked(text) is (blocked and "secret" not in text)


def test_directions() -> None:
    assert MOD.input_blocked("my ssn is") and not whole("my ssn is")[1]
    assert whole("a secret")[1] and not MOD.input_blocked("a secret")


def test_a_blocked_reply_releases_exactly_the_text_before_the_match() -> None:
    assert whole("you are a badword, sorry") == ("you are a ", True)
    assert whole("badword") == ("", True)


# ---------------------------------------------------------------- streaming, every split


STREAM_TEXTS = [
    "you are a badword!",
    "no bad words here",
    "kill yourself",
    "a class ass.",
    "call 555-1234",
    "call 555-12345",
    "坏蛋 and 好",
    "Ｂａｄ word",
    "badwor",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_every_split_releases_what_the_whole_text_releases(text: str) -> None:
    expected, expected_blocked = whole(text)
    for parts in splits(text):
        released, blocked, held = run(parts)
        got = "".join(released)
        assert (got, blocked) == (expected, expected_blocked), parts
        # Never anything but a prefix of the reply, and never a blocked match.
        assert text.startswith(got)
        assert not whole(got)[1], parts
        assert max(held, default=0) <= LONGEST, parts


def test_a_term_split_across_deltas_never_goes_out() -> None:
    for parts in splits("so badword"):
        released, blocked, _ = run(parts)
        assert blocked and "".join(released) == "so ", parts
        assert not any("b" in r for r in released), parts


def test_text_that_cannot_start_an_entry_goes_out_with_its_delta() -> None:
    f = MOD.output_filter()
    assert f.feed("hello ") == ("hello ", False)
    assert f.feed("there") == ("there", False)
    assert f.feed(" ba") == (" ", False)  # "ba" may become "badword"
    assert f.feed("nana") == ("banana", False)
    assert f.finish() == ("", False)


def test_a_complete_term_waits_one_character_for_its_right_boundary() -> None:
    f = MOD.output_filter()
    assert f.feed("the ass") == ("the ", False)
    assert f.feed("et") == ("asset", False)
    g = MOD.output_filter()
    assert g.feed("the ass") == ("the ", False)
    assert g.finish() == ("", True)  # the end of the reply is a boundary


def test_a_pattern_holds_only_what_could_still_match() -> None:
    f = MOD.output_filter()
    assert f.feed("call 55") == ("call ", False)
    assert f.feed("5-12") == ("", False)
    assert f.feed("345 ok") == ("555-12345 ok", False)


def test_after_a_block_nothing_more_is_released() -> None:
    f = MOD.output_filter()
    assert f.feed("badword ") == ("", True)
    assert f.feed("more") == ("", True)
    assert f.finish() == ("", True)


def test_held_text_at_finish_is_released_when_clean() -> None:
    f = MOD.output_filter()
    assert f.feed("so bad") == ("so ", False)
    assert f.finish() == ("bad", False)


def test_a_code_point_that_normalises_to_several_characters_is_held_whole() -> None:
    mod = parse_list("ssa")
    f = mod.output_filter()
    assert f.feed("x ß") == ("x ", False)  # ß is "ss": the start of "ssa"
    assert f.feed("x") == ("ßx", False)


# ---------------------------------------------------------------- the list file


def test_list_errors_name_the_line() -> None:
    with pytest.raises(ModerationListError, match="line 3"):
        parse_list("ok\n# fine\nre:a+\n", source="list")
    with pytest.raises(ModerationListError, match="bounded"):
        parse_list("re:\\d{3,}")
    with pytest.raises(ModerationListError, match="lookaround"):
        parse_list("re:foo(?=bar)")
    with pytest.raises(ModerationListError, match="regular expression"):
        parse_list("re:(")
    with pytest.raises(ModerationListError, match="empty"):
        parse_list("*")
    with pytest.raises(ModerationListError, match=str(MAX_PATTERN_CHARS)):
        parse_list("re:a{300}")


def test_blank_lines_comments_and_an_empty_list() -> None:
    mod = parse_list("\n  # nothing\n\n")
    assert not mod.input_blocked("anything")
    assert whole("anything", mod) == ("anything", False)


# ---------------------------------------------------------------- several policies


def test_a_chain_applies_every_policy() -> None:
    chain = ChainModerator((parse_list("badword"), parse_list("other")))
    assert chain.input_blocked("an other one") and chain.input_blocked("badword")
    assert not chain.input_blocked("fine")
    for parts in splits("ok other"):
        released, blocked, _ = run(parts, chain)
        assert ("".join(released), blocked) == ("ok ", True), parts
    for parts in splits("ok bad"):
        released, blocked, _ = run(parts, chain)
        assert ("".join(released), blocked) == ("ok bad", False), parts
