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

Remembered facts: a scenario's ``remember`` list is pinned with ``memory.add``
(docs/protocol.md, addition 22) before its first turn, on the conversation's
own user (so facts never leak into another conversation), and deleted again
when the conversation ends. A target run without memory (``--memory off`` at
its position, or ``--no-memory``), and a server older than addition 22 (it
refuses ``memory.*`` as an unknown frame type), get the facts instead as the
conversation's first user messages, one fact each, played like any turn (they
count in the turn figures, carry no checks, and are marked ``setup`` in the
JSON); a progress line and the table row "remembered facts" say which
happened. That is the "without memory" side of a comparison: the facts then
live only in history, where a short prompt window (``--max-history-turns``)
loses them unless the server's conversation summary keeps them.

Scenarios and how their checks are scored are :mod:`clients.eval_scenarios`'s;
summaries, thresholds and the table are :mod:`clients.eval_summary`'s. This
module plays the conversations and is the command line.

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
import contextlib
import itertools
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL

from .connection import RapportConnection, TurnStream
from .errors import ClientError, ServerError, credentials_refused
from .eval_scenarios import (
    CHECK_KINDS,
    CHECK_OPS,
    Check,
    CheckResult,
    Scenario,
    ScenarioError,
    ScenarioTurn,
    fail_checks,
    load_scenario,
    load_scenarios,
    normalize_text,
    parse_scenario,
    score_reply,
    shipped_scenario_names,
)
from .eval_summary import (
    TargetSummary,
    Thresholds,
    TurnResult,
    failures_of,
    render_failures,
    render_table,
    summarize,
)
from .retry import advised_delay, retry
from .target import default_jwt_secret, mint_token, normalize_url

# The scenario and summary names stay importable from here, where they were first.
__all__ = [
    "CHECK_KINDS",
    "CHECK_OPS",
    "Check",
    "CheckResult",
    "EvalConfig",
    "EvalReport",
    "FACTS_AS_MESSAGES",
    "FACTS_PINNED",
    "FACTS_SERVER_WITHOUT_MEMORY",
    "ConversationRecord",
    "Scenario",
    "ScenarioError",
    "ScenarioTurn",
    "TargetSpec",
    "TargetSummary",
    "Thresholds",
    "TurnResult",
    "add_eval_arguments",
    "eval_command",
    "fail_checks",
    "load_scenario",
    "load_scenarios",
    "main",
    "memory_unsupported",
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

#: error answers after which the same turn is sent again (after retry_after_ms)
RETRYABLE_CODES = frozenset({"busy", "rate_limited", "turn_in_progress"})
MAX_ADVISED_WAIT_S = 60.0  # a retry_after_ms beyond this is a server bug, not advice to follow
CONNECT_RETRY_S = 1.0  # a conversation tries to connect twice, this far apart

# How a conversation's ``remember`` facts reached the target (TargetSummary.facts_modes).
FACTS_PINNED = "pinned (memory.add)"
FACTS_AS_MESSAGES = "sent as messages (--memory off)"
FACTS_SERVER_WITHOUT_MEMORY = "sent as messages (server has no memory.*)"


def memory_unsupported(exc: ServerError) -> bool:
    """A server older than addition 22 refuses ``memory.*`` as an unknown frame
    type (``bad_request``), which is the only way a version-1 client can tell."""
    return exc.code == "bad_request" and "unknown frame type" in exc.message


# ---------------------------------------------------------------------------
# Running conversations (I/O)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetSpec:
    url: str
    label: str | None = None
    #: pin ``remember`` facts with memory.add (False: send them as plain messages)
    memory: bool = True


@dataclass(slots=True)
class ConversationRecord:
    """One conversation as played: whose it was and what happened to its facts."""

    scenario: str
    repeat: int
    user: str
    conversation_id: str
    facts_mode: str | None = None  # None: the scenario remembers nothing
    #: the facts this conversation pinned, as the server's ``memory`` answer listed them
    pinned: list[dict[str, Any]] = field(default_factory=list)
    cleanup_error: str | None = None  # a pinned fact that could not be deleted afterwards

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "repeat": self.repeat, "user": self.user,
                "conversation_id": self.conversation_id, "facts_mode": self.facts_mode,
                "pinned": [dict(f) for f in self.pinned], "cleanup_error": self.cleanup_error}


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
        return mint_token(user, self.jwt_secret or default_jwt_secret()), None


@dataclass(slots=True)
class TargetRun:
    spec: TargetSpec
    results: list[TurnResult]
    model: str | None = None
    label: str = ""
    conversations: list[ConversationRecord] = field(default_factory=list)

    def facts_modes(self) -> dict[str, int]:
        return dict(Counter(c.facts_mode for c in self.conversations if c.facts_mode is not None))


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


