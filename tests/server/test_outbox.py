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
