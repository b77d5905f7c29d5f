"""What ``rapport eval`` makes of the turns it played: per-target summaries, thresholds, the table.

Pure functions and data. A :class:`TurnResult` is one user turn as the client
saw it; :func:`summarize` turns a target's results into a
:class:`TargetSummary` (context accuracy, TTFT and turn-time percentiles by
:func:`clients.percentiles.percentile`, interruption rate, budget misses) with
a PASS/FAIL per :class:`Thresholds` entry; :func:`render_table` puts the
targets side by side and :func:`render_failures` lists every failing check.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .eval_scenarios import CheckResult
from .percentiles import percentile

__all__ = [
    "COMPLETED_REASONS",
    "INTERRUPTED_REASONS",
    "TargetSummary",
    "ThresholdResult",
    "Thresholds",
    "TurnResult",
    "evaluate_thresholds",
    "failures_of",
    "render_failures",
    "render_table",
    "summarize",
]

_SPACES = re.compile(r"\s+")

#: finish reasons of a turn that counts as interrupted
INTERRUPTED_REASONS = frozenset({"error", "interrupted", "budget_exceeded", "cancelled"})
#: finish reasons of a turn whose reply is scored
COMPLETED_REASONS = frozenset({"stop", "length"})


# ---------------------------------------------------------------------------
# Results and summaries (pure)
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class TurnResult:
    """One user turn as the client saw it."""

    scenario: str
    repeat: int
    turn: int  # 1-based
    user: str
    reply: str = ""
    finish_reason: str | None = None
    error: str | None = None  # client-side failure: connection, error answer, timeout...
    ttft_ms: float | None = None
    turn_ms: float | None = None
    retries: int = 0  # busy / rate_limited answers before the turn was accepted
    retry_codes: list[str] = field(default_factory=list)
    server_timings: dict[str, Any] | None = None
    checks: list[CheckResult] = field(default_factory=list)
    #: a scenario's ``remember`` fact sent as an ordinary message (the target
    #: had no memory, see clients.eval), not one of its scripted turns; ``turn`` is 0
    setup: bool = False

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_reason in COMPLETED_REASONS

    @property
    def interrupted(self) -> bool:
        return self.error is not None or self.finish_reason in INTERRUPTED_REASONS

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "repeat": self.repeat, "turn": self.turn, "user": self.user,
                "reply": self.reply, "finish_reason": self.finish_reason, "error": self.error,
                "ttft_ms": _round(self.ttft_ms), "turn_ms": _round(self.turn_ms), "retries": self.retries,
                "retry_codes": list(self.retry_codes), "server_timings": self.server_timings,
                "checks": [c.to_dict() for c in self.checks], "setup": self.setup}


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_accuracy: float = 0.9
    max_p95_turn_ms: float = 800.0
    max_interruption_rate: float = 0.02


@dataclass(frozen=True, slots=True)
class ThresholdResult:
    name: str
    label: str  # e.g. "accuracy >= 90%"
    value: float | None
    limit: float
    passed: bool
    note: str = ""  # why a missing value passed or failed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "value": _round(self.value, 4),
                "limit": self.limit, "passed": self.passed, "note": self.note}


@dataclass(slots=True)
class TargetSummary:
    label: str
    url: str
    model: str | None
    conversations: int
    turns: int
    completed_turns: int
    recall_total: int
    recall_passed: int
    style_total: int
    style_passed: int
    safety_total: int
    safety_passed: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    turn_p50_ms: float | None
    turn_p95_ms: float | None
    interruptions: int
    budget_ms: float
    budget_misses: int
    retries: int
    retry_codes: dict[str, int]
    finish_reasons: dict[str, int]
    errors: dict[str, int]
    thresholds: list[ThresholdResult]
    #: recall checks (passed, total) per scenario, in the order first played
    recall_by_scenario: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: how the conversations with ``remember`` facts got them: mode -> conversations
    #: (clients.eval: "pinned", "messages", "messages (server has no memory.*)")
    facts_modes: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return self.recall_passed / self.recall_total if self.recall_total else None

    @property
    def other_total(self) -> int:
        return self.style_total + self.safety_total

    @property
    def other_passed(self) -> int:
        return self.style_passed + self.safety_passed

    @property
    def interruption_rate(self) -> float | None:
        return self.interruptions / self.turns if self.turns else None

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.thresholds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "url": self.url, "model": self.model,
            "conversations": self.conversations, "turns": self.turns, "completed_turns": self.completed_turns,
            "context_accuracy": _round(self.accuracy, 4),
            "recall_checks": {"passed": self.recall_passed, "total": self.recall_total},
            "style_checks": {"passed": self.style_passed, "total": self.style_total},
            "safety_checks": {"passed": self.safety_passed, "total": self.safety_total},
            "other_checks": {"passed": self.other_passed, "total": self.other_total},
            "ttft_ms": {"p50": _round(self.ttft_p50_ms), "p95": _round(self.ttft_p95_ms)},
            "turn_ms": {"p50": _round(self.turn_p50_ms), "p95": _round(self.turn_p95_ms)},
            "interruptions": self.interruptions, "interruption_rate": _round(self.interruption_rate, 4),
            "budget_ms": self.budget_ms, "budget_misses": self.budget_misses, "retries": self.retries,
            "retry_codes": dict(self.retry_codes), "finish_reasons": dict(self.finish_reasons),
            "errors": dict(self.errors),
            "recall_by_scenario": {name: {"passed": p, "total": t, "accuracy": _round(p / t if t else None, 4)}
                                   for name, (p, t) in self.recall_by_scenario.items()},
            "facts_modes": dict(self.facts_modes),
            "thresholds": [t.to_dict() for t in self.thresholds], "passed": self.passed,
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(float(value), digits)


def _error_kind(error: str) -> str:
    return error.split(":", 1)[0].strip() or "error"


def evaluate_thresholds(*, accuracy: float | None, turn_p95_ms: float | None,
                        interruption_rate: float | None, thresholds: Thresholds) -> list[ThresholdResult]:
    """PASS/FAIL per threshold. No recall checks: accuracy passes as n/a; no
    completed turn (no turn time) or no turn at all fails."""
    t = thresholds
    return [
        ThresholdResult("min_accuracy", f"accuracy >= {t.min_accuracy:.0%}", accuracy, t.min_accuracy,
                        True if accuracy is None else accuracy >= t.min_accuracy,
                        "no recall checks" if accuracy is None else ""),
        ThresholdResult("max_p95_turn_ms", f"turn p95 <= {t.max_p95_turn_ms:g} ms", turn_p95_ms,
                        t.max_p95_turn_ms, turn_p95_ms is not None and turn_p95_ms <= t.max_p95_turn_ms,
                        "no completed turn" if turn_p95_ms is None else ""),
        ThresholdResult("max_interruption_rate", f"interruptions <= {t.max_interruption_rate:.1%}",
                        interruption_rate, t.max_interruption_rate,
                        interruption_rate is not None and interruption_rate <= t.max_interruption_rate,
                        "no turns" if interruption_rate is None else ""),
    ]


def summarize(results: Sequence[TurnResult], *, label: str = "target", url: str = "",
              model: str | None = None, budget_ms: float = 2000.0,
              thresholds: Thresholds | None = None, facts_modes: dict[str, int] | None = None) -> TargetSummary:
    """Aggregate one target's turns into its figures and threshold verdicts."""
    thresholds = thresholds or Thresholds()
    counts: Counter[tuple[str, bool]] = Counter()
    by_scenario: dict[str, tuple[int, int]] = {}
    for r in results:
        for c in r.checks:
            counts[(c.check.kind, c.passed)] += 1
            if c.check.kind == "recall":
                p, t = by_scenario.get(r.scenario, (0, 0))
                by_scenario[r.scenario] = (p + c.passed, t + 1)
    ttfts = sorted(r.ttft_ms for r in results if r.ttft_ms is not None)
    turn_times = sorted(r.turn_ms for r in results if r.completed and r.turn_ms is not None)
    misses = sum(1 for r in results if (r.ttft_ms is not None and r.ttft_ms > budget_ms)
                 or (r.ttft_ms is None and r.finish_reason == "budget_exceeded"))
    interruptions = sum(1 for r in results if r.interrupted)

    def total(kind: str) -> int:
        return counts[(kind, True)] + counts[(kind, False)]

    recall_total = total("recall")
    accuracy = counts[("recall", True)] / recall_total if recall_total else None
    turn_p95 = percentile(turn_times, 95, presorted=True)
    rate = interruptions / len(results) if results else None
    return TargetSummary(
        label=label, url=url, model=model,
        conversations=len({(r.scenario, r.repeat) for r in results}),
        turns=len(results),
        completed_turns=sum(1 for r in results if r.completed),
        recall_total=recall_total, recall_passed=counts[("recall", True)],
        style_total=total("style"), style_passed=counts[("style", True)],
        safety_total=total("safety"), safety_passed=counts[("safety", True)],
        ttft_p50_ms=percentile(ttfts, 50, presorted=True), ttft_p95_ms=percentile(ttfts, 95, presorted=True),
        turn_p50_ms=percentile(turn_times, 50, presorted=True), turn_p95_ms=turn_p95,
        interruptions=interruptions, budget_ms=budget_ms, budget_misses=misses,
        retries=sum(r.retries for r in results),
        retry_codes=dict(Counter(code for r in results for code in r.retry_codes)),
        finish_reasons=dict(Counter(r.finish_reason for r in results if r.finish_reason)),
        errors=dict(Counter(_error_kind(r.error) for r in results if r.error)),
        thresholds=evaluate_thresholds(accuracy=accuracy, turn_p95_ms=turn_p95, interruption_rate=rate,
                                       thresholds=thresholds),
        recall_by_scenario=by_scenario, facts_modes=dict(facts_modes or {}),
    )


