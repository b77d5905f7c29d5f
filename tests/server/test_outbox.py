"""A connection's bounded outbox (server/outbox.py)."""

from __future__ import annotations

import pytest

from protocol.errors import RapportError
from server.outbox import Outbox, OutboxOverflow


def frame(i: int) -> dict[str, object]:
    return {"type": "turn.delta", "turn_id": "t", "seq": i, "text": str(i)}


def test_starts_empty() -> None:
    box = Outbox(4)
    assert len(box) == 0
    assert not box
    with pytest.raises(IndexError):
        box.get()


def test_default_bound() -> None:
    assert Outbox().max_frames == 1024


def test_fifo() -> None:
    box = Outbox(10)
    for i in range(1, 6):
        box.put(frame(i))
    assert len(box) == 5 and box
    assert [box.get()["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]
    assert not box


def test_fifo_when_interleaved() -> None:
    box = Outbox(3)
    box.put(frame(1))
    box.put(frame(2))
    assert box.get() == frame(1)
    box.put(frame(3))
    box.put(frame(4))
    assert [box.get()["seq"] for _ in range(3)] == [2, 3, 4]


def test_put_returns_the_same_object() -> None:
    box = Outbox(1)
    f = frame(1)
    box.put(f)
    assert box.get() is f


def test_overflow_at_the_bound() -> None:
    box = Outbox(3)
    for i in range(3):
        box.put(frame(i))  # exactly max_frames fit
    with pytest.raises(OutboxOverflow) as exc:
        box.put(frame(99))
    assert isinstance(exc.value, RapportError)
    assert exc.value.code == "internal"
    # The refused frame was not queued; what was there is intact and in order.
    assert len(box) == 3
    assert [box.get()["seq"] for _ in range(3)] == [0, 1, 2]


def test_room_again_after_a_get() -> None:
    box = Outbox(2)
    box.put(frame(1))
    box.put(frame(2))
    with pytest.raises(OutboxOverflow):
        box.put(frame(3))
    box.get()
    box.put(frame(3))
    assert len(box) == 2
    with pytest.raises(OutboxOverflow):
        box.put(frame(4))


def test_overflow_keeps_raising_while_full() -> None:
    box = Outbox(1)
    box.put(frame(1))
    for i in range(5):
        with pytest.raises(OutboxOverflow):
            box.put(frame(i))
    assert len(box) == 1


def test_zero_bound_refuses_everything() -> None:
    box = Outbox(0)
    with pytest.raises(OutboxOverflow):
        box.put(frame(1))
    assert not box


# ---------------------------------------------------------------- the byte bound


def history_frame(n: int, chars: int) -> dict[str, object]:
    return {"type": "history", "conversation_id": "c", "messages": [
        {"id": f"{i}-0", "role": "user", "text": "m" * chars, "turn_id": "t", "status": "stop",
         "created_at": i} for i in range(n)]}


def test_bytes_are_bounded_as_well_as_frames() -> None:
    box = Outbox(1000, max_bytes=1_000_000)
    big = history_frame(60, 8000)  # ~490 KB of text
    box.put(big)
    assert 480_000 < box.bytes < 600_000
    with pytest.raises(OutboxOverflow) as exc:
        box.put(history_frame(60, 8000))
    assert "bytes" in str(exc.value)
    assert len(box) == 1  # the refused frame was not queued
    assert box.get() is big
    assert box.bytes == 0


def test_many_small_frames_count_their_bytes_too() -> None:
    box = Outbox(100_000, max_bytes=64 * 1024)
    with pytest.raises(OutboxOverflow):
        for i in range(100_000):
            box.put(frame(i))
    assert 100 < len(box) < 2000
    assert box.bytes <= 64 * 1024


def test_bytes_follow_gets_and_merges() -> None:
    box = Outbox(100, max_bytes=10_000_000, coalesce=True)
    for i in range(1, 11):
        box.put({"type": "turn.delta", "turn_id": "t", "seq": i, "text": "x" * 100}, live=True)
    assert len(box) == 1
    one = box.bytes
    box.put({"type": "ping", "t": 1})
    box.get()
    box.get()
    assert box.bytes == 0
    assert one > 1000  # ten deltas' text, merged into one frame


def test_clear_drops_everything() -> None:
    box = Outbox(10, coalesce=True)
    box.put({"type": "turn.delta", "turn_id": "t", "seq": 1, "text": "x"}, live=True)
    box.put(frame(2))
    box.clear()
    assert not box and box.bytes == 0 and box.stalled_since is None
    box.put({"type": "turn.delta", "turn_id": "t", "seq": 2, "text": "y"}, live=True)
    assert box.get()["seq"] == 2
