"""A pool of OpenAI-compatible vLLM servers (``--engine remote``).

:class:`RemoteEngine` streams each turn from one of several vLLM OpenAI
servers (``python -m vllm.entrypoints.openai.api_server ...``) over HTTP.

Replicas
--------
Upstream URLs are base URLs (``http://10.0.0.5:8000``, with or without a
trailing ``/v1``). Start the replicas with ``--enable-prompt-tokens-details``:
without it vLLM leaves ``usage.prompt_tokens_details.cached_tokens`` out and
every turn reports 0 cached prompt tokens. Every replica must serve the same
model under the same served name.

Health
------
One background task owned by the engine checks every replica each
``health_interval_s``: ``GET /health`` (200 = up), and, once, ``GET /v1/models``
for the served model name and its ``max_model_len``. A replica is *routable*
when its last health check passed, its model card matched and it has finished
one warm-up generation (a few tokens, once per replica). A request that fails
on a replica (connection refused or reset, 5xx, a stream cut short, an error
event) marks that replica down at once; the next passing health check brings
it back. The same task scrapes ``/metrics`` (``vllm:num_requests_running``,
``vllm:num_requests_waiting``) so :meth:`RemoteEngine.load` also sees requests
other gateways sent. A replica that stops answering while streams are open is
not cut off by the health check: those streams end with their own transport
error or read timeout (``request_timeout_s`` between two chunks).

Routing
-------
Rendezvous (highest-random-weight) hashing on the request's ``user_id``
(``request_id`` when there is none): every replica gets the weight
``blake2b(user_id, replica URL)`` and the user's turns go to the routable
replica with the highest weight. A user therefore stays on one replica, whose
prefix cache holds the conversation so far, for as long as it is up; when it
is down the user's turns go to the next-highest routable replica, and come
back once it recovers. Adding or losing a replica only moves that replica's
users. If the chosen replica fails *before any text was produced* (connection
refused, 5xx), the request moves on to the next replica in the user's order
without the caller noticing; after text was produced the turn fails with
:class:`protocol.errors.EngineError` (the turn manager ends it ``interrupted``
and keeps the partial reply).

Streams and aborts
------------------
Each request runs in a small pump task that reads the server-sent events and
hands text to the consumer of :meth:`RemoteEngine.generate`. Closing that
generator (``aclose()``), cancelling its consumer, or :meth:`RemoteEngine.abort`
cancels the pump, which closes the HTTP response; vLLM sees the disconnect and
aborts the request, freeing its batch slot. An aborted request's generator
returns without an :class:`EngineFinish`.

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
import hashlib
import json
import logging
import os
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from protocol.errors import EngineError, Unavailable
from server.engines.base import (
    Engine,
    EngineDelta,
    EngineEvent,
    EngineFinish,
    EngineLoad,
    EngineRequest,
    SamplingOptions,
)
from sessions.messages import ChatMessage

log = logging.getLogger(__name__)

#: How many recent requests the TTFT / inter-token medians cover.
RECENT_WINDOW = 64
#: Batch capacity assumed per replica when the caller gives none (vLLM's default).
DEFAULT_MAX_NUM_SEQS = 256
#: How many request -> replica records :meth:`RemoteEngine.served_by` keeps.
ROUTING_MEMORY = 4096
#: Longest a warm-up generation may take on a cold CPU replica.
WARMUP_TIMEOUT_S = 180.0


def normalize_upstream(url: str) -> str:
    """``http://host:port[/prefix][/v1][/]`` -> ``http://host:port[/prefix]``."""
    base = url.strip().rstrip("/")
    if not base:
        raise ValueError("an upstream URL is empty")
    if "://" not in base:
        base = "http://" + base
    base = base.removesuffix("/v1")
    return base


def rendezvous_weight(key: str, replica: str) -> int:
    """The stable highest-random-weight score of ``replica`` for ``key``."""
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogatepass") + b"\x00" + replica.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """``replicas`` from the key's most to least preferred."""
    return sorted(replicas, key=lambda r: (rendezvous_weight(key, r), r), reverse=True)


class _UpstreamFailed(Exception):
    """One attempt on one replica failed; ``down`` says whether to blame the replica."""

    def __init__(self, message: str, *, down: bool) -> None:
        super().__init__(message)
        self.down = down


