"""clients/bench_report.py: the merged figures, the table and the optional plot (pure, fast)."""

from __future__ import annotations

import subprocess
import sys
from array import array
from collections import Counter

import pytest
from conftest import ROOT

from clients.bench_report import (
    PlotUnavailable,
    build_report,
    check_plotting,
    finite_or_none,
    format_table,
    histogram,
    write_plot,
)
from clients.bench_stats import SERIES, TIMED, TURN_COLUMNS, Stats, merge_results
from clients.bench_workers import BenchConfig


def a_report(**counts: int) -> dict:
    stats = Stats()
    for v in (10.0, 20.0, 30.0):
        stats.add("ttft", v)
    stats.counts.update({"turns_planned": 3, "turns_completed": 3, "deltas_received": 9, "end_seq_total": 9,
                         **counts})
    stats.finish["stop"] = 3
    merged = merge_results([stats.export(), Stats().export()])
    return build_report(BenchConfig(token="secret", jwt_secret="secret"), 2.0, merged)


def test_workers_results_merge_and_the_report_checks_the_protocol():
    report = a_report()
    assert report["latency_ms"]["ttft"]["count"] == 3 and report["latency_ms"]["ttft"]["p50"] == 20.0
    assert report["protocol_ok"] and report["all_deltas_delivered"]
    assert report["throughput"]["turns_per_s"] == 1.5
    assert "token" not in report["config"] and "jwt_secret" not in report["config"]
    assert not a_report(seq_gaps=1)["protocol_ok"]
    missing = a_report(deltas_received=8)
    assert not missing["protocol_ok"] and not missing["all_deltas_delivered"]


def test_the_table_names_every_series_and_flags_missing_deltas():
    table = format_table(a_report())
    assert "time to first token" in table and "all delivered" in table
    assert "MISSING DELTAS" in format_table(a_report(deltas_received=1))


def test_merge_keeps_every_series():
    merged = merge_results([])
    assert set(merged.series) == set(SERIES) and all(isinstance(s, array) for s in merged.series.values())
    assert merged.counts == Counter()


def test_turn_rows_stay_aligned_across_workers_and_are_relative_to_the_start():
    one, two = Stats(), Stats()
    one.turn_row(sent_at=101.0, ttft=50.0, server_ttft=40.0)
    two.turn_row(sent_at=102.5, ttft=70.0, end_seq=3.0)
    one.add("gap", 5.0, at=101.25)
    two.add("busy_latency", 2.0, at=100.5)
    merged = merge_results([one.export(), two.export()])
    cfg = BenchConfig(turn_rows=True)
    report = build_report(cfg, 3.0, merged, start=100.0, setup_s=0.5)
    turns = report["turns"]
    assert set(turns) == {*TURN_COLUMNS, "sent_s"} - {"sent_at"}
    assert turns["sent_s"] == [1.0, 2.5] and turns["ttft"] == [50.0, 70.0]
    assert turns["server_ttft"][0] == 40.0 and turns["end_seq"][1] == 3.0
    assert report["timed"] == {"gap": {"ms": [5.0], "at_s": [1.25]}, "busy_latency": {"ms": [2.0], "at_s": [0.5]}}
    assert set(report["timed"]) == set(TIMED)
    assert report["start_monotonic"] == 100.0 and report["setup_s"] == 0.5
    strict = finite_or_none(report)
    assert strict["turns"]["server_ttft"][1] is None and strict["turns"]["end_seq"][0] is None
    assert "turns" not in build_report(BenchConfig(), 3.0, merged)  # only when asked for


def test_error_messages_group_by_code_with_digits_masked():
    stats = Stats()
    stats.error("unavailable", "redis pool of 512 exhausted")
    stats.error("unavailable", "redis pool of 64 exhausted")
    merged = merge_results([stats.export()])
    assert merged.errors == Counter({"unavailable": 2}) and merged.counts["errors"] == 2
    assert merged.error_messages == Counter({"unavailable: redis pool of N exhausted": 2})


def test_histogram_buckets():
    buckets = histogram([0.5, 1, 1.5, 2000, 99_999])
    by_edge = {b["le_ms"]: b["count"] for b in buckets}
    assert by_edge[1] == 2 and by_edge[2] == 1 and by_edge[2000] == 1 and by_edge["inf"] == 1
    assert sum(by_edge.values()) == 5


def test_a_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(PlotUnavailable, match=r"rapport\[plot\]"):
        check_plotting()
    with pytest.raises(PlotUnavailable, match=r"rapport\[plot\]"):
        write_plot(a_report(), str(tmp_path / "x.png"))


def test_matplotlib_is_imported_only_when_a_plot_is_drawn():
    code = "import sys, clients.bench, clients.bench_report; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_plot_without_matplotlib_exits_2_before_running():
    code = ("import sys; sys.modules['matplotlib'] = None; from clients.bench import main; "
            "sys.exit(main(['--url', 'ws://127.0.0.1:9/v1/ws', '--dev-users', '--plot', 'x.png']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "rapport[plot]" in proc.stderr
