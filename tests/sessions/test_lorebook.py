"""sessions/lorebook.py: which entries the recent turns activate, in which order, within which budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sessions.characters import parse_card
from sessions.lorebook import MAX_ENTRIES, LoreEntry, active_entries, lore_block, parse_book

CARDS = Path(__file__).resolve().parent.parent / "fixtures" / "cards"


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def entry(content: str, keys: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    return {"keys": keys if keys is not None else [], "content": content, "extensions": {}, "enabled": True,
            "insertion_order": 0, **fields}


def book(*entries: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"entries": list(entries), "extensions": {}, **fields}


def lore(b: Any, recent: list[str], **kwargs: Any) -> str:
    return lore_block(b, recent, count_tokens=words, **kwargs)


def test_a_keyword_in_the_recent_turns_activates_its_entry() -> None:
    b = book(entry("Dragons hoard gold.", ["dragon"]), entry("Elves live long.", ["elf"]))
    assert lore(b, ["Tell me about the dragon"]) == "Dragons hoard gold."
    assert lore(b, ["nothing here"]) == ""
    assert lore(b, ["a dragon", "and an elf"]) == "Dragons hoard gold.\n\nElves live long."


def test_only_the_last_scan_depth_messages_count() -> None:
    b = book(entry("Dragons hoard gold.", ["dragon"]))
    old = ["the dragon", "one", "two", "three", "four"]
    assert lore(b, old) == ""  # five messages ago, the default depth is 4
    assert lore(b, old, default_scan_depth=5) == "Dragons hoard gold."
    assert lore(book(entry("x", ["dragon"]), scan_depth=1), ["dragon", "hi"]) == ""
    assert lore(book(entry("x", ["dragon"]), scan_depth=2), ["dragon", "hi"]) == "x"
    assert lore(book(entry("x", ["dragon"]), scan_depth=0), ["dragon"]) == ""


def test_keys_match_whole_words_and_ignore_case_by_default() -> None:
    b = book(entry("Art lore.", ["art"]))
    assert lore(b, ["I love ART."]) == "Art lore."
    assert lore(b, ["what a party"]) == ""
    assert lore(book(entry("Port lore.", ["Port Vantage"])), ["off to port  vantage"]) == "Port lore."
    assert lore(book(entry("Port lore.", ["Port Vantage"])), ["off to portvantage"]) == ""
    assert lore(book(entry("Port lore.", ["Port Vantage"])), ["off to port vantage!"]) == "Port lore."
    # Scripts without spaces have no word edges: a key matches inside the text.
    assert lore(book(entry("Tokyo lore.", ["東京"])), ["我在东京和東京都"]) == "Tokyo lore."
    # A key never spans two messages.
    assert lore(book(entry("x", ["red dragon"])), ["red", "dragon"]) == ""


def test_case_sensitive_entries() -> None:
    b = book(entry("Mr. Bean lore.", ["Bean"], case_sensitive=True))
    assert lore(b, ["a bean"]) == ""
    assert lore(b, ["Mr. Bean"]) == "Mr. Bean lore."


def test_selective_entries_need_a_secondary_key_too() -> None:
    b = book(entry("The king's sword.", ["sword"], selective=True, secondary_keys=["king", "crown"]))
    assert lore(b, ["a sword"]) == ""
    assert lore(b, ["the crown", "a sword"]) == "The king's sword."
    assert lore(b, ["the crown"]) == ""
    # Selective without secondary keys: the keys alone decide.
    assert lore(book(entry("s", ["sword"], selective=True)), ["sword"]) == "s"
    # Secondary keys do nothing on an entry that is not selective.
    assert lore(book(entry("s", ["sword"], secondary_keys=["king"])), ["sword"]) == "s"


def test_constant_and_disabled_entries() -> None:
    b = book(entry("Always.", [], constant=True), entry("Never.", ["dragon"], enabled=False),
             entry("Off constant.", [], constant=True, enabled=False))
    assert lore(b, ["dragon"]) == "Always."
    assert lore(b, []) == "Always."


def test_insertion_order_then_priority_then_book_position() -> None:
    b = book(entry("third", ["k"], insertion_order=5),
             entry("first", ["k"], insertion_order=-1),
             entry("second-b", ["k"], insertion_order=2, priority=1),
             entry("second-a", ["k"], insertion_order=2, priority=9),
             entry("second-c", ["k"], insertion_order=2, priority=1))
    assert lore(b, ["k"]).split("\n\n") == ["first", "second-a", "second-b", "second-c", "third"]


def test_the_budget_drops_lower_priority_entries_first() -> None:
    b = book(entry("one two three four", ["k"], insertion_order=0, priority=1),
             entry("five six seven", ["k"], insertion_order=1, priority=10),
             entry("eight nine", ["k"], insertion_order=2, priority=5),
             token_budget=6)
    # priority 10 (3 tokens) then 5 (2 tokens) fit; priority 1 (4 tokens) does not.
    assert lore(b, ["k"]) == "five six seven\n\neight nine"
    # A smaller entry of lower priority still fits where a bigger one did not.
    b2 = book(entry("a b c d e", ["k"], priority=3), entry("f g g g g g", ["k"], priority=2),
              entry("h", ["k"], priority=1, insertion_order=-5), token_budget=6)
    assert lore(b2, ["k"]) == "h\n\na b c d e"
    # Without a book budget the caller's default holds, and the caller caps what a book asks.
    big = book(entry("w " * 30, ["k"]))
    assert lore(big, ["k"], default_budget=10) == ""
    assert lore(big, ["k"], default_budget=30) != ""
    assert lore(book(entry("w " * 30, ["k"]), token_budget=10_000), ["k"], max_budget=20) == ""
    # Equal priority: the entry inserted earlier wins the room.
    b3 = book(entry("late late", ["k"], insertion_order=9), entry("early early", ["k"], insertion_order=1),
              token_budget=3)
    assert lore(b3, ["k"]) == "early early"


def test_regex_keys_are_literal_text() -> None:
    b = book(entry("Regex lore.", ["/drag(on)?/"], use_regex=True))
    assert lore(b, ["a dragon"]) == ""
    assert lore(b, ["literally /drag(on)?/ here"]) == "Regex lore."


@pytest.mark.parametrize("bad", [
    None, 42, "book", [], {}, {"entries": None}, {"entries": "x"}, {"entries": [None, 1, "x", []]},
    {"entries": [{"keys": "dragon", "content": "c"}]},
    {"entries": [{"keys": [1, None, {"a": 1}], "content": "c"}]},
    {"entries": [{"keys": ["dragon"], "content": None}]},
    {"entries": [{"keys": ["dragon"], "content": "c", "insertion_order": "first", "priority": [],
                  "enabled": "yes", "case_sensitive": 1, "selective": "no", "secondary_keys": 7,
                  "constant": None, "position": 3}]},
    {"entries": [{"keys": ["dragon"], "content": "c"}], "scan_depth": "deep", "token_budget": -5},
    {"entries": [{"keys": [""], "content": "c"}, {"keys": ["   "], "content": "c"}]},
    {"entries": [{"keys": ["dragon"], "content": "c", "insertion_order": float("nan"),
                  "priority": float("inf")}]},
])
def test_bad_book_shapes_never_raise(bad: Any) -> None:
    out = lore(bad, ["dragon", 3, None])  # type: ignore[list-item]
    assert out in ("", "c")


def test_loose_fields_read_defensively() -> None:
    b = {"entries": [{"keys": ["dragon"], "content": " c ", "insertion_order": 2.0, "enabled": "yes"}]}
    parsed = parse_book(b)
    assert parsed.entries == (LoreEntry(content="c", keys=("dragon",), insertion_order=2),)
    assert lore(b, ["dragon"]) == "c"  # enabled defaults to true when not a boolean


def test_the_work_is_bounded() -> None:
    many = book(*(entry(f"e{i}", [f"key{i}"]) for i in range(MAX_ENTRIES + 100)))
    parsed = parse_book(many)
    assert len(parsed.entries) == MAX_ENTRIES
    assert lore(many, [f"key{MAX_ENTRIES + 5}"]) == ""
    assert lore(many, ["key3"], default_budget=10) == "e3"
    # Only the newest MAX_SCAN_CHARS characters of the recent messages are looked at.
    assert lore(book(entry("x", ["needle"])), ["needle " + "y" * 50_000]) == ""
    assert lore(book(entry("x", ["needle"])), ["y" * 50_000 + " needle"]) == "x"


def test_active_entries_lists_before_the_budget() -> None:
    parsed = parse_book(book(entry("b", ["k"], insertion_order=2), entry("a", ["k"], insertion_order=1)))
    assert [e.content for e in active_entries(parsed, ["k"])] == ["a", "b"]


def test_the_fixture_cards_book() -> None:
    card = json.loads((CARDS / "v3_card.json").read_text(encoding="utf-8"))
    character = parse_card(card)
    b = character.character_book
    assert b is not None
    airship = "The Kestrel is a patched-up courier airship with a temperamental engine."
    port = "Port Vantage is a floating market where {{char}} owes the harbourmaster."
    assert lore_block(b, ["Is that your airship?"], count_tokens=words) == airship
    assert lore_block(b, ["we dock at port vantage", "and then?"], count_tokens=words) == port
    assert lore_block(b, ["Port Vantage on the Kestrel"], count_tokens=words) == f"{airship}\n\n{port}"
    assert lore_block(b, ["hello"], count_tokens=words) == ""
    assert lore_block(b, ["the kestrel"], count_tokens=words, default_budget=5) == ""
    assert lore_block(None, ["kestrel"], count_tokens=words) == ""
