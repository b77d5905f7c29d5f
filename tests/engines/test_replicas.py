"""The replica pool's decisions: rendezvous order, routability, failover, model cards, load.

The pool is pure state, so these tests set what the health monitor or a
stream would have reported and check what the pool decides.
"""

from __future__ import annotations

import pytest

from server.engines import replicas as replicas_module
from server.engines.replicas import (
    Replica,
    ReplicaPool,
    ServedModel,
    normalize_upstream,
    rendezvous_order,
)

URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]


def routable_pool(urls: list[str] = URLS) -> ReplicaPool:
    pool = ReplicaPool(urls)
    for r in pool:
        r.healthy = r.model_ok = r.warmed = True
    return pool


def key_preferring(pool: ReplicaPool, url: str) -> str:
    return next(k for k in (f"user-{i}" for i in range(1000)) if pool.preference(k)[0] == url)


def test_rendezvous_moves_only_the_lost_replicas_users():
    replicas = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    users = [f"user-{i}" for i in range(300)]
    before = {u: rendezvous_order(u, replicas)[0] for u in users}
    # Stable across calls (and processes: blake2b, not the salted hash()).
    assert before == {u: rendezvous_order(u, replicas)[0] for u in users}
    assert len(set(before.values())) == 3
    after = {u: rendezvous_order(u, replicas[:2])[0] for u in users}
    for u in users:
        if before[u] != replicas[2]:
            assert after[u] == before[u]
        else:  # its users go to their second choice
            assert after[u] == rendezvous_order(u, replicas)[1]
    assert normalize_upstream("http://h:1/v1/") == normalize_upstream("h:1") == "http://h:1"


def test_upstream_urls_are_normalised_and_deduplicated():
    assert normalize_upstream(" https://h:1/prefix/v1 ") == "https://h:1/prefix"
    pool = ReplicaPool(["h:1", "http://h:1/v1", "http://h:2/"])
    assert [r.url for r in pool] == ["http://h:1", "http://h:2"]
    with pytest.raises(ValueError):
        ReplicaPool([])
    with pytest.raises(ValueError):
        ReplicaPool(["  "])


def test_a_replica_is_routable_once_healthy_matched_and_warmed():
    replica = Replica("http://h:1")
    assert not replica.routable
    replica.healthy = True
    replica.model_ok = True
    assert not replica.routable  # not warmed up yet
    replica.warmed = True
    assert replica.routable


def test_pick_follows_the_users_order_over_routable_untried_replicas():
    pool = routable_pool()
    user = "user-7"
    order = pool.preference(user)
    assert pick_url(pool, user) == order[0]
    assert pick_url(pool, user, tried={order[0]}) == order[1]
    assert pick_url(pool, user, tried=set(order[:2])) == order[2]
    assert pool.pick(user, tried=set(order)) is None
    # Health does not change the preference, only the pick.
    for r in pool:
        r.healthy = False
    assert pool.preference(user) == order
    assert pool.pick(user) is None and not pool.any_routable()


def pick_url(pool: ReplicaPool, key: str, tried: set[str] | None = None) -> str | None:
    replica = pool.pick(key, tried or set())
    return replica.url if replica is not None else None


def test_a_failed_replica_hands_its_users_to_their_next_choice_until_it_recovers():
    pool = routable_pool()
    first = pool.replicas[0]
    users = [key_preferring(pool, first.url)] + [f"other-{i}" for i in range(50)]
    before = {u: pick_url(pool, u) for u in users}

    pool.mark_down(first, "ConnectError: refused")
    assert not first.routable and first.last_error == "ConnectError: refused"
    assert first.down_since is not None
    for u in users:
        if before[u] == first.url:
            assert pick_url(pool, u) == pool.preference(u)[1]
        else:  # nobody else moves
            assert pick_url(pool, u) == before[u]

    # Failing again while down keeps the newest reason.
    pool.mark_down(first, "HTTP 503")
    assert first.last_error == "HTTP 503"

    pool.mark_up(first)
    assert first.routable and first.last_error is None and first.down_since is None
    assert {u: pick_url(pool, u) for u in users} == before


