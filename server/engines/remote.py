"""The remote engine (``--engine remote``): turns streamed from a pool of vLLM OpenAI servers.

:class:`RemoteEngine` streams each turn from one of several vLLM OpenAI
servers (``python -m vllm.entrypoints.openai.api_server ...``) over HTTP. The
pieces it puts together:

- :mod:`server.engines.replicas`: the pool, its health state and the
  user-sticky rendezvous routing (a user stays on the replica whose prefix
  cache holds the conversation);
- :mod:`server.engines.replica_health`: the health task that checks, warms up
  and scrapes the replicas;
- :mod:`server.engines.chat_completions`: one streamed chat completion from
  one replica;
- :mod:`server.engines.chat_template`: exact token counts, when the model's
  tokenizer is on this machine.

Failover
--------
If the chosen replica fails *before any text was produced* (connection
refused, 5xx), the request moves on to the next replica in the user's order
without the caller noticing; after text was produced the turn fails with
:class:`protocol.errors.EngineError` (the turn manager ends it ``interrupted``
and keeps the partial reply). Either way the failed replica is marked down
until its next passing health check.

Streams and aborts
------------------
Each request runs in a small pump task that reads the server-sent events and
hands text to the consumer of :meth:`RemoteEngine.generate`. Closing that
generator (``aclose()``), cancelling its consumer, or :meth:`RemoteEngine.abort`
cancels the pump, which closes the HTTP response; vLLM sees the disconnect and
aborts the request, freeing its batch slot. An aborted request's generator
returns without an :class:`EngineFinish`.

LoRA adapters
-------------
A request with ``lora`` names the adapter as the completion's ``model``;
start the replicas with ``--enable-lora --lora-modules NAME=PATH ...`` (the
same names on every replica). An adapter a replica does not serve (404) fails
that request alone with :class:`protocol.errors.BadRequest`, without marking
the replica down or trying the others.

Token counting
--------------
:meth:`Engine.count_tokens` is synchronous, so it cannot ask the server's
``POST /tokenize``. When ``transformers`` can load the model's tokenizer from
a local folder (the ``model`` argument, or the ``root`` path a replica reports
in its model card when that folder exists here) or from the local Hugging Face
cache (never from the network), the engine keeps it and counts exactly with the
model's chat template. Otherwise it falls back to the base class's estimate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from protocol.errors import BadRequest, EngineError, RapportError, Unavailable
from server.engines.base import (
    Engine,
    EngineDelta,
    EngineEvent,
    EngineFinish,
    EngineLoad,
    EngineRequest,
    SamplingOptions,
    finish_reason_from_vllm,
)
from server.engines.chat_completions import (
    UpstreamFailed,
    chat_completion_body,
    stream_chat_completion,
)
from server.engines.chat_template import ChatTemplate, load_local_chat_template
from server.engines.latency import RecentLatency
from server.engines.replica_health import ReplicaMonitor
from server.engines.replicas import Replica, ReplicaPool, ServedModel
from server.lora_prep import is_valid_name
from sessions.messages import ChatMessage

log = logging.getLogger(__name__)

#: Batch capacity assumed per replica when the caller gives none (vLLM's default).
DEFAULT_MAX_NUM_SEQS = 256


class _Stream:
    """One request in flight: what the pump task hands to the generator."""

    __slots__ = (
        "aborted",
        "cancelled",
        "chunks",
        "done",
        "error",
        "event",
        "finish",
        "key",
        "pieces",
        "produced",
        "replica",
        "request",
        "t_first",
        "t_last",
        "t_start",
        "task",
        "tokens",
    )

    def __init__(self, request: EngineRequest, key: str) -> None:
        self.request = request
        self.key = key
        self.replica: Replica | None = None
        self.pieces: list[str] = []
        self.tokens = 0  # tokens not yet handed out in a delta
        self.produced = False  # any text went to the consumer's queue
        self.finish: EngineFinish | None = None
        self.error: RapportError | None = None
        self.aborted = False
        self.done = False
        self.event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.t_start = 0.0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.chunks = 0  # token-bearing chunks of the current attempt

    def stop(self) -> asyncio.Task[None] | None:
        """Cancel the pump (closing its HTTP response); the task to await, if still running.

        Cancels at most once: a second cancel would interrupt httpx while it
        closes the connection and leave it open (and vLLM still generating).
        """
        task = self.task
        if task is None or task.done():
            return None
        if not self.cancelled:
            self.cancelled = True
            task.cancel()
        return task

    def interrupt(self, error: RapportError | None) -> asyncio.Task[None] | None:
        """End the request for its consumer: aborted (``error`` None) or failed with ``error``.

        A request that already finished or failed keeps that outcome. Stops
        the pump and wakes the consumer; returns the pump task to await.
        """
        if self.finish is None and self.error is None:
            if error is None:
                self.aborted = True
            else:
                self.error = error
        task = self.stop()
        self.event.set()
        return task

    def on_token(self, text: str) -> None:
        self.chunks += 1
        self.tokens += 1
        if text:
            self.push(text)

    def push(self, text: str) -> None:
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.pieces.append(text)
        self.produced = True
        self.event.set()


class RemoteEngine(Engine):
    """OpenAI-compatible vLLM servers behind user-sticky rendezvous routing.

    Args:
        upstreams: base URLs of the replicas.
        model: the served model name to request (or the model folder a replica
            reports as its card's ``root``); default: the first model the
            replicas list. A local folder is also where the tokenizer is loaded from.
        max_model_len: context window override (capped by what the replicas report).
        health_interval_s: seconds between two health checks of a replica.
        request_timeout_s: longest wait for the next chunk of a stream.
        connect_timeout_s: TCP connect timeout for every call.
        api_key: sent as ``Authorization: Bearer`` (vLLM's ``--api-key``).
        max_num_seqs: batch capacity of one replica, for :meth:`load`.
        scrape_metrics: also read ``/metrics`` in the health loop.
        start_timeout_s: :meth:`start` gives up (``Unavailable``) after this
            long without a routable replica; None waits as long as it takes.
    """

    def __init__(
        self,
        upstreams: list[str],
        model: str | None = None,
        max_model_len: int | None = None,
        health_interval_s: float = 2.0,
        request_timeout_s: float = 600,
        connect_timeout_s: float = 2.0,
        api_key: str | None = None,
        *,
        max_num_seqs: int | None = None,
        scrape_metrics: bool = True,
        start_timeout_s: float | None = None,
    ) -> None:
        self._pool = ReplicaPool(upstreams)
        if health_interval_s <= 0 or request_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("intervals and timeouts must be positive")
        self._model = ServedModel(model)
        self._max_model_len_arg = max_model_len or None
        if max_model_len:
            self.max_model_len = int(max_model_len)
        self.model_name = model or "remote"
        self.health_interval_s = float(health_interval_s)
        self.request_timeout_s = float(request_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._max_num_seqs = int(max_num_seqs or DEFAULT_MAX_NUM_SEQS)
        self._start_timeout_s = start_timeout_s
        self._monitor = ReplicaMonitor(
            self._pool,
            self._model,
            warm_up=self._warm_up,
            on_model_card=self._adopt_model_card,
            interval_s=self.health_interval_s,
            connect_timeout_s=self.connect_timeout_s,
            scrape_metrics=bool(scrape_metrics),
        )

        self._client: httpx.AsyncClient | None = None
        self._started = False
        self._closed = False
        self._template: ChatTemplate | None = None
        #: Where the local tokenizer came from (None: token counts are estimates).
        self.tokenizer_source: str | None = None

        self._streams: dict[str, set[_Stream]] = {}
        self._latency = RecentLatency()
        #: Seconds :meth:`start` took, for logs and tests.
        self.start_seconds: float | None = None

    @property
    def replicas(self) -> list[Replica]:
        return self._pool.replicas

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._started and not self._closed and self._pool.any_routable()

    async def start(self) -> None:
        """Discover the model, start the health task, warm up; returns once a replica is routable."""
        if self._started:
            return
        t0 = time.monotonic()
        self._closed = False
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers,
                timeout=httpx.Timeout(self.request_timeout_s, connect=self.connect_timeout_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                # Upstreams are internal addresses: never through an HTTP proxy from the environment.
                trust_env=False,
            )
        self._monitor.start(self._client)
        waited = asyncio.ensure_future(self._monitor.routable.wait())
        try:
            while True:
                budget = 15.0
                if self._start_timeout_s is not None:
                    budget = min(budget, self._start_timeout_s - (time.monotonic() - t0))
                    if budget <= 0:
                        raise Unavailable(
                            f"no upstream became ready in {self._start_timeout_s:.0f}s: "
                            + self._pool.describe("starting")
                        )
                done, _ = await asyncio.wait({waited}, timeout=budget)
                if done:
                    break
                log.info("remote engine waiting for an upstream: %s", self._pool.describe("warming up"))
        finally:
            waited.cancel()
        # Loading a tokenizer reads files for a while: not on the event loop.
        self._use_chat_template(await asyncio.to_thread(
            load_local_chat_template, (self._model.requested, self._model.root, self._model.served_name)
        ))
        self._started = True
        self.start_seconds = time.monotonic() - t0
        log.info(
            "remote engine ready: model=%s max_model_len=%d routable=%s tokenizer=%s in %.1fs",
            self.model_name, self.max_model_len,
            [r.url for r in self._pool if r.routable],
            "local" if self._template is not None else "estimate", self.start_seconds,
        )

    async def close(self) -> None:
        """Stop the health task, fail open streams with EngineError, close the HTTP client."""
        self._closed = True
        self._started = False
        closing = EngineError("the remote engine is closing")
        pumps = [st.interrupt(closing) for streams in list(self._streams.values()) for st in streams]
        await self._monitor.close()
        await _wait_all(pumps)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _adopt_model_card(self) -> None:
        """A replica's model card matched: take its served name and the pool's context window."""
        if self._model.served_name is not None:
            self.model_name = self._model.served_name
        max_model_len = self._pool.max_model_len(self._max_model_len_arg)
        if max_model_len:
            self.max_model_len = max_model_len

    async def _warm_up(self, replica: Replica) -> None:
        """One short generation on ``replica`` (the health monitor's warm-up); raises UpstreamFailed."""
        request = EngineRequest(
            request_id=f"rapport-warmup-{time.monotonic_ns()}",
            messages=(ChatMessage("user", "Say hello."),),
            sampling=SamplingOptions(temperature=0.0, max_tokens=2),
        )
        await self._attempt(replica, _Stream(request, key=""))

    # ------------------------------------------------------------------ routing

    def _key(self, request: EngineRequest) -> str:
        return request.user_id or request.request_id

    def preference(self, user_id: str) -> list[str]:
        """Every replica URL, from this user's most to least preferred (health ignored)."""
        return self._pool.preference(user_id)

    def replica_for(self, user_id: str) -> str | None:
        """The replica this user's next turn goes to (None when none is routable)."""
        replica = self._pool.pick(user_id)
        return replica.url if replica is not None else None

    def served_by(self, request_id: str) -> str | None:
        """The replica that served (or is serving) a recent request."""
        return self._pool.served_by(request_id)

    def request_counts(self) -> dict[str, int]:
        """Generation requests sent to each replica (warm-ups excluded)."""
        return self._pool.request_counts()

    def replica_stats(self) -> list[dict[str, Any]]:
        return self._pool.snapshots()

    # ------------------------------------------------------------------ LoRA

    def check_lora(self, name: str | None) -> None:
        """Refuses only a malformed name: which adapters the replicas serve is
        learnt from their answer (404 becomes BadRequest in :meth:`generate`)."""
        if name is not None and not is_valid_name(name):
            raise BadRequest(f"unknown LoRA adapter {name[:64]!r}")

    # ------------------------------------------------------------------ tokens

    def _use_chat_template(self, loaded: tuple[ChatTemplate, str] | None) -> None:
        if loaded is None:
            log.info("no local tokenizer for %s; token counts are estimates", self.model_name)
            return
        self._template, self.tokenizer_source = loaded
        log.info("remote engine counts tokens with the tokenizer from %s", self.tokenizer_source)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Exact with a locally loaded tokenizer, else the base class's estimate."""
        template = self._template
        if template is None:
            return super().count_tokens(messages)
        try:
            return template.count_tokens(messages)
        except Exception:
            log.debug("chat template failed; estimating tokens", exc_info=True)
            return super().count_tokens(messages)

    # ------------------------------------------------------------------ generation

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Stream one reply from the user's replica; see the module docstring."""
        if not self._started or self._closed or self._client is None:
            raise EngineError("the remote engine is not running")
        st = _Stream(request, self._key(request))
        st.t_start = time.monotonic()
        self._streams.setdefault(request.request_id, set()).add(st)
        st.task = asyncio.get_running_loop().create_task(
            self._pump(st), name=f"remote-engine {request.request_id}"
        )
        try:
            while True:
                if st.pieces:
                    text = "".join(st.pieces)
                    n = max(1, st.tokens)
                    st.pieces.clear()
                    st.tokens = 0
                    yield EngineDelta(text, n)
                    continue
                if st.finish is not None:
                    yield st.finish
                    return
                if st.error is not None:
                    raise st.error
                if st.aborted or st.done:
                    return
                st.event.clear()
                await st.event.wait()
        finally:
            streams = self._streams.get(request.request_id)
            if streams is not None:
                streams.discard(st)
                if not streams:
                    self._streams.pop(request.request_id, None)
            # Cancelling the pump closes the HTTP response: vLLM aborts the request.
            await _wait_all([st.stop()])

    async def abort(self, request_id: str) -> None:
        """Close the request's upstream stream; its generator returns without a finish."""
        await _wait_all([st.interrupt(None) for st in list(self._streams.get(request_id, ()))])

    async def _pump(self, st: _Stream) -> None:
        """Run the request on the user's replica, moving on while nothing was produced."""
        tried: set[str] = set()
        try:
            while True:
                replica = self._pool.pick(st.key, tried)
                if replica is None:
                    detail = self._pool.describe("not ready", unroutable_only=True)
                    st.error = EngineError(f"no upstream can take the request ({detail})")
                    return
                tried.add(replica.url)
                replica.requests += 1
                self._pool.remember(st.request.request_id, replica.url)
                try:
                    await self._attempt(replica, st)
                except UpstreamFailed as exc:
                    if exc.down:
                        replica.failures += 1
                        self._pool.mark_down(replica, str(exc))
                    lora = st.request.lora
                    if exc.status in (400, 404) and lora is not None and not st.produced:
                        # vLLM answers a model (adapter) name it does not serve with 404.
                        st.error = BadRequest(f"unknown LoRA adapter {lora!r} ({exc})")
                        return
                    if exc.down and not st.produced:
                        log.info("request %s: %s failed before any output (%s); trying the next upstream",
                                 st.request.request_id, replica.url, exc)
                        continue
                    st.error = EngineError(f"upstream {replica.url} failed: {exc}")
                    return
                if st.finish is not None:
                    self._latency.add_stream(st.t_start, st.t_first, st.t_last, st.finish.completion_tokens)
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s: remote stream failed", st.request.request_id)
            st.error = EngineError(f"remote stream failed: {exc}")
        finally:
            st.done = True
            st.event.set()

    async def _attempt(self, replica: Replica, st: _Stream) -> None:
        """Stream the request from one replica into ``st``; sets ``st.finish`` on success.

        Raises UpstreamFailed. Cancellation closes the response.
        """
        client = self._client
        if client is None:
            raise UpstreamFailed("the remote engine is closed", down=False)
        st.replica = replica
        st.chunks = 0
        if not st.produced:
            st.tokens = 0  # empty chunks of a failed earlier attempt
        body = chat_completion_body(st.request, self._model.request_name)
        with replica.stream_open():
            end = await stream_chat_completion(client, replica.url, body, st)
        if end.connection_error is not None:
            self._pool.mark_down(replica, f"connection lost after the reply: {end.connection_error}")
        if end.given_up:
            # Not the replica's fault: only this request failed.
            raise UpstreamFailed(f"the upstream ended the request ({end.finish_reason})", down=False)
        st.finish = EngineFinish(
            finish_reason=finish_reason_from_vllm(end.finish_reason),
            prompt_tokens=end.prompt_tokens if end.prompt_tokens is not None
            else self.count_tokens(st.request.messages),
            completion_tokens=end.completion_tokens if end.completion_tokens is not None else st.chunks,
            cached_prompt_tokens=end.cached_prompt_tokens,
            engine_ttft_ms=(st.t_first - st.t_start) * 1000.0 if st.t_first is not None else None,
        )
        st.event.set()

    # ------------------------------------------------------------------ load

    def load(self) -> EngineLoad:
        """Requests in flight over the routable replicas.

        ``running`` per replica is this engine's open streams (always current)
        plus what other clients ran there at the last ``/metrics`` scrape
        (``vllm:num_requests_running`` minus this engine's streams at that
        moment); ``waiting`` is the scraped ``vllm:num_requests_waiting`` (0 when
        unknown). Scraped numbers older than three health intervals are ignored.
        ``max_num_seqs`` is the per-replica capacity times the number of
        routable replicas.
        """
        scraped_max_age_s = 3 * self.health_interval_s + 1.0 if self._monitor.scrape_metrics else None
        pool = self._pool.load(time.monotonic(), scraped_max_age_s)
        return EngineLoad(
            running=pool.running,
            waiting=pool.waiting,
            max_num_seqs=self._max_num_seqs * max(1, pool.routable),
            recent_ttft_ms=self._latency.ttft_ms(),
            recent_itl_ms=self._latency.itl_ms(),
        )

    def inflight(self) -> int:
        """Streams this engine has open right now."""
        return self._pool.inflight()


async def _wait_all(tasks: Sequence[asyncio.Task[None] | None]) -> None:
    """Wait until every one of ``tasks`` (None: nothing to wait for) has ended."""
    running = {task for task in tasks if task is not None}
    if running:
        await asyncio.wait(running)
