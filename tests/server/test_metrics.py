"""`/metrics` speaks the Prometheus text format with the names operators will alert on."""

from __future__ import annotations

import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families
from wire import open_ws, send, stream_turn

EXPECTED = {
    # name: Prometheus type
    "rapport_connections_open": "gauge",
    "rapport_turns": "counter",
    "rapport_time_to_first_token_seconds": "histogram",
    "rapport_inter_delta_gap_seconds": "histogram",
    "rapport_turn_duration_seconds": "histogram",
    "rapport_ttft_budget_misses": "counter",
    "rapport_admissions_refused": "counter",
    "rapport_resumes": "counter",
    "rapport_heartbeat_timeouts": "counter",
    "rapport_slow_consumer_closes": "counter",
    "rapport_engine_running_requests": "gauge",
    "rapport_engine_waiting_requests": "gauge",
    "rapport_prefix_cache_hit_share": "gauge",
}


async def test_metric_names_types_and_values_after_a_turn(sim_server):
    ws = await open_ws(sim_server, user=f"metrics-{uuid.uuid4().hex[:6]}")
    frames = await stream_turn(ws, "count me", options={"max_tokens": 8})
    await send(ws, {"type": "turn.resume", "turn_id": frames[0]["turn_id"], "after_seq": 0})
    async with httpx.AsyncClient() as http:
        response = await http.get(sim_server.base + "/metrics")
    await ws.close()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name, kind in EXPECTED.items():
        assert name in families, f"missing metric {name}"
        assert families[name].type == kind, (name, families[name].type)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("rapport_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("rapport_inter_delta_gap_seconds_count", ())] >= 1
    assert sum(v for (n, labels), v in samples.items() if n == "rapport_turns_total") >= 1
    assert samples[("rapport_resumes_total", ())] >= 1
    assert samples[("rapport_connections_open", ())] >= 1
