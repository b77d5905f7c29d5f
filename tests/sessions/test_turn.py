"""The pure turn state machine (sessions/turn.py): every state, every transition.

No I/O, no clock: times are plain numbers passed in, as the adapters do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from protocol.errors import IllegalTransition, RapportError
from sessions.turn import (
    ALL_FINISH_REASONS,
    ENGINE_FINISH_REASONS,
    FINISH_REASONS,
    INTERRUPTING_EVENTS,
    INTERRUPTIONS,
    TRANSITIONS,
    Attachment,
    AttachmentState,
    DeltaOut,
    Ending,
    Turn,
    TurnEvent,
    TurnState,
    Usage,
)

T0 = 1000.0  # received_ms of every turn below
NOW = 2000.0

# The contract's finish reasons (protocol.md, "finish_reason"), with the
# addition content_filter (a blocked reply, sessions.moderation).
CONTRACT_FINISH_REASONS = {"stop", "length", "cancelled", "interrupted", "budget_exceeded", "error",
                           "content_filter"}

# How an adapter fires each event: one method per TurnEvent.
FIRE: dict[TurnEvent, Callable[[Turn, float], object]] = {
    TurnEvent.DELTA: lambda t, now: t.delta("x", 1, now),
    TurnEvent.FINISH: lambda t, now: t.finish("stop", Usage(1, 2, 0), now),
    TurnEvent.CONTENT_FILTER: lambda t, now: t.content_filtered(now),
    TurnEvent.CANCEL: lambda t, now: t.cancel(now),
    TurnEvent.DETACH_EXPIRED: lambda t, now: t.expire_detached(now),
    TurnEvent.ENGINE_FAILED: lambda t, now: t.engine_failed(now),
    TurnEvent.DEADLINE: lambda t, now: t.miss_deadline(now),
    TurnEvent.INTERNAL_ERROR: lambda t, now: t.internal_error(now),
}

ENDING_EVENTS = [e for e in TurnEvent if e is not TurnEvent.DELTA]


def new_turn() -> Turn:
    return Turn(turn_id="t-1", received_ms=T0)


def turn_in(state: TurnState, ended_by: TurnEvent = TurnEvent.CANCEL) -> Turn:
    """A turn brought into ``state`` through legal moves only."""
    turn = new_turn()
    if state is TurnState.QUEUED:
        return turn
    turn.delta("hello", 1, T0 + 10)
    if state is TurnState.STREAMING:
        return turn
    if ended_by is TurnEvent.DEADLINE:  # only reachable from QUEUED
        turn = new_turn()
    FIRE[ended_by](turn, T0 + 20)
    assert turn.state is TurnState.ENDED
    return turn


# ---------------------------------------------------------------- the table itself


def test_fire_covers_every_event() -> None:
    assert set(FIRE) == set(TurnEvent)


def test_transition_table_is_the_documented_lifecycle() -> None:
    expected = {(TurnState.QUEUED, TurnEvent.DELTA): TurnState.STREAMING,
                (TurnState.STREAMING, TurnEvent.DELTA): TurnState.STREAMING,
                (TurnState.QUEUED, TurnEvent.DEADLINE): TurnState.ENDED}
    for event in (TurnEvent.FINISH, TurnEvent.CONTENT_FILTER, TurnEvent.CANCEL, TurnEvent.DETACH_EXPIRED,
                  TurnEvent.ENGINE_FAILED, TurnEvent.INTERNAL_ERROR):
        expected[(TurnState.QUEUED, event)] = TurnState.ENDED
        expected[(TurnState.STREAMING, event)] = TurnState.ENDED
    assert TRANSITIONS == expected


def test_ended_is_final_and_deadline_only_while_queued() -> None:
    assert not [k for k in TRANSITIONS if k[0] is TurnState.ENDED]
    assert [k for k in TRANSITIONS if k[1] is TurnEvent.DEADLINE] == [
        (TurnState.QUEUED, TurnEvent.DEADLINE)
    ]


def test_every_state_is_reachable() -> None:
    reachable = {TurnState.QUEUED} | set(TRANSITIONS.values())
    assert reachable == set(TurnState)


def test_new_turn_is_queued() -> None:
    turn = new_turn()
    assert turn.state is TurnState.QUEUED
    assert not turn.ended
    assert turn.seq == 0 and turn.text == "" and turn.ending is None
    assert turn.completion_tokens == 0
    assert turn.timings() == {"queue_ms": None, "ttft_ms": None, "total_ms": None}


@pytest.mark.parametrize(("state", "event"), sorted(TRANSITIONS, key=lambda k: (k[0].value, k[1].value)),
                         ids=lambda x: x.value)
def test_legal_transition(state: TurnState, event: TurnEvent) -> None:
    turn = turn_in(state)
    result = FIRE[event](turn, NOW)
    assert turn.state is TRANSITIONS[(state, event)]
    if TRANSITIONS[(state, event)] is TurnState.ENDED:
        assert isinstance(result, Ending)
        assert turn.ended and turn.ending is result
        assert turn.ended_ms == NOW
    else:
        assert isinstance(result, DeltaOut)
        assert not turn.ended and turn.ending is None


ILLEGAL = [
    (state, event, ended_by)
    for state, event in itertools.product(TurnState, TurnEvent)
    if (state, event) not in TRANSITIONS
    # For ENDED, try every way a turn can have ended.
    for ended_by in (ENDING_EVENTS if state is TurnState.ENDED else [TurnEvent.CANCEL])
]


def test_illegal_pairs_cover_streaming_and_ended() -> None:
    # QUEUED accepts every event; STREAMING refuses only the deadline; ENDED refuses all.
    assert {(s, e) for s, e, _ in ILLEGAL} == (
        {(TurnState.STREAMING, TurnEvent.DEADLINE)} | {(TurnState.ENDED, e) for e in TurnEvent}
    )


@pytest.mark.parametrize(("state", "event", "ended_by"), ILLEGAL,
                         ids=[f"{s.value}-{e.value}-by-{b.value}" for s, e, b in ILLEGAL])
def test_illegal_transition_raises_and_changes_nothing(state: TurnState, event: TurnEvent,
                                                       ended_by: TurnEvent) -> None:
    turn = turn_in(state, ended_by)
    before = (turn.state, turn.seq, turn.text, turn.completion_tokens, turn.ending, turn.ended_ms,
              turn.first_delta_ms)
    with pytest.raises(IllegalTransition) as exc:
        FIRE[event](turn, NOW)
    assert exc.value.code == "internal"
    assert isinstance(exc.value, RapportError)
    after = (turn.state, turn.seq, turn.text, turn.completion_tokens, turn.ending, turn.ended_ms,
             turn.first_delta_ms)
    assert after == before


def test_deadline_while_streaming_is_illegal() -> None:
    turn = turn_in(TurnState.STREAMING)
    with pytest.raises(IllegalTransition):
        turn.miss_deadline(NOW)
    assert turn.state is TurnState.STREAMING


def test_delta_after_end_is_illegal() -> None:
    turn = turn_in(TurnState.ENDED)
    with pytest.raises(IllegalTransition):
        turn.delta("late", 1, NOW)
    assert turn.text == "hello" and turn.seq == 1


def test_empty_delta_after_end_is_illegal_too() -> None:
    turn = turn_in(TurnState.ENDED)
    with pytest.raises(IllegalTransition):
        turn.delta("", 3, NOW)
    assert turn.completion_tokens == 1


def test_finish_twice_is_illegal() -> None:
    turn = new_turn()
    first = turn.finish("stop", Usage(), NOW)
    with pytest.raises(IllegalTransition):
        turn.finish("length", Usage(), NOW + 1)
    assert turn.ending is first and turn.ending.finish_reason == "stop"
    assert turn.ended_ms == NOW


def test_cancel_after_end_is_illegal() -> None:
    turn = turn_in(TurnState.STREAMING)
    turn.finish("stop", Usage(), NOW)
    with pytest.raises(IllegalTransition):
        turn.cancel(NOW + 1)
    assert turn.ending is not None and turn.ending.finish_reason == "stop"


# ---------------------------------------------------------------- submitted


def test_submitted_records_time_without_changing_state() -> None:
    turn = new_turn()
    turn.submitted(T0 + 3)
    assert turn.state is TurnState.QUEUED
    assert turn.submitted_ms == T0 + 3


def test_submitted_twice_is_illegal() -> None:
    turn = new_turn()
    turn.submitted(T0 + 3)
    with pytest.raises(IllegalTransition):
        turn.submitted(T0 + 4)
    assert turn.submitted_ms == T0 + 3


@pytest.mark.parametrize("state", [TurnState.STREAMING, TurnState.ENDED], ids=lambda s: s.value)
def test_submitted_after_start_is_illegal(state: TurnState) -> None:
    turn = turn_in(state)
    with pytest.raises(IllegalTransition):
        turn.submitted(NOW)
    assert turn.submitted_ms is None


def test_submitted_after_ending_while_queued_is_illegal() -> None:
    turn = new_turn()
    turn.miss_deadline(NOW)
    with pytest.raises(IllegalTransition):
        turn.submitted(NOW + 1)


# ---------------------------------------------------------------- deltas and seq


def test_seq_starts_at_one_and_is_contiguous() -> None:
    turn = new_turn()
    outs = [turn.delta(f"w{i} ", 1, T0 + i) for i in range(1, 21)]
    assert [o.seq for o in outs if o] == list(range(1, 21))
    assert all(o is not None and o.text == f"w{i} " for i, o in enumerate(outs, 1))
    assert turn.seq == 20
    assert turn.state is TurnState.STREAMING


def test_empty_text_deltas_count_tokens_but_take_no_seq() -> None:
    turn = new_turn()
    assert turn.delta("", 2, T0 + 1) is None
    assert turn.state is TurnState.QUEUED  # nothing produced yet
    assert turn.first_delta_ms is None
    assert turn.delta("你", 1, T0 + 5) == DeltaOut(1, "你")
    assert turn.delta("", 1, T0 + 6) is None
    assert turn.delta("", 4, T0 + 7) is None
    assert turn.delta("好", 1, T0 + 8) == DeltaOut(2, "好")
    assert turn.seq == 2
    assert turn.completion_tokens == 9
    assert turn.text == "你好"
    assert turn.first_delta_ms == T0 + 5  # the first delta actually sent


def test_queued_turn_with_only_empty_deltas_can_still_miss_its_deadline() -> None:
    turn = new_turn()
    turn.delta("", 3, T0 + 1)
    ending = turn.miss_deadline(T0 + 10_000)
    assert ending.finish_reason == "budget_exceeded"
    assert ending.seq == 0 and ending.text == ""
    assert ending.usage.completion_tokens == 3


def test_delta_may_carry_several_tokens() -> None:
    turn = new_turn()
    turn.delta("several words", 5, T0 + 1)
    turn.delta("!", 1, T0 + 2)
    assert turn.completion_tokens == 6
    assert turn.seq == 2


def test_text_is_the_concatenation_of_deltas_in_seq_order() -> None:
    turn = new_turn()
    parts = ["Hi", " ", "there", "，", "😀", "\n", "¿qué tal?"]
    for i, p in enumerate(parts):
        turn.delta(p, 1, T0 + i)
    assert turn.text == "".join(parts)
    assert "".join(d.text for d in turn.deltas_after(0)) == turn.text
    ending = turn.finish("stop", Usage(), NOW)
    assert ending.text == turn.text
    assert ending.seq == len(parts)


# ---------------------------------------------------------------- deltas_after (resume)


@pytest.fixture
def five() -> Turn:
    turn = new_turn()
    for i, word in enumerate(["a", "b", "c", "d", "e"], 1):
        turn.delta(word, 1, T0 + i)
    return turn


def test_deltas_after_zero_is_everything(five: Turn) -> None:
    assert five.deltas_after(0) == [DeltaOut(1, "a"), DeltaOut(2, "b"), DeltaOut(3, "c"),
                                    DeltaOut(4, "d"), DeltaOut(5, "e")]


def test_deltas_after_middle(five: Turn) -> None:
    assert five.deltas_after(2) == [DeltaOut(3, "c"), DeltaOut(4, "d"), DeltaOut(5, "e")]


def test_deltas_after_last_is_empty(five: Turn) -> None:
    assert five.deltas_after(5) == []


def test_deltas_after_beyond_end_is_empty(five: Turn) -> None:
    assert five.deltas_after(6) == []
    assert five.deltas_after(10**9) == []


def test_deltas_after_negative_is_treated_as_zero(five: Turn) -> None:
    assert five.deltas_after(-3) == five.deltas_after(0)


def test_deltas_after_on_a_fresh_turn_is_empty() -> None:
    assert new_turn().deltas_after(0) == []


def test_deltas_after_every_prefix_then_live_has_no_gap_or_duplicate(five: Turn) -> None:
    for held in range(0, 6):
        missing = five.deltas_after(held)
        assert [d.seq for d in missing] == list(range(held + 1, 6))
    five.delta("f", 1, T0 + 9)
    assert five.deltas_after(4) == [DeltaOut(5, "e"), DeltaOut(6, "f")]


def test_deltas_after_still_works_once_ended(five: Turn) -> None:
    five.cancel(NOW)
    assert [d.seq for d in five.deltas_after(3)] == [4, 5]


# ---------------------------------------------------------------- finish reasons


def test_finish_reasons_cover_every_ending_event() -> None:
    assert set(FINISH_REASONS) | {TurnEvent.FINISH} == set(ENDING_EVENTS)
    assert TurnEvent.FINISH not in FINISH_REASONS
    assert TurnEvent.DELTA not in FINISH_REASONS


def test_all_finish_reasons_match_the_contract() -> None:
    assert ALL_FINISH_REASONS == CONTRACT_FINISH_REASONS
    assert set(FINISH_REASONS.values()) | ENGINE_FINISH_REASONS == CONTRACT_FINISH_REASONS
    assert ENGINE_FINISH_REASONS == {"stop", "length"}


@pytest.mark.parametrize(("event", "reason"), [
    (TurnEvent.CONTENT_FILTER, "content_filter"),
    (TurnEvent.CANCEL, "cancelled"),
    (TurnEvent.DETACH_EXPIRED, "interrupted"),
    (TurnEvent.ENGINE_FAILED, "interrupted"),
    (TurnEvent.DEADLINE, "budget_exceeded"),
    (TurnEvent.INTERNAL_ERROR, "error"),
], ids=lambda x: getattr(x, "value", x))
def test_reason_of_each_ending_event(event: TurnEvent, reason: str) -> None:
    assert FINISH_REASONS[event] == reason
    turn = new_turn()
    ending = FIRE[event](turn, NOW)
    assert isinstance(ending, Ending)
    assert ending.finish_reason == reason
    if event is not TurnEvent.DEADLINE:
        streaming = turn_in(TurnState.STREAMING)
        assert FIRE[event](streaming, NOW).finish_reason == reason  # type: ignore[union-attr]


@pytest.mark.parametrize("reason", ["stop", "length"])
@pytest.mark.parametrize("state", [TurnState.QUEUED, TurnState.STREAMING], ids=lambda s: s.value)
def test_engine_finish_takes_the_engines_reason(reason: str, state: TurnState) -> None:
    turn = turn_in(state)
    ending = turn.finish(reason, Usage(3, 4, 1), NOW)
    assert ending.finish_reason == reason
    assert turn.state is TurnState.ENDED


@pytest.mark.parametrize("reason", ["cancelled", "interrupted", "error", "budget_exceeded",
                                    "abort", "", "STOP", "stop ", None])
def test_engine_finish_rejects_other_reasons(reason: object) -> None:
    turn = turn_in(TurnState.STREAMING)
    with pytest.raises(IllegalTransition):
        turn.finish(reason, Usage(), NOW)  # type: ignore[arg-type]
    assert turn.state is TurnState.STREAMING
    assert turn.ending is None and turn.ended_ms is None


def test_every_ending_reason_is_in_the_contract() -> None:
    for event in ENDING_EVENTS:
        turn = new_turn()
        ending = FIRE[event](turn, NOW)
        assert ending.finish_reason in ALL_FINISH_REASONS  # type: ignore[union-attr]


# ---------------------------------------------------------------- the ending's body


def test_ending_carries_seq_text_usage_and_timings() -> None:
    turn = new_turn()
    turn.submitted(T0 + 2)
    turn.delta("Hel", 2, T0 + 50)
    turn.delta("lo", 1, T0 + 70)
    usage = Usage(prompt_tokens=11, completion_tokens=3, cached_prompt_tokens=8)
    ending = turn.finish("length", usage, T0 + 90)
    assert ending == Ending(
        finish_reason="length", seq=2, text="Hello", usage=usage,
        timings={"queue_ms": 2.0, "ttft_ms": 50.0, "total_ms": 90.0},
    )
    assert turn.ending is ending


def test_ending_without_usage_counts_completion_tokens_seen() -> None:
    turn = new_turn()
    turn.delta("a", 2, T0 + 1)
    turn.delta("", 1, T0 + 2)
    ending = turn.cancel(NOW)
    assert ending.usage == Usage(prompt_tokens=0, completion_tokens=3, cached_prompt_tokens=0)


@pytest.mark.parametrize("event", [e for e in ENDING_EVENTS if e is not TurnEvent.FINISH],
                         ids=lambda e: e.value)
def test_non_engine_endings_accept_an_explicit_usage(event: TurnEvent) -> None:
    usage = Usage(7, 8, 9)
    method = {
        TurnEvent.CONTENT_FILTER: Turn.content_filtered,
        TurnEvent.CANCEL: Turn.cancel,
        TurnEvent.DETACH_EXPIRED: Turn.expire_detached,
        TurnEvent.ENGINE_FAILED: Turn.engine_failed,
        TurnEvent.DEADLINE: Turn.miss_deadline,
        TurnEvent.INTERNAL_ERROR: Turn.internal_error,
    }[event]
    turn = new_turn()
    assert method(turn, NOW, usage).usage == usage


def test_usage_as_dict_has_the_contract_keys() -> None:
    assert Usage(1, 2, 3).as_dict() == {
        "prompt_tokens": 1, "completion_tokens": 2, "cached_prompt_tokens": 3,
    }
    assert Usage().as_dict() == {"prompt_tokens": 0, "completion_tokens": 0, "cached_prompt_tokens": 0}


# ---------------------------------------------------------------- timings


def test_timings_measured_from_received() -> None:
    turn = Turn(turn_id="t", received_ms=500.0)
    turn.submitted(512.5)
    turn.delta("x", 1, 740.0)
    turn.delta("y", 1, 800.0)  # later deltas do not move ttft
    ending = turn.finish("stop", Usage(), 1500.25)
    assert ending.timings == {"queue_ms": 12.5, "ttft_ms": 240.0, "total_ms": 1000.25}


def test_timings_are_none_where_the_moment_never_came() -> None:
    never_submitted = new_turn()
    assert never_submitted.cancel(T0 + 5).timings == {"queue_ms": None, "ttft_ms": None,
                                                      "total_ms": 5.0}
    no_token = new_turn()
    no_token.submitted(T0 + 1)
    assert no_token.miss_deadline(T0 + 10_000).timings == {"queue_ms": 1.0, "ttft_ms": None,
                                                            "total_ms": 10_000.0}


def test_timings_while_running_have_no_total() -> None:
    turn = new_turn()
    turn.submitted(T0 + 1)
    turn.delta("x", 1, T0 + 30)
    assert turn.timings() == {"queue_ms": 1.0, "ttft_ms": 30.0, "total_ms": None}


def test_timings_are_rounded_to_microseconds() -> None:
    turn = Turn(turn_id="t", received_ms=0.1)
    turn.submitted(0.3)
    ending = turn.internal_error(0.1 + 1.23456789)
    assert ending.timings["queue_ms"] == 0.2
    assert ending.timings["total_ms"] == 1.235


def test_ending_timings_are_frozen_at_the_end() -> None:
    turn = new_turn()
    ending = turn.engine_failed(T0 + 40)
    assert ending.timings["total_ms"] == 40.0
    assert turn.timings() == ending.timings


# ---------------------------------------------------------------- Attachment


def test_attachment_starts_attached_with_one_follower() -> None:
    a = Attachment(grace_ms=30_000)
    assert a.state is AttachmentState.ATTACHED
    assert a.followers == 1
    assert a.detached_until_ms is None
    assert not a.expired(10**12)


def test_last_follower_leaving_detaches_with_a_deadline() -> None:
    a = Attachment(grace_ms=30_000)
    assert a.leave(1_000.0) == 31_000.0
    assert a.state is AttachmentState.DETACHED
    assert a.followers == 0
    assert a.detached_until_ms == 31_000.0


def test_expired_only_at_or_after_the_deadline() -> None:
    a = Attachment(grace_ms=100)
    a.leave(1_000.0)
    assert not a.expired(1_000.0)
    assert not a.expired(1_099.999)
    assert a.expired(1_100.0)
    assert a.expired(5_000.0)


def test_a_follower_leaving_while_others_stay_keeps_it_attached() -> None:
    a = Attachment(grace_ms=100)
    a.join()
    assert a.followers == 2
    assert a.leave(1_000.0) is None
    assert a.state is AttachmentState.ATTACHED
    assert a.followers == 1
    assert not a.expired(10**9)
    assert a.leave(2_000.0) == 2_100.0
    assert a.state is AttachmentState.DETACHED


def test_join_reattaches_a_detached_turn() -> None:
    a = Attachment(grace_ms=100)
    a.leave(1_000.0)
    a.join()
    assert a.state is AttachmentState.ATTACHED
    assert a.followers == 1
    assert a.detached_until_ms is None
    assert not a.expired(10**9)


def test_leaving_again_after_rejoin_starts_a_fresh_grace_period() -> None:
    a = Attachment(grace_ms=100)
    a.leave(1_000.0)
    a.join()
    assert a.leave(5_000.0) == 5_100.0
    assert not a.expired(1_100.0)
    assert a.expired(5_100.0)


def test_leave_with_no_followers_raises() -> None:
    a = Attachment(grace_ms=100)
    a.leave(1_000.0)
    with pytest.raises(IllegalTransition):
        a.leave(1_050.0)
    # Nothing moved: still detached with the first deadline.
    assert a.followers == 0
    assert a.state is AttachmentState.DETACHED
    assert a.detached_until_ms == 1_100.0


def test_leave_on_an_attachment_created_empty_raises() -> None:
    a = Attachment(grace_ms=100, followers=0)
    with pytest.raises(IllegalTransition):
        a.leave(0.0)


def test_zero_grace_expires_at_once() -> None:
    a = Attachment(grace_ms=0)
    assert a.leave(42.0) == 42.0
    assert a.expired(42.0)


# ---------------------------------------------------------------- interruptions


def test_interruptions_are_every_ending_but_the_engine_streams_own() -> None:
    # The engine's finish and the output filter's block both come from the
    # engine stream, in order: neither can arrive too late.
    assert set(INTERRUPTING_EVENTS) == set(ENDING_EVENTS) - {TurnEvent.FINISH, TurnEvent.CONTENT_FILTER}


def test_interruptions_have_a_row_for_every_state_and_attachment() -> None:
    assert set(INTERRUPTIONS) == set(itertools.product(TurnState, AttachmentState, INTERRUPTING_EVENTS))


def test_an_interruption_that_moves_agrees_with_the_lifecycle() -> None:
    for (state, _, event), after in INTERRUPTIONS.items():
        if after is not state:
            assert TRANSITIONS[(state, event)] is after is TurnState.ENDED


def test_the_interruptions_that_come_too_late_are_exactly_the_documented_ones() -> None:
    stale = {(s, a, e) for (s, a, e), after in INTERRUPTIONS.items() if after is s}
    assert stale == (
        # The first token came in time.
        {(TurnState.STREAMING, a, TurnEvent.DEADLINE) for a in AttachmentState}
        # Somebody came back within the grace period.
        | {(s, AttachmentState.ATTACHED, TurnEvent.DETACH_EXPIRED)
           for s in (TurnState.QUEUED, TurnState.STREAMING)}
        # The turn had already ended.
        | {(TurnState.ENDED, a, e) for a in AttachmentState for e in INTERRUPTING_EVENTS}
    )


@pytest.mark.parametrize(("state", "attachment", "event"), sorted(
    INTERRUPTIONS, key=lambda k: (k[0].value, k[1].value, k[2].value)), ids=lambda x: x.value)
def test_interrupt_does_what_its_row_says(state: TurnState, attachment: AttachmentState,
                                          event: TurnEvent) -> None:
    turn = turn_in(state)
    before = (turn.state, turn.seq, turn.text, turn.ending, turn.ended_ms)
    assert turn.would_end(event, attachment) is (INTERRUPTIONS[(state, attachment, event)] is not state)
    ending = turn.interrupt(event, NOW, attachment=attachment)
    if INTERRUPTIONS[(state, attachment, event)] is state:
        assert ending is None
        assert (turn.state, turn.seq, turn.text, turn.ending, turn.ended_ms) == before
    else:
        assert ending is not None and turn.ending is ending
        assert turn.state is TurnState.ENDED and turn.ended_ms == NOW
        assert ending.finish_reason == FINISH_REASONS[event]
        assert not turn.would_end(event, attachment)


@pytest.mark.parametrize("event", [TurnEvent.DELTA, TurnEvent.FINISH, TurnEvent.CONTENT_FILTER],
                         ids=lambda e: e.value)
@pytest.mark.parametrize("state", list(TurnState), ids=lambda s: s.value)
def test_engine_stream_events_are_not_interruptions(state: TurnState, event: TurnEvent) -> None:
    turn = turn_in(state)
    with pytest.raises(IllegalTransition):
        turn.interrupt(event, NOW)
    with pytest.raises(IllegalTransition):
        turn.would_end(event, AttachmentState.ATTACHED)
    assert turn.state is state


def test_the_first_interruption_wins() -> None:
    turn = new_turn()
    turn.submitted(T0 + 1)
    cancelled = turn.interrupt(TurnEvent.CANCEL, T0 + 50)
    assert cancelled is not None and cancelled.finish_reason == "cancelled"
    # The deadline timer fires a moment later, the server shuts down: nothing changes.
    assert turn.interrupt(TurnEvent.DEADLINE, T0 + 60) is None
    assert turn.interrupt(TurnEvent.ENGINE_FAILED, T0 + 70, attachment=AttachmentState.DETACHED) is None
    assert turn.ending is cancelled and turn.ended_ms == T0 + 50
    assert cancelled.timings == {"queue_ms": 1.0, "ttft_ms": None, "total_ms": 50.0}


def test_a_deadline_after_the_first_token_changes_nothing() -> None:
    turn = new_turn()
    turn.delta("hi", 1, T0 + 10)
    assert not turn.would_end(TurnEvent.DEADLINE, AttachmentState.ATTACHED)
    assert turn.interrupt(TurnEvent.DEADLINE, T0 + 5000) is None
    assert turn.state is TurnState.STREAMING
    assert turn.delta(" there", 1, T0 + 5001) == DeltaOut(2, " there")


def test_a_deadline_while_only_empty_deltas_came_ends_the_turn() -> None:
    turn = new_turn()
    turn.delta("", 2, T0 + 10)
    ending = turn.interrupt(TurnEvent.DEADLINE, T0 + 5000)
    assert ending is not None and ending.finish_reason == "budget_exceeded"
    assert ending.usage.completion_tokens == 2


def test_the_grace_period_ends_only_a_detached_turn() -> None:
    attachment = Attachment(grace_ms=100)
    turn = turn_in(TurnState.STREAMING)
    attachment.leave(T0)
    attachment.join()  # somebody came back before the timer fired
    assert turn.interrupt(TurnEvent.DETACH_EXPIRED, T0 + 100, attachment=attachment.state) is None
    attachment.leave(T0 + 200)
    assert turn.would_end(TurnEvent.DETACH_EXPIRED, attachment.state)
    ending = turn.interrupt(TurnEvent.DETACH_EXPIRED, T0 + 300, Usage(5, 1, 0), attachment=attachment.state)
    assert ending is not None and ending.finish_reason == "interrupted"
    assert ending.usage == Usage(5, 1, 0) and ending.text == "hello"


def test_an_ended_turn_arms_no_grace_period() -> None:
    turn = turn_in(TurnState.ENDED)
    assert not turn.would_end(TurnEvent.DETACH_EXPIRED, AttachmentState.DETACHED)


# ---------------------------------------------------------------- engine_stopped


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_engine_stopped_with_its_own_reason_is_a_natural_finish(reason: str) -> None:
    turn = turn_in(TurnState.STREAMING)
    ending = turn.engine_stopped(reason, Usage(4, 9, 2), NOW)
    assert ending.finish_reason == reason
    assert ending.usage == Usage(4, 9, 2)
    assert turn.state is TurnState.ENDED


@pytest.mark.parametrize("reason", ["abort", "error", "cancelled", "", None])
@pytest.mark.parametrize("state", [TurnState.QUEUED, TurnState.STREAMING], ids=lambda s: s.value)
def test_engine_stopped_without_a_natural_reason_is_an_engine_failure(reason: str | None,
                                                                       state: TurnState) -> None:
    turn = turn_in(state)
    ending = turn.engine_stopped(reason, None, NOW)
    assert ending.finish_reason == FINISH_REASONS[TurnEvent.ENGINE_FAILED] == "interrupted"
    assert ending.text == turn.text
    assert ending.usage == Usage(completion_tokens=turn.completion_tokens)


@pytest.mark.parametrize("reason", ["stop", None])
def test_engine_stopped_after_the_end_is_illegal(reason: str | None) -> None:
    turn = turn_in(TurnState.ENDED)
    first = turn.ending
    with pytest.raises(IllegalTransition):
        turn.engine_stopped(reason, Usage(), NOW)
    assert turn.ending is first


# ---------------------------------------------------------------- a blocked reply


@pytest.mark.parametrize("state", [TurnState.QUEUED, TurnState.STREAMING], ids=lambda s: s.value)
def test_a_blocked_reply_ends_content_filter_with_what_was_released(state: TurnState) -> None:
    turn = turn_in(state)
    before = (turn.seq, turn.text, turn.first_delta_ms)
    ending = turn.content_filtered(NOW)
    assert ending.finish_reason == "content_filter"
    assert (ending.seq, ending.text, turn.first_delta_ms) == before
    assert turn.state is TurnState.ENDED
    with pytest.raises(IllegalTransition):
        turn.content_filtered(NOW)
