"""``rapport eval``: scripted multi-turn conversations, scored for memory and latency.

Each *scenario* (``clients/scenarios/*.json``, schema in
``clients/scenarios/README.md``) is a dialogue whose user turns may carry
checks on the reply. The harness plays every scenario against every
``--target`` over the WebSocket protocol, each conversation with a fresh
``conversation_id`` (and a fresh user) so history starts empty, and reports one
table with the targets side by side::

    rapport eval --target ws://10.0.0.5:8000/v1/ws --target ws://10.0.0.6:8000/v1/ws \\
        --scenario shoe-return --scenario fact-recall-8 --repeat 3 --json eval.json

Figures per target:

* **context accuracy**: recall checks passed / recall checks run;
* style and safety checks passed (reported separately, not in the accuracy);
* time to first token and turn time, p50/p95, on the client's monotonic clock
  (from sending the ``turn.start`` that was accepted to the first
  ``turn.delta`` / to ``turn.end``);
* **interruption rate**: turns that ended ``error``, ``interrupted``,
  ``budget_exceeded`` or ``cancelled``, or that failed on the client side (the
  connection dropped or could not be opened, an error answer, a timeout, a
  protocol violation), over all turns;
* budget misses: turns whose first token came later than ``--budget-ms``, plus
  turns that ended ``budget_exceeded``.

Scoring (:func:`score_reply`): the reply and every needle are normalised with
:func:`normalize_text` (Unicode NFKC, so full-width ``Ａ－４８２１３`` equals
``A-48213`` and ``３年`` equals ``3年``; dash-like characters become ``-``;
whitespace runs become one space; case folded). ``pattern`` is a Python regular
expression searched in the NFKC-normalised reply (not case folded; the search
ignores case). A turn that did not complete (no ``turn.end`` with ``stop`` or
``length``) fails all of its checks.

Comparability: protocol v1 has no sampling seed, so ``--seed`` is recorded in
the report but not sent; runs are comparable because every turn is sent with
``temperature`` 0 (greedy decoding) unless ``--temperature`` says otherwise.

The exit status is 0 even when thresholds fail (it is a report); with
``--fail-on-threshold`` it is 1 when any target fails a threshold. Usage
errors (an unknown scenario, an invalid scenario file) exit with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import itertools
import json
import os
import re
import sys
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .bench import mint_token, normalize_url, percentile
from .client import (
    JSON_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    AuthenticationError,
    ClientError,
    RapportConnection,
    ServerError,
    TurnStream,
)

__all__ = [
    "CHECK_KINDS",
    "CHECK_OPS",
    "Check",
    "CheckResult",
    "EvalConfig",
    "EvalReport",
    "Scenario",
    "ScenarioError",
    "ScenarioTurn",
    "TargetSpec",
    "TargetSummary",
    "Thresholds",
    "TurnResult",
    "add_eval_arguments",
    "eval_command",
    "load_scenario",
    "load_scenarios",
    "main",
    "normalize_text",
    "parse_scenario",
    "render_failures",
    "render_table",
    "report_to_dict",
    "run_eval",
    "score_reply",
    "shipped_scenario_names",
    "summarize",
]

CLIENT_NAME = "rapport-eval"
REPORT_VERSION = 1

CHECK_KINDS = ("recall", "style", "safety")
CHECK_OPS = ("must_include_any", "must_include_all", "must_not_include", "pattern")
#: finish reasons of a turn that counts as interrupted
INTERRUPTED_REASONS = frozenset({"error", "interrupted", "budget_exceeded", "cancelled"})
#: finish reasons of a turn whose reply is scored
COMPLETED_REASONS = frozenset({"stop", "length"})
#: error answers after which the same turn is sent again (after retry_after_ms)
RETRYABLE_CODES = frozenset({"busy", "rate_limited", "turn_in_progress"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SCENARIO_KEYS = ("name", "description", "language", "tags", "turns", "comment", "schema_version")
_TURN_KEYS = ("user", "checks", "comment")
_CHECK_KEYS = ("kind", "name", "comment", *CHECK_OPS)


# ---------------------------------------------------------------------------
# Scenarios: data, validation, loading
# ---------------------------------------------------------------------------


class ScenarioError(ValueError):
    """A scenario that cannot be found or does not follow the schema."""


@dataclass(frozen=True, slots=True)
class Check:
    """One check on a reply: ``op`` with its ``values`` (needles, or one regex)."""

    kind: str
    op: str
    values: tuple[str, ...]
    name: str

    def describe(self) -> str:
        if self.op == "pattern":
            return f"pattern /{self.values[0]}/"
        return f"{self.op} " + ", ".join(json.dumps(v, ensure_ascii=False) for v in self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "op": self.op,
                self.op: self.values[0] if self.op == "pattern" else list(self.values)}


@dataclass(frozen=True, slots=True)
class ScenarioTurn:
    user: str
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    turns: tuple[ScenarioTurn, ...]
    description: str = ""
    language: str = ""
    tags: tuple[str, ...] = ()
    source: str = ""

    @property
    def check_count(self) -> int:
        return sum(len(t.checks) for t in self.turns)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_keys(obj: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise ScenarioError(f"{where}: unknown key '{key}'{_suggest(str(key), allowed)}; "
                                f"allowed: {', '.join(allowed)}")


def _parse_check(raw: Any, where: str, index: int) -> Check:
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: a check must be an object, not {type(raw).__name__}")
    _unknown_keys(raw, _CHECK_KEYS, where)
    kind = raw.get("kind")
    if kind is None:
        raise ScenarioError(f"{where}: missing 'kind' (one of {', '.join(CHECK_KINDS)})")
    if kind not in CHECK_KINDS:
        raise ScenarioError(f"{where}: 'kind' must be one of {', '.join(CHECK_KINDS)}, "
                            f"not {kind!r}{_suggest(str(kind), CHECK_KINDS)}")
    ops = [op for op in CHECK_OPS if op in raw]
    if len(ops) != 1:
        found = ", ".join(ops) if ops else "none"
        raise ScenarioError(f"{where}: a check needs exactly one of {', '.join(CHECK_OPS)} (found {found}); "
                            "write two checks to test two things")
    op = ops[0]
    value = raw[op]
    if op == "pattern":
        if not isinstance(value, str) or not value:
            raise ScenarioError(f"{where}: 'pattern' must be a non-empty string (a regular expression)")
        try:
            re.compile(value)
        except re.error as exc:
            raise ScenarioError(f"{where}: 'pattern' is not a valid regular expression: {exc}") from None
        values: tuple[str, ...] = (value,)
    else:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ScenarioError(f"{where}: '{op}' must be a non-empty list of strings")
        for j, item in enumerate(items):
            if not isinstance(item, str) or not normalize_text(item).strip():
                raise ScenarioError(f"{where}: '{op}'[{j}] must be a non-empty string, not {item!r}")
        values = tuple(items)
    name = raw.get("name")
    if name is None:
        name = f"{kind}#{index + 1}"
    elif not isinstance(name, str) or not name.strip():
        raise ScenarioError(f"{where}: 'name' must be a non-empty string")
    comment = raw.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise ScenarioError(f"{where}: 'comment' must be a string")
    return Check(kind=kind, op=op, values=values, name=name)


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    """Validate a decoded scenario; raises :class:`ScenarioError` naming the exact place."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario must be a JSON object, not {type(data).__name__}")
    _unknown_keys(data, _SCENARIO_KEYS, source)
    version = data.get("schema_version", 1)
    if version != 1:
        raise ScenarioError(f"{source}: 'schema_version' {version!r} is not supported (only 1)")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ScenarioError(f"{source}: 'name' must be 1-64 characters of letters, digits, '.', '_' or '-' "
                            f"(starting with a letter or digit), not {name!r}")
    where = f"{source} ({name})"
    for key in ("description", "language", "comment"):
        if key in data and not isinstance(data[key], str):
            raise ScenarioError(f"{where}: '{key}' must be a string")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ScenarioError(f"{where}: 'tags' must be a list of strings")
    raw_turns = data.get("turns")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise ScenarioError(f"{where}: 'turns' must be a non-empty list of {{\"user\": ..., \"checks\": [...]}}")
    turns: list[ScenarioTurn] = []
    for i, raw in enumerate(raw_turns):
        at = f"{where}: turns[{i}]"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{at}: a turn must be an object, not {type(raw).__name__}")
        _unknown_keys(raw, _TURN_KEYS, at)
        user = raw.get("user")
        if not isinstance(user, str) or not user.strip():
            raise ScenarioError(f"{at}: 'user' (the user's message) must be a non-empty string")
        raw_checks = raw.get("checks", [])
        if not isinstance(raw_checks, list):
            raise ScenarioError(f"{at}: 'checks' must be a list")
        checks = tuple(_parse_check(c, f"{at}.checks[{j}]", j) for j, c in enumerate(raw_checks))
        turns.append(ScenarioTurn(user=user, checks=checks))
    return Scenario(name=name, turns=tuple(turns), description=data.get("description", ""),
                    language=data.get("language", ""), tags=tuple(tags), source=source)