# ---------------------------------------------------------------------------
# Rendering (pure)
# ---------------------------------------------------------------------------


def _width(text: str) -> int:
    """Terminal columns: East Asian wide/full-width characters take two."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ratio(passed: int, total: int) -> str:
    return "-" if not total else f"{passed}/{total} ({passed / total:.0%})"


def _scenario_rows(summaries: Sequence[TargetSummary]) -> list[tuple[str, list[str]]]:
    """Context accuracy per scenario, when more than one scenario had recall checks."""
    names = list(dict.fromkeys(n for s in summaries for n in s.recall_by_scenario))
    if len(names) < 2:
        return []
    rows = []
    for name in names:
        cells = []
        for s in summaries:
            p, t = s.recall_by_scenario.get(name, (0, 0))
            cells.append(f"{_pct(p / t)} ({p}/{t})" if t else "-")
        rows.append((f"  {name}", cells))
    return rows


def _facts_rows(summaries: Sequence[TargetSummary]) -> list[tuple[str, list[str]]]:
    """How ``remember`` facts reached each target, when any scenario had them."""
    if not any(s.facts_modes for s in summaries):
        return []
    return [("remembered facts", [", ".join(mode if len(s.facts_modes) == 1 else f"{mode} ({n})"
                                            for mode, n in s.facts_modes.items()) or "-"
                                  for s in summaries])]


def render_table(summaries: Sequence[TargetSummary]) -> str:
    """One table, one column per target, one row per figure; PASS/FAIL at the bottom."""
    if not summaries:
        return "(no targets)"
    rows: list[tuple[str, list[str]]] = [
        ("model", [s.model or "-" for s in summaries]),
        ("url", [s.url for s in summaries]),
        ("conversations", [str(s.conversations) for s in summaries]),
        ("turns (completed)", [f"{s.turns} ({s.completed_turns})" for s in summaries]),
        ("context accuracy", [f"{_pct(s.accuracy)} ({s.recall_passed}/{s.recall_total})"
                              if s.recall_total else "- (no recall checks)" for s in summaries]),
        *_scenario_rows(summaries),
        *_facts_rows(summaries),
        ("style checks passed", [_ratio(s.style_passed, s.style_total) for s in summaries]),
        ("safety checks passed", [_ratio(s.safety_passed, s.safety_total) for s in summaries]),
        ("TTFT p50 / p95 (ms)", [f"{_ms(s.ttft_p50_ms)} / {_ms(s.ttft_p95_ms)}" for s in summaries]),
        ("turn time p50 / p95 (ms)", [f"{_ms(s.turn_p50_ms)} / {_ms(s.turn_p95_ms)}" for s in summaries]),
        ("interruption rate", [f"{_pct(s.interruption_rate)} ({s.interruptions}/{s.turns})" for s in summaries]),
        (f"budget misses (TTFT > {summaries[0].budget_ms:g} ms)", [str(s.budget_misses) for s in summaries]),
        ("busy / rate-limit retries", [str(s.retries) for s in summaries]),
    ]
    rule: list[tuple[str, list[str]]] = [("", [])]
    verdicts: list[tuple[str, list[str]]] = []
    for i, t in enumerate(summaries[0].thresholds):
        cells = []
        for s in summaries:
            r = s.thresholds[i]
            cells.append(("PASS" if r.passed else "FAIL") + (f" ({r.note})" if r.note else ""))
        verdicts.append((t.label, cells))
    verdicts.append(("overall", ["PASS" if s.passed else "FAIL" for s in summaries]))
    header = ("", [s.label for s in summaries])
    table = [header, *rows, *rule, *verdicts]
    first = max(_width(name) for name, _ in table)
    widths = [max(_width(cells[i]) for _, cells in table if cells) for i in range(len(summaries))]
    lines = []
    for name, cells in table:
        if not cells and not name:
            lines.append("  ".join(["-" * first, *("-" * w for w in widths)]))
            continue
        padded = (_pad(c, w) for c, w in zip(cells, widths, strict=True))  # one cell per target
        lines.append("  ".join([_pad(name, first), *padded]).rstrip())
    lines.insert(1, "  ".join(["-" * first, *("-" * w for w in widths)]))
    return "\n".join(lines)


def _one_line(text: str, limit: int) -> str:
    flat = _SPACES.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def failures_of(label: str, results: Iterable[TurnResult]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        for c in r.checks:
            if not c.passed:
                out.append({"target": label, "scenario": r.scenario, "repeat": r.repeat, "turn": r.turn,
                            "check": c.check.name, "kind": c.check.kind, "op": c.check.op,
                            "expected": c.check.describe(), "detail": c.detail,
                            "user": r.user, "reply": r.reply, "finish_reason": r.finish_reason,
                            "error": r.error})
    return out


def render_failures(failures: Sequence[dict[str, Any]], *, limit: int = 50, reply_chars: int = 160) -> str:
    """The failing checks, one line each plus the (truncated) reply."""
    if not failures:
        return "No failing checks."
    lines = [f"Failing checks ({len(failures)}):"]
    for f in failures[:limit]:
        where = f"[{f['target']}] {f['scenario']}#{f['repeat'] + 1} turn {f['turn']}"
        lines.append(f"  {where}  {f['kind']} '{f['check']}': {f['expected']} -> {f['detail']}")
        lines.append(f"      reply: {json.dumps(_one_line(f['reply'], reply_chars), ensure_ascii=False)}")
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more (all of them are in --json)")
    return "\n".join(lines)
