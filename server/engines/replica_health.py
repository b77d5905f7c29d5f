"""Health checks of the replica pool: one background task, one warm-up per replica.

Every ``interval_s`` the monitor checks each replica of the
:class:`~server.engines.replicas.ReplicaPool`: ``GET /health`` (200 = up)
and, until one matches, ``GET /v1/models`` for the served model's card and its
``max_model_len``. The first replica that passes both gets one warm-up
generation (a few tokens), after which it is routable. The same round scrapes
``/metrics`` (``vllm:num_requests_running``, ``vllm:num_requests_waiting``) so
the engine's load also sees requests other gateways sent.

A replica that stops answering while streams are open is not cut off here:
those streams end with their own transport error or read timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx

from server.engines.chat_completions import UpstreamFailed, describe_error
from server.engines.replicas import Replica, ReplicaPool, ServedModel

log = logging.getLogger(__name__)

#: Longest a warm-up generation may take on a cold CPU replica.
WARMUP_TIMEOUT_S = 180.0


class ReplicaMonitor:
    """Owns the pool's health task and the replicas' warm-up tasks.

    Args:
        pool: the replicas whose health state this monitor keeps.
        model: the served model the replicas' cards must list.
        warm_up: runs one short generation on a replica (raises UpstreamFailed).
        on_model_card: called after a replica's model card matched.
        interval_s: seconds between two health rounds.
        connect_timeout_s: TCP connect timeout of every check.
        scrape_metrics: also read ``/metrics`` in each round.
    """

    def __init__(
        self,
        pool: ReplicaPool,
        model: ServedModel,
        *,
        warm_up: Callable[[Replica], Awaitable[object]],
        on_model_card: Callable[[], None],
        interval_s: float,
        connect_timeout_s: float,
        scrape_metrics: bool,
    ) -> None:
        self._pool = pool
        self._model = model
        self._warm_up_on = warm_up
        self._on_model_card = on_model_card
        self.interval_s = interval_s
        self._connect_timeout_s = connect_timeout_s
        self.scrape_metrics = scrape_metrics
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._warm_tasks: dict[str, asyncio.Task[None]] = {}
        #: Set when a replica finished its warm-up and is routable.
        self.routable = asyncio.Event()

    def start(self, client: httpx.AsyncClient) -> None:
        """Start the health task (unless it runs) with the engine's HTTP client."""
        self._client = client
        self.routable = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="remote-engine-health")

    async def close(self) -> None:
        """Cancel and await the health task and every warm-up; the client stays the caller's."""
        owned = [self._task, *self._warm_tasks.values()]
        self._task = None
        self._warm_tasks.clear()
        self._client = None
        running = [task for task in owned if task is not None and not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.gather(*(self._check(r) for r in self._pool))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("remote engine health round failed")
            await asyncio.sleep(self.interval_s)

    async def _check(self, replica: Replica) -> None:
        client = self._client
        if client is None:
            return
        timeout = httpx.Timeout(max(5.0, self._connect_timeout_s), connect=self._connect_timeout_s)
        try:
            resp = await client.get(replica.url + "/health", timeout=timeout)
            if resp.status_code != 200:
                raise UpstreamFailed(f"/health answered {resp.status_code}", down=True)
            if not replica.model_ok:
                await self._discover(client, replica, timeout)
        except (httpx.HTTPError, UpstreamFailed, ValueError) as exc:
            self._pool.mark_down(replica, describe_error(exc))
            return
        self._pool.mark_up(replica)
        warming = self._warm_tasks.get(replica.url)
        if not replica.warmed and (warming is None or warming.done()):
            self._warm_tasks[replica.url] = asyncio.get_running_loop().create_task(
                self._warm_up(replica), name=f"remote-engine-warmup {replica.url}"
            )
        if self.scrape_metrics:
            await self._scrape(client, replica, timeout)

    async def _discover(self, client: httpx.AsyncClient, replica: Replica, timeout: httpx.Timeout) -> None:
        """Read the replica's model cards (vLLM's ``GET /v1/models``); adopt the served name if not known yet."""
        resp = await client.get(replica.url + "/v1/models", timeout=timeout)
        if resp.status_code != 200:
            raise UpstreamFailed(f"/v1/models answered {resp.status_code}", down=True)
        cards = [c for c in resp.json().get("data") or () if isinstance(c, dict) and c.get("id")]
        if not cards:
            raise UpstreamFailed("/v1/models lists no model", down=True)
        card = self._model.match(cards)
        if card is None:
            names = ", ".join(str(c["id"]) for c in cards)
            raise UpstreamFailed(f"serves {names}, not {self._model.request_name}", down=True)
        self._model.adopt(card)
        # vLLM's model card carries the server's context window.
        card_len = card.get("max_model_len")
        if isinstance(card_len, int) and card_len > 0:
            replica.max_model_len = card_len
        replica.model_ok = True
        self._on_model_card()
        log.info("upstream %s serves %s (max_model_len=%s)", replica.url, card["id"], replica.max_model_len)

    async def _warm_up(self, replica: Replica) -> None:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._warm_up_on(replica), WARMUP_TIMEOUT_S)
        except (UpstreamFailed, TimeoutError) as exc:
            self._pool.mark_down(replica, f"warm-up failed: {describe_error(exc)}")
            return
        except Exception as exc:
            log.exception("warm-up on %s failed", replica.url)
            self._pool.mark_down(replica, f"warm-up failed: {describe_error(exc)}")
            return
        replica.warmed = True
        log.info("upstream %s warmed up in %.2fs", replica.url, time.monotonic() - t0)
        if replica.routable:
            self.routable.set()

    async def _scrape(self, client: httpx.AsyncClient, replica: Replica, timeout: httpx.Timeout) -> None:
        try:
            resp = await client.get(replica.url + "/metrics", timeout=timeout)
            if resp.status_code != 200:
                return
            running, waiting = parse_vllm_load(resp.text)
        except httpx.HTTPError:
            return
        replica.record_scrape(running, waiting, time.monotonic())


def parse_vllm_load(text: str) -> tuple[int | None, int | None]:
    """``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` from a /metrics page.

    Summed over engines (data-parallel servers report one series each). Read
    line by line rather than with prometheus_client's parser on purpose: that
    parser rejects a whole page for one malformed line, and one odd series of
    another version's vLLM must not blind admission control to the two we need.
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
