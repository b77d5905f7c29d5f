"""The turn state machine: a pure core with no I/O, no clock and no ``await``.

Theory of operation
-------------------
A *turn* is one user message and the model's streamed reply. It lives through
three lifecycle states::

    QUEUED ──delta──▶ STREAMING ──delta──▶ STREAMING
      │                   │
      └──finish / content_filter / cancel / detach_expired / engine_failed / internal_error──▶ ENDED
      └──deadline (no first token in time)──▶ ENDED

Every legal move is one row of :data:`TRANSITIONS`; anything else raises
:class:`IllegalTransition`, which is always a bug in an adapter. The machine
numbers deltas (``seq`` starts at 1 and grows by one, guarantee 2), keeps the
text, measures timings from timestamps the caller passes in, and decides the
finish reason of every ending. Adapters (``server.turns`` for WebSocket turns,
``server.openai_api`` for ``POST /v1/chat/completions``) feed it engine output
and outside events and carry out what it returns: send a frame, write the delta
log, abort the engine request.

Events from the engine stream (deltas, the engine's finish) arrive in order,
so one that does not fit the state is a bug. The other ending events are
*interruptions* (:data:`INTERRUPTING_EVENTS`): the user's cancel, the two
timers an adapter keeps (the hard deadline, the end of the detached grace
period), the engine failing or going away at shutdown, an unexpected error.
They come from outside the stream and race the turn's own progress: a deadline
timer may fire just as the first token arrives, a cancel just as the engine
finishes. So :data:`INTERRUPTIONS` has a row for each of them in every state,
in the style of h11's state tables: either the move to ENDED (the adapter then
aborts the engine request and carries the ending out), or a row that keeps the
state, meaning the event came too late and changes nothing. The first
interruption to arrive ends the turn; later ones find it ENDED.

Whether anybody is watching is a second, orthogonal dimension (guarantee 3: a
dropped socket is not a cancel). :class:`Attachment` counts followers and, when
the last one leaves, says by when somebody must come back before the turn is
ended ``interrupted``. It is part of the key of :data:`INTERRUPTIONS`: the end
of the grace period only ends a turn that is still detached.
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
    # The output filter blocked the reply (sessions.moderation). It comes from the
    # engine stream, in order, so it is not an interruption.
    CONTENT_FILTER = "content_filter"
    CANCEL = "cancel"  # the user asked (turn.cancel)
    DETACH_EXPIRED = "detach_expired"  # nobody resumed within the grace period
    ENGINE_FAILED = "engine_failed"  # the engine or its process failed
    DEADLINE = "deadline"  # no first token within the hard deadline
    INTERNAL_ERROR = "internal_error"  # a bug or an unexpected failure of ours


_ENDING_EVENTS = (
    TurnEvent.FINISH,
    TurnEvent.CONTENT_FILTER,
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


class AttachmentState(enum.Enum):
    ATTACHED = "attached"  # somebody follows the turn (or an HTTP client waits for it)
    DETACHED = "detached"  # nobody does; the grace period runs


#: Ending events that come from outside the engine stream and so may arrive
#: when they no longer apply (see "Theory of operation").
INTERRUPTING_EVENTS = (
    TurnEvent.CANCEL,
    TurnEvent.DETACH_EXPIRED,
    TurnEvent.DEADLINE,
    TurnEvent.ENGINE_FAILED,
    TurnEvent.INTERNAL_ERROR,
)

_RUNNING = (TurnState.QUEUED, TurnState.STREAMING)

#: (state, attachment, interrupting event) -> next state, for every combination.
#: A row that keeps the state means the event came too late and changes
#: nothing; a row that moves agrees with :data:`TRANSITIONS`.
INTERRUPTIONS: dict[tuple[TurnState, AttachmentState, TurnEvent], TurnState] = {
    # turn.cancel, the engine failing (or going away at shutdown) and our own
    # unexpected errors end a running turn, followed or not.
    **{(s, a, e): TurnState.ENDED
       for s in _RUNNING for a in AttachmentState
       for e in (TurnEvent.CANCEL, TurnEvent.ENGINE_FAILED, TurnEvent.INTERNAL_ERROR)},
    # The hard deadline ends a turn still waiting for its first token...
    **{(TurnState.QUEUED, a, TurnEvent.DEADLINE): TurnState.ENDED for a in AttachmentState},
    # ...and changes nothing once it streams: the first token came in time.
    **{(TurnState.STREAMING, a, TurnEvent.DEADLINE): TurnState.STREAMING for a in AttachmentState},
    # The end of the grace period ends a running turn nobody came back to...
    **{(s, AttachmentState.DETACHED, TurnEvent.DETACH_EXPIRED): TurnState.ENDED for s in _RUNNING},
    # ...and changes nothing for one somebody did come back to.
    **{(s, AttachmentState.ATTACHED, TurnEvent.DETACH_EXPIRED): s for s in _RUNNING},
    # An ended turn stays as it ended: whatever arrives now raced its end and lost.
    **{(TurnState.ENDED, a, e): TurnState.ENDED for a in AttachmentState for e in INTERRUPTING_EVENTS},
}

#: The finish reason each ending event gives (FINISH takes the engine's own).
FINISH_REASONS: dict[TurnEvent, str] = {
    TurnEvent.CONTENT_FILTER: "content_filter",
    TurnEvent.CANCEL: "cancelled",
    TurnEvent.DETACH_EXPIRED: "interrupted",
    TurnEvent.ENGINE_FAILED: "interrupted",
    TurnEvent.DEADLINE: "budget_exceeded",
    TurnEvent.INTERNAL_ERROR: "error",
}

ENGINE_FINISH_REASONS = frozenset({"stop", "length"})
ALL_FINISH_REASONS = frozenset(
    {"stop", "length", "cancelled", "interrupted", "budget_exceeded", "error", "content_filter"}
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

    def content_filtered(self, now_ms: float, usage: Usage | None = None) -> Ending:
        """The output filter blocked the reply: it ends with what was released so far."""
        return self._end(TurnEvent.CONTENT_FILTER, None, usage, now_ms)

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

    def engine_stopped(self, finish_reason: str | None, usage: Usage | None, now_ms: float) -> Ending:
        """The engine stream is over, with the engine's finish reason or none at all.

        Its own ``stop`` or ``length`` is a natural end. Any other reason (vLLM's
        ``abort``) or none (the stream just stopped) means the engine gave the
        request up: ENGINE_FAILED, and the turn keeps its partial reply.
        """
        if finish_reason in ENGINE_FINISH_REASONS:
            return self._end(TurnEvent.FINISH, finish_reason, usage, now_ms)
        return self._end(TurnEvent.ENGINE_FAILED, None, usage, now_ms)

    # ------------------------------------------------------------ interruptions

    def interrupt(self, event: TurnEvent, now_ms: float, usage: Usage | None = None, *,
                  attachment: AttachmentState = AttachmentState.ATTACHED) -> Ending | None:
        """An event from outside the engine stream, as :data:`INTERRUPTIONS` decides it.

        Returns the ending when the event ends the turn (the adapter aborts the
        engine request and carries the ending out), None when it came too late.
        ``attachment`` is whether anybody follows the turn; an HTTP request is
        always attached, since its client leaving is a cancel.
        """
        if self._interrupted_state(event, attachment) is self.state:
            return None
        return self._end(event, None, usage, now_ms)

    def would_end(self, event: TurnEvent, attachment: AttachmentState) -> bool:
        """Whether ``event`` would end the turn now; an adapter need not arm a
        timer whose event could only come too late."""
        return self._interrupted_state(event, attachment) is not self.state

    def _interrupted_state(self, event: TurnEvent, attachment: AttachmentState) -> TurnState:
        try:
            return INTERRUPTIONS[(self.state, attachment, event)]
        except KeyError:
            raise IllegalTransition(
                f"turn {self.turn_id}: {event.value} comes from the engine stream, not from outside it"
            ) from None

    def _end(self, event: TurnEvent, engine_reason: str | None, usage: Usage | None,
             now_ms: float) -> Ending:
        self._move(event)
        self.ended_ms = now_ms
        if usage is None:
            usage = Usage(completion_tokens=self.completion_tokens)
        # Only FINISH carries the engine's reason (finish() and engine_stopped() check it).
        reason = FINISH_REASONS[event] if engine_reason is None else engine_reason
        self.ending = Ending(
            finish_reason=reason,
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
