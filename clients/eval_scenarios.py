"""Scenarios of ``rapport eval``: the schema, loading, and what each check means.

A scenario (``clients/scenarios/*.json``, schema in
``clients/scenarios/README.md``) is a dialogue whose user turns may carry
checks on the reply. :func:`parse_scenario` validates one and names the exact
place of any mistake; :func:`load_scenario` finds one by shipped name or path.

Scoring (:func:`score_reply`): the reply and every needle are normalised with
:func:`normalize_text` (Unicode NFKC, so full-width ``Ａ－４８２１３`` equals
``A-48213`` and ``３年`` equals ``3年``; dash-like characters become ``-``;
whitespace runs become one space; case folded). ``pattern`` is a Python regular
expression searched in the NFKC-normalised reply (not case folded; the search
ignores case). A turn that did not complete fails all of its checks
(:func:`fail_checks`).

``remember`` (optional) lists facts the user pins before the first turn
(``memory.add``, docs/protocol.md addition 22); the runner
(:mod:`clients.eval`) decides whether they are pinned or sent as plain
messages. Their bounds are the protocol's: at most :data:`MAX_FACTS` facts of
at most :data:`MAX_FACT_CHARS` characters.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "CHECK_KINDS",
    "CHECK_OPS",
    "MAX_FACTS",
    "MAX_FACT_CHARS",
    "Check",
    "CheckResult",
    "Scenario",
    "ScenarioError",
    "ScenarioTurn",
    "fail_checks",
    "load_scenario",
    "load_scenarios",
    "normalize_text",
    "parse_scenario",
    "score_check",
    "score_reply",
    "shipped_scenario_names",
]

CHECK_KINDS = ("recall", "style", "safety")
CHECK_OPS = ("must_include_any", "must_include_all", "must_not_include", "pattern")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SCENARIO_KEYS = ("name", "description", "language", "tags", "remember", "turns", "comment", "schema_version")
#: A pinned fact is at most this long (docs/protocol.md, addition 22: ``memory.add``).
MAX_FACT_CHARS = 500
#: A user holds at most this many pinned facts (the same addition).
MAX_FACTS = 50
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
    #: facts pinned before the first turn (``memory.add``), in order
    remember: tuple[str, ...] = ()

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
    remember = _parse_remember(data.get("remember", []), where)
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
                    language=data.get("language", ""), tags=tuple(tags), source=source, remember=remember)


def _parse_remember(raw: Any, where: str) -> tuple[str, ...]:
    """``remember``: the facts to pin, within the bounds ``memory.add`` accepts
    (refused here rather than by the server halfway through a run)."""
    if not isinstance(raw, list):
        raise ScenarioError(f"{where}: 'remember' must be a list of strings (facts to pin)")
    if len(raw) > MAX_FACTS:
        raise ScenarioError(f"{where}: 'remember' holds {len(raw)} facts; a user can pin at most {MAX_FACTS}")
    facts: list[str] = []
    for i, fact in enumerate(raw):
        if not isinstance(fact, str) or not fact.strip():
            raise ScenarioError(f"{where}: remember[{i}] must be a non-empty string, not {fact!r}")
        if len(fact) > MAX_FACT_CHARS:
            raise ScenarioError(f"{where}: remember[{i}] is {len(fact)} characters; a pinned fact is at most "
                                f"{MAX_FACT_CHARS}")
        if fact in facts:
            raise ScenarioError(f"{where}: remember[{i}] repeats remember[{facts.index(fact)}]")
        facts.append(fact)
    return tuple(facts)


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