def _scenario_dir() -> Any:
    return resources.files("clients").joinpath("scenarios")


def shipped_scenario_names() -> list[str]:
    """Names of the scenarios shipped with the package (their file names without ``.json``)."""
    folder = _scenario_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _decode(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def load_scenario(ref: str) -> Scenario:
    """A scenario by shipped name (``shoe-return``) or by file path (``./mine.json``)."""
    path = Path(ref)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ScenarioError(f"{ref}: cannot read: {exc}") from None
        return parse_scenario(_decode(text, ref), ref)
    if path.suffix == ".json" or "/" in ref or os.sep in ref:
        raise ScenarioError(f"no scenario file {ref!r}")
    names = shipped_scenario_names()
    if ref not in names:
        raise ScenarioError(f"unknown scenario {ref!r}{_suggest(ref, names)}; shipped: {', '.join(names)} "
                            "(or give a path to a .json file)")
    resource = _scenario_dir().joinpath(f"{ref}.json")
    scenario = parse_scenario(_decode(resource.read_text(encoding="utf-8"), f"{ref}.json"), f"{ref}.json")
    if scenario.name != ref:
        raise ScenarioError(f"{ref}.json: 'name' is {scenario.name!r}; a shipped scenario is named after its file")
    return scenario


def load_scenarios(refs: Sequence[str] | None = None) -> list[Scenario]:
    """The scenarios ``refs`` name (default: every shipped one); names must be unique."""
    scenarios = [load_scenario(r) for r in (refs or shipped_scenario_names())]
    if not scenarios:
        raise ScenarioError("no scenarios to run")
    seen: dict[str, Scenario] = {}
    unique: list[Scenario] = []
    for s in scenarios:
        if s.name in seen:
            if seen[s.name].source == s.source:
                continue  # the same scenario named twice: run it once
            raise ScenarioError(f"two scenarios are named {s.name!r} ({seen[s.name].source} and {s.source})")
        seen[s.name] = s
        unique.append(s)
    return unique


# ---------------------------------------------------------------------------
# Scoring (pure)
# ---------------------------------------------------------------------------

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63"), "-")
_SPACES = re.compile(r"\s+")


def _fold(text: str) -> str:
    """NFKC, dash-like characters as '-', whitespace runs as one space (case kept)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).translate(_DASHES))


def normalize_text(text: str) -> str:
    """What include-checks compare: NFKC (full-width -> half-width), dashes unified,
    whitespace collapsed, case folded."""
    return _fold(text).casefold()


@dataclass(frozen=True, slots=True)
class CheckResult:
    check: Check
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.check.name, "kind": self.check.kind, "op": self.check.op,
                "check": self.check.describe(), "passed": self.passed, "detail": self.detail}


def _quote(values: Iterable[str]) -> str:
    return ", ".join(json.dumps(v, ensure_ascii=False) for v in values)


def score_check(check: Check, reply: str) -> CheckResult:
    if check.op == "pattern":
        found = re.search(check.values[0], _fold(reply), re.IGNORECASE) is not None
        return CheckResult(check, found, "" if found else f"no match for /{check.values[0]}/")
    text = normalize_text(reply)
    present = [v for v in check.values if normalize_text(v) in text]
    if check.op == "must_include_any":
        ok = bool(present)
        return CheckResult(check, ok, "" if ok else f"none of {_quote(check.values)}")
    if check.op == "must_include_all":
        missing = [v for v in check.values if v not in present]
        return CheckResult(check, not missing, f"missing {_quote(missing)}" if missing else "")
    if check.op == "must_not_include":
        return CheckResult(check, not present, f"contains {_quote(present)}" if present else "")
    raise ValueError(f"unknown check op {check.op!r}")


def score_reply(checks: Sequence[Check], reply: str) -> list[CheckResult]:
    """Score one complete reply against a turn's checks."""
    return [score_check(c, reply) for c in checks]


def fail_checks(checks: Sequence[Check], why: str) -> list[CheckResult]:
    """The results of a turn without a complete reply: every check fails."""
    return [CheckResult(c, False, f"no complete reply ({why})") for c in checks]


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
                "checks": [c.to_dict() for c in self.checks]}


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
              thresholds: Thresholds | None = None) -> TargetSummary:
    """Aggregate one target's turns into its figures and threshold verdicts."""
    thresholds = thresholds or Thresholds()
    counts: Counter[tuple[str, bool]] = Counter()
    for r in results:
        for c in r.checks:
            counts[(c.check.kind, c.passed)] += 1
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
        ("style checks passed", [_ratio(s.style_passed, s.style_total) for s in summaries]),
        ("safety checks passed", [_ratio(s.safety_passed, s.safety_total) for s in summaries]),
        ("TTFT p50 / p95 (ms)", [f"{_ms(s.ttft_p50_ms)} / {_ms(s.ttft_p95_ms)}" for s in summaries]),
        ("turn time p50 / p95 (ms)", [f"{_ms(s.turn_p50_ms)} / {_ms(s.turn_p95_ms)}" for s in summaries]),
        ("interruption rate", [f"{_pct(s.interruption_rate)} ({s.interruptions}/{s.turns})" for s in summaries]),
        (f"budget misses (TTFT > {summaries[0].budget_ms:g} ms)", [str(s.budget_misses) for s in summaries]),
        ("busy / rate-limit retries", [str(s.retries) for s in summaries]),
    ]
    rule = [("", [])]
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
        lines.append("  ".join([_pad(name, first), *(_pad(c, w) for c, w in zip(cells, widths))]).rstrip())
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


