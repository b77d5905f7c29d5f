"""What ``rapport bench`` reports: the figures, the table, the JSON histogram, the TTFT plot.

Pure functions over what the workers (:mod:`clients.bench_workers`) measured,
merged (:mod:`clients.bench_stats`); every percentile is
:func:`clients.percentiles.percentile`'s.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .bench_stats import COUNTS, SERIES, TURN_COLUMNS, MergedStats
from .bench_workers import BenchConfig
from .percentiles import percentile, summarize

__all__ = ["PlotUnavailable", "build_report", "check_plotting", "finite_or_none", "format_table", "histogram",
           "progress_line", "write_plot"]

SERIES_LABELS = {
    "ttft": "time to first token",
    "ttft_with_retries": "  incl. busy retries",
    "gap": "gap between deltas",
    "turn": "turn time",
    "server_ttft": "server timings.ttft_ms",
    "server_queue": "server timings.queue_ms",
    "server_engine_ttft": "server engine_ttft_ms",
    "server_total": "server timings.total_ms",
    "ttft_diff": "client - server TTFT",
    "overhead": "client - engine TTFT",
    "busy_latency": "busy / rate_limited answer",
    "loop_lag": "client event-loop lag",
}


class PlotUnavailable(RuntimeError):
    """``--plot`` without matplotlib installed."""


PLOT_INSTALL_HINT = "--plot needs matplotlib, an optional extra: pip install 'rapport[plot]'"


def check_plotting() -> None:
    """Raise PlotUnavailable now, before a long run, rather than after it (nothing is imported)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable(PLOT_INSTALL_HINT)


def progress_line(elapsed: float, snaps: dict[int, dict[str, Any]], ttfts: list[float]) -> str:
    """The live line on stderr: turns done and active, p50 TTFT of the last interval, refusals."""
    done = sum(s["done"] for s in snaps.values())
    active = sum(s["active"] for s in snaps.values())
    busy = sum(s["busy"] for s in snaps.values())
    limited = sum(s["rate_limited"] for s in snaps.values())
    errors = sum(s["errors"] for s in snaps.values())
    p50 = percentile(ttfts, 50)
    p50_s = f"{p50:7.1f} ms" if p50 is not None else "      - ms"
    return (f"[{elapsed:6.1f}s] turns done {done:6d}  active {active:5d}  p50 TTFT {p50_s}  "
            f"busy {busy:5d}  rate_limited {limited:4d}  errors {errors:4d}")


def build_report(cfg: BenchConfig, elapsed: float, merged: MergedStats, failed_workers: int = 0, *,
                 start: float | None = None, setup_s: float | None = None) -> dict[str, Any]:
    """Every figure of the run; ``start`` is the monotonic time the workers were told to go."""
    series = merged.series
    c = {name: int(merged.counts.get(name, 0)) for name in COUNTS}
    protocol_ok = (c["seq_gaps"] == 0 and c["seq_duplicates"] == 0 and c["text_mismatches"] == 0
                   and c["deltas_received"] == c["end_seq_total"])
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("token", "jwt_secret")},
        "elapsed_s": elapsed,
        "latency_ms": {name: summarize(series[name]) for name in SERIES},
        "counts": c,
        "errors": dict(merged.errors),
        "error_messages": dict(merged.error_messages),
        "finish_reasons": dict(merged.finish),
        "all_deltas_delivered": c["deltas_received"] == c["end_seq_total"],
        "protocol_ok": protocol_ok,
        "failed_workers": failed_workers,
        "start_monotonic": start,
        "setup_s": setup_s,
        "client_cpu_s": merged.cpu_s,
        "throughput": {
            "turns_per_s": c["turns_completed"] / elapsed if elapsed > 0 else 0.0,
            "deltas_per_s": c["deltas_received"] / elapsed if elapsed > 0 else 0.0,
        },
        "_samples": {"ttft": list(series["ttft"]), "server_ttft": list(series["server_ttft"])},
        **(_timelines(merged, start or 0.0) if cfg.turn_rows else {}),
    }


def _timelines(merged: MergedStats, start: float) -> dict[str, Any]:
    """One row per completed turn (``sent_s`` from the start); each gap and refusal with when it happened."""
    turns = {name: list(merged.turns[name]) for name in TURN_COLUMNS if name != "sent_at"}
    turns["sent_s"] = [t - start for t in merged.turns["sent_at"]]
    return {"turns": turns,
            "timed": {name: {"ms": list(merged.series[name]), "at_s": [t - start for t in at]}
                      for name, at in merged.moments.items()}}