class Replica:
    """One upstream vLLM server, as this engine sees it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.healthy = False
        self.model_ok = False  # its model card listed the served model
        self.warmed = False
        self.max_model_len: int | None = None
        self.last_error: str | None = None
        self.down_since: float | None = time.monotonic()
        self.requests = 0  # generation requests routed here (warm-up excluded)
        self.failures = 0
        self.inflight = 0  # this engine's open streams on the replica
        self.upstream_running: int | None = None  # from /metrics
        self.upstream_waiting: int | None = None
        self.others_running: int | None = None  # upstream_running minus ours, at the scrape
        self.metrics_at = 0.0
        self.warm_task: asyncio.Task[None] | None = None

    @property
    def routable(self) -> bool:
        return self.healthy and self.model_ok and self.warmed

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "routable": self.routable,
            "healthy": self.healthy,
            "warmed": self.warmed,
            "requests": self.requests,
            "failures": self.failures,
            "inflight": self.inflight,
            "upstream_running": self.upstream_running,
            "upstream_waiting": self.upstream_waiting,
            "others_running": self.others_running,
            "last_error": self.last_error,
        }


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
        self.error: EngineError | None = None
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

    def push(self, text: str) -> None:
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.pieces.append(text)
        self.produced = True
        self.event.set()


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


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
        urls = list(dict.fromkeys(normalize_upstream(u) for u in upstreams))
        if not urls:
            raise ValueError("the remote engine needs at least one upstream URL")
        if health_interval_s <= 0 or request_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("intervals and timeouts must be positive")
        self.replicas: list[Replica] = [Replica(u) for u in urls]
        self._by_url = {r.url: r for r in self.replicas}
        self._model_arg = model or None
        self._served_name: str | None = None
        self._model_root: str | None = None
        self._max_model_len_arg = max_model_len or None
        if max_model_len:
            self.max_model_len = int(max_model_len)
        self.model_name = model or "remote"
        self.health_interval_s = float(health_interval_s)
        self.request_timeout_s = float(request_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._max_num_seqs = int(max_num_seqs or DEFAULT_MAX_NUM_SEQS)
        self._scrape = bool(scrape_metrics)
        self._start_timeout_s = start_timeout_s

        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._routable_event: asyncio.Event | None = None
        self._started = False
        self._closed = False
        self._tokenizer: Any = None
        #: Where the local tokenizer came from (None: token counts are estimates).
        self.tokenizer_source: str | None = None
        self._thinking_switch = False

        self._streams: dict[str, set[_Stream]] = {}
        self._served_by: OrderedDict[str, str] = OrderedDict()
        self._recent_ttft_ms: deque[float] = deque(maxlen=RECENT_WINDOW)
        self._recent_itl_ms: deque[float] = deque(maxlen=RECENT_WINDOW)
        #: Seconds :meth:`start` took, for logs and tests.
        self.start_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._started and not self._closed and any(r.routable for r in self.replicas)

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
        self._routable_event = asyncio.Event()
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(
                self._health_loop(), name="remote-engine-health"
            )
        waited = asyncio.ensure_future(self._routable_event.wait())
        try:
            while True:
                budget = 15.0
                if self._start_timeout_s is not None:
                    budget = min(budget, self._start_timeout_s - (time.monotonic() - t0))
                    if budget <= 0:
                        raise Unavailable(
                            f"no upstream became ready in {self._start_timeout_s:.0f}s: "
                            + "; ".join(f"{r.url}: {r.last_error or 'starting'}" for r in self.replicas)
                        )
                done, _ = await asyncio.wait({waited}, timeout=budget)
                if done:
                    break
                log.info("remote engine waiting for an upstream: %s",
                         "; ".join(f"{r.url}: {r.last_error or 'warming up'}" for r in self.replicas))
        finally:
            waited.cancel()
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer)
        self._started = True
        self.start_seconds = time.monotonic() - t0
        log.info(
            "remote engine ready: model=%s max_model_len=%d routable=%s tokenizer=%s in %.1fs",
            self.model_name, self.max_model_len,
            [r.url for r in self.replicas if r.routable],
            "local" if self._tokenizer is not None else "estimate", self.start_seconds,
        )

    async def close(self) -> None:
        """Stop the health task, fail open streams with EngineError, close the HTTP client."""
        self._closed = True
        self._started = False
        tasks: list[asyncio.Task[Any]] = []
        owned = [self._health_task, *(r.warm_task for r in self.replicas)]
        self._health_task = None
        for r in self.replicas:
            r.warm_task = None
        for task in owned:
            if task is not None and not task.done():
                task.cancel()
                tasks.append(task)
        for streams in list(self._streams.values()):
            for st in streams:
                if st.error is None and st.finish is None:
                    st.error = EngineError("the remote engine is closing")
                task = st.stop()
                if task is not None:
                    tasks.append(task)
                st.event.set()
        if tasks:
            await asyncio.wait(tasks)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ routing

    def _key(self, request: EngineRequest) -> str:
        return request.user_id or request.request_id

    def preference(self, user_id: str) -> list[str]:
        """Every replica URL, from this user's most to least preferred (health ignored)."""
        return rendezvous_order(user_id, [r.url for r in self.replicas])

    def replica_for(self, user_id: str) -> str | None:
        """The replica this user's next turn goes to (None when none is routable)."""
        for url in self.preference(user_id):
            if self._by_url[url].routable:
                return url
        return None

    def served_by(self, request_id: str) -> str | None:
        """The replica that served (or is serving) a recent request."""
        return self._served_by.get(request_id)

    def request_counts(self) -> dict[str, int]:
        """Generation requests sent to each replica (warm-ups excluded)."""
        return {r.url: r.requests for r in self.replicas}

    def replica_stats(self) -> list[dict[str, Any]]:
        return [r.snapshot() for r in self.replicas]

    def _pick(self, key: str, tried: set[str]) -> Replica | None:
        for url in rendezvous_order(key, [r.url for r in self.replicas]):
            replica = self._by_url[url]
            if url not in tried and replica.routable:
                return replica
        return None

    def _mark_down(self, replica: Replica, reason: str) -> None:
        replica.last_error = reason
        if replica.healthy:
            replica.healthy = False
            replica.down_since = time.monotonic()
            log.warning("upstream %s marked down: %s", replica.url, reason)

    def _mark_up(self, replica: Replica) -> None:
        if not replica.healthy:
            replica.healthy = True
            replica.last_error = None
            was = replica.down_since
            replica.down_since = None
            if replica.routable:
                log.info("upstream %s is up%s", replica.url,
                         f" after {time.monotonic() - was:.1f}s down" if was else "")

    # ------------------------------------------------------------------ health

    async def _health_loop(self) -> None:
        while True:
            try:
                await asyncio.gather(*(self._check(r) for r in self.replicas))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("remote engine health round failed")
            await asyncio.sleep(self.health_interval_s)

    async def _check(self, replica: Replica) -> None:
        client = self._client
        if client is None:
            return
        timeout = httpx.Timeout(max(5.0, self.connect_timeout_s), connect=self.connect_timeout_s)
        try:
            resp = await client.get(replica.url + "/health", timeout=timeout)
            if resp.status_code != 200:
                raise _UpstreamFailed(f"/health answered {resp.status_code}", down=True)
            if not replica.model_ok:
                await self._discover(replica, timeout)
        except (httpx.HTTPError, _UpstreamFailed, ValueError) as exc:
            self._mark_down(replica, _describe(exc))
            return
        self._mark_up(replica)
        if not replica.warmed and (replica.warm_task is None or replica.warm_task.done()):
            replica.warm_task = asyncio.get_running_loop().create_task(
                self._warm_up(replica), name=f"remote-engine-warmup {replica.url}"
            )
        if self._scrape:
            await self._scrape_metrics(replica, timeout)

    async def _discover(self, replica: Replica, timeout: httpx.Timeout) -> None:
        """Read the replica's model card; pick the served name if not chosen yet."""
        assert self._client is not None
        resp = await self._client.get(replica.url + "/v1/models", timeout=timeout)
        if resp.status_code != 200:
            raise _UpstreamFailed(f"/v1/models answered {resp.status_code}", down=True)
        cards = [c for c in resp.json().get("data") or () if isinstance(c, dict) and c.get("id")]
        if not cards:
            raise _UpstreamFailed("/v1/models lists no model", down=True)
        card = self._match_card(cards)
        if card is None:
            names = ", ".join(str(c["id"]) for c in cards)
            raise _UpstreamFailed(
                f"serves {names}, not {self._served_name or self._model_arg}", down=True
            )
        if self._served_name is None:
            self._served_name = str(card["id"])
            self.model_name = self._served_name
            root = card.get("root")
            self._model_root = str(root) if root else None
        card_len = card.get("max_model_len")
        if isinstance(card_len, int) and card_len > 0:
            replica.max_model_len = card_len
        self._update_max_model_len()
        replica.model_ok = True
        log.info("upstream %s serves %s (max_model_len=%s)", replica.url, card["id"],
                 replica.max_model_len)

    def _match_card(self, cards: list[dict[str, Any]]) -> dict[str, Any] | None:
        wanted = self._served_name or self._model_arg
        if wanted is None:
            return cards[0]
        for card in cards:
            if card["id"] == wanted:
                return card
        if self._served_name is None:
            # A model folder given as --model: match the card's root path.
            norm = os.path.normpath(wanted)
            for card in cards:
                root = card.get("root")
                if root and os.path.normpath(str(root)) == norm:
                    return card
        return None

    def _update_max_model_len(self) -> None:
        lens = [r.max_model_len for r in self.replicas if r.max_model_len]
        if self._max_model_len_arg:
            lens.append(self._max_model_len_arg)
        if lens:
            self.max_model_len = min(lens)

    async def _warm_up(self, replica: Replica) -> None:
        request = EngineRequest(
            request_id=f"rapport-warmup-{time.monotonic_ns()}",
            messages=(ChatMessage("user", "Say hello."),),
            sampling=SamplingOptions(temperature=0.0, max_tokens=2),
        )
        st = _Stream(request, key="")
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._attempt(replica, st), WARMUP_TIMEOUT_S)
        except (_UpstreamFailed, TimeoutError) as exc:
            self._mark_down(replica, f"warm-up failed: {_describe(exc)}")
            return
        except Exception as exc:
            log.exception("warm-up on %s failed", replica.url)
            self._mark_down(replica, f"warm-up failed: {_describe(exc)}")
            return
        replica.warmed = True
        log.info("upstream %s warmed up in %.2fs", replica.url, time.monotonic() - t0)
        if replica.routable and self._routable_event is not None:
            self._routable_event.set()

    async def _scrape_metrics(self, replica: Replica, timeout: httpx.Timeout) -> None:
        assert self._client is not None
        try:
            resp = await self._client.get(replica.url + "/metrics", timeout=timeout)
            if resp.status_code != 200:
                return
            running, waiting = parse_vllm_load(resp.text)
        except httpx.HTTPError:
            return
        replica.upstream_running = running
        replica.upstream_waiting = waiting
        # What other clients run there; this engine's own share is counted live.
        replica.others_running = max(0, running - replica.inflight) if running is not None else None
        replica.metrics_at = time.monotonic()

    # ------------------------------------------------------------------ tokens

    def _load_tokenizer(self) -> Any:
        candidates: list[tuple[str, bool]] = []
        for path in (self._model_arg, self._model_root):
            if path and os.path.isdir(path):
                candidates.append((path, False))
        for name in (self._model_arg, self._model_root, self._served_name):
            if name and not os.path.isdir(name):
                candidates.append((name, True))
        if not candidates:
            return None
        try:
            from transformers import AutoTokenizer
        except Exception as exc:  # noqa: BLE001 - no transformers: estimate instead
            log.info("transformers is unavailable (%s); token counts are estimates", exc)
            return None
        for name, cache_only in dict.fromkeys(candidates):
            try:
                tok = AutoTokenizer.from_pretrained(name, local_files_only=cache_only)
            except Exception:
                log.debug("no tokenizer at %s", name, exc_info=True)
                continue
            if getattr(tok, "chat_template", None):
                self._thinking_switch = "enable_thinking" in str(tok.chat_template)
                self.tokenizer_source = name
                log.info("remote engine counts tokens with the tokenizer from %s", name)
                return tok
        log.info("no local tokenizer for %s; token counts are estimates", self.model_name)
        return None

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Exact with a locally loaded tokenizer, else the base class's estimate."""
        tok = self._tokenizer
        if tok is None:
            return super().count_tokens(messages)
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
        if self._thinking_switch:
            kwargs["enable_thinking"] = False
        try:
            text = tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], **kwargs
            )
            return len(tok.encode(text, add_special_tokens=False))
        except Exception:
            log.debug("chat template failed; estimating tokens", exc_info=True)
            return super().count_tokens(messages)

    # ------------------------------------------------------------------ generation

    def _body(self, request: EngineRequest) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self._served_name or self._model_arg,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": False},
            "chat_template_kwargs": {"enable_thinking": s.enable_thinking},
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.ignore_eos:
            body["ignore_eos"] = True
        return body

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
            task = st.stop()
            if task is not None:
                await asyncio.wait({task})

    async def abort(self, request_id: str) -> None:
        """Close the request's upstream stream; its generator returns without a finish."""
        tasks = []
        for st in list(self._streams.get(request_id, ())):
            if st.finish is None and st.error is None:
                st.aborted = True
            task = st.stop()
            if task is not None:
                tasks.append(task)
            st.event.set()
        if tasks:
            await asyncio.wait(tasks)

    async def _pump(self, st: _Stream) -> None:
        """Run the request on the user's replica, moving on while nothing was produced."""
        tried: set[str] = set()
        try:
            while True:
                replica = self._pick(st.key, tried)
                if replica is None:
                    detail = "; ".join(f"{r.url}: {r.last_error or 'not ready'}"
                                       for r in self.replicas if not r.routable)
                    st.error = EngineError(f"no upstream can take the request ({detail})")
                    return
                tried.add(replica.url)
                replica.requests += 1
                self._remember(st.request.request_id, replica.url)
                try:
                    await self._attempt(replica, st)
                except _UpstreamFailed as exc:
                    if exc.down:
                        replica.failures += 1
                        self._mark_down(replica, str(exc))
                    if exc.down and not st.produced:
                        log.info("request %s: %s failed before any output (%s); trying the next upstream",
                                 st.request.request_id, replica.url, exc)
                        continue
                    st.error = EngineError(f"upstream {replica.url} failed: {exc}")
                    return
                self._record(st)
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s: remote stream failed", st.request.request_id)
            st.error = EngineError(f"remote stream failed: {exc}")
        finally:
            st.done = True
            st.event.set()

    def _remember(self, request_id: str, url: str) -> None:
        self._served_by[request_id] = url
        self._served_by.move_to_end(request_id)
        while len(self._served_by) > ROUTING_MEMORY:
            self._served_by.popitem(last=False)

    async def _attempt(self, replica: Replica, st: _Stream) -> None:
        """Stream the request from one replica into ``st``; sets ``st.finish`` on success.

        Raises _UpstreamFailed. Cancellation closes the response (``async with``).
        """
        client = self._client
        if client is None:
            raise _UpstreamFailed("the remote engine is closed", down=False)
        st.replica = replica
        st.chunks = 0
        if not st.produced:
            st.tokens = 0  # empty chunks of a failed earlier attempt
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        replica.inflight += 1
        try:
            async with client.stream(
                "POST", replica.url + "/v1/chat/completions", json=self._body(st.request)
            ) as resp:
                if resp.status_code != 200:
                    raw = await resp.aread()
                    message = _error_message(raw) or resp.reason_phrase
                    raise _UpstreamFailed(f"HTTP {resp.status_code}: {message}",
                                          down=resp.status_code >= 500)
                complete = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments
                    data = line[5:].strip()
                    if data == "[DONE]":
                        complete = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise _UpstreamFailed(f"bad event {data[:80]!r}", down=True) from exc
                    if not isinstance(chunk, dict):
                        continue
                    if chunk.get("error"):
                        raise _UpstreamFailed(f"error event: {_error_text(chunk['error'])}", down=True)
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        content = delta.get("content")
                        # The opening chunk carries the role and no token.
                        if not ("role" in delta and not content):
                            st.chunks += 1
                            st.tokens += 1
                        if content:
                            st.push(content)
                        if choice.get("finish_reason"):
                            finish_reason = str(choice["finish_reason"])
                if not complete and finish_reason is None:
                    raise _UpstreamFailed("the stream ended before the reply finished", down=True)
        except httpx.TimeoutException as exc:
            if finish_reason is None:
                raise _UpstreamFailed(f"timed out ({_describe(exc)})", down=True) from exc
        except httpx.HTTPError as exc:
            # Connection refused / reset, incomplete chunked body: the replica is gone.
            if finish_reason is None:
                raise _UpstreamFailed(_describe(exc), down=True) from exc
            self._mark_down(replica, f"connection lost after the reply: {_describe(exc)}")
        finally:
            replica.inflight -= 1
        if finish_reason is None:
            raise _UpstreamFailed("the stream ended without a finish reason", down=True)
        if finish_reason in ("abort", "error"):
            raise _UpstreamFailed(f"the upstream ended the request ({finish_reason})", down=False)
        usage = usage or {}
        details = usage.get("prompt_tokens_details") or {}
        prompt_tokens = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        st.finish = EngineFinish(
            finish_reason=_finish_reason(finish_reason),
            prompt_tokens=int(prompt_tokens) if isinstance(prompt_tokens, int)
            else self.count_tokens(st.request.messages),
            completion_tokens=int(completion) if isinstance(completion, int) else st.chunks,
            cached_prompt_tokens=int(details.get("cached_tokens") or 0)
            if isinstance(details, dict) else 0,
            engine_ttft_ms=(st.t_first - st.t_start) * 1000.0 if st.t_first is not None else None,
        )
        st.event.set()

    def _record(self, st: _Stream) -> None:
        if st.t_first is None or st.finish is None:
            return
        self._recent_ttft_ms.append((st.t_first - st.t_start) * 1000.0)
        n = st.finish.completion_tokens
        if st.t_last is not None and n > 1 and st.t_last > st.t_first:
            self._recent_itl_ms.append((st.t_last - st.t_first) * 1000.0 / (n - 1))

    # ------------------------------------------------------------------ load

    def load(self) -> EngineLoad:
        """Requests in flight over the routable replicas.

        ``running`` per replica is this engine's open streams (always current)
        plus what other clients ran there at the last ``/metrics`` scrape
        (``vllm:num_requests_running`` minus this engine's streams at that
        moment); ``waiting`` is the scraped ``vllm:num_requests_waiting`` (0 when
        unknown). Scraped numbers older than three health intervals are ignored. ``max_num_seqs`` is the per-replica capacity times the number of
        routable replicas.
        """
        now = time.monotonic()
        fresh_s = 3 * self.health_interval_s + 1.0
        running = waiting = 0
        live = 0
        for r in self.replicas:
            fresh = self._scrape and r.metrics_at and now - r.metrics_at <= fresh_s
            others = r.others_running if fresh and r.others_running is not None else 0
            if r.routable:
                live += 1
                running += r.inflight + others
                if fresh and r.upstream_waiting is not None:
                    waiting += r.upstream_waiting
            else:
                running += r.inflight
        return EngineLoad(
            running=running,
            waiting=waiting,
            max_num_seqs=self._max_num_seqs * max(1, live),
            recent_ttft_ms=statistics.median(self._recent_ttft_ms) if self._recent_ttft_ms else None,
            recent_itl_ms=statistics.median(self._recent_itl_ms) if self._recent_itl_ms else None,
        )

    def inflight(self) -> int:
        """Streams this engine has open right now."""
        return sum(r.inflight for r in self.replicas)


def parse_vllm_load(text: str) -> tuple[int | None, int | None]:
    """``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` from a /metrics page.

    Summed over engines (data-parallel servers report one series each).
    """
    running: float | None = None
    waiting: float | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:num_requests_"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value_text = line.partition(" ")
        else:
            value_text = rest.rpartition("}")[2]
        try:
            value = float(value_text.split()[0])
        except (ValueError, IndexError):
            continue
        if name == "vllm:num_requests_running":
            running = (running or 0.0) + value
        elif name == "vllm:num_requests_waiting":
            waiting = (waiting or 0.0) + value
    return (int(running) if running is not None else None,
            int(waiting) if waiting is not None else None)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:300].decode("utf-8", "replace")
    if isinstance(body, dict):
        if "error" in body:
            return _error_text(body["error"])[:300]
        if "message" in body:
            return str(body["message"])[:300]
    return str(body)[:300]
