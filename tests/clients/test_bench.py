"""``rapport bench``: the load generator against a real simulated-engine server.

Runs the module as a user would (a subprocess, spawning its worker processes)
and checks the table, the JSON figures and the plot; its helpers are unit-tested
directly (the statistics in test_percentiles.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from conftest import JWT_SECRET, ROOT

from clients.bench import normalize_url

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- helpers


def test_urls_are_normalized():
    assert normalize_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/ws"
    assert normalize_url("https://chat.example") == "wss://chat.example/v1/ws"
    assert normalize_url("ws://h:1/") == "ws://h:1/v1/ws"
    assert normalize_url("ws://h:1/v1/ws") == "ws://h:1/v1/ws"
    assert normalize_url("h:1") == "ws://h:1/v1/ws"


# ---------------------------------------------------------------- end to end


def run_bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clients.bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def check_report(report: dict, *, turns: int) -> None:
    c = report["counts"]
    assert c["turns_planned"] == turns
    assert c["turns_completed"] == turns, report
    assert c["errors"] == 0 and report["errors"] == {}, report
    assert c["seq_gaps"] == c["seq_duplicates"] == c["text_mismatches"] == 0
    assert c["deltas_received"] == c["end_seq_total"] > 0
    assert report["all_deltas_delivered"] and report["protocol_ok"]
    assert sum(report["finish_reasons"].values()) == turns
    assert set(report["finish_reasons"]) <= {"stop", "length"}
    lat = report["latency_ms"]
    for name in ("ttft", "turn", "server_ttft", "server_total", "ttft_diff"):
        assert lat[name]["count"] == turns, name
    # Sane, not fast: a correctness bound on a shared machine.
    assert 0 < lat["ttft"]["p50"] <= lat["ttft"]["p99"] <= lat["ttft"]["max"] < 10_000
    assert lat["ttft"]["p50"] <= lat["turn"]["p50"]
    assert lat["ttft_with_retries"]["p50"] >= lat["ttft"]["p50"] - 1e-6
    assert lat["gap"]["count"] > 0 and lat["gap"]["p50"] >= 0
    # The client measures from before the server received the start to after it sent the delta.
    assert lat["ttft_diff"]["min"] > -5
    assert "jwt_secret" not in report["config"] and "token" not in report["config"]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_short_run_reports_the_table_json_and_plot(sim_server, tmp_path, processes):
    out, png = tmp_path / "bench.json", tmp_path / "ttft.png"
    users, turns = 4, 2
    proc = run_bench("--url", sim_server.base, "--dev-users", "--users", str(users), "--turns", str(turns),
                     "--think-ms", "50", "--processes", str(processes), "--max-tokens", "24",
                     "--user-prefix", f"bench-{uuid.uuid4().hex[:6]}-", "--json", str(out),
                     "--plot", str(png), *(["--msgpack"] if processes == 2 else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in ("time to first token", "gap between deltas", "turn time", "server timings.ttft_ms",
                  "client - server TTFT", "budget misses", "busy answers", "rate_limited", "errors",
                  "interrupted turns", "dropped / resumed", "deltas received / end seq", "all delivered"):
        assert label in proc.stdout, label
    assert "turns done" in proc.stderr  # the live progress line
    report = json.loads(out.read_text())
    check_report(report, turns=users * turns)
    assert report["config"]["processes"] == processes
    assert report["counts"]["connects"] == users
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_dropped_sockets_resume_without_gaps_or_duplicates(sim_server, tmp_path):
    out = tmp_path / "bench.json"
    users, turns = 3, 2
    proc = run_bench("--url", sim_server.ws_url, "--dev-users", "--users", str(users), "--turns", str(turns),
                     "--think-ms", "20", "--drop-rate", "1", "--processes", "2", "--no-progress",
                     "--user-prefix", f"bench-drop-{uuid.uuid4().hex[:6]}-", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    check_report(report, turns=users * turns)
    c = report["counts"]
    assert c["dropped"] >= 1
    assert c["resumed"] == c["dropped"]
    assert c["connects"] == users + c["dropped"]


def test_jwt_users_and_idle_connections(jwt_server, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--url", jwt_server.base, "--jwt-secret", JWT_SECRET, "--users", "2", "--turns", "1",
                     "--idle", "6", "--processes", "2", "--no-progress",
                     "--user-prefix", f"bench-jwt-{uuid.uuid4().hex[:6]}-", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    check_report(report, turns=2)
    assert report["counts"]["idle_open"] == 6 and report["counts"]["idle_failed"] == 0
    assert "idle connections" in proc.stdout


def test_bad_arguments_exit_2():
    proc = run_bench("--users", "0")
    assert proc.returncode == 2 and "nothing to do" in proc.stderr
    proc = run_bench("--dev-users", "--token", "x")
    assert proc.returncode == 2


def test_hooks_sample_the_run_and_end_an_idle_hold(sim_server):
    from clients.bench import BenchConfig, RunHooks
    from clients.bench import run_bench as run_in_process

    started: list[float] = []
    ticks: list[float] = []

    def tick(elapsed: float) -> bool:
        ticks.append(elapsed)
        return elapsed >= 0.5  # no --duration-s: only this ends the hold

    cfg = BenchConfig(url=sim_server.ws_url, users=0, idle=4, processes=2, dev_users=True, progress=False,
                      user_prefix=f"bench-hold-{uuid.uuid4().hex[:6]}-")
    report = run_in_process(cfg, hooks=RunHooks(on_start=started.append, on_tick=tick, tick_s=0.1))
    c = report["counts"]
    assert c["idle_open"] == c["idle_open_at_end"] == 4 and c["idle_lost"] == 0
    assert report["start_monotonic"] == started[0] and report["setup_s"] > 0
    assert ticks and ticks[-1] >= 0.5 and report["elapsed_s"] < 10
    assert report["client_cpu_s"] >= 0 and report["failed_workers"] == 0


def test_open_loop_arrivals_with_turn_rows(sim_server, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--url", sim_server.ws_url, "--dev-users", "--users", "6", "--open-loop-rate", "20",
                     "--duration-s", "1", "--processes", "2", "--turn-rows", "--no-progress", "--max-tokens", "8",
                     "--user-prefix", f"bench-open-{uuid.uuid4().hex[:6]}-", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "open-loop arrivals" in proc.stdout
    report = json.loads(out.read_text())
    c = report["counts"]
    assert c["arrivals"] > 0 and c["turns_planned"] + c["no_free_connection"] == c["arrivals"]
    assert c["turns_completed"] == len(report["turns"]["ttft"]) > 0 and c["connects"] == 6
    assert all(0 <= t < 3 for t in report["turns"]["sent_s"])
    assert report["protocol_ok"]
