"""The running summary's pure rules (sessions/summary.py): which trimmed turns are
folded, the block the model sees, the chat that asks for a fold."""

from __future__ import annotations

from sessions.prompt import Context, PastTurn, plan_window, render
from sessions.summary import (
    DEFAULT_INSTRUCTIONS,
    GREETING_MARK,
    SUMMARY_HEADING,
    fold_mark,
    fold_messages,
    summary_block,
    turns_to_fold,
)

GREETING = PastTurn("", "Hi, I am Mira.")
TURNS = [GREETING] + [PastTurn(f"u{i}", f"a{i}", f"t_{i}") for i in range(1, 9)]


def test_without_a_summary_every_dropped_turn_is_folded() -> None:
    assert turns_to_fold(TURNS[:4], {}) == TURNS[:4]
    assert turns_to_fold(TURNS[:4], {"character_id": "mira", "sel:t_1": "t_9"}) == TURNS[:4]


def test_only_turns_after_summary_upto_are_folded() -> None:
    assert turns_to_fold(TURNS[:8], {"summary": "s", "summary_upto": "t_3"}) == TURNS[4:8]


def test_nothing_to_fold_between_trims() -> None:
    # The window dropped the same turns as at the last trim: the summary covers them.
    assert turns_to_fold(TURNS[:4], {"summary": "s", "summary_upto": "t_3"}) == []
    assert turns_to_fold([], {}) == []


def test_a_summary_older_than_the_turns_read_folds_them_all() -> None:
    # summary_upto names a turn before the history that was read.
    assert turns_to_fold(TURNS[5:8], {"summary": "s", "summary_upto": "t_2"}) == TURNS[5:8]


def test_the_greeting_has_a_mark_of_its_own() -> None:
    assert fold_mark(GREETING) == GREETING_MARK
    assert fold_mark(TURNS[1]) == "t_1"
    # A summary that covers only the greeting folds the turns after it.
    assert turns_to_fold(TURNS[:3], {"summary": "s", "summary_upto": GREETING_MARK}) == TURNS[1:3]


def test_summary_block() -> None:
    assert summary_block({}) == ""
    assert summary_block({"summary": "  ", "summary_upto": "t_1"}) == ""
    block = summary_block({"summary": "Mira and Sam met at the lake.\n", "summary_upto": "t_1"})
    assert block == f"{SUMMARY_HEADING}\nMira and Sam met at the lake."


def test_the_block_follows_the_system_prompt_and_keeps_the_prefix() -> None:
    meta = {"summary": "Sam has a cat named Pixel.", "summary_upto": "t_4"}
    context = Context("You are Mira.", memory=summary_block(meta))
    one = render(context, TURNS[5:7], "hello")
    two = render(context, TURNS[5:8], "again")
    assert one[0].role == "system" and one[0].content.startswith("You are Mira.\n\n" + SUMMARY_HEADING)
    assert "Pixel" in one[0].content
    assert two[: len(one) - 1] == one[:-1]  # the next turn extends the same prefix


def test_the_window_drops_what_is_then_folded() -> None:
    window = plan_window(system_prompt="sys", history=TURNS, new_text="new", max_history_turns=4)
    dropped = TURNS[: window.first_kept]
    assert turns_to_fold(dropped, {}) == dropped
    assert turns_to_fold(dropped, {"summary": "s", "summary_upto": fold_mark(dropped[-1])}) == []


def test_fold_messages_default_instructions() -> None:
    messages = fold_messages("", TURNS[:3], instructions="", max_summary_words=120)
    assert [m.role for m in messages] == ["system", "user"]
    system = messages[0].content
    assert system == DEFAULT_INSTRUCTIONS.replace("{max_words}", "120")
    for wanted in ("names", "relationships", "facts", "feelings", "promises", "third person", "concise"):
        assert wanted in system
    user = messages[1].content
    assert "nothing yet" in user
    assert "Companion: Hi, I am Mira." in user
    assert "User: u1\nCompanion: a1\nUser: u2\nCompanion: a2" in user


def test_fold_messages_carry_the_previous_summary_and_custom_instructions() -> None:
    messages = fold_messages("Sam likes tea.", [PastTurn("I got a dog", "", "t_9")],
                             instructions="Summarise in at most {max_words} words, in German.",
                             max_summary_words=50)
    assert messages[0].content == "Summarise in at most 50 words, in German."
    assert "Summary so far:\nSam likes tea." in messages[1].content
    assert "User: I got a dog" in messages[1].content
    assert "Companion:" not in messages[1].content  # an empty reply is left out
