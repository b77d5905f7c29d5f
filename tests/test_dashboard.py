"""The shipped Grafana dashboard (deploy/grafana/dashboards/rapport.json) only
queries metrics a real server exports.

Every PromQL expression of every panel (rows' nested panels too) is reduced to
the metric names it selects; a server on the simulated engine runs one turn and
its ``/metrics`` is read with the Prometheus client's own parser. A renamed or
invented metric would draw an empty panel in Grafana without any error, so it
fails here instead.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from wire import open_ws, stream_turn

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "rapport.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"

# ---------------------------------------------------------------- PromQL metric names

#: Words of the PromQL grammar that are never metric names: binary and set
#: operators, modifiers, and Inf/NaN (compared lower-cased).
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})
#: Clauses followed by a parenthesised list of label names, not expressions.
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
#: Aggregation operators and functions (the Prometheus documentation's lists).
#: ``sum by (le) (...)`` puts a clause between the name and its parenthesis,
#: so these are recognised by name, not only by a following ``(``.
FUNCTIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "double_exponential_smoothing", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label",
    "sort_by_label_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time",
    "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time", "mad_over_time", "acos", "acosh", "asin",
    "asinh", "atan", "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad", "pi",
    "start", "end",
})

_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+)                       # Grafana: $__rate_interval, ${job}
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)  # 0.95, 1e3, 5m
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<space>\s+|\#[^\n]*)
  | (?P<punct>.)
""", re.VERBOSE)


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of every token but blanks and comments."""
    out = []
    for m in _TOKEN.finditer(expr):
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group()))
    return out


def _closing(toks: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    """The index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(toks)):
        if toks[i] == ("punct", opening):
            depth += 1
        elif toks[i] == ("punct", closing):
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opening!r} in {' '.join(t for _, t in toks)}")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Skipped: label matchers (``{...}``, except a ``__name__`` matcher, which
    names a metric), range and subquery windows (``[...]``), label lists after
    ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right``,
    function and aggregation names, keywords, numbers, durations, strings and
    Grafana variables.
    """
    toks = tokens(expr)
    names: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if (kind, text) == ("punct", "{"):
            end = _closing(toks, i, "{", "}")
            inner = toks[i + 1:end]
            for j in range(len(inner) - 2):
                if inner[j] == ("ident", "__name__") and inner[j + 1] == ("punct", "=") \
                        and inner[j + 2][0] == "string":
                    names.add(inner[j + 2][1][1:-1])
            i = end + 1
        elif (kind, text) == ("punct", "["):
            i = _closing(toks, i, "[", "]") + 1
        elif kind == "ident" and text in LABEL_LISTS:
            i = _closing(toks, i + 1, "(", ")") + 1 if following == ("punct", "(") else i + 1
        elif kind == "ident":
            if text.lower() not in KEYWORDS and text not in FUNCTIONS and following != ("punct", "("):
                names.add(text)
            i += 1
        else:
            i += 1
    return names


@pytest.mark.parametrize(("expr", "expected"), [
    ("histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket[5m])))", {"x_seconds_bucket"}),
    ("sum by (finish_reason) (rate(turns_total{job=\"rapport\", code=~\"a|b\"}[$__rate_interval]))",
     {"turns_total"}),
    ("sum(rate(a_total[5m])) / ignoring(code) group_left sum without (instance) (b_total offset 1h)",
     {"a_total", "b_total"}),
    ("max_over_time(up[1h:5m]) > bool 0 and on (instance) g unless h or Inf", {"up", "g", "h"}),
    ("{__name__=\"by_name\", le=\"+Inf\"}", {"by_name"}),
    ("label_replace(m, \"dst\", \"$1\", \"src\", \"(by|sum)\") * 1e3 + 0x1F - .5", {"m"}),
    ("sum by(le)(rate(ns:recorded:rate5m[${window}]))", {"ns:recorded:rate5m"}),
    ("topk(5, count by (reason) (c)) @ end()", {"c"}),
])
def test_the_promql_reader_finds_exactly_the_metric_names(expr, expected):
    assert metric_names(expr) == expected


# ---------------------------------------------------------------- the dashboard


def all_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, a row's nested panels (a collapsed row keeps them) included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels") or [])


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def queries(dashboard: dict) -> dict[str, set[str]]:
    """Each query panel's title -> the metric names its targets select."""
    out: dict[str, set[str]] = {}
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        names = set()
        for target in panel["targets"]:
            names |= metric_names(target["expr"])
        out[panel["title"]] = names
    return out


def provisioned_prometheus_uid() -> str:
    sources = [ds for f in sorted(DATASOURCES.glob("*.y*ml"))
               for ds in yaml.safe_load(f.read_text())["datasources"] if ds["type"] == "prometheus"]
    assert len(sources) == 1, sources
    return str(sources[0]["uid"])


def test_every_panel_has_a_title_queries_and_the_provisioned_data_source(dashboard):
    uid = provisioned_prometheus_uid()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        assert panel.get("title", "").strip(), panel
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
            assert target["expr"].strip() and metric_names(target["expr"]), (panel["title"], target)


def test_the_dashboard_shows_what_operators_watch(queries):
    """The panels the issue asks for, by the metrics they read."""
    used = set().union(*queries.values())
    for name in ("rapport_connections_open", "rapport_turns_total",
                 "rapport_time_to_first_token_seconds_bucket", "rapport_inter_delta_gap_seconds_bucket",
                 "rapport_admissions_refused_total", "rapport_engine_running_requests",
                 "rapport_engine_waiting_requests", "rapport_cached_prompt_tokens_total",
                 "rapport_prompt_tokens_total", "rapport_webhook_deliveries_total",
                 "rapport_summary_folds_total", "rapport_redis_failures_total"):
        assert name in used, name


def exported_names(text: str) -> set[str]:
    """The sample names a ``/metrics`` exposition has or declares.

    A labelled counter with no child yet (``rapport_admissions_refused_total``
    before anything was refused) has HELP and TYPE lines but no sample; the
    names its samples will take follow from its type.
    """
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "gauge": ("",), "untyped": ("",)}
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ())}
    return names


async def test_every_metric_the_dashboard_queries_is_exported(sim_server, queries):
    ws = await open_ws(sim_server, user=f"dashboard-{uuid.uuid4().hex[:6]}")
    try:
        frames = await stream_turn(ws, "fill the counters", options={"max_tokens": 8})
        assert frames[-1]["type"] == "turn.end", frames[-1]
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.get(sim_server.base + "/metrics")
    finally:
        await ws.close()
    response.raise_for_status()
    exported = exported_names(response.text)
    # The turn gave the counters and histograms real samples.
    assert {"rapport_turns_total", "rapport_time_to_first_token_seconds_bucket",
            "rapport_inter_delta_gap_seconds_bucket"} <= exported
    missing = {title: sorted(names - exported) for title, names in queries.items() if names - exported}
    assert not missing, f"panels query metrics the server does not export: {missing}"
