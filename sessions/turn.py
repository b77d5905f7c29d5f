"""The turn state machine: a pure core with no I/O, no clock and no ``await``.

Theory of operation
-------------------
A *turn* is one user message and the model's streamed reply. It lives through
three lifecycle states::

    QUEUED ──delta──▶ STREAMING ──delta──▶ STREAMING
      │                   │
      └──finish / cancel / detach_expired / engine_failed / internal_error──▶ ENDED
      └──deadline (no first token in time)──▶ ENDED

Every legal move is one row of :data:`TRANSITIONS`; anything else raises
:class:`IllegalTransition`, which is always a bug in an adapter. The machine
numbers deltas (``seq`` starts at 1 and grows by one, guarantee 2), keeps the
text, measures timings from timestamps the caller passes in, and decides the
finish reason of every ending. Adapters (``server.turn_runner``) feed it engine
output and socket events and carry out what it returns: send a frame, write the
delta log, abort the engine request.

Whether anybody is watching is a second, orthogonal dimension (guarantee 3: a
dropped socket is not a cancel). :class:`Attachment` counts followers and, when
the last one leaves, says by when somebody must come back before the turn is
ended ``interrupted``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protocol.errors import IllegalTransition


class TurnState(enum.Enum):
    QUEUED = "queued"  # accepted; the engine has not produced a token yet
    STREAMING = "streaming"  # at least one delta produced
    ENDED = "ended"  # final; finish_reason decided


class TurnEvent(enum.Enum):
    DELTA = "delta"
    FINISH = "finish"  # the engine finished on its own (stop or length)
    CANCEL = "cancel"  # the user asked (turn.cancel)
    DETACH_EXPIRED = "detach_expired"  # nobody resumed within the grace period
    ENGINE_FAILED = "engine_failed"  # the engine or its process failed
    DEADLINE = "deadline"  # no first token within the hard deadline
    INTERNAL_ERROR = "internal_error"  # a bug or an unexpected failure of ours


_ENDING_EVENTS = (
    TurnEvent.FINISH,
    TurnEvent.CANCEL,
    TurnEvent.DETACH_EXPIRED,
    TurnEvent.ENGINE_FAILED,
    TurnEvent.INTERNAL_ERROR,
)

#: (state, event) -> next state. The whole lifecycle, as data.
TRANSITIONS: dict[tuple[TurnState, TurnEvent], TurnState] = {
    (TurnState.QUEUED, TurnEvent.DELTA): TurnState.STREAMING,
    (TurnState.STREAMING, TurnEvent.DELTA): TurnState.STREAMING,
    # A hard deadline only applies while waiting for the first token.
    (TurnState.QUEUED, TurnEvent.DEADLINE): TurnState.ENDED,
    **{(TurnState.QUEUED, e): TurnState.ENDED for e in _ENDING_EVENTS},
    **{(TurnState.STREAMING, e): TurnState.ENDED for e in _ENDING_EVENTS},
}

#: The finish reason each ending event gives (FINISH takes the engine's own).
FINISH_REASONS: dict[TurnEvent, str] = {
    TurnEvent.CANCEL: "cancelled",
    TurnEvent.DETACH_EXPIRED: "interrupted",
    TurnEvent.ENGINE_FAILED: "interrupted",
    TurnEvent.DEADLINE: "budget_exceeded",
    TurnEvent.INTERNAL_ERROR: "error",
}

ENGINE_FINISH_REASONS = frozenset({"stop", "length"})
ALL_FINISH_REASONS = frozenset(
    {"stop", "length", "cancelled", "interrupted", "budget_exceeded", "error"}
)


@dataclass(frozen=True, slots=True)
class DeltaOut:
    """A delta to send and log: ``seq`` is contiguous from 1."""

    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }


@dataclass(frozen=True, slots=True)
class Ending:
    """What an ended turn reports: the body of ``turn.end`` and the history entry."""

    finish_reason: str
    seq: int
    text: str
    usage: Usage
    timings: dict[str, float | None]


@dataclass(slots=True)
class Turn:
    """One turn's lifecycle. All times are milliseconds on one monotonic clock."""

    turn_id: str
    received_ms: float  # when turn.start arrived: the first-token budget starts here
    state: TurnState = TurnState.QUEUED
    submitted_ms: float | None = None  # handed to the engine
    first_delta_ms: float | None = None
    ended_ms: float | None = None
    seq: int = 0
    completion_tokens: int = 0
    _parts: list[str] = field(default_factory=list)
    ending: Ending | None = None

    # ------------------------------------------------------------ queries

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def ended(self) -> bool:
        return self.state is TurnState.ENDED

    def deltas_after(self, after_seq: int) -> list[DeltaOut]:
        """The deltas a resuming follower is missing (guarantee 2)."""
        start = max(after_seq, 0)
        return [DeltaOut(i + 1, t) for i, t in enumerate(self._parts[start:], start)]

    # ------------------------------------------------------------ events

    def _check(self, event: TurnEvent) -> TurnState:
        try:
            return TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(
                f"turn {self.turn_id}: {event.value} is not allowed in state {self.state.value}"
            ) from None

    def _move(self, event: TurnEvent) -> None:
        self.state = self._check(event)

    def submitted(self, now_ms: float) -> None:
        """The request went to the engine (not a state change: it is still queued)."""
        if self.state is not TurnState.QUEUED or self.submitted_ms is not None:
            raise IllegalTransition(f"turn {self.turn_id}: submitted twice or after it started")
        self.submitted_ms = now_ms

    def delta(self, text: str, tokens: int, now_ms: float) -> DeltaOut | None:
        """Record generated text. Empty text produces no delta (nothing to send)."""
        if not text:
            # Tokens that decode to no text yet (a partial UTF-8 sequence, say)
            # count, but change no state and send nothing.
            self._check(TurnEvent.DELTA)
            self.completion_tokens += tokens
            return None
        self._move(TurnEvent.DELTA)
        if self.first_delta_ms is None:
            self.first_delta_ms = now_ms
        self.seq += 1
        self.completion_tokens += tokens
        self._parts.append(text)
        return DeltaOut(self.seq, text)

    def finish(self, finish_reason: str, usage: Usage, now_ms: float) -> Ending:
        """The engine finished by itself."""
        if finish_reason not in ENGINE_FINISH_REASONS:
            raise IllegalTransition(f"engine finish reason must be stop or length, not {finish_reason!r}")
        return self._end(TurnEvent.FINISH, finish_reason, usage, now_ms)

    def cancel(self, now_ms: float, usage: Usage | None = None) -> Ending:
        return self._end(TurnEvent.CANCEL, None, usage, now_ms)

    def expire_detached(self, now_ms: float, usage: Usage | None = None) -> Ending:
        return self._end(TurnEvent.DETACH_EXPIRED, None, usage, now_ms)

    def engine_failed(self, now_ms: float, usage: Usage | None = None) -> Ending:
        return self._end(TurnEvent.ENGINE_FAILED, None, usage, now_ms)

    def miss_deadline(self, now_ms: float, usage: Usage | None = None) -> Ending:
        return self._end(TurnEvent.DEADLINE, None, usage, now_ms)

    def internal_error(self, now_ms: float, usage: Usage | None = None) -> Ending:
        return self._end(TurnEvent.INTERNAL_ERROR, None, usage, now_ms)

    def _end(self, event: TurnEvent, engine_reason: str | None, usage: Usage | None,
             now_ms: float) -> Ending:
        self._move(event)
        self.ended_ms = now_ms
        if usage is None:
            usage = Usage(completion_tokens=self.completion_tokens)
        reason = engine_reason if event is TurnEvent.FINISH else FINISH_REASONS[event]
        self.ending = Ending(
            finish_reason=reason,  # type: ignore[arg-type]
            seq=self.seq,
            text=self.text,
            usage=usage,
            timings=self.timings(),
        )
        return self.ending

    def timings(self) -> dict[str, float | None]:
        """``turn.end.timings``: all measured from receipt of ``turn.start``.

        queue_ms: until the request was handed to the engine (admission, the
        history read and the accept write); ttft_ms: until the first delta;
        total_ms: until the end. ``None`` where the moment never came.
        """

        def since(t: float | None) -> float | None:
            return None if t is None else round(t - self.received_ms, 3)

        return {
            "queue_ms": since(self.submitted_ms),
            "ttft_ms": since(self.first_delta_ms),
            "total_ms": since(self.ended_ms),
        }


class AttachmentState(enum.Enum):
    ATTACHED = "attached"
    DETACHED = "detached"


@dataclass(slots=True)
class Attachment:
    """Who is following a turn, and when a detached turn must be given up.

    A new turn starts attached to the socket that started it. When the last
    follower leaves, the turn becomes DETACHED with a deadline ``grace_ms``
    later (guarantee 3); any follower coming back re-attaches it.
    """

    grace_ms: float
    followers: int = 1
    state: AttachmentState = AttachmentState.ATTACHED
    detached_until_ms: float | None = None

    def join(self) -> None:
        self.followers += 1
        self.state = AttachmentState.ATTACHED
        self.detached_until_ms = None

    def leave(self, now_ms: float) -> float | None:
        """A follower left; returns the deadline if the turn is now detached."""
        if self.followers <= 0:
            raise IllegalTransition("a follower left a turn nobody was following")
        self.followers -= 1
        if self.followers == 0:
            self.state = AttachmentState.DETACHED
            self.detached_until_ms = now_ms + self.grace_ms
            return self.detached_until_ms
        return None

    def expired(self, now_ms: float) -> bool:
        return (
            self.state is AttachmentState.DETACHED
            and self.detached_until_ms is not None
            and now_ms >= self.detached_until_ms
        )