def finite_or_none(obj: Any) -> Any:
    """The report with NaN and infinities as None, so that its JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}"


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    c = report["counts"]
    lines = [
        f"rapport bench: {cfg['users']} user(s) x {cfg['turns']} turn(s), {cfg['processes']} process(es), "
        f"{'msgpack' if cfg['msgpack'] else 'json'}, {report['elapsed_s']:.1f} s"
        + (f", {c['idle_open']} idle connection(s)" if cfg["idle"] else ""),
        "",
        f"{'milliseconds':<28}{'count':>8}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
    ]
    for name in SERIES:
        s = report["latency_ms"][name]
        lines.append(f"{SERIES_LABELS[name]:<28}{s['count']:>8}{_fmt(s['p50']):>10}{_fmt(s['p95']):>10}"
                     f"{_fmt(s['p99']):>10}{_fmt(s['max']):>10}")
    finish = ", ".join(f"{k} {v}" for k, v in sorted(report["finish_reasons"].items())) or "-"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(report["errors"].items()))
    delivered = "all delivered" if report["all_deltas_delivered"] else "MISSING DELTAS"
    rows = [
        ("turns completed", f"{c['turns_completed']} / {c['turns_planned']}  ({finish})"),
        (f"budget misses (> {cfg['budget_ms']:g} ms)", str(c["budget_misses"])),
        ("busy answers (retried)", f"{c['busy']}  (gave up: {c['gave_up']})"),
        ("rate_limited", str(c["rate_limited"])),
        ("errors", f"{c['errors']}" + (f"  ({errors})" if errors else "")),
        ("interrupted turns", str(c["interrupted"])),
        ("dropped / resumed", f"{c['dropped']} / {c['resumed']}  (connections lost: {c['connection_lost']})"),
        ("deltas received / end seq", f"{c['deltas_received']} / {c['end_seq_total']}  ({delivered})"),
        ("seq gaps / duplicates", f"{c['seq_gaps']} / {c['seq_duplicates']}"),
        ("text mismatches", str(c["text_mismatches"])),
        ("connects (failed, 4429)", f"{c['connects']} ({c['connect_failures']}, {c['closed_4429']})"
                                    + (f"; {c['hello_errors']} error(s) before ready" if c["hello_errors"] else "")),
        ("throughput", f"{report['throughput']['turns_per_s']:.2f} turns/s, "
                       f"{report['throughput']['deltas_per_s']:.1f} deltas/s"),
    ]
    if cfg["open_loop_rate"]:
        rows.append(("open-loop arrivals", f"{c['arrivals']} ({c['no_free_connection']} found no free connection, "
                                           f"{c['unfinished']} unfinished at the end)"))
    if cfg["idle"]:
        rows.append(("idle connections", f"{c['idle_open']} open, {c['idle_failed']} failed, "
                                         f"{c['idle_lost']} lost"))
    rows.append(("client CPU", f"{report['client_cpu_s']:.1f} s"))
    lines.append("")
    lines.extend(f"{k:<28}{v}" for k, v in rows)
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: str) -> None:
    """A PNG: histogram and CDF of client TTFT (server TTFT on the CDF), budget marked.

    matplotlib is an optional extra (``plot``), imported here only, so the
    load generator runs without it; :class:`PlotUnavailable` says how to get it.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable(PLOT_INSTALL_HINT) from exc

    matplotlib.use("Agg")  # no display: render straight to the file
    import matplotlib.pyplot as plt

    ttft = sorted(report["_samples"]["ttft"])
    server = sorted(report["_samples"]["server_ttft"])
    budget = report["config"]["budget_ms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if ttft:
        ax1.hist(ttft, bins=min(60, max(10, len(ttft) // 5)), color="#4c72b0")
        ax2.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label="client", color="#4c72b0")
    if server:
        ax2.plot(server, [(i + 1) / len(server) for i in range(len(server))], label="server timings",
                 color="#dd8452", linestyle="--")
    top = max([*ttft[-1:], *server[-1:], 1.0])
    for ax in (ax1, ax2):
        # The budget line only when it is on the data's scale; otherwise it would squash the data.
        if budget <= top * 2:
            ax.axvline(budget, color="#c44e52", linewidth=1, label=f"budget {budget:g} ms")
            ax.set_xlim(0, max(top, budget) * 1.05)
        else:
            ax.set_xlim(0, top * 1.05)
            ax.text(0.98, 0.97, f"budget {budget:g} ms: off scale", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, color="#c44e52")
        ax.set_xlabel("time to first token (ms)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("turns")
    ax1.set_title("TTFT histogram (client)")
    ax2.set_ylabel("share of turns")
    ax2.set_ylim(0, 1.0)
    ax2.set_title("TTFT CDF")
    ax2.legend(loc="lower right")
    cfg = report["config"]
    fig.suptitle(f"rapport bench: {cfg['users']} users x {cfg['turns']} turns, {len(ttft)} first tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histogram(values: Sequence[float]) -> list[dict[str, float | int]]:
    """Counts of ``values`` in log-spaced millisecond buckets (for the JSON report)."""
    edges = [1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000,
             float("inf")]
    counts = [0] * len(edges)
    for v in values:
        for i, e in enumerate(edges):
            if v <= e:
                counts[i] += 1
                break
    return [{"le_ms": e if e != float("inf") else "inf", "count": n}  # type: ignore[dict-item]
            for e, n in zip(edges, counts, strict=True)]