def _facts_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The fact objects of a ``memory`` answer (malformed entries skipped)."""
    facts = answer.get("facts")
    return [f for f in facts if isinstance(f, dict)] if isinstance(facts, list) else []


class _Conversation:
    """One scenario played once on one target, over one connection (re-opened if lost)."""

    def __init__(self, cfg: EvalConfig, url: str, scenario: Scenario, repeat: int, user: str,
                 on_ready: Callable[[dict[str, Any]], None], *, memory: bool = True) -> None:
        self.cfg = cfg
        self.url = url
        self.scenario = scenario
        self.repeat = repeat
        self.user = user
        self.memory = memory
        self.conversation_id = f"eval-{uuid.uuid4().hex}"
        self.on_ready = on_ready
        self.conn: RapportConnection | None = None
        self.fatal: str | None = None  # a connection that cannot be opened fails the remaining turns
        self.record = ConversationRecord(scenario=scenario.name, repeat=repeat, user=user,
                                         conversation_id=self.conversation_id)

    async def run(self) -> list[TurnResult]:
        results: list[TurnResult] = []
        try:
            if self.scenario.remember:
                results.extend(await self._remember())
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
            try:
                await self._forget()
            finally:
                if self.conn is not None:
                    await self.conn.close()
        return results

    async def _remember(self) -> list[TurnResult]:
        """The scenario's facts: pinned before the first turn, else its first user messages."""
        facts = self.scenario.remember
        await self._connect()
        if self.fatal is not None or self.conn is None:
            return []  # the scripted turns report the failure
        mode = FACTS_AS_MESSAGES
        if self.memory:
            mode = await self._pin(self.conn, facts)
            if self.fatal is not None:
                return []
        self.record.facts_mode = mode
        if mode == FACTS_PINNED:
            return []
        results = []
        for fact in facts:
            result = TurnResult(scenario=self.scenario.name, repeat=self.repeat, turn=0, user=fact, setup=True)
            if self.conn is None or self.conn.closed:
                await self._connect()
            if self.fatal is not None:
                result.error = self.fatal
            else:
                await self._play(ScenarioTurn(user=fact), result)
            results.append(result)
        return results

    async def _pin(self, conn: RapportConnection, facts: Sequence[str]) -> str:
        """``memory.add`` each fact; FACTS_PINNED, or FACTS_SERVER_WITHOUT_MEMORY for an older server.

        Only facts this conversation added are recorded (and deleted later): a
        shared ``--token`` user may already hold some of them.
        """
        try:
            before = {f.get("id") for f in _facts_of(await conn.memory_list())}
            answer: dict[str, Any] = {}
            for fact in facts:
                answer = await conn.memory_add(fact)
        except ServerError as exc:
            if memory_unsupported(exc):
                return FACTS_SERVER_WITHOUT_MEMORY
            self.fatal = f"memory_refused: {exc.code}: {exc.message}"
        except (ClientError, TimeoutError) as exc:
            self.fatal = f"memory_failed: {exc}"
        else:
            self.record.pinned = [f for f in _facts_of(answer) if f.get("id") not in before]
            return FACTS_PINNED
        # Whatever was pinned before the failure is still the user's: find it to delete it.
        with contextlib.suppress(ClientError, TimeoutError):
            if not conn.closed:
                self.record.pinned = [f for f in _facts_of(await conn.memory_list())
                                      if f.get("id") not in before and f.get("text") in facts]
        return FACTS_PINNED

    async def _forget(self) -> None:
        """Unpin what this conversation pinned, so the user's facts are as they were."""
        if not self.record.pinned:
            return
        if self.conn is None or self.conn.closed:
            self.fatal = None
            await self._connect()
        conn = self.conn
        if conn is None or conn.closed:
            self.record.cleanup_error = f"could not reconnect: {self.fatal}"
            return
        for fact in self.record.pinned:
            fact_id = fact.get("id")
            if not isinstance(fact_id, str):
                continue
            try:
                await conn.memory_delete(fact_id)
            except ServerError as exc:
                if exc.code != "not_found":  # already gone is what we wanted
                    self.record.cleanup_error = f"{exc.code}: {exc.message}"
            except (ClientError, TimeoutError) as exc:
                self.record.cleanup_error = f"memory.delete {fact_id}: {exc}"
                return

    async def _connect(self) -> None:
        """Open (one retry after 1 s); refused credentials or a second failure end the conversation."""
        token, hello_user = self.cfg.credentials(self.user)
        subprotocol = MSGPACK_SUBPROTOCOL if self.cfg.msgpack else JSON_SUBPROTOCOL

        def once_more(exc: Exception, retries: int) -> float | None:
            return None if not isinstance(exc, ClientError) or credentials_refused(exc) else CONNECT_RETRY_S

        try:
            self.conn = await retry(
                lambda: RapportConnection.open(self.url, token=token, user=hello_user, subprotocol=subprotocol,
                                               client_name=CLIENT_NAME, open_timeout=self.cfg.connect_timeout_s),
                delay=once_more, max_retries=1)
        except ClientError as exc:
            # Close 4401 / HTTP 401-403, or an error answer to the hello.
            self.fatal = f"unauthorized: {exc.message}" if credentials_refused(exc) else f"connect_failed: {exc}"
            return
        self.on_ready(self.conn.ready)
        await self._settle(self.conn)

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
        started = loop.time()
        first: float | None = None
        stream: TurnStream | None = None

        async def attempt() -> None:
            # Each try is timed on its own: TTFT runs from the start that was accepted.
            nonlocal started, first, stream
            started, first, stream = loop.time(), None, None
            stream = await conn.start_turn(turn.user, conversation_id=self.conversation_id, options=options or None)
            async with asyncio.timeout(self.cfg.turn_timeout_s):
                async for _ in stream:
                    if first is None:
                        first = loop.time()

        def after_refusal(exc: Exception, retries: int) -> float | None:
            if not (isinstance(exc, ServerError) and exc.code in RETRYABLE_CODES):
                return None
            result.retries += 1
            result.retry_codes.append(exc.code)
            return advised_delay(exc.retry_after_ms, default=0.5, cap=MAX_ADVISED_WAIT_S)

        try:
            await retry(attempt, delay=after_refusal, max_retries=self.cfg.max_retries)
        except ServerError as exc:
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
    run = TargetRun(spec=TargetSpec(url, spec.label, spec.memory), results=[])
    semaphore = asyncio.Semaphore(max(1, cfg.concurrency))
    counter = itertools.count()

    def on_ready(ready: dict[str, Any]) -> None:
        model = ready.get("model")
        if run.model is None and isinstance(model, str) and model:
            run.model = model

    async def one(scenario: Scenario, repeat: int) -> list[TurnResult]:
        async with semaphore:
            user = f"{cfg.user_prefix}{run_id}-{next(counter)}"
            conversation = _Conversation(cfg, url, scenario, repeat, user, on_ready, memory=spec.memory)
            run.conversations.append(conversation.record)
            results = await conversation.run()
        passed = sum(c.passed for r in results for c in r.checks)
        checks = sum(len(r.checks) for r in results)
        trouble = sum(r.interrupted for r in results)
        line = f"{spec.label or url}: {scenario.name}#{repeat + 1}: {passed}/{checks} checks passed"
        record = conversation.record
        if record.facts_mode is not None:
            line += f"; {len(scenario.remember)} remembered fact(s) {record.facts_mode}"
        if record.cleanup_error:
            line += f"; pinned facts NOT deleted ({record.cleanup_error})"
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
                           budget_ms=cfg.budget_ms, thresholds=cfg.thresholds, facts_modes=run.facts_modes())
                 for run in runs]
    return EvalReport(config=cfg, runs=runs, summaries=summaries, started_at=started_at,
                      duration_s=time.monotonic() - t0)


