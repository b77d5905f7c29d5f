"""Admission control: refuse a turn with ``busy`` rather than accept one that
would miss its first-token budget (protocol guarantee 6).

:meth:`AdmissionController.check` runs on every ``turn.start`` and never awaits.
It predicts the time to first token of a turn submitted now and raises
:class:`protocol.errors.Busy` (with ``retry_after_ms``) when the prediction,
plus the gateway's own overhead, is over the budget.

Prediction
----------
Notation: ``R`` running, ``W`` waiting (from :meth:`Engine.load`), ``N`` the
engine's ``max_num_seqs``, ``free = max(0, N - R)``, ``P`` *pending*: turns this
process admitted that the engine has not seen yet (see below), ``L`` typical
reply length in tokens, ``itl`` decode step time (``load().recent_itl_ms``,
else ``default_itl_ms``).

A full batch frees about ``N / L`` slots per step, so one slot frees every
``slot_ms = L * itl / N`` ms, and a request that finds ``a`` requests ahead of
it waits for ``deficit(a) = max(0, a + 1 - free)`` slots::

    queue_ms(a) = deficit(a) * slot_ms

* Engine with ``estimate_ttft_ms(prompt_tokens)`` (the simulated engine; it
  knows its own queue and step schedule)::

      predicted = estimate_ttft_ms(prompt) + queue_ms(W + P) - queue_ms(W)

  (the engine's estimate covers ``W``; the second part adds the pending turns).

* Any other engine, from :meth:`Engine.load` alone::

      predicted = base + queue_ms(W + P)

  with ``base = load().recent_ttft_ms`` (median of recent first tokens), else
  ``default_ttft_ms``.

Background requests (``EngineRequest.priority > 0``: conversation summaries)
are scheduled after any waiting user turn, so ``W`` counts only user requests
(``load().waiting - load().background_waiting``); running background requests
hold their slots and stay in ``R``.

The turn is refused when ``predicted + overhead_ms > budget_ms`` **and** the
engine is not idle (no user request running, waiting or pending). An idle engine always admits: refusing
cannot make a turn faster there, and a model too slow for the budget then still
serves one turn at a time (the misses show in the metrics) instead of refusing
everyone forever.

``retry_after_ms = clamp(predicted + overhead_ms - budget_ms + slot_ms, 100, 30000)``:
the time the queue needs to drain until a new turn fits the budget, plus one
slot, so the retry does not land exactly on the edge.

Pending turns
-------------
Between admission and the engine's queue a turn spends a few Redis round trips
(history read, storing the turn). Without counting those turns, a burst of
simultaneous arrivals would all see the same idle engine and all be admitted.
Each admission leaves a ticket holding the engine's ``R + W`` at that moment.
At the next check, growth of ``R + W`` since the oldest ticket means that many
tickets have reached the engine; they are dropped. Completions in between hide
growth, so tickets also expire after ``pending_ttl_ms`` (either way the error is
on the conservative side: a turn counted twice, never not at all).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from protocol.errors import Busy

from .engines.base import Engine, EngineLoad

__all__ = ["AdmissionController", "Prediction"]

RETRY_MIN_MS = 100
RETRY_MAX_MS = 30_000


class Prediction:
    """What :meth:`AdmissionController.predict` worked out (for logs and tests)."""

    __slots__ = ("predicted_ms", "slot_ms", "running", "waiting", "pending", "max_num_seqs", "background")

    def __init__(self, predicted_ms: float, slot_ms: float, load: EngineLoad, pending: int) -> None:
        self.predicted_ms = predicted_ms
        self.slot_ms = slot_ms
        self.running = load.running
        self.waiting = load.waiting
        self.pending = pending
        self.max_num_seqs = load.max_num_seqs
        self.background = load.background

    @property
    def idle(self) -> bool:
        """No user request in the engine or on its way (background work does not count)."""
        return self.running + self.waiting - self.background + self.pending <= 0

    def __repr__(self) -> str:
        return (f"Prediction(predicted_ms={self.predicted_ms:.1f}, slot_ms={self.slot_ms:.1f}, "
                f"running={self.running}, waiting={self.waiting}, pending={self.pending}, "
                f"max_num_seqs={self.max_num_seqs})")


class AdmissionController:
    """Refuses turns that would miss ``budget_ms``; see the module docstring.

    Args:
        engine: the engine turns go to.
        budget_ms: the first-token budget (from receipt of ``turn.start``).
        reply_tokens: typical reply length ``L`` (the server's default max_tokens
            is a conservative choice).
        prompt_tokens: prompt size assumed when the caller does not know it.
        overhead_ms: the gateway's own time before the engine sees a turn.
        default_ttft_ms, default_itl_ms: used until the engine has measured its own.
        pending_ttl_ms: longest an admitted turn counts as on its way to the engine.
        clock: monotonic time in seconds (tests inject one).
    """

    def __init__(self, engine: Engine, budget_ms: float, *, reply_tokens: int = 256,
                 prompt_tokens: int = 512, overhead_ms: float = 20.0, default_ttft_ms: float = 200.0,
                 default_itl_ms: float = 30.0, pending_ttl_ms: float = 1000.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if budget_ms <= 0:
            raise ValueError("budget_ms must be positive")
        self.engine = engine
        self.budget_ms = float(budget_ms)
        self.reply_tokens = max(1, int(reply_tokens))
        self.prompt_tokens = max(1, int(prompt_tokens))
        self.overhead_ms = float(overhead_ms)
        self.default_ttft_ms = float(default_ttft_ms)
        self.default_itl_ms = float(default_itl_ms)
        self.pending_ttl_s = pending_ttl_ms / 1000.0
        self._clock = clock
        self._estimate: Callable[[int], float] | None = getattr(engine, "estimate_ttft_ms", None)
        # Tickets of admitted turns not yet seen by the engine: (admitted_at, engine R+W then - seen).
        self._tickets: deque[tuple[float, int]] = deque()
        self._seen = 0  # tickets retired because the engine's R+W grew
        self.admitted = 0
        self.refused = 0
        self._prior_reply_tokens = self.reply_tokens

    def observe_reply(self, completion_tokens: int) -> None:
        """Learn the typical reply length from finished turns (a moving average).

        Starting from the server's default max_tokens over-estimates how long a
        slot stays busy when replies are short, and refuses turns the engine had
        room for; the observed length is never taken above that prior.
        """
        if completion_tokens <= 0:
            return
        blended = 0.9 * self.reply_tokens + 0.1 * completion_tokens
        self.reply_tokens = max(1, min(self._prior_reply_tokens, round(blended)))

    # ------------------------------------------------------------ pending turns

    def _pending(self, load: EngineLoad, now: float) -> int:
        tickets = self._tickets
        horizon = now - self.pending_ttl_s
        while tickets and tickets[0][0] < horizon:
            tickets.popleft()
        if tickets:
            # Background requests (summaries) reaching the engine are not the
            # tickets' turns: only user requests retire tickets.
            total = load.running + load.waiting - load.background
            grown = total - (tickets[0][1] + self._seen)
            if grown > 0:
                for _ in range(min(grown, len(tickets))):
                    tickets.popleft()
                    self._seen += 1
        return len(tickets)

    @property
    def pending(self) -> int:
        """Admitted turns counted as not yet in the engine's queue."""
        return self._pending(self.engine.load(), self._clock())

    # ------------------------------------------------------------ prediction

    def predict(self, prompt_tokens: int | None = None, *, _now: float | None = None) -> Prediction:
        """The predicted time to first token (ms, engine side) of a turn submitted now."""
        load = self.engine.load()
        now = self._clock() if _now is None else _now
        pending = self._pending(load, now)
        n = max(1, load.max_num_seqs)
        free = max(0, n - load.running)
        # Waiting background requests (priority > 0) are scheduled after a user
        # turn, so they are not ahead of it; running ones do hold their slots.
        waiting = max(0, load.waiting - load.background_waiting)
        itl = load.recent_itl_ms if load.recent_itl_ms else self.default_itl_ms
        slot_ms = self.reply_tokens * itl / n

        def queue_ms(ahead: int) -> float:
            return max(0, ahead + 1 - free) * slot_ms

        if self._estimate is not None:
            prompt = self.prompt_tokens if prompt_tokens is None else max(1, int(prompt_tokens))
            predicted = float(self._estimate(prompt))
            if pending:
                predicted += queue_ms(waiting + pending) - queue_ms(waiting)
        else:
            base = load.recent_ttft_ms if load.recent_ttft_ms else self.default_ttft_ms
            predicted = base + queue_ms(waiting + pending)
        return Prediction(predicted, slot_ms, load, pending)

    def check(self, prompt_tokens: int | None = None) -> None:
        """Admit a turn (counted as pending) or raise :class:`Busy` with ``retry_after_ms``."""
        now = self._clock()
        p = self.predict(prompt_tokens, _now=now)
        over = p.predicted_ms + self.overhead_ms - self.budget_ms
        if over > 0 and not p.idle:
            self.refused += 1
            retry = int(min(RETRY_MAX_MS, max(RETRY_MIN_MS, math.ceil(over + p.slot_ms))))
            raise Busy(
                f"the model is busy; a new turn would wait about {p.predicted_ms / 1000:.1f} s for its "
                f"first token (budget {self.budget_ms / 1000:.1f} s); retry in {retry / 1000:.1f} s",
                retry_after_ms=retry,
            )
        load_total = p.running + p.waiting - p.background
        self._tickets.append((now, load_total - self._seen))
        self.admitted += 1

    def release(self) -> None:
        """Forget the newest pending ticket (an admitted turn that will never reach the engine)."""
        if self._tickets:
            self._tickets.pop()

    def stats(self) -> dict[str, Any]:
        return {"admitted": self.admitted, "refused": self.refused, "pending": len(self._tickets)}
