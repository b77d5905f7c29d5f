"""Everything one server process holds: settings, Redis, the store, the engine,
the turn manager, metrics and the open connections.

Created and torn down by the app's lifespan (:mod:`server.app`); the gateway
and the HTTP endpoints reach it through ``app.state.runtime``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shlex
import time
from typing import Any, Protocol

from redis.exceptions import RedisClusterException, RedisError

from protocol import close_codes
from protocol.errors import Unavailable
from sessions.character_store import CharacterStore
from sessions.keys import KeySpace
from sessions.memory import FactStore
from sessions.store import ConversationStore
from sessions.training import TrainingLog

from .audit import Audit
from .auth import Authenticator
from .character_catalog import CharacterCatalog
from .config import Settings
from .coordination import Coordinator
from .engines.base import Engine
from .feedback import FeedbackService
from .metrics import Metrics
from .moderation import Moderation
from .moderation import load as load_moderation
from .redis_clients import async_client, discover
from .summaries import Summarizer
from .turns import TurnManager, TurnPolicy

log = logging.getLogger("rapport")


class Peer(Protocol):
    """What the runtime needs of an open connection (``server.gateway.Connection``).

    Named here so the runtime does not import the gateway that imports it.
    """

    user_id: str
    session_id: str

    def beat(self, now: float) -> None: ...

    async def close_going_away(self) -> None: ...


def build_engine(settings: Settings) -> Engine:
    """The engine the settings name; heavy imports only for the one chosen."""
    if settings.engine == "simulated":
        from .engines.simulated import SimulatedEngine

        return SimulatedEngine(
            ttft_ms=settings.sim_ttft_ms,
            itl_ms=settings.sim_itl_ms,
            max_num_seqs=settings.sim_max_num_seqs,
            reply_tokens=settings.sim_reply_tokens or None,
            echo=settings.sim_echo,
        )
    if settings.engine == "vllm":
        from .engines.vllm_local import VllmEngine
        from .model_prep import prepare_default_model

        model = settings.model or str(prepare_default_model())
        extra = parse_engine_args(settings.vllm_arg)
        default_cpu = not settings.model
        from .lora_prep import default_lora_dir
        from .model_prep import default_cache_dir

        quiet = settings.log_level.lower() != "debug"
        return VllmEngine(
            model=model,
            max_model_len=settings.max_model_len or (2048 if default_cpu else None),
            dtype=settings.dtype if settings.dtype != "auto" or not default_cpu else "float32",
            engine_args=extra,
            lora_dir=settings.lora_dir or default_lora_dir(),
            enable_lora=settings.enable_lora,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            log_file=(settings.vllm_log or default_cache_dir() / "logs" / "vllm.log") if quiet else None,
        )
    from .engines.remote import RemoteEngine

    return RemoteEngine(upstreams=settings.upstream, model=settings.model or None,
                        max_model_len=settings.max_model_len or None)


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for vLLM's engine arguments; values parsed as Python literals when they can be."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--vllm-arg expects KEY=VALUE, got {shlex.quote(item)}")
        try:
            out[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.replace("-", "_")] = value
    return out


class Runtime:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine = engine if engine is not None else build_engine(settings)
        # One server or a Redis Cluster, as the URL says (server.redis_clients).
        # A blocking pool: under a burst, a command waits briefly for a free
        # connection instead of failing with "too many connections".
        self.redis = async_client(
            settings.redis_url, decode_responses=True, socket_connect_timeout=2.0,
            socket_timeout=10.0, health_check_interval=15, max_connections=512, blocking_pool=True,
        )
        # Blocking stream reads hold a connection each; keep them off the main pool.
        self.blocking_redis = async_client(
            settings.redis_url, decode_responses=True, socket_connect_timeout=2.0,
            socket_timeout=None, max_connections=4096,
        )
        self.keys = KeySpace(settings.redis_prefix)
        self.store = ConversationStore(
            self.redis, self.keys, idempotency_ttl_s=settings.idempotency_ttl_s,
            delta_log_ttl_s=settings.delta_log_ttl_s, blocking_redis=self.blocking_redis,
        )
        # Characters (addition 18): the store for REST writes and listings, the
        # catalog (cached per process, 2 s) for what every turn reads.
        self.character_store = CharacterStore(self.redis, self.keys)
        # The user's pinned facts (addition 22), read by every turn with its history.
        self.facts = FactStore(self.redis, self.keys)
        self.characters = CharacterCatalog(self.character_store)
        # The audit log has a Redis client of its own, so that entries recorded
        # while the runtime shuts down (its main pool closing) still get written.
        self.audit_redis = async_client(settings.redis_url, decode_responses=True,
                                        socket_connect_timeout=2.0, socket_timeout=10.0)
        self.audit = Audit(self.audit_redis, self.keys, retention_days=settings.audit_retention_days)
        # One authenticator per process, shared by the WebSocket, REST, admin and
        # OpenAI endpoints; it records refusals in the audit log.
        self.auth = Authenticator.from_settings(settings, audit=self.audit)
        # Loaded before anything else can fail on it: Settings.validate() has
        # already read the list (or imported the callable) once, to refuse a bad one.
        self.moderation = Moderation(load_moderation(settings), audit=self.audit)
        self.manager = TurnManager(
            store=self.store, engine=self.engine, metrics=self.metrics, moderation=self.moderation,
            policy=TurnPolicy(
                system_prompt=settings.system_prompt,
                max_history_turns=settings.max_history_turns,
                detached_grace_ms=settings.detached_grace_ms,
                hard_deadline_ms=settings.hard_deadline_ms,
                ttft_budget_ms=settings.ttft_budget_ms,
                default_max_tokens=settings.default_max_tokens,
                max_tokens_limit=settings.max_tokens_limit,
                default_temperature=settings.default_temperature,
            ),
        )
        self.coordinator = Coordinator(
            redis=self.redis, pubsub_redis=self.blocking_redis, keys=self.keys, store=self.store,
            owner=self.manager.owner, lease_ms=settings.lease_ms,
            live_turns=self.manager.live_turns, on_control=self.manager.on_control,
        )
        self.manager.coordinator = self.coordinator
        self.manager.characters = self.characters
        # Ratings and choices kept as training snapshots (docs/protocol.md addition 20).
        self.feedback = FeedbackService(self.manager.exchange_snapshot, TrainingLog(self.redis, self.keys))
        self.connections: set[Peer] = set()
        self._engine_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Per-user limits across processes (server.limits) and admission control.
        from .admission import AdmissionController
        from .limits import ConnectionRegistry, TurnRateLimiter

        self.rate_limiter = TurnRateLimiter(self.redis, self.keys, limit=settings.turns_per_minute)
        self.conn_registry = ConnectionRegistry(self.redis, self.keys, cap=settings.max_connections_per_user)
        self.rate_limiter.audit = self.audit
        self.conn_registry.audit = self.audit
        self.admission = AdmissionController(self.engine, settings.ttft_budget_ms,
                                             reply_tokens=settings.default_max_tokens)
        self.manager.reply_observer = self.admission.observe_reply
        # Conversation memory: turns the prompt window trims, folded into a
        # running summary by background engine requests (server.summaries).
        self.summarizer = Summarizer(self.redis, self.keys, self.engine,
                                     instructions=settings.summary_instructions,
                                     max_tokens=settings.summary_max_tokens, metrics=self.metrics,
                                     enabled=settings.memory_summaries)
        self.manager.summarizer = self.summarizer
        self.manager.facts = self.facts
        # Push when a reply ends with nobody following it (docs/protocol.md addition 23).
        from .webhooks import WebhookSender

        self.webhooks = WebhookSender(self.redis, self.keys, default_url=settings.webhook_url or None,
                                      secret=settings.webhook_signing_secret(), metrics=self.metrics,
                                      timeout_s=settings.webhook_timeout_s)
        if self.webhooks.enabled:
            self.manager.end_observers.append(self.webhooks.observe)
        # Connections this process counts in the registry: connection -> user id.
        self._registered: dict[Peer, str] = {}

    async def start(self) -> None:
        try:
            async with asyncio.timeout(2.0):
                await discover(self.redis, self.blocking_redis, self.audit_redis)
        except (RedisClusterException, RedisError, OSError, TimeoutError) as exc:
            # Not fatal, as with one server: readiness says Redis is down, and
            # each client reads the slot map on its first command.
            log.warning("could not read the Redis Cluster's slot map: %r", exc)
        self.audit.start()
        try:
            async with asyncio.timeout(2.0):
                await self.store.load_scripts()
        except (Unavailable, TimeoutError) as exc:
            # Not fatal: redis-py loads a script the server lacks on first use.
            log.warning("could not preload the Lua scripts: %r", exc)
        if self.auth.keys is not None:
            await self.auth.keys.start()
        # The engine warms up in the background: /healthz answers at once and
        # /readyz turns true when the warm-up generation has completed.
        self._engine_task = asyncio.get_running_loop().create_task(self._start_engine(), name="engine start")
        self.conn_registry.start(self._registered_pairs)
        self.coordinator.start()
        self.webhooks.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_heartbeats(), name="heartbeats")

    async def _sweep_heartbeats(self) -> None:
        s = self.settings
        tick = max(0.05, min(1.0, s.heartbeat_interval_ms / 4000.0, s.heartbeat_timeout_ms / 4000.0,
                             s.stuck_timeout_ms / 4000.0))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.beat(now)

    async def _start_engine(self) -> None:
        log.info("starting engine %s (%s)", self.engine.model_name, type(self.engine).__name__)
        await self.engine.start()
        # Everything loaded so far (the engine, its libraries) lives as long as
        # the process: move it out of the collector's sight, so that full
        # collections no longer walk it and pause every stream for tens of ms.
        gc.freeze()
        log.info("engine ready: %s", self.engine.model_name)

    async def wait_engine(self) -> None:
        if self._engine_task is not None:
            await self._engine_task

    async def going_away(self) -> None:
        """Shutdown begins: close every socket with 1001 so clients reconnect elsewhere."""
        for conn in list(self.connections):
            await conn.close_going_away()
        # Let the senders flush the close frames before the server drops the sockets.
        for _ in range(50):
            if not self.connections:
                break
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.going_away()
        await self.manager.close(drain_s=self.settings.shutdown_drain_s)
        # Pending folds are background work: cancelled (their engine requests
        # aborted) before the engine and Redis go; the next trim folds again.
        await self.summarizer.close()
        await self.coordinator.close()
        # After the drain (turns ending in it may still queue an event), before Redis closes.
        await self.webhooks.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._engine_task is not None and not self._engine_task.done():
            self._engine_task.cancel()
            await asyncio.gather(self._engine_task, return_exceptions=True)
        await self.engine.close()
        await self.conn_registry.close(self._registered_pairs())
        self._registered.clear()
        await self.redis.aclose()
        await self.blocking_redis.aclose()
        if self.auth.keys is not None:
            await self.auth.keys.close()
        await self.audit.close()
        await self.audit_redis.aclose()

    async def ready(self) -> dict[str, bool]:
        try:
            await self.store.ping()
            redis_ok = True
        except Exception:  # noqa: BLE001 - readiness reports any failure as not ready
            redis_ok = False
        engine_task_failed = (self._engine_task is not None and self._engine_task.done()
                              and not self._engine_task.cancelled()
                              and self._engine_task.exception() is not None)
        return {"engine": self.engine.ready and not engine_task_failed, "redis": redis_ok}

    # ------------------------------------------------------------ hooks for limits

    async def connection_opened(self, conn: Peer, timeout_s: float = 1.5) -> int | None:
        """Admit an authenticated connection; a close code refuses it.

        Over the per-user cap (counted across every process sharing Redis):
        4429. When Redis cannot be reached the connection is admitted untracked
        rather than refused; the periodic refresh records it once Redis is back.
        """
        from protocol.errors import Unavailable

        try:
            async with asyncio.timeout(timeout_s):
                admitted = await self.conn_registry.add(conn.user_id, conn.session_id)
            if not admitted:
                log.info("user %s is over %d connections; closing 4429", conn.user_id,
                         self.conn_registry.cap)
                return close_codes.TOO_MANY_CONNECTIONS
        except (Unavailable, TimeoutError) as exc:
            log.warning("connection cap not checked (Redis unavailable): %r", exc)
        self._registered[conn] = conn.user_id
        self.metrics.connections.inc()
        return None

    async def connection_closed(self, conn: Peer) -> None:
        user_id = self._registered.pop(conn, None)
        if user_id is None:
            return  # refused with 4429: never counted
        self.metrics.connections.dec()
        try:
            await self.conn_registry.remove(user_id, conn.session_id)
        except Exception as exc:  # noqa: BLE001 - the entry expires on its own
            log.debug("could not remove connection %s: %r", conn.session_id, exc)

    def _registered_pairs(self) -> list[tuple[str, str]]:
        return [(user_id, conn.session_id) for conn, user_id in self._registered.items()]

    async def admit_turn(self, user_id: str, prompt_tokens: int | None = None,
                         client_turn_id: str | None = None) -> None:
        """Rate limits and admission control for a new turn or completion request.

        Raises Unavailable, RateLimited or Busy to refuse; the WebSocket and the
        OpenAI-compatible endpoint both call it. ``prompt_tokens``: the prompt's
        size if known (else a typical size is assumed). ``client_turn_id``: when
        given, a re-sent turn.start of an id the user already used (a replay,
        no new generation) passes without counting against either limit.
        """
        from protocol.errors import Busy, RateLimited, Unavailable

        if not self.engine.ready:
            raise Unavailable("the model is still warming up; retry shortly", retry_after_ms=1000)
        try:
            permit = await self.rate_limiter.check(user_id, client_turn_id=client_turn_id)
        except RateLimited:
            self.metrics.refused("rate_limited")
            raise
        if permit.replay:
            return
        try:
            self.admission.check(prompt_tokens)
        except Busy:
            self.metrics.refused("busy")
            # A turn refused for the server's load does not use up the user's rate.
            try:
                await self.rate_limiter.refund(permit)
            except Exception as exc:  # noqa: BLE001 - at worst the start stays counted
                log.debug("could not refund a rate permit: %r", exc)
            raise
