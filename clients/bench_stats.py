"""What ``rapport bench`` measures: one worker's :class:`Stats`, and all workers' merged.

A worker appends to plain ``array('d')`` columns (cheap to grow, cheap to ship
to the parent as bytes). Three kinds of column:

* latency series (milliseconds), summarized in the table: :data:`SERIES`;
* the moment (monotonic seconds) of each sample of the series that happen
  at a point in the run, so a caller can cut them into windows: :data:`TIMED`;
* one row per completed turn, every column appended together so that rows
  stay aligned across merged workers: :data:`TURN_COLUMNS` (NaN where the
  server did not report a figure).
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COUNTS", "SERIES", "TIMED", "TURN_COLUMNS", "MergedStats", "Stats", "merge_results"]

SERIES = ("ttft", "ttft_with_retries", "gap", "turn", "server_ttft", "server_queue", "server_engine_ttft",
          "server_total", "ttft_diff", "overhead", "busy_latency", "loop_lag")
#: Series whose samples also keep when they were taken.
TIMED = ("gap", "busy_latency")
TURN_COLUMNS = ("sent_at", "ttft", "ttft_with_retries", "server_ttft", "server_queue", "server_engine_ttft",
                "server_total", "turn", "end_seq", "received")
COUNTS = (
    "turns_planned", "turns_started", "turns_completed", "turns_failed", "busy", "rate_limited",
    "gave_up", "errors", "interrupted", "budget_misses", "dropped", "resumed", "connection_lost",
    "deltas_received", "end_seq_total", "seq_gaps", "seq_duplicates", "text_mismatches",
    "connects", "connect_failures", "closed_4429", "hello_errors", "idle_open", "idle_failed", "idle_lost",
    "idle_open_at_end", "pings_answered", "pings_answered_in_run", "arrivals", "no_free_connection",
    "unfinished",
)


class Stats:
    """One worker's measurements: latency series (ms), their moments, per-turn rows and counters."""

    def __init__(self) -> None:
        self.series: dict[str, array[float]] = {name: array("d") for name in SERIES}
        self.moments: dict[str, array[float]] = {name: array("d") for name in TIMED}
        self.turns: dict[str, array[float]] = {name: array("d") for name in TURN_COLUMNS}
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        #: Error messages by code, digits masked so that messages differing only in a number group.
        self.error_messages: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()
        #: CPU seconds this worker spent between being ready and the end of its run.
        self.cpu_s = 0.0
        self.active = 0
        self._fresh_ttft: list[float] = []

    def add(self, name: str, value: float, at: float | None = None) -> None:
        self.series[name].append(value)
        if name in self.moments:
            self.moments[name].append(math.nan if at is None else at)
        if name == "ttft":
            self._fresh_ttft.append(value)

    def turn_row(self, **values: float) -> None:
        for name in TURN_COLUMNS:
            self.turns[name].append(values.get(name, math.nan))

    def error(self, code: str, message: str | None = None) -> None:
        self.errors[code] += 1
        self.counts["errors"] += 1
        if message is not None:
            self.error_messages[f"{code}: {re.sub(r'[0-9]+', 'N', message)[:90]}"] += 1

    def progress(self) -> dict[str, Any]:
        fresh, self._fresh_ttft = self._fresh_ttft, []
        c = self.counts
        return {"done": c["turns_completed"], "active": self.active, "busy": c["busy"],
                "rate_limited": c["rate_limited"], "errors": c["errors"], "ttft": fresh}

    def export(self) -> dict[str, Any]:
        def raw(columns: dict[str, array[float]]) -> dict[str, bytes]:
            return {k: v.tobytes() for k, v in columns.items()}

        return {"series": raw(self.series), "moments": raw(self.moments), "turns": raw(self.turns),
                "counts": dict(self.counts), "errors": dict(self.errors),
                "error_messages": dict(self.error_messages), "finish": dict(self.finish), "cpu_s": self.cpu_s}


@dataclass
class MergedStats:
    """The workers' exported Stats, added up (columns concatenated worker after worker)."""

    series: dict[str, array[float]] = field(default_factory=lambda: {n: array("d") for n in SERIES})
    moments: dict[str, array[float]] = field(default_factory=lambda: {n: array("d") for n in TIMED})
    turns: dict[str, array[float]] = field(default_factory=lambda: {n: array("d") for n in TURN_COLUMNS})
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_messages: Counter[str] = field(default_factory=Counter)
    finish: Counter[str] = field(default_factory=Counter)
    cpu_s: float = 0.0


def merge_results(results: list[dict[str, Any]]) -> MergedStats:
    merged = MergedStats()
    for r in results:
        for target, columns in ((merged.series, r["series"]), (merged.moments, r["moments"]),
                                (merged.turns, r["turns"])):
            for name, data in columns.items():
                target[name].frombytes(data)
        merged.counts.update(r["counts"])
        merged.errors.update(r["errors"])
        merged.error_messages.update(r["error_messages"])
        merged.finish.update(r["finish"])
        merged.cpu_s += r["cpu_s"]
    return merged