# ---------------------------------------------------------------------------
# Running conversations (I/O)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetSpec:
    url: str
    label: str | None = None


@dataclass(slots=True)
class EvalConfig:
    targets: list[TargetSpec]
    scenarios: list[Scenario]
    repeat: int = 1
    concurrency: int = 1
    temperature: float | None = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    token: str | None = None
    jwt_secret: str | None = None
    dev_users: bool = False
    user_prefix: str = "eval-"
    budget_ms: float = 2000.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    turn_timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    max_retries: int = 30
    msgpack: bool = False
    progress: Callable[[str], None] | None = None

    def turn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        return options

    def credentials(self, user: str) -> tuple[str | None, str | None]:
        """(bearer token, hello.user) for a conversation's user."""
        if self.dev_users:
            return None, user
        if self.token:
            return self.token, None
        secret = self.jwt_secret
        if not secret:
            from protocol.development import DEV_JWT_SECRET

            secret = os.environ.get("RAPPORT_JWT_SECRET") or DEV_JWT_SECRET
        return mint_token(user, secret), None


@dataclass(slots=True)
class TargetRun:
    spec: TargetSpec
    results: list[TurnResult]
    model: str | None = None
    label: str = ""


@dataclass(slots=True)
class EvalReport:
    config: EvalConfig
    runs: list[TargetRun]
    summaries: list[TargetSummary]
    started_at: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.summaries)

    def failures(self) -> list[dict[str, Any]]:
        return [f for run in self.runs for f in failures_of(run.label, run.results)]


