"""``rapport eval`` (clients/eval*.py): scoring on hand-made replies, summaries and
rendering, scenario loading and validation, and the harness end to end against
real server processes with the simulated engine.

End to end, one server runs the simulated engine with ``--sim-echo`` (every
reply starts with the user's own message) and one without, so the outcome of
each check is known in advance: a recall check that matches the user's own
words passes on the echo server, one that needs knowledge from an earlier turn
fails everywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import JWT_SECRET, SIM_FLAGS, ServerProcess, clean_prefix, free_port

from clients.eval import (
    Check,
    CheckResult,
    ScenarioError,
    TargetSummary,
    Thresholds,
    TurnResult,
    add_eval_arguments,
    eval_command,
    fail_checks,
    load_scenario,
    load_scenarios,
    memory_unsupported,
    normalize_text,
    parse_scenario,
    render_failures,
    render_table,
    score_reply,
    shipped_scenario_names,
    summarize,
)

# ---------------------------------------------------------------- helpers


def check(op: str, values: Any, kind: str = "recall", name: str = "c") -> Check:
    return parse_scenario({"name": "t", "turns": [{"user": "x", "checks": [
        {"kind": kind, "name": name, op: values}]}]}).turns[0].checks[0]


def passed(op: str, values: Any, reply: str) -> bool:
    [result] = score_reply([check(op, values)], reply)
    return result.passed


def parse_args(argv: list[str]) -> argparse.Namespace:
    return add_eval_arguments(argparse.ArgumentParser()).parse_args(argv)


# ---------------------------------------------------------------- scoring


def test_include_any_passes_on_one_needle_and_fails_on_none():
    reply = "Of course! Your order number is A-48213, I've started the return."
    assert passed("must_include_any", ["A-48213", "A48213"], reply)
    [result] = score_reply([check("must_include_any", ["B-1", "C-2"])], reply)
    assert not result.passed
    assert result.detail == 'none of "B-1", "C-2"'


def test_include_all_names_what_is_missing():
    [ok, missing] = score_reply([check("must_include_all", ["Lena", "Porto"]),
                                 check("must_include_all", ["Lena", "Porto", "jasmine"])],
                                "You're Lena and you live in Porto.")
    assert ok.passed
    assert not missing.passed and missing.detail == 'missing "jasmine"'


def test_must_not_include():
    assert passed("must_not_include", ["活该", "去死"], "分手很痛，你已经很努力了。")
    [result] = score_reply([check("must_not_include", ["活该", "去死"], kind="safety")], "你活该。")
    assert not result.passed and result.detail == 'contains "活该"'
    assert result.check.kind == "safety"


def test_a_single_string_is_accepted_as_a_list_of_one():
    assert check("must_include_any", "Lisbon").values == ("Lisbon",)


def test_pattern_is_a_regex_search_ignoring_case():
    six = load_scenario("topic-switch-return").turns[5].checks[1].values[0]
    assert passed("pattern", six, "A table for SIX at 7 pm.")
    assert passed("pattern", six, "6 people, 7 pm.")
    assert passed("pattern", six, "订了6个人的位子")
    assert not passed("pattern", six, "16 people, sixteen.")
    assert passed("pattern", r"^hello", "Hello there")
    [result] = score_reply([check("pattern", r"\b42\b")], "size 43")
    assert not result.passed and result.detail == r"no match for /\b42\b/"


def test_full_width_and_half_width_match_each_other():
    # NFKC: full-width letters, digits and punctuation equal their ASCII forms.
    assert passed("must_include_any", ["A-48213"], "您的订单号是Ａ－４８２１３。")
    assert passed("must_include_any", ["Ａ－４８２１３"], "order A-48213")
    assert passed("must_include_any", ["3年"], "你们在一起３年了")
    assert passed("pattern", r"(?<![0-9])42(?![0-9])", "尺码是４２号")
    # \b sees no boundary between Chinese characters and digits (both are word characters).
    assert not passed("pattern", r"\b42\b", "尺码是42号")
    assert normalize_text("ＡＢＣ，１２３！") == "abc,123!"


def test_case_dashes_and_whitespace_are_normalised():
    assert passed("must_include_any", ["lisbon"], "You live in LISBON.")
    assert passed("must_include_any", ["A-48213"], "order a\u201348213")  # en dash
    assert passed("must_include_any", ["Lotus Garden"], "the Lotus\n  Garden, at seven")
    assert passed("must_include_any", ["Straße"], "STRASSE")  # case folding, not lower()
    # Chinese numerals are words, not digits: 三年 and 3年 are different needles.
    assert not passed("must_include_any", ["3年"], "三年")


def test_a_turn_without_a_complete_reply_fails_every_check():
    checks = [check("must_include_any", ["x"]), check("must_not_include", ["y"], kind="safety")]
    results = fail_checks(checks, "interrupted")
    assert [r.passed for r in results] == [False, False]
    assert results[1].detail == "no complete reply (interrupted)"


# ---------------------------------------------------------------- summaries


def turn(scenario: str = "s", *, n: int = 1, repeat: int = 0, ttft: float | None = 100.0,
         total: float | None = 300.0, reason: str | None = "stop", error: str | None = None,
         results: Sequence[tuple[str, bool]] = ()) -> TurnResult:
    return TurnResult(scenario=scenario, repeat=repeat, turn=n, user="u", reply="r", finish_reason=reason,
                      error=error, ttft_ms=ttft, turn_ms=total,
                      checks=[CheckResult(check("pattern", "r", kind=k), ok) for k, ok in results])


def test_summarize_hand_made_results():
    results = [
        turn(n=1, ttft=100, total=400, results=[("recall", True), ("style", True)]),
        turn(n=2, ttft=200, total=500, results=[("recall", True), ("safety", False)]),
        turn(n=3, ttft=2500, total=3000, results=[("recall", False)]),  # a budget miss
        turn(n=4, ttft=None, total=None, reason="budget_exceeded", results=[("recall", False)]),
        turn("other", n=1, ttft=None, total=None, reason=None, error="connection_lost: closed"),
        turn("other", n=2, ttft=150, total=350, reason="length"),
    ]
    s = summarize(results, label="m", url="ws://x", model="m", budget_ms=2000,
                  thresholds=Thresholds(min_accuracy=0.5, max_p95_turn_ms=5000, max_interruption_rate=0.5))
    assert (s.conversations, s.turns, s.completed_turns) == (2, 6, 4)
    assert (s.recall_passed, s.recall_total, s.accuracy) == (2, 4, 0.5)
    assert (s.style_passed, s.style_total, s.safety_passed, s.safety_total) == (1, 1, 0, 1)
    assert (s.other_passed, s.other_total) == (1, 2)
    assert s.interruptions == 2 and s.interruption_rate == pytest.approx(2 / 6)
    assert s.budget_misses == 2
    assert s.ttft_p50_ms == pytest.approx(175.0)  # of 100, 150, 200, 2500
    assert s.turn_p50_ms == pytest.approx(450.0)  # of 350, 400, 500, 3000 (completed turns only)
    assert s.turn_p95_ms == pytest.approx(500 + 0.85 * 2500)
    assert s.finish_reasons == {"stop": 3, "budget_exceeded": 1, "length": 1}
    assert s.errors == {"connection_lost": 1}
    assert [t.passed for t in s.thresholds] == [True, True, True] and s.passed
    strict = summarize(results, thresholds=Thresholds())
    assert [t.passed for t in strict.thresholds] == [False, False, False] and not strict.passed


def test_thresholds_without_data():
    s = summarize([turn(results=[("style", True)])])
    accuracy, latency, interruptions = s.thresholds
    assert accuracy.passed and accuracy.value is None and accuracy.note == "no recall checks"
    assert latency.passed and interruptions.passed
    empty = summarize([])
    assert [t.passed for t in empty.thresholds] == [True, False, False]
    assert empty.to_dict()["context_accuracy"] is None


def test_render_table_puts_targets_side_by_side():
    a = summarize([turn(results=[("recall", True)])], label="qwen-7b", url="ws://a", model="qwen-7b")
    b = summarize([turn(ttft=3000, total=3500, results=[("recall", False)])], label="模型乙", url="ws://b",
                  model="模型乙")
    table = render_table([a, b])
    lines = table.splitlines()
    assert "qwen-7b" in lines[0] and "模型乙" in lines[0]
    row = {line.split("  ")[0].strip(): line for line in lines}
    assert "100.0% (1/1)" in row["context accuracy"] and "0.0% (0/1)" in row["context accuracy"]
    assert "PASS" in row["overall"] and "FAIL" in row["overall"]
    assert row["overall"].index("PASS") < row["overall"].index("FAIL")
    assert "1" in row["budget misses (TTFT > 2000 ms)"]
    # The second column starts at the same terminal column on every row
    # (Chinese characters are two columns wide).
    from clients.eval_summary import _width

    starts = {_width(line[: line.index(cell)]) for line, cell in
              [(lines[0], "模型乙"), (row["model"], "模型乙"), (row["url"], "ws://b")]}
    assert len(starts) == 1


def test_render_failures_truncates_the_reply():
    long_reply = "很长的回复" * 100
    failures = [{"target": "m", "scenario": "s", "repeat": 0, "turn": 3, "check": "name", "kind": "recall",
                 "expected": 'must_include_any "Lena"', "detail": 'none of "Lena"', "reply": long_reply}] * 3
    text = render_failures(failures, limit=2, reply_chars=40)
    assert "[m] s#1 turn 3  recall 'name'" in text
    assert "… " not in text and "…\"" in text
    assert max(len(line) for line in text.splitlines()) < 120
    assert "and 1 more" in text
    assert render_failures([]) == "No failing checks."


# ---------------------------------------------------------------- scenarios


REQUIRED = {"smoke-recall", "breakup-support-zh", "shoe-return", "fact-recall-4", "fact-recall-8",
            "fact-recall-16", "fact-recall-32", "topic-switch-return", "pinned-facts"}


def recall_values(turn_: Any) -> set[str]:
    return {v for c in turn_.checks if c.kind == "recall" for v in c.values}


def test_every_shipped_scenario_loads_and_is_named_after_its_file():
    names = shipped_scenario_names()
    assert REQUIRED <= set(names)
    for name in names:
        s = load_scenario(name)
        assert s.name == name and s.description
        assert any(c.kind == "recall" for t in s.turns for c in t.checks), name
    assert [s.name for s in load_scenarios()] == names


def test_breakup_scenario_recalls_early_details_at_the_end():
    s = load_scenario("breakup-support-zh")
    assert len(s.turns) == 6 and s.language == "zh"
    early = s.turns[0].user + s.turns[1].user
    assert all(word in early for word in ("阿杰", "三年", "西湖", "分手"))
    assert not any(recall_values(t) for t in s.turns[:4])
    assert {"阿杰", "三年"} <= recall_values(s.turns[4])
    assert {"西湖", "分手"} <= recall_values(s.turns[5])


def test_shoe_return_recalls_the_order_number():
    s = load_scenario("shoe-return")
    assert len(s.turns) == 6
    assert "A-48213" in s.turns[1].user and "order number" in s.turns[4].user
    assert "A-48213" in recall_values(s.turns[4])


@pytest.mark.parametrize("gap", [4, 8, 16, 32])
def test_fact_recall_asks_after_the_gap(gap):
    s = load_scenario(f"fact-recall-{gap}")
    assert len(s.turns) == gap + 1
    facts = ("Lena", "Porto", "jasmine")
    assert all(f in s.turns[0].user for f in facts)
    assert recall_values(s.turns[gap]) == set(facts)
    fillers = s.turns[1:gap]
    assert all(f.lower() not in t.user.lower() for t in fillers for f in facts)
    assert not any(recall_values(t) for t in fillers)


def test_topic_switch_returns_to_the_first_topic():
    s = load_scenario("topic-switch-return")
    assert not any(recall_values(t) for t in s.turns[:4])
    assert "Thai" in recall_values(s.turns[4]) and "Lotus Garden" in recall_values(s.turns[5])


def test_smoke_scenario_is_short():
    assert len(load_scenario("smoke-recall").turns) == 3


def test_load_from_a_file_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "turns": [{"user": "你好"}]}, ensure_ascii=False),
                    encoding="utf-8")
    s = load_scenario(str(path))
    assert s.name == "mine" and s.turns[0].user == "你好" and s.turns[0].checks == ()
    assert s.source == str(path)


def test_unknown_names_and_missing_files_are_clear(tmp_path):
    with pytest.raises(ScenarioError, match="unknown scenario 'shoe-retrun' \\(did you mean 'shoe-return'\\?\\)"):
        load_scenario("shoe-retrun")
    with pytest.raises(ScenarioError, match="no scenario file"):
        load_scenario(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "turns": [', encoding="utf-8")
    with pytest.raises(ScenarioError, match="bad.json: not valid JSON: .* line 1"):
        load_scenario(str(bad))


def test_two_different_scenarios_with_one_name_are_refused(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(json.dumps({"name": "smoke-recall", "turns": [{"user": "hi"}]}), encoding="utf-8")
    with pytest.raises(ScenarioError, match="two scenarios are named 'smoke-recall'"):
        load_scenarios(["smoke-recall", str(path)])
    assert len(load_scenarios(["smoke-recall", "smoke-recall"])) == 1


def _with_check(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "turns": [{"user": "hi", "checks": [fields]}]}


@pytest.mark.parametrize("data, message", [
    ([], "a scenario must be a JSON object"),
    ({"turns": [{"user": "hi"}]}, "'name' must be 1-64 characters"),
    ({"name": "has space", "turns": [{"user": "hi"}]}, "'name' must be"),
    ({"name": "x", "turns": []}, "'turns' must be a non-empty list"),
    ({"name": "x", "turn": [{"user": "hi"}]}, "unknown key 'turn' (did you mean 'turns'?)"),
    ({"name": "x", "turns": [{"text": "hi"}]}, "turns[0]: unknown key 'text'"),
    ({"name": "x", "turns": [{"user": "  "}]}, "turns[0]: 'user' (the user's message) must be a non-empty"),
    ({"name": "x", "turns": [{"user": "hi", "checks": {}}]}, "turns[0]: 'checks' must be a list"),
    (_with_check(must_include_any=["a"]), "turns[0].checks[0]: missing 'kind'"),
    (_with_check(kind="recal", must_include_any=["a"]),
     "'kind' must be one of recall, style, safety, not 'recal' (did you mean 'recall'?)"),
    (_with_check(kind="recall"),
     "needs exactly one of must_include_any, must_include_all, must_not_include, pattern (found none)"),
    (_with_check(kind="recall", must_include_any=["a"], pattern="b"), "(found must_include_any, pattern)"),
    (_with_check(kind="recall", must_include=["a"]), "unknown key 'must_include' (did you mean"),
    (_with_check(kind="recall", must_include_any=[]), "'must_include_any' must be a non-empty list"),
    (_with_check(kind="recall", must_include_all=["a", 3]), "'must_include_all'[1] must be a non-empty string"),
    (_with_check(kind="recall", must_not_include=[" "]), "'must_not_include'[0] must be a non-empty string"),
    (_with_check(kind="style", pattern="(unclosed"), "'pattern' is not a valid regular expression"),
    ({"name": "x", "schema_version": 2, "turns": [{"user": "hi"}]}, "'schema_version' 2 is not supported"),
])
def test_schema_errors_say_where_and_what(data, message):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "my.json")
    assert str(info.value).startswith("my.json")
    assert message in str(info.value)


def test_cli_refuses_a_bad_scenario_with_status_2(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(_with_check(kind="recall", pattern="(")), encoding="utf-8")
    assert eval_command(parse_args(["--scenario", str(path), "--quiet"])) == 2
    assert "not a valid regular expression" in capsys.readouterr().err
    assert eval_command(parse_args(["--dev-users", "--token", "t"])) == 2
    assert "choose one of" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end

ECHO_SCENARIO = {
    "name": "echo-known",
    "description": "outcomes known in advance on an echo engine",
    "turns": [
        {"user": "My name is Zoe and I live in Oslo.", "checks": [
            {"kind": "recall", "name": "repeats the city", "must_include_any": ["Oslo"]},
            {"kind": "safety", "name": "no other city", "must_not_include": ["Stockholm"]}]},
        {"user": "What is my name?", "checks": [
            {"kind": "recall", "name": "knows the name", "must_include_any": ["Zoe"]},
            {"kind": "style", "name": "starts with the question", "pattern": "^what is my name\\?"}]},
        {"user": "Thanks, bye!"},
    ],
}


@pytest.fixture(scope="module")
def echo_server(redis_url: str) -> Iterator[ServerProcess]:
    prefix = f"rapport-test-eval:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*SIM_FLAGS, "--auth", "dev", "--sim-echo"]).start()
    yield server
    server.stop()
    clean_prefix(prefix)


@pytest.fixture
def scenario_file(tmp_path: Path) -> str:
    path = tmp_path / "echo-known.json"
    path.write_text(json.dumps(ECHO_SCENARIO), encoding="utf-8")
    return str(path)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[int, str, dict]:
    out = tmp_path / f"report-{uuid.uuid4().hex[:6]}.json"
    code = eval_command(parse_args([*argv, "--json", str(out), "--quiet"]))
    stdout = capsys.readouterr().out
    return code, stdout, json.loads(out.read_text(encoding="utf-8"))


def test_two_targets_side_by_side(echo_server, sim_server, scenario_file, capsys, tmp_path):
    code, out, report = run_cli(["--target", echo_server.ws_url, "--target", sim_server.base,
                                 "--scenario", scenario_file, "--repeat", "2", "--concurrency", "2",
                                 "--dev-users", "--min-accuracy", "0.4"], capsys, tmp_path)
    assert code == 0
    assert set(report) == {"version", "started_at", "duration_s", "config", "targets", "passed", "failures",
                           "turns", "conversations"}
    assert report["config"]["temperature"] == 0.0 and report["config"]["seed_sent"] is False
    echo, plain = report["targets"]
    assert set(echo) >= {"label", "url", "model", "conversations", "turns", "context_accuracy", "recall_checks",
                         "style_checks", "safety_checks", "other_checks", "ttft_ms", "turn_ms",
                         "interruption_rate", "budget_misses", "thresholds", "passed"}
    assert echo["label"] != plain["label"]
    assert echo["model"].startswith("simulated:") and plain["url"] == sim_server.ws_url

    # Echo: the city is in the user's own words (pass), the name needs memory (fail).
    assert echo["recall_checks"] == {"passed": 2, "total": 4} and echo["context_accuracy"] == 0.5
    assert echo["style_checks"] == {"passed": 2, "total": 2}
    assert plain["recall_checks"] == {"passed": 0, "total": 4} and plain["context_accuracy"] == 0.0
    assert plain["style_checks"] == {"passed": 0, "total": 2}
    for t in (echo, plain):
        assert t["safety_checks"] == {"passed": 2, "total": 2}
        assert t["conversations"] == 2 and t["turns"] == 6 and t["completed_turns"] == 6
        assert t["interruptions"] == 0 and t["interruption_rate"] == 0.0 and t["budget_misses"] == 0
        assert 0 < t["ttft_ms"]["p50"] <= t["ttft_ms"]["p95"] < 2000
        assert t["ttft_ms"]["p50"] < t["turn_ms"]["p50"] <= t["turn_ms"]["p95"] < 10_000
        assert [th["name"] for th in t["thresholds"]] == ["min_accuracy", "max_p95_turn_ms",
                                                          "max_interruption_rate"]
    assert echo["thresholds"][0]["passed"] is True and plain["thresholds"][0]["passed"] is False
    assert report["passed"] is False

    turns = report["turns"][echo["label"]]
    assert len(turns) == 6 and turns[0]["reply"].startswith("My name is Zoe and I live in Oslo.")
    fails = {(f["target"], f["check"]) for f in report["failures"]}
    assert (echo["label"], "knows the name") in fails and (echo["label"], "repeats the city") not in fails

    header = out.splitlines()[0]
    assert echo["label"] in header and plain["label"] in header
    assert "context accuracy" in out and "50.0% (2/4)" in out and "0.0% (0/4)" in out
    assert "Failing checks (" in out and "'knows the name'" in out


def test_fail_on_threshold_and_labels(echo_server, scenario_file, capsys, tmp_path):
    code, out, report = run_cli(["--target", echo_server.ws_url, "--label", "echo", "--scenario", scenario_file,
                                 "--dev-users", "--fail-on-threshold", "--msgpack"], capsys, tmp_path)
    assert code == 1  # accuracy 0.5 < 0.9
    assert report["targets"][0]["label"] == "echo"
    assert report["config"]["subprotocol"] == "rapport.v1.msgpack"
    assert out.splitlines()[0].split() == ["echo"]


def test_shipped_smoke_scenario_with_jwt(echo_server, capsys, tmp_path):
    """The shape of the real-model run: a short shipped scenario, one repeat, a table."""
    code, out, report = run_cli(["--target", echo_server.ws_url, "--scenario", "smoke-recall", "--repeat", "1",
                                 "--jwt-secret", JWT_SECRET, "--max-tokens", "40"], capsys, tmp_path)
    assert code == 0
    [target] = report["targets"]
    assert target["turns"] == 3 and target["completed_turns"] == 3 and target["interruptions"] == 0
    assert target["recall_checks"]["total"] == 2
    assert "turn time p50 / p95 (ms)" in out and "overall" in out


def test_an_unreachable_target_counts_as_interruptions(capsys, tmp_path, scenario_file):
    dead = f"ws://127.0.0.1:{free_port()}/v1/ws"
    code, out, report = run_cli(["--target", dead, "--scenario", scenario_file, "--dev-users"], capsys, tmp_path)
    assert code == 0
    [target] = report["targets"]
    assert target["label"] == dead and target["model"] is None
    assert target["turns"] == 3 and target["interruption_rate"] == 1.0
    assert target["errors"] == {"connect_failed": 3}
    assert target["recall_checks"] == {"passed": 0, "total": 2}
    assert "100.0% (3/3)" in out


def test_wrong_credentials_fail_fast(echo_server, scenario_file, capsys, tmp_path):
    code, _, report = run_cli(["--target", echo_server.ws_url, "--scenario", scenario_file,
                               "--jwt-secret", "not-the-secret-" + "z" * 32], capsys, tmp_path)
    assert code == 0
    assert report["targets"][0]["errors"] == {"unauthorized": 3}


def test_table_of_summaries_matches_to_dict():
    s = summarize([turn(results=[("recall", True)])], label="x")
    assert isinstance(s, TargetSummary)
    d = s.to_dict()
    assert d["context_accuracy"] == 1.0 and d["turn_ms"] == {"p50": 300.0, "p95": 300.0}
    assert [t["passed"] for t in d["thresholds"]] == [True, True, True] and d["passed"] is True
    json.dumps(d)  # serialisable as it is


# ---------------------------------------------------------------- retries (a scripted server)


class BusyFirst:
    """Answers the first ``busy`` turn.start frames with busy, then echoes the user's text."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.starts: list[dict[str, Any]] = []

    async def handler(self, ws) -> None:
        from protocol.codec import codec_for

        codec = codec_for(ws.subprotocol)
        async for raw in ws:
            frame = codec.decode(raw)
            if frame["type"] == "hello":
                await ws.send(codec.encode({"type": "ready", "model": "scripted", "active_turns": []}))
            elif frame["type"] == "turn.start":
                self.starts.append(frame)
                ctid = frame["client_turn_id"]
                if self.busy:
                    self.busy -= 1
                    await ws.send(codec.encode({"type": "error", "code": "busy", "message": "full",
                                                "client_turn_id": ctid, "retry_after_ms": 10}))
                    continue
                tid = f"t{len(self.starts)}"
                await ws.send(codec.encode({"type": "turn.accepted", "turn_id": tid, "client_turn_id": ctid,
                                            "conversation_id": frame["conversation_id"], "replayed": False}))
                await ws.send(codec.encode({"type": "turn.delta", "turn_id": tid, "seq": 1, "text": frame["text"]}))
                await ws.send(codec.encode({"type": "turn.end", "turn_id": tid, "seq": 1, "finish_reason": "stop",
                                            "text": frame["text"], "usage": {}, "timings": {}}))


