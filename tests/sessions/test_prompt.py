"""The prompt window (sessions/prompt.py): turn cap in blocks, token budget, pairing."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import pytest

from protocol.errors import TooLarge
from sessions.messages import ChatMessage
from sessions.prompt import PastTurn, build_window, first_kept_turn, pair_history, plan_window, render


def chars(messages: Sequence[ChatMessage]) -> int:
    """A fake tokenizer: one token per character of content."""
    return sum(len(m.content) for m in messages)


def turns(n: int) -> list[PastTurn]:
    return [PastTurn(f"user {i}", f"reply {i}") for i in range(n)]


def history_of(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


# ---------------------------------------------------------------- first_kept_turn


@pytest.mark.parametrize(("total", "cap", "block", "start"), [
    (0, 16, 4, 0),
    (1, 16, 4, 0),
    (16, 16, 4, 0),  # exactly at the cap: no overflow
    (17, 16, 4, 4),  # one over: jump a whole block
    (18, 16, 4, 4),
    (20, 16, 4, 4),
    (21, 16, 4, 8),
    (24, 16, 4, 8),
    (25, 16, 4, 12),
    (17, 16, 1, 1),  # block 1: slide one at a time
    (30, 16, 1, 14),
    (17, 16, 0, 1),  # a block below 1 counts as 1
    (17, 16, -3, 1),
])
def test_first_kept_turn(total: int, cap: int, block: int, start: int) -> None:
    assert first_kept_turn(total, cap, block) == start


@pytest.mark.parametrize(("total", "start"), [(4, 0), (5, 4), (8, 4), (9, 8), (13, 12)])
def test_first_kept_turn_block_larger_than_cap_is_clamped_to_the_cap(total: int, start: int) -> None:
    assert first_kept_turn(total, 4, 10) == start
    assert 1 <= total - start <= 4


@pytest.mark.parametrize("total", [0, 1, 5, 100])
def test_first_kept_turn_cap_zero_keeps_nothing(total: int) -> None:
    assert first_kept_turn(total, 0, 4) == total
    assert first_kept_turn(total, -1, 4) == total


@pytest.mark.parametrize(("cap", "block"), [(16, 4), (16, 1), (16, 16), (10, 3), (5, 8), (1, 4)])
def test_window_start_moves_only_every_block_turns(cap: int, block: int) -> None:
    eff = max(1, min(block, cap))
    starts = [first_kept_turn(n, cap, block) for n in range(0, 41)]
    for n, start in enumerate(starts):
        kept = n - start
        assert 0 <= start <= n
        assert start % eff == 0
        assert kept <= cap
        if n >= cap:
            assert kept >= cap - eff + 1
        else:
            assert start == 0
    # Non-decreasing, and every move is exactly one block, block turns apart.
    changes = [n for n in range(1, 41) if starts[n] != starts[n - 1]]
    assert all(starts[n] - starts[n - 1] == eff for n in changes)
    assert changes[0] == cap + 1
    assert all(b - a == eff for a, b in pairwise(changes))


def test_consecutive_prompts_extend_each_other_between_jumps() -> None:
    """The prefix-cache property over a growing conversation: 40 turns, cap 16, block 4."""
    cap, block = 16, 4
    conversation = turns(41)
    prompts = [
        build_window(system_prompt="sys", history=conversation[:n], new_text=conversation[n].user,
                     max_history_turns=cap, trim_block=block)
        for n in range(41)
    ]
    jumps = 0
    for n in range(1, 41):
        prev, cur = prompts[n - 1], prompts[n]
        kept = sum(1 for m in cur if m.role == "assistant")
        assert kept <= cap
        if n >= cap:
            assert kept >= cap - block + 1
        if first_kept_turn(n, cap, block) == first_kept_turn(n - 1, cap, block):
            assert cur[:len(prev)] == prev  # the old prompt is a prefix of the new one
        else:
            jumps += 1
            assert cur[:len(prev)] != prev
    assert jumps == (40 - cap + block - 1) // block  # 17, 21, 25, 29, 33, 37


# ---------------------------------------------------------------- render


def test_render_orders_system_history_then_new_message() -> None:
    msgs = render("be kind", [PastTurn("hi", "hello!"), PastTurn("how are you", "fine")], "and you?")
    assert history_of(msgs) == [
        ("system", "be kind"),
        ("user", "hi"), ("assistant", "hello!"),
        ("user", "how are you"), ("assistant", "fine"),
        ("user", "and you?"),
    ]


def test_render_omits_an_empty_system_prompt() -> None:
    assert history_of(render("", [], "hi")) == [("user", "hi")]


def test_render_skips_empty_assistant_replies() -> None:
    msgs = render("", [PastTurn("hi", ""), PastTurn("still there?", "yes")], "good")
    assert history_of(msgs) == [
        ("user", "hi"),
        ("user", "still there?"), ("assistant", "yes"),
        ("user", "good"),
    ]


# ---------------------------------------------------------------- build_window


def test_build_window_without_budget_applies_only_the_turn_cap() -> None:
    history = turns(20)
    msgs = build_window(system_prompt="sys", history=history, new_text="new", max_history_turns=16,
                        trim_block=4)
    assert msgs == render("sys", history[4:], "new")


def test_build_window_needs_both_budget_and_counter_to_trim_by_tokens() -> None:
    history = turns(6)
    only_budget = build_window(system_prompt="", history=history, new_text="n", max_history_turns=16,
                               max_prompt_tokens=1)
    only_counter = build_window(system_prompt="", history=history, new_text="n", max_history_turns=16,
                                count_tokens=chars)
    assert only_budget == only_counter == render("", history, "n")


def test_build_window_with_no_history() -> None:
    msgs = build_window(system_prompt="sys", history=[], new_text="hi", max_history_turns=16,
                        max_prompt_tokens=100, count_tokens=chars)
    assert history_of(msgs) == [("system", "sys"), ("user", "hi")]


def test_build_window_cap_zero_sends_no_history() -> None:
    msgs = build_window(system_prompt="sys", history=turns(5), new_text="hi", max_history_turns=0,
                        max_prompt_tokens=10_000, count_tokens=chars)
    assert history_of(msgs) == [("system", "sys"), ("user", "hi")]


# Each past turn below costs 20 "tokens" (10 + 10 characters); the bare prompt costs 20.
SYS = "S" * 10
NEW = "N" * 10
TEN = [PastTurn("u" * 10, "a" * 10) for _ in range(10)]
BARE = 20


@pytest.mark.parametrize("budget", [BARE + 10 * 20, BARE + 10 * 20 + 50])
def test_build_window_keeps_everything_that_fits(budget: int) -> None:
    msgs = build_window(system_prompt=SYS, history=TEN, new_text=NEW, max_history_turns=100,
                        max_prompt_tokens=budget, count_tokens=chars)
    assert msgs == render(SYS, TEN, NEW)


@pytest.mark.parametrize(("budget", "start"), [
    # quantum = budget // 2; dropped tokens = overflow rounded up to a quantum, in whole turns
    (BARE + 10 * 20 - 1, 6),  # overflow 1 -> drop 109 -> 6 turns (120)
    (BARE + 6 * 20, 7),  # overflow 80 -> drop 140 (quantum 70) -> 7 turns
    (BARE + 2 * 20, 10),
    (BARE, 10),
])
def test_build_window_drops_a_whole_quantum_of_tokens(budget: int, start: int) -> None:
    msgs = build_window(system_prompt=SYS, history=TEN, new_text=NEW, max_history_turns=100,
                        max_prompt_tokens=budget, count_tokens=chars)
    assert chars(msgs) <= budget
    overflow = chars(render(SYS, TEN, NEW)) - budget
    quantum = budget // 2
    need = -(-overflow // quantum) * quantum
    expected = min(10, -(-need // 20))
    assert msgs == render(SYS, TEN[expected:], NEW)


def test_token_trimming_keeps_the_prefix_for_a_quantum_of_growth() -> None:
    """Over a growing conversation the start moves only after half a budget of growth."""
    budget = BARE + 20 * 20  # 20 turns of 20 tokens
    conversation = [PastTurn("u" * 10, "a" * 10) for _ in range(120)]
    starts = []
    for n in range(len(conversation)):
        msgs = build_window(system_prompt=SYS, history=conversation[:n], new_text=NEW,
                            max_history_turns=1000, max_prompt_tokens=budget, count_tokens=chars)
        assert chars(msgs) <= budget
        kept = (len(msgs) - 2) // 2
        starts.append(n - kept)
    moves = [i for i in range(1, len(starts)) if starts[i] != starts[i - 1]]
    gaps = [b - a for a, b in pairwise(moves)]
    # A quantum is 210 tokens, more than 10 turns: at least 10 turns between moves.
    assert gaps and min(gaps) >= 10, (moves, gaps)
    for a, b in pairwise(moves):  # between moves each prompt extends the previous one
        assert len(set(starts[a:b])) == 1


def test_build_window_budget_trimming_starts_from_the_cap_start() -> None:
    history = [PastTurn("u" * 10, "a" * 10) for _ in range(20)]
    # The cap alone keeps turns 4..19 (16 turns, 320 tokens); the budget fits 9.
    msgs = build_window(system_prompt=SYS, history=history, new_text=NEW, max_history_turns=16,
                        max_prompt_tokens=BARE + 9 * 20, count_tokens=chars, trim_block=4)
    # From the cap start 4: overflow 140, quantum 100, so 200 tokens (10 turns) go.
    assert msgs == render(SYS, history[14:], NEW)


def test_build_window_returns_system_and_message_when_no_history_fits() -> None:
    msgs = build_window(system_prompt=SYS, history=TEN, new_text=NEW, max_history_turns=16,
                        max_prompt_tokens=BARE + 5, count_tokens=chars, trim_block=4)
    assert history_of(msgs) == [("system", SYS), ("user", NEW)]


def test_build_window_raises_too_large_when_the_bare_message_does_not_fit() -> None:
    with pytest.raises(TooLarge) as exc:
        build_window(system_prompt=SYS, history=TEN, new_text=NEW, max_history_turns=16,
                     max_prompt_tokens=BARE - 1, count_tokens=chars)
    assert exc.value.code == "too_large"


def test_build_window_raises_too_large_even_without_history() -> None:
    with pytest.raises(TooLarge):
        build_window(system_prompt="", history=[], new_text="x" * 11, max_history_turns=16,
                     max_prompt_tokens=10, count_tokens=chars)


def test_build_window_with_budget_omits_an_empty_system_prompt() -> None:
    msgs = build_window(system_prompt="", history=TEN, new_text=NEW, max_history_turns=16,
                        max_prompt_tokens=10 + 2 * 20, count_tokens=chars, trim_block=4)
    assert msgs[0] == ChatMessage("user", "u" * 10)
    assert msgs == render("", TEN[9:], NEW)  # overflow 160, quantum 25: drop 175 -> 9 turns
    bare = build_window(system_prompt="", history=TEN, new_text=NEW, max_history_turns=16,
                        max_prompt_tokens=10, count_tokens=chars)
    assert history_of(bare) == [("user", NEW)]


def test_build_window_skips_empty_replies_and_counts_what_is_sent() -> None:
    history = [PastTurn("u" * 10, ""), PastTurn("v" * 10, "b" * 10)]
    seen: list[int] = []

    def count(msgs: Sequence[ChatMessage]) -> int:
        assert all(m.content for m in msgs)  # no empty assistant message is ever sent
        seen.append(len(msgs))
        return chars(msgs)

    msgs = build_window(system_prompt="", history=history, new_text=NEW, max_history_turns=16,
                        max_prompt_tokens=1000, count_tokens=count)
    assert history_of(msgs) == [("user", "u" * 10), ("user", "v" * 10), ("assistant", "b" * 10),
                                ("user", NEW)]


# ---------------------------------------------------------------- pair_history


def test_pair_history_normal_pairs() -> None:
    entries = [("user", "hi", "t1"), ("assistant", "hello", "t1"),
               ("user", "how are you", "t2"), ("assistant", "fine", "t2")]
    assert pair_history(entries) == [PastTurn("hi", "hello"), PastTurn("how are you", "fine")]


def test_pair_history_empty() -> None:
    assert pair_history([]) == []


def test_pair_history_user_without_reply_at_the_end() -> None:
    entries = [("user", "hi", "t1"), ("assistant", "hello", "t1"), ("user", "still typing", "t2")]
    assert pair_history(entries) == [PastTurn("hi", "hello"), PastTurn("still typing", "")]


def test_pair_history_user_without_reply_in_the_middle() -> None:
    entries = [("user", "lost", "t1"), ("user", "again", "t2"), ("assistant", "here", "t2")]
    assert pair_history(entries) == [PastTurn("lost", ""), PastTurn("again", "here")]


def test_pair_history_skips_an_assistant_whose_user_was_trimmed() -> None:
    entries = [("assistant", "orphan", "t0"), ("user", "hi", "t1"), ("assistant", "hello", "t1")]
    assert pair_history(entries) == [PastTurn("hi", "hello")]


def test_pair_history_only_an_orphan_reply() -> None:
    assert pair_history([("assistant", "orphan", "t0")]) == []


def test_pair_history_reply_of_another_turn_does_not_pair() -> None:
    entries = [("user", "hi", "t1"), ("assistant", "not yours", "t9")]
    assert pair_history(entries) == [PastTurn("hi", "")]


def test_pair_history_keeps_empty_replies_as_empty() -> None:
    entries = [("user", "hi", "t1"), ("assistant", "", "t1"), ("user", "there?", "t2"),
               ("assistant", "yes", "t2")]
    paired = pair_history(entries)
    assert paired == [PastTurn("hi", ""), PastTurn("there?", "yes")]
    assert history_of(render("", paired, "ok")) == [("user", "hi"), ("user", "there?"),
                                                     ("assistant", "yes"), ("user", "ok")]


def test_pair_history_ignores_other_roles() -> None:
    entries = [("user", "hi", "t1"), ("system", "note", "t1"), ("assistant", "hello", "t1")]
    assert pair_history(entries) == [PastTurn("hi", "hello")]


def test_the_turn_cap_counts_positions_in_the_whole_conversation_not_in_what_was_read() -> None:
    """Only the newest turns are read: with their offset, the first kept turn still moves in blocks."""
    conversation = [PastTurn(f"u{n}", f"a{n}") for n in range(40)]
    firsts = []
    for total in range(20, 30):
        read = conversation[total - 9:total]  # the newest 9 turns, as the manager reads them
        window = plan_window(system_prompt="s", history=read, new_text="new", max_history_turns=4,
                             history_offset=total - len(read))
        kept_first = window.messages[1].content
        firsts.append(kept_first)
    # The first kept turn stays put for a whole block of 4 turns, then jumps.
    assert firsts == ["u16"] + ["u20"] * 4 + ["u24"] * 4 + ["u28"], firsts
    # Without the offset the window would start one turn later on every turn.
    unanchored = [plan_window(system_prompt="s", history=conversation[t - 9:t], new_text="new",
                              max_history_turns=4).messages[1].content for t in (20, 21)]
    assert unanchored == ["u19", "u20"]