def _retry_delay(exc: ServerError) -> float:
    ms = exc.retry_after_ms
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms >= 0:
        return min(float(ms), 60_000.0) / 1000.0
    return 0.5


class _Conversation:
    """One scenario played once on one target, over one connection (re-opened if lost)."""

    def __init__(self, cfg: EvalConfig, url: str, scenario: Scenario, repeat: int, user: str,
                 on_ready: Callable[[dict[str, Any]], None]) -> None:
        self.cfg = cfg
        self.url = url
        self.scenario = scenario
        self.repeat = repeat
        self.user = user
        self.conversation_id = f"eval-{uuid.uuid4().hex}"
        self.on_ready = on_ready
        self.conn: RapportConnection | None = None
        self.fatal: str | None = None  # a connection that cannot be opened fails the remaining turns

    async def run(self) -> list[TurnResult]:
        results: list[TurnResult] = []
        try:
            for index, turn in enumerate(self.scenario.turns, 1):
                result = TurnResult(scenario=self.scenario.name, repeat=self.repeat, turn=index, user=turn.user)
                if self.fatal is None and (self.conn is None or self.conn.closed):
                    await self._connect()
                if self.fatal is not None:
                    result.error = self.fatal
                else:
                    await self._play(turn, result)
                result.checks = (score_reply(turn.checks, result.reply) if result.completed
                                 else fail_checks(turn.checks, result.error or f"ended {result.finish_reason}"))
                results.append(result)
        finally:
            if self.conn is not None:
                await self.conn.close()
        return results

    async def _connect(self) -> None:
        """Open (one retry after 1 s); refused credentials or a second failure end the conversation."""
        token, hello_user = self.cfg.credentials(self.user)
        subprotocol = MSGPACK_SUBPROTOCOL if self.cfg.msgpack else JSON_SUBPROTOCOL
        for attempt in range(2):
            try:
                self.conn = await RapportConnection.open(
                    self.url, token=token, user=hello_user, subprotocol=subprotocol,
                    client_name=CLIENT_NAME, open_timeout=self.cfg.connect_timeout_s)
            except ClientError as exc:
                # Close 4401 / HTTP 401-403, or an error answer to the hello.
                if isinstance(exc, AuthenticationError) or getattr(exc, "code", None) == "unauthorized":
                    self.fatal = f"unauthorized: {exc.message}"
                    return
                if attempt == 0:
                    await asyncio.sleep(1.0)
                    continue
                self.fatal = f"connect_failed: {exc}"
                return
            self.on_ready(self.conn.ready)
            await self._settle(self.conn)
            return

    async def _settle(self, conn: RapportConnection) -> None:
        """After a reconnect, stop a turn of ours still running from the lost connection."""
        for active in conn.ready.get("active_turns") or []:
            if not isinstance(active, dict) or active.get("conversation_id") != self.conversation_id:
                continue
            turn_id, last_seq = active.get("turn_id"), active.get("last_seq")
            if not isinstance(turn_id, str):
                continue
            try:
                stream = await conn.resume(turn_id, last_seq if isinstance(last_seq, int) else 0)
                await conn.cancel(turn_id)
                async with asyncio.timeout(10.0):
                    await stream.wait()
            except (ClientError, TimeoutError):
                pass

    async def _play(self, turn: ScenarioTurn, result: TurnResult) -> None:
        assert self.conn is not None
        conn = self.conn
        loop = asyncio.get_running_loop()
        options = self.cfg.turn_options()
        while True:
            started = loop.time()
            first: float | None = None
            stream: TurnStream | None = None
            try:
                stream = await conn.start_turn(turn.user, conversation_id=self.conversation_id,
                                               options=options or None)
                async with asyncio.timeout(self.cfg.turn_timeout_s):
                    async for _ in stream:
                        if first is None:
                            first = loop.time()
            except ServerError as exc:
                if exc.code in RETRYABLE_CODES and result.retries < self.cfg.max_retries:
                    result.retries += 1
                    result.retry_codes.append(exc.code)
                    await asyncio.sleep(_retry_delay(exc))
                    continue
                result.error = f"{exc.code}: {exc.message}"
            except TimeoutError:
                result.error = f"timeout: no turn.end within {self.cfg.turn_timeout_s:g} s"
                await self._abandon(conn, stream)
            except ClientError as exc:  # the connection dropped, or the server broke the protocol
                result.error = f"{exc.code}: {exc}"
            ended = loop.time()
            if stream is not None:
                result.reply = stream.text
            if first is not None:
                result.ttft_ms = (first - started) * 1000.0
            if result.error is None and stream is not None and stream.end is not None:
                end = stream.end
                reason = end.get("finish_reason")
                result.finish_reason = reason if isinstance(reason, str) else "unknown"
                if isinstance(end.get("text"), str):
                    result.reply = end["text"]
                timings = end.get("timings")
                result.server_timings = timings if isinstance(timings, dict) else None
                result.turn_ms = (ended - started) * 1000.0
            return

    async def _abandon(self, conn: RapportConnection, stream: TurnStream | None) -> None:
        """A turn that took too long: cancel it so the conversation can go on."""
        if stream is None or stream.turn_id is None or conn.closed:
            return
        try:
            await stream.cancel()
            async with asyncio.timeout(10.0):
                await stream.wait()
        except (ClientError, TimeoutError):
            pass