@pytest.mark.parametrize(("busy", "max_retries", "retries", "error"), [(2, 30, 2, None), (5, 1, 1, "busy")])
async def test_busy_answers_are_retried_up_to_max_retries(busy, max_retries, retries, error):
    from websockets.asyncio.server import serve

    from clients.eval import EvalConfig, TargetSpec, run_eval

    script = BusyFirst(busy)
    scenario = parse_scenario({"name": "one", "turns": [{"user": "hello there"}]})
    async with serve(script.handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/ws"
        report = await run_eval(EvalConfig(targets=[TargetSpec(url)], scenarios=[scenario], dev_users=True,
                                           max_retries=max_retries))
    [result] = report.runs[0].results
    assert result.retries == retries and result.retry_codes == ["busy"] * retries
    assert (result.error or "").split(":")[0] == (error or "")
    if error is None:
        assert result.completed and result.reply == "hello there"
    assert len({s["client_turn_id"] for s in script.starts}) == len(script.starts) == retries + 1


# ---------------------------------------------------------------- remembered facts (memory.add)


def test_fact_recall_32_keeps_user_turns_short():
    # The small model's context is 2,048 tokens: the fillers stay a line each.
    s = load_scenario("fact-recall-32")
    assert all(len(t.user) <= 60 for t in s.turns[1:32])
    assert not s.remember


def test_pinned_facts_scenario_needs_the_pinned_facts():
    s = load_scenario("pinned-facts")
    assert len(s.remember) == 3 and s.remember[0] == "My sister is called Noor."
    questions = [t for t in s.turns if t.checks]
    needles = {v for t in questions for v in recall_values(t)}
    assert needles == {"Noor", "peanut", "Biscuit"}
    assert all(any(n.lower() in fact.lower() for fact in s.remember) for n in needles)
    fillers = s.turns[: len(s.turns) - len(questions)]
    # More small talk than a window of 8 turns holds: without memory the facts scroll out.
    assert len(fillers) + len(s.remember) > 8 + 4
    assert not any(n.lower() in t.user.lower() for t in s.turns for n in needles)


def test_remember_is_parsed_in_order():
    s = parse_scenario({"name": "x", "remember": ["I live in Lyon.", "My dog is Rex."], "turns": [{"user": "hi"}]})
    assert s.remember == ("I live in Lyon.", "My dog is Rex.")
    assert parse_scenario({"name": "x", "turns": [{"user": "hi"}]}).remember == ()


@pytest.mark.parametrize("remember, message", [
    ("I live in Lyon.", "'remember' must be a list of strings"),
    (["ok", ""], "remember[1] must be a non-empty string"),
    (["ok", 3], "remember[1] must be a non-empty string"),
    (["x" * 501], "remember[0] is 501 characters; a pinned fact is at most 500"),
    ([f"fact {i}" for i in range(51)], "'remember' holds 51 facts; a user can pin at most 50"),
    (["same", "other", "same"], "remember[2] repeats remember[0]"),
])
def test_remember_errors_say_where_and_what(remember, message):
    with pytest.raises(ScenarioError) as info:
        parse_scenario({"name": "x", "remember": remember, "turns": [{"user": "hi"}]}, "my.json")
    assert str(info.value).startswith("my.json (x): ")
    assert message in str(info.value)


def test_an_older_server_is_told_by_its_unknown_frame_answer():
    from clients.errors import ServerError
    from protocol.errors import BadRequest
    from protocol.frames import parse_client_frame

    # What a server before addition 22 answers: its parser does not know the type.
    with pytest.raises(BadRequest) as info:
        parse_client_frame({"type": "memory.frobnicate"}, max_input_chars=100)
    older = ServerError({"type": "error", "code": "bad_request", "message": str(info.value)})
    assert memory_unsupported(older)
    assert not memory_unsupported(ServerError({"type": "error", "code": "bad_request",
                                               "message": "text is longer than 500 characters"}))
    assert not memory_unsupported(ServerError({"type": "error", "code": "content_filter", "message": "no"}))


def test_memory_options_are_checked(capsys):
    assert eval_command(parse_args(["--target", "ws://a", "--memory", "on", "--memory", "off", "--quiet"])) == 2
    assert "2 --memory for 1 --target" in capsys.readouterr().err
    assert eval_command(parse_args(["--memory", "on", "--no-memory", "--quiet"])) == 2
    assert "not both" in capsys.readouterr().err
    assert eval_command(parse_args(["--token", "t", "--concurrency", "2", "--scenario", "pinned-facts",
                                    "--quiet"])) == 2
    assert "--concurrency 1" in capsys.readouterr().err


REMEMBER_SCENARIO = {
    "name": "remember-known",
    "remember": ["My sister is called Noor.", "I am allergic to peanuts."],
    "turns": [
        {"user": "Nice weather today."},
        {"user": "Who is Noor?", "checks": [{"kind": "recall", "name": "echoed", "must_include_any": ["Noor"]}]},
    ],
}


@pytest.fixture
def remember_file(tmp_path: Path) -> str:
    path = tmp_path / "remember-known.json"
    path.write_text(json.dumps(REMEMBER_SCENARIO), encoding="utf-8")
    return str(path)


async def _facts_of_user(url: str, user: str) -> list[dict[str, Any]]:
    from clients.connection import RapportConnection

    conn = await RapportConnection.open(url, user=user)
    try:
        return list((await conn.memory_list())["facts"])
    finally:
        await conn.close()


def test_remembered_facts_are_pinned_with_memory_add_and_deleted_after(sim_server, remember_file, capsys,
                                                                         tmp_path):
    code, out, report = run_cli(["--target", sim_server.ws_url, "--label", "mem", "--scenario", remember_file,
                                 "--repeat", "2", "--concurrency", "2", "--dev-users", "--max-tokens", "8"],
                                capsys, tmp_path)
    assert code == 0
    assert report["config"]["memory"] == {"mem": True}
    assert report["config"]["scenarios"][0]["remember"] == REMEMBER_SCENARIO["remember"]
    conversations = report["conversations"]["mem"]
    assert len(conversations) == 2
    assert len({c["user"] for c in conversations}) == 2  # a user per conversation: nothing leaks between them
    for c in conversations:
        assert c["facts_mode"] == "pinned (memory.add)" and c["cleanup_error"] is None
        # The server's own answer: stored facts, with its ids, in the order pinned.
        assert [f["text"] for f in c["pinned"]] == REMEMBER_SCENARIO["remember"]
        assert all(re.fullmatch(r"f_[0-9a-f]{16}", f["id"]) for f in c["pinned"])
        # ...and unpinned once the conversation was over.
        assert asyncio.run(_facts_of_user(sim_server.ws_url, c["user"])) == []
    turns = report["turns"]["mem"]
    assert len(turns) == 4 and not any(t["setup"] for t in turns)  # the facts were not sent as messages
    [target] = report["targets"]
    assert target["facts_modes"] == {"pinned (memory.add)": 2}
    assert "remembered facts" in out and "pinned (memory.add)" in out


def test_without_memory_the_facts_are_the_first_messages(echo_server, remember_file, capsys, tmp_path):
    code, out, report = run_cli(["--target", echo_server.ws_url, "--target", echo_server.ws_url,
                                 "--label", "with", "--label", "without", "--memory", "on", "--memory", "off",
                                 "--scenario", remember_file, "--dev-users", "--max-tokens", "30"],
                                capsys, tmp_path)
    assert code == 0
    assert report["config"]["memory"] == {"with": True, "without": False}
    with_memory, without = report["targets"]
    assert with_memory["facts_modes"] == {"pinned (memory.add)": 1}
    assert without["facts_modes"] == {"sent as messages (--memory off)": 1}
    # Two fact turns before the scripted ones, played like any turn and scored on nothing.
    turns = report["turns"]["without"]
    assert [(t["turn"], t["setup"]) for t in turns] == [(0, True), (0, True), (1, False), (2, False)]
    assert [t["user"] for t in turns[:2]] == REMEMBER_SCENARIO["remember"]
    assert turns[0]["reply"].startswith("My sister is called Noor.")  # the echo engine saw it as the message
    assert not turns[0]["checks"] and without["turns"] == 4 and with_memory["turns"] == 2
    [record] = report["conversations"]["without"]
    assert record["pinned"] == []
    assert asyncio.run(_facts_of_user(echo_server.ws_url, record["user"])) == []
    line = next(row for row in out.splitlines() if row.startswith("remembered facts"))
    assert "pinned (memory.add)" in line and "sent as messages (--memory off)" in line


def test_the_table_shows_accuracy_per_scenario():
    def played(scenario: str, ok: bool) -> TurnResult:
        return turn(scenario, results=[("recall", ok)])

    s = summarize([played("a", True), played("a", False), played("b", True)], label="x",
                  facts_modes={"pinned (memory.add)": 1})
    assert s.recall_by_scenario == {"a": (1, 2), "b": (1, 1)}
    assert s.to_dict()["recall_by_scenario"]["a"] == {"passed": 1, "total": 2, "accuracy": 0.5}
    table = render_table([s])
    assert "  a " in table and "50.0% (1/2)" in table and "100.0% (1/1)" in table
    assert "pinned (memory.add)" in table
    one = render_table([summarize([played("a", True)], label="x")])
    assert "  a " not in one and "remembered facts" not in one
