"""Which replies become DPO pairs and SFT conversations (sessions.training_export, pure)."""

from __future__ import annotations

import pytest

from sessions.messages import ChatMessage
from sessions.training import Alternative, ExchangeSnapshot, Rating, TrainingRecord
from sessions.training_export import chosen_and_rejected, dpo_rows, sft_rows

PROMPT = (ChatMessage("system", "You are Luna."), ChatMessage("assistant", "Hi!"), ChatMessage("user", "Tell me"))
PROMPT_JSON = [{"role": m.role, "content": m.content} for m in PROMPT]


def record(texts: list[str], ratings: dict[int, int] | None = None, selected: int | None = None,
           prompt: tuple[ChatMessage, ...] = PROMPT) -> TrainingRecord:
    """Alternatives t0, t1, ... with ``texts``; ``ratings`` and ``selected`` by index."""
    alternatives = tuple(Alternative(turn_id=f"t{i}", text=text, finish_reason="stop") for i, text in enumerate(texts))
    return TrainingRecord(
        snapshot=ExchangeSnapshot(user_id="u", conversation_id="c", exchange_id="x", character_id=None,
                                  prompt=prompt, alternatives=alternatives,
                                  selected=None if selected is None else f"t{selected}"),
        ratings={f"t{i}": Rating(rating=r, reason=None, at_ms=1) for i, r in (ratings or {}).items()},
        created_at_ms=1, updated_at_ms=1,
    )


def sides(rec: TrainingRecord) -> tuple[list[str], list[str]]:
    chosen, rejected = chosen_and_rejected(rec)
    return [a.text for a in chosen], [a.text for a in rejected]


@pytest.mark.parametrize("texts, ratings, selected, chosen, rejected", [
    # Ratings alone.
    (["a", "b"], {0: 1, 1: -1}, None, ["a"], ["b"]),
    (["a", "b", "c"], {0: 1, 2: 1, 1: -1}, None, ["a", "c"], ["b"]),
    # Unrated, unselected alternatives are neither side without an explicit choice.
    (["a", "b", "c"], {1: -1}, None, [], ["b"]),
    (["a", "b", "c"], {1: 1}, None, ["b"], []),
    # An explicit choice: the selected one is chosen, the others rejected unless rated +1.
    (["a", "b", "c"], {}, 1, ["b"], ["a", "c"]),
    (["a", "b", "c"], {0: 1}, 1, ["a"], ["c"]),
    # +1 ratings win over the selection for the chosen side.
    (["a", "b", "c"], {2: 1}, 0, ["c"], ["b"]),
    # A selected reply rated -1 is rejected, never chosen.
    (["a", "b"], {1: -1}, 1, [], ["a", "b"]),
    (["a", "b"], {0: 1, 1: -1}, 1, ["a"], ["b"]),
    # Empty and blank replies are never used.
    (["", "b", "  \n"], {0: 1, 2: -1}, 1, ["b"], []),
    (["a", ""], {}, 1, [], ["a"]),
])
def test_chosen_and_rejected(texts: list[str], ratings: dict[int, int], selected: int | None,
                             chosen: list[str], rejected: list[str]) -> None:
    assert sides(record(texts, ratings, selected)) == (chosen, rejected)


def test_dpo_rows_pair_every_chosen_with_every_rejected_in_generation_order() -> None:
    rows = dpo_rows(record(["a", "b", "c", "d"], {3: 1, 0: -1, 1: 1}, selected=1))
    pairs = [(row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in rows]
    assert pairs == [("b", "a"), ("b", "c"), ("d", "a"), ("d", "c")]
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] == PROMPT_JSON
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"


def test_dpo_needs_both_sides_and_a_prompt() -> None:
    assert dpo_rows(record(["a", "b"], {0: 1})) == []
    assert dpo_rows(record(["a", "b"], {0: -1, 1: -1})) == []
    assert dpo_rows(record([], {})) == []
    assert dpo_rows(record(["a", "b"], {0: 1, 1: -1}, prompt=())) == []
    assert sft_rows(record(["a", "b"], {0: 1}, prompt=())) == []


def test_dpo_drops_pairs_whose_texts_are_equal() -> None:
    rows = dpo_rows(record(["same", "same", "other"], {0: 1, 1: -1, 2: -1}))
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("same", "other")]


def test_sft_rows_are_the_prompt_then_each_chosen_reply() -> None:
    rows = sft_rows(record(["a", "b", "c"], {0: 1, 2: 1, 1: -1}))
    assert rows == [{"messages": [*PROMPT_JSON, {"role": "assistant", "content": "a"}]},
                    {"messages": [*PROMPT_JSON, {"role": "assistant", "content": "c"}]}]
    assert sft_rows(record(["a", "b"], {}, selected=1)) == [
        {"messages": [*PROMPT_JSON, {"role": "assistant", "content": "b"}]}]
    # Nothing chosen: nothing to imitate.
    assert sft_rows(record(["a", "b"], {0: -1})) == []
    assert sft_rows(record(["a", "b"], {})) == []


def test_rows_are_deterministic_and_do_not_share_lists() -> None:
    rec = record(["a", "b", "c"], {0: 1}, selected=2)
    first, second = dpo_rows(rec), dpo_rows(rec)
    assert first == second
    first[0]["prompt"].append({"role": "user", "content": "mutated"})
    assert dpo_rows(rec)[0]["prompt"] == PROMPT_JSON


def test_a_rating_of_an_alternative_the_snapshot_lacks_is_ignored() -> None:
    rec = record(["a", "b"], {0: 1, 1: -1})
    ghost = TrainingRecord(snapshot=rec.snapshot, ratings={**rec.ratings, "gone": Rating(1, None, 1)},
                           created_at_ms=1, updated_at_ms=1)
    assert sides(ghost) == (["a"], ["b"])