async def _run_target(cfg: EvalConfig, spec: TargetSpec, run_id: str, report: Callable[[str], None]) -> TargetRun:
    url = normalize_url(spec.url)
    run = TargetRun(spec=TargetSpec(url, spec.label), results=[])
    semaphore = asyncio.Semaphore(max(1, cfg.concurrency))
    counter = itertools.count()

    def on_ready(ready: dict[str, Any]) -> None:
        model = ready.get("model")
        if run.model is None and isinstance(model, str) and model:
            run.model = model

    async def one(scenario: Scenario, repeat: int) -> list[TurnResult]:
        async with semaphore:
            user = f"{cfg.user_prefix}{run_id}-{next(counter)}"
            results = await _Conversation(cfg, url, scenario, repeat, user, on_ready).run()
        passed = sum(c.passed for r in results for c in r.checks)
        checks = sum(len(r.checks) for r in results)
        trouble = sum(r.interrupted for r in results)
        line = f"{spec.label or url}: {scenario.name}#{repeat + 1}: {passed}/{checks} checks passed"
        report(line + (f", {trouble} turn(s) interrupted" if trouble else ""))
        return results

    jobs = [one(s, r) for s in cfg.scenarios for r in range(cfg.repeat)]
    for results in await asyncio.gather(*jobs):
        run.results.extend(results)
    return run