def test_routing_memory_keeps_the_newest_requests(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(replicas_module, "ROUTING_MEMORY", 3)
    pool = ReplicaPool(URLS)
    for i in range(5):
        pool.remember(f"r{i}", URLS[i % 3])
    assert pool.served_by("r0") is None and pool.served_by("r1") is None
    assert [pool.served_by(f"r{i}") for i in (2, 3, 4)] == [URLS[2], URLS[0], URLS[1]]
    pool.remember("r2", URLS[1])  # a retry on another replica refreshes the record
    pool.remember("r5", URLS[2])
    assert pool.served_by("r2") == URLS[1] and pool.served_by("r3") is None


def test_the_served_model_is_matched_by_name_or_by_folder():
    cards = [{"id": "other"}, {"id": "smol", "root": "/models/SmolLM2/"}]
    anything = ServedModel(None)
    assert anything.match(cards) == cards[0]

    by_name = ServedModel("smol")
    assert by_name.match(cards) == cards[1] and by_name.request_name == "smol"

    by_folder = ServedModel("/models/./SmolLM2")
    assert by_folder.match(cards) == cards[1]
    assert by_folder.request_name == "/models/./SmolLM2"
    assert by_folder.adopt(cards[1]) is True
    assert (by_folder.served_name, by_folder.root, by_folder.request_name) == (
        "smol", "/models/SmolLM2/", "smol")
    # Once adopted, every replica must serve that name; the folder no longer matches.
    assert by_folder.adopt({"id": "other"}) is False and by_folder.served_name == "smol"
    assert by_folder.match([{"id": "smol-2", "root": "/models/SmolLM2"}]) is None

    assert ServedModel("missing").match(cards) is None


def test_the_pools_context_window_is_the_smallest_reported():
    pool = ReplicaPool(URLS)
    assert pool.max_model_len() is None and pool.max_model_len(1024) == 1024
    pool.replicas[0].max_model_len = 4096
    pool.replicas[1].max_model_len = 2048
    assert pool.max_model_len() == 2048
    assert pool.max_model_len(1024) == 1024 and pool.max_model_len(8192) == 2048


def test_load_adds_fresh_scrapes_of_routable_replicas_to_this_engines_streams():
    pool = routable_pool(URLS[:2])
    a, b = pool.replicas
    with a.stream_open(), a.stream_open():
        # /metrics counts this engine's two streams too: only the rest is others'.
        a.record_scrape(running=5, waiting=4, now=100.0)
    assert (a.upstream_running, a.others_running, a.metrics_at) == (5, 3, 100.0)
    b.record_scrape(running=None, waiting=None, now=100.0)
    assert b.others_running is None
    with a.stream_open():
        assert pool.inflight() == 1
        assert pool.load(now=101.0, scraped_max_age_s=5.0) == (1 + 3, 4, 2)
        # Stale scrapes, or none wanted: only this engine's streams count.
        assert pool.load(now=200.0, scraped_max_age_s=5.0) == (1, 0, 2)
        assert pool.load(now=101.0, scraped_max_age_s=None) == (1, 0, 2)
        # A replica that is down keeps counting this engine's streams on it, nothing scraped.
        pool.mark_down(a, "gone")
        assert pool.load(now=101.0, scraped_max_age_s=5.0) == (1, 0, 1)
    assert pool.inflight() == 0


def test_stream_open_counts_a_stream_until_it_ends_even_by_an_error():
    replica = Replica("http://h:1")
    with pytest.raises(RuntimeError), replica.stream_open():
        assert replica.inflight == 1
        raise RuntimeError("stream failed")
    assert replica.inflight == 0


def test_describe_and_snapshots_name_each_replicas_state():
    pool = routable_pool(URLS[:2])
    pool.mark_down(pool.replicas[1], "HTTP 500")
    pool.replicas[0].requests = 3
    assert pool.describe("starting") == f"{URLS[0]}: starting; {URLS[1]}: HTTP 500"
    assert pool.describe("not ready", unroutable_only=True) == f"{URLS[1]}: HTTP 500"
    assert pool.request_counts() == {URLS[0]: 3, URLS[1]: 0}
    stats = pool.snapshots()
    assert [(s["url"], s["routable"], s["last_error"]) for s in stats] == [
        (URLS[0], True, None), (URLS[1], False, "HTTP 500")]
