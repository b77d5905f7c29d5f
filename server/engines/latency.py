"""Recent latencies of an engine: the ``recent_*`` fields of :class:`EngineLoad`.

Admission control estimates a new turn's time to first token from the
engine's recent requests, so every engine keeps the same two rolling windows
and reports their medians (a median, so one stalled request does not move the
estimate).
"""

from __future__ import annotations

import statistics
from collections import deque

#: How many recent requests the TTFT / inter-token medians cover.
RECENT_WINDOW = 64


class RecentLatency:
    """Medians of the last ``window`` times to first token and inter-token latencies."""

    def __init__(self, window: int = RECENT_WINDOW) -> None:
        self._ttft_ms: deque[float] = deque(maxlen=window)
        self._itl_ms: deque[float] = deque(maxlen=window)

    def add_ttft_ms(self, ms: float) -> None:
        self._ttft_ms.append(ms)

    def add_itl_ms(self, ms: float) -> None:
        self._itl_ms.append(ms)

    def add_stream(self, t_start: float, t_first: float | None, t_last: float | None, tokens: int) -> None:
        """One finished stream, from its monotonic timestamps and the tokens it delivered.

        The first token arrives after prefill; the other ``tokens - 1`` arrived
        between the first and the last delta, which gives the inter-token latency.
        A stream that produced no text records nothing.
        """
        if t_first is None:
            return
        self._ttft_ms.append((t_first - t_start) * 1000.0)
        if t_last is not None and tokens > 1 and t_last > t_first:
            self._itl_ms.append((t_last - t_first) * 1000.0 / (tokens - 1))

    def ttft_ms(self) -> float | None:
        """Median time to first token, None before the first sample."""
        return statistics.median(self._ttft_ms) if self._ttft_ms else None

    def itl_ms(self) -> float | None:
        """Median time per output token while decoding, None before the first sample."""
        return statistics.median(self._itl_ms) if self._itl_ms else None
