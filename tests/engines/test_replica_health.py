"""The health monitor against local servers that answer like vLLM's (no vLLM needed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import pytest_asyncio
from fake_vllm_server import FakeVllmServer, running

from server.engines.chat_completions import UpstreamFailed
from server.engines.replica_health import ReplicaMonitor, parse_vllm_load
from server.engines.replicas import Replica, ReplicaPool, ServedModel

INTERVAL_S = 0.05


def test_parse_vllm_load():
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 9.0\n'
    )
    assert parse_vllm_load(text) == (3, 3)
    assert parse_vllm_load("") == (None, None)


def test_parse_vllm_load_reads_unlabelled_series_and_skips_garbage():
    assert parse_vllm_load("vllm:num_requests_running 4\nvllm:num_requests_waiting nan?\n") == (4, None)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


class Monitored:
    """A pool of fake servers under a running monitor whose warm-up is scripted."""

    def __init__(self, servers: list[FakeVllmServer], model: str | None) -> None:
        self.servers = servers
        self.pool = ReplicaPool([s.url for s in servers])
        self.model = ServedModel(model)
        self.warm_ups: list[str] = []
        self.warm_up_error: Exception | None = None
        self.model_cards = 0
        self.monitor = ReplicaMonitor(
            self.pool, self.model, warm_up=self._warm_up, on_model_card=self._on_model_card,
            interval_s=INTERVAL_S, connect_timeout_s=1.0, scrape_metrics=True,
        )

    async def _warm_up(self, replica: Replica) -> None:
        self.warm_ups.append(replica.url)
        if self.warm_up_error is not None:
            raise self.warm_up_error

    def _on_model_card(self) -> None:
        self.model_cards += 1

    def replica(self, server: FakeVllmServer) -> Replica:
        return next(r for r in self.pool if r.url == server.url)


@pytest_asyncio.fixture
async def servers() -> AsyncIterator[list[FakeVllmServer]]:
    async with running(FakeVllmServer(model="smol", root="/models/smol", max_model_len=4096),
                       FakeVllmServer(model="smol", root="/models/smol", max_model_len=2048)) as pair:
        yield pair


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as c:
        yield c


async def test_replicas_are_discovered_warmed_once_and_scraped(servers, client):
    servers[0].running, servers[0].waiting = 3, 2
    m = Monitored(servers, model="/models/smol")  # a folder: matched by the card's root
    m.monitor.start(client)
    try:
        await asyncio.wait_for(m.monitor.routable.wait(), 5)
        await until(lambda: all(r.routable for r in m.pool), "both replicas routable")
        assert m.model.served_name == "smol" and m.model.root == "/models/smol"
        assert [r.max_model_len for r in m.pool] == [4096, 2048] and m.model_cards == 2
        await until(lambda: m.replica(servers[0]).metrics_at > 0, "a scrape")
        first = m.replica(servers[0])
        assert (first.upstream_running, first.upstream_waiting, first.others_running) == (3, 2, 3)
        await asyncio.sleep(5 * INTERVAL_S)  # more rounds: no second warm-up
        assert sorted(m.warm_ups) == sorted(s.url for s in servers)
    finally:
        await m.monitor.close()


async def test_a_failing_health_check_marks_down_and_a_passing_one_brings_back(servers, client):
    m = Monitored(servers, model="smol")
    m.monitor.start(client)
    try:
        await until(lambda: all(r.routable for r in m.pool), "both replicas routable")
        sick = m.replica(servers[1])
        servers[1].health_status = 503
        await until(lambda: not sick.routable, "the replica marked down")
        assert sick.last_error == "UpstreamFailed: /health answered 503"
        assert m.replica(servers[0]).routable
        servers[1].health_status = 200
        await until(lambda: sick.routable, "the replica back up")
        assert sick.last_error is None and m.warm_ups.count(sick.url) == 1
    finally:
        await m.monitor.close()


async def test_a_replica_serving_another_model_never_becomes_routable(servers, client):
    servers[1].model = "other"
    m = Monitored(servers, model="smol")
    m.monitor.start(client)
    try:
        await until(lambda: m.replica(servers[0]).routable, "the matching replica routable")
        wrong = m.replica(servers[1])
        await until(lambda: wrong.last_error is not None, "the mismatch noticed")
        assert wrong.last_error == "UpstreamFailed: serves other, not smol"
        assert not wrong.model_ok and not wrong.routable and wrong.url not in m.warm_ups
    finally:
        await m.monitor.close()


async def test_a_failed_warm_up_marks_the_replica_down_and_is_retried(servers, client):
    m = Monitored(servers[:1], model=None)  # the first model listed
    m.warm_up_error = UpstreamFailed("HTTP 500: no", down=True)
    m.monitor.start(client)
    try:
        replica = m.replica(servers[0])
        await until(lambda: len(m.warm_ups) >= 2, "a second warm-up after the first failed")
        assert not replica.warmed and not m.monitor.routable.is_set()
        assert m.model.served_name == "smol"
        m.warm_up_error = None
        await asyncio.wait_for(m.monitor.routable.wait(), 5)
        await until(lambda: replica.routable, "the replica routable")
    finally:
        await m.monitor.close()


async def test_an_unreachable_replica_is_down_with_the_transport_error(servers, client):
    url = servers[1].url
    await servers[1].stop()
    m = Monitored(servers, model="smol")
    m.monitor.start(client)
    try:
        dead = next(r for r in m.pool if r.url == url)
        await until(lambda: dead.last_error is not None, "the refused check")
        assert (dead.last_error or "").startswith("ConnectError") and not dead.routable
        await until(lambda: m.replica(servers[0]).routable, "the live replica routable")
    finally:
        await m.monitor.close()


async def test_close_cancels_the_health_task_and_a_warm_up_in_progress(servers, client):
    m = Monitored(servers[:1], model="smol")
    warming = asyncio.Event()

    async def slow_warm_up(replica: Replica) -> None:
        warming.set()
        await asyncio.sleep(60)

    m.monitor = ReplicaMonitor(m.pool, m.model, warm_up=slow_warm_up, on_model_card=lambda: None,
                               interval_s=INTERVAL_S, connect_timeout_s=1.0, scrape_metrics=False)
    m.monitor.start(client)
    await asyncio.wait_for(warming.wait(), 5)
    owned = [t for t in asyncio.all_tasks() if t.get_name().startswith("remote-engine-")]
    assert {t.get_name().split(" ")[0] for t in owned} == {"remote-engine-health", "remote-engine-warmup"}
    await m.monitor.close()
    assert all(t.done() for t in owned)
    # Checks that were in flight when it closed have no client left to use.
    assert not m.replica(servers[0]).warmed


@pytest.mark.parametrize("scrape", [True, False])
async def test_scraping_can_be_turned_off(servers, client, scrape: bool):
    servers[0].running = 1
    m = Monitored(servers[:1], model="smol")
    m.monitor.scrape_metrics = scrape
    m.monitor.start(client)
    try:
        await until(lambda: m.replica(servers[0]).routable, "routable")
        await asyncio.sleep(3 * INTERVAL_S)
        assert (m.replica(servers[0]).upstream_running == 1) is scrape
    finally:
        await m.monitor.close()