def _assign_labels(runs: Sequence[TargetRun]) -> None:
    """``--label``, else the model the target's ``ready`` named, else its URL; made unique."""
    for run in runs:
        run.label = run.spec.label or run.model or run.spec.url
    counts = Counter(r.label for r in runs)
    for run in runs:
        if counts[run.label] > 1 and not run.spec.label:
            parts = urlsplit(run.spec.url)
            run.label = f"{run.label} @{parts.netloc or run.spec.url}"
    seen: Counter[str] = Counter()
    counts = Counter(r.label for r in runs)
    for run in runs:
        if counts[run.label] > 1:
            seen[run.label] += 1
            run.label = f"{run.label} #{seen[run.label]}"


async def run_eval(cfg: EvalConfig) -> EvalReport:
    """Play every scenario ``repeat`` times on each target (targets one after
    another, so they do not compete for the same hardware) and summarise."""
    report = cfg.progress or (lambda _line: None)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    runs = []
    for spec in cfg.targets:
        runs.append(await _run_target(cfg, spec, run_id, report))
    _assign_labels(runs)
    summaries = [summarize(run.results, label=run.label, url=run.spec.url, model=run.model,
                           budget_ms=cfg.budget_ms, thresholds=cfg.thresholds) for run in runs]
    return EvalReport(config=cfg, runs=runs, summaries=summaries, started_at=started_at,
                      duration_s=time.monotonic() - t0)