def report_to_dict(report: EvalReport) -> dict[str, Any]:
    cfg = report.config
    return {
        "version": REPORT_VERSION,
        "started_at": report.started_at,
        "duration_s": round(report.duration_s, 3),
        "config": {
            "scenarios": [{"name": s.name, "source": s.source, "turns": len(s.turns), "checks": s.check_count,
                           "remember": list(s.remember)} for s in cfg.scenarios],
            "memory": {spec.label or spec.url: spec.memory for spec in cfg.targets},
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
        "conversations": {run.label: [c.to_dict() for c in run.conversations] for run in report.runs},
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
    a("--memory", action="append", default=None, choices=("on", "off"),
      help="for the target at the same position (repeatable, like --label): 'on' pins a scenario's "
           "'remember' facts with memory.add, 'off' sends them as the first user messages instead "
           "(default on; a server without memory.* falls back to messages by itself)")
    a("--no-memory", action="store_true", help="--memory off for every target")
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
    memory = getattr(args, "memory", None) or []
    if len(memory) > len(targets):
        raise ValueError(f"{len(memory)} --memory for {len(targets)} --target")
    if memory and getattr(args, "no_memory", False):
        raise ValueError("choose --memory per target or --no-memory, not both")
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
    specs = [TargetSpec(url, labels[i] if i < len(labels) else None,
                        memory=not getattr(args, "no_memory", False) and (i >= len(memory) or memory[i] == "on"))
             for i, url in enumerate(targets)]
    scenarios = load_scenarios(args.scenario)
    if args.token and args.concurrency > 1 and any(s.remember for s in scenarios):
        # One user for every conversation: a conversation that ends would unpin
        # the facts another one is still using.
        raise ValueError("scenarios with 'remember' pin facts on the user: with one --token for every "
                         "conversation, run them with --concurrency 1 (or give each its own user with "
                         "--jwt-secret or --dev-users)")
    return EvalConfig(
        targets=specs, scenarios=scenarios, repeat=args.repeat,
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
