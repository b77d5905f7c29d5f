"""Prometheus metrics, one registry per app (so tests can run several apps).

Names follow Prometheus conventions: ``_total`` for counters, base units
(seconds), and a ``rapport_`` namespace.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sessions.store import redis_failures

# Buckets around the 2 s first-token budget, fine near the fast end.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0,
                    3.0, 5.0, 10.0, 30.0)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: The outcomes of ``rapport_webhook_deliveries_total``.
WEBHOOK_OUTCOMES = ("delivered", "retried", "failed", "dropped", "duplicate")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("rapport_connections_open", "Open WebSocket connections", registry=r)
        self.turns = Counter("rapport_turns_total", "Turns ended, by finish reason",
                             ["finish_reason"], registry=r)
        self.ttft = Histogram("rapport_time_to_first_token_seconds",
                              "From receipt of turn.start to the first delta sent",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.gap = Histogram("rapport_inter_delta_gap_seconds", "Time between consecutive deltas of a turn",
                             buckets=_GAP_BUCKETS, registry=r)
        self.duration = Histogram("rapport_turn_duration_seconds", "From receipt of turn.start to turn.end",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.budget_misses = Counter("rapport_ttft_budget_misses_total",
                                     "Turns whose first token came after the budget", registry=r)
        self.admissions_refused = Counter("rapport_admissions_refused_total",
                                          "turn.start answered busy or rate_limited", ["reason"], registry=r)
        self.resumes = Counter("rapport_resumes_total", "turn.resume requests", registry=r)
        self.heartbeat_timeouts = Counter("rapport_heartbeat_timeouts_total",
                                          "Connections closed 4408 for silence", registry=r)
        self.slow_consumers = Counter("rapport_slow_consumer_closes_total",
                                      "Connections closed because they stopped reading", registry=r)
        self.bad_frames = Counter("rapport_bad_frames_total", "Client frames refused", ["code"], registry=r)
        self.rate_limited_frames = Counter("rapport_rate_limited_frames_total",
                                           "Client frames refused by the per-socket frame rate", registry=r)
        self.flood_closes = Counter("rapport_flood_closes_total",
                                    "Connections closed 1008 for sending frames far over the rate", registry=r)
        self.unauthenticated = Gauge("rapport_unauthenticated_connections",
                                     "Connections not yet authenticated (before their request or hello)",
                                     registry=r)
        self.unauthenticated_closes = Counter(
            "rapport_unauthenticated_closes_total",
            "Connections closed before authenticating, by why (a deadline, the cap, oversized headers)",
            ["reason"], registry=r)
        self.engine_running = Gauge("rapport_engine_running_requests", "Requests in the engine's batch",
                                    registry=r)
        self.engine_waiting = Gauge("rapport_engine_waiting_requests", "Requests queued in the engine",
                                    registry=r)
        self.engine_unfinished = Gauge("rapport_engine_unfinished_requests",
                                       "Requests the engine itself still tracks (vLLM's own count)",
                                       registry=r)
        self.prompt_tokens = Counter("rapport_prompt_tokens_total", "Prompt tokens of ended turns",
                                     registry=r)
        self.cached_prompt_tokens = Counter("rapport_cached_prompt_tokens_total",
                                            "Prompt tokens served from the prefix cache", registry=r)
        self.prefix_cache_hit_share = Gauge("rapport_prefix_cache_hit_share",
                                            "Cached prompt tokens over prompt tokens, since start",
                                            registry=r)
        # Push on detached completion (server.webhooks, docs/protocol.md addition 23).
        self.webhook_deliveries = Counter(
            "rapport_webhook_deliveries_total",
            "Webhook events and attempts by outcome: delivered, retried (an attempt to be tried again), "
            "failed (refused or given up), dropped (queue full), duplicate (claimed by another delivery)",
            ["outcome"], registry=r)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)  # every outcome visible from the start, at 0
        self.webhook_pending = Gauge("rapport_webhook_pending", "Webhook events queued or being delivered",
                                     registry=r)
        # Conversation memory (server.summaries): background folds of trimmed turns.
        self.summary_folds = Counter(
            "rapport_summary_folds_total",
            "Conversation summary folds by outcome: started, succeeded, failed (engine or Redis), "
            "lost (another fold of the conversation stored first)", ["outcome"], registry=r)
        self.redis_failures = Counter("rapport_redis_failures_total",
                                      "Failed Redis calls of the conversation store, by kind: unavailable "
                                      "(connection, timeout, failover) or error", ["kind"], registry=r)
        for kind in ("unavailable", "error"):
            self.redis_failures.labels(kind)
        self._redis_failures_seen: dict[str, int] = {}
        self.summary_engine = Histogram("rapport_summary_engine_seconds",
                                        "Engine time of one summary fold (a background request)",
                                        buckets=_LATENCY_BUCKETS, registry=r)

    # Small named hooks keep call sites readable and the metric names in one place.
    def bad_frame(self, code: str) -> None:
        self.bad_frames.labels(code).inc()

    def resumed(self) -> None:
        self.resumes.inc()

    def heartbeat_timeout(self) -> None:
        self.heartbeat_timeouts.inc()

    def slow_consumer_closed(self) -> None:
        self.slow_consumers.inc()

    def frame_rate_limited(self) -> None:
        self.rate_limited_frames.inc()

    def flood_closed(self) -> None:
        self.flood_closes.inc()

    def unauthenticated_closed(self, reason: str) -> None:
        self.unauthenticated_closes.labels(reason).inc()

    def webhook(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome).inc()

    def summary_fold(self, outcome: str) -> None:
        self.summary_folds.labels(outcome).inc()

    def refused(self, reason: str) -> None:
        self.admissions_refused.labels(reason).inc()

    def turn_ended(self, finish_reason: str, timings: dict[str, float | None], usage: dict[str, int],
                   budget_ms: float) -> None:
        self.turns.labels(finish_reason).inc()
        ttft = timings.get("ttft_ms")
        if ttft is not None:
            self.ttft.observe(ttft / 1000.0)
            if ttft > budget_ms:
                self.budget_misses.inc()
        total = timings.get("total_ms")
        if total is not None:
            self.duration.observe(total / 1000.0)
        prompt = usage.get("prompt_tokens", 0)
        if prompt:
            self.prompt_tokens.inc(prompt)
            self.cached_prompt_tokens.inc(usage.get("cached_prompt_tokens", 0))
            seen = self.prompt_tokens._value.get()
            if seen:
                self.prefix_cache_hit_share.set(self.cached_prompt_tokens._value.get() / seen)

    def delta_gap(self, seconds: float) -> None:
        self.gap.observe(seconds)

    def render(self, engine_running: int, engine_waiting: int, engine_unfinished: int | None = None) -> bytes:
        # The store counts its failed calls (it has no metrics of its own): the
        # counter catches up with it at each scrape.
        for kind, total in redis_failures().items():
            child = self.redis_failures.labels(kind)
            seen = self._redis_failures_seen.get(kind, 0)
            if total > seen:
                child.inc(total - seen)
                self._redis_failures_seen[kind] = total
        self.engine_running.set(engine_running)
        self.engine_waiting.set(engine_waiting)
        self.engine_unfinished.set(engine_running + engine_waiting if engine_unfinished is None
                                   else engine_unfinished)
        return generate_latest(self.registry)