def report_to_dict(report: EvalReport) -> dict[str, Any]:
    cfg = report.config
    return {
        "version": REPORT_VERSION,
        "started_at": report.started_at,
        "duration_s": round(report.duration_s, 3),
        "config": {
            "scenarios": [{"name": s.name, "source": s.source, "turns": len(s.turns), "checks": s.check_count}
                          for s in cfg.scenarios],
            "repeat": cfg.repeat, "concurrency": cfg.concurrency, "temperature": cfg.temperature,
            "seed": cfg.seed, "seed_sent": False, "max_tokens": cfg.max_tokens, "budget_ms": cfg.budget_ms,
            "subprotocol": MSGPACK_SUBPROTOCOL if cfg.msgpack else JSON_SUBPROTOCOL,
            "thresholds": {"min_accuracy": cfg.thresholds.min_accuracy,
                           "max_p95_turn_ms": cfg.thresholds.max_p95_turn_ms,
                           "max_interruption_rate": cfg.thresholds.max_interruption_rate},
        },
        "targets": [s.to_dict() for s in report.summaries],
        "passed": report.passed,
        "failures": report.failures(),
        "turns": {run.label: [r.to_dict() for r in run.results] for run in report.runs},
    }


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--target", action="append", default=None, metavar="URL",
      help="server WebSocket URL, or http://host:port (repeatable; each is labelled by the model its "
           "'ready' frame names). Default ws://127.0.0.1:8000/v1/ws")
    a("--label", action="append", default=None,
      help="label for the target at the same position (repeatable; default: the model name)")
    a("--scenario", action="append", default=None, metavar="NAME|PATH",
      help="a shipped scenario name or a .json file (repeatable; default: every shipped scenario)")
    a("--list-scenarios", action="store_true", help="print the shipped scenarios and exit")
    a("--repeat", type=int, default=1, help="play each scenario N times per target (default 1)")
    a("--concurrency", type=int, default=1, help="conversations in parallel per target (default 1)")
    a("--temperature", type=float, default=0.0,
      help="options.temperature of every turn (default 0: greedy, so targets are comparable)")
    a("--seed", type=int, default=None,
      help="recorded in the report; NOT sent: protocol v1 has no sampling seed, temperature 0 is "
           "what makes runs comparable")
    a("--max-tokens", type=int, default=None, help="options.max_tokens of every turn (default: server's)")
    a("--token", default=None, help="one JWT for every conversation (then all share one user)")
    a("--jwt-secret", default=None,
      help="mint a JWT per conversation user with this HMAC secret (default: $RAPPORT_JWT_SECRET, "
           "else the server's loopback development secret)")
    a("--dev-users", action="store_true", help="development mode: name users in hello.user, no token")
    a("--user-prefix", default=None, help="user ids start with this (default eval-)")
    a("--msgpack", action="store_true", help="speak rapport.v1.msgpack instead of JSON")
    a("--budget-ms", type=float, default=2000.0, help="first-token budget to count misses against (default 2000)")
    a("--min-accuracy", type=float, default=0.9, help="threshold: context accuracy at least (default 0.9)")
    a("--max-p95-turn-ms", type=float, default=800.0, help="threshold: turn time p95 at most (default 800)")
    a("--max-interruption-rate", type=float, default=0.02,
      help="threshold: interruption rate at most (default 0.02)")
    a("--fail-on-threshold", action="store_true", help="exit 1 when any target fails a threshold")
    a("--turn-timeout-s", type=float, default=120.0, help="give up (and cancel) a turn after this long (default 120)")
    a("--max-retries", type=int, default=30, help="busy / rate_limited retries per turn (default 30)")
    a("--json", dest="json_path", default=None, metavar="PATH", help="also write the whole report as JSON")
    a("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Validate the options; raises ValueError / ScenarioError with a message for the user."""
    targets = args.target or ["ws://127.0.0.1:8000/v1/ws"]
    labels = args.label or []
    if len(labels) > len(targets):
        raise ValueError(f"{len(labels)} --label for {len(targets)} --target")
    if args.repeat < 1 or args.concurrency < 1:
        raise ValueError("--repeat and --concurrency must be >= 1")
    if args.temperature is not None and not 0.0 <= args.temperature <= 2.0:
        raise ValueError("--temperature must be within 0..2")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")
    if args.turn_timeout_s <= 0 or args.max_retries < 0 or args.budget_ms <= 0:
        raise ValueError("--turn-timeout-s and --budget-ms must be > 0, --max-retries >= 0")
    if sum(bool(x) for x in (args.token, args.jwt_secret, args.dev_users)) > 1:
        raise ValueError("choose one of --token, --jwt-secret and --dev-users")
    specs = [TargetSpec(url, labels[i] if i < len(labels) else None) for i, url in enumerate(targets)]
    return EvalConfig(
        targets=specs, scenarios=load_scenarios(args.scenario), repeat=args.repeat,
        concurrency=args.concurrency, temperature=args.temperature, seed=args.seed,
        max_tokens=args.max_tokens, token=args.token, jwt_secret=args.jwt_secret, dev_users=args.dev_users,
        user_prefix=args.user_prefix if args.user_prefix is not None else "eval-",
        budget_ms=args.budget_ms,
        thresholds=Thresholds(min_accuracy=args.min_accuracy, max_p95_turn_ms=args.max_p95_turn_ms,
                              max_interruption_rate=args.max_interruption_rate),
        turn_timeout_s=args.turn_timeout_s, max_retries=args.max_retries, msgpack=args.msgpack,
        progress=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)),
    )


def eval_command(args: argparse.Namespace) -> int:
    """Entry point of ``rapport eval``; returns the exit status."""
    if getattr(args, "list_scenarios", False):
        for name in shipped_scenario_names():
            s = load_scenario(name)
            print(f"{name:24} {len(s.turns):3} turns  {s.description}")
        return 0
    try:
        cfg = config_from_args(args)
    except (ValueError, ScenarioError) as exc:
        print(f"rapport eval: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_eval(cfg))
    except KeyboardInterrupt:
        return 130
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report_to_dict(report), ensure_ascii=False, indent=2) + "\n",
                                        encoding="utf-8")
    print(render_table(report.summaries))
    print()
    print(render_failures(report.failures()))
    if args.fail_on_threshold and not report.passed:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rapport eval", description=__doc__.split("\n\n")[0].replace("``", ""))
    add_eval_arguments(parser)
    return eval_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
