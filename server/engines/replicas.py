"""The replica pool of the remote engine: who is up, and which replica a user's turn goes to.

Pure state and decisions, no I/O: the health monitor
(:mod:`server.engines.replica_health`) and the streams of
:mod:`server.engines.remote` report what they saw, the pool answers.

Replicas
--------
Upstream URLs are base URLs (``http://10.0.0.5:8000``, with or without a
trailing ``/v1``). Every replica must serve the same model under the same
served name. A replica is *routable* when its last health check passed, its
model card matched and it has finished one warm-up generation. A request that
fails on a replica marks it down at once; the next passing health check
brings it back.

Routing
-------
Rendezvous (highest-random-weight) hashing on the request's ``user_id``
(``request_id`` when there is none): every replica gets the weight
``blake2b(user_id, replica URL)`` and the user's turns go to the routable
replica with the highest weight. A user therefore stays on one replica, whose
prefix cache holds the conversation so far, for as long as it is up; when it
is down the user's turns go to the next-highest routable replica, and come
back once it recovers. Adding or losing a replica only moves that replica's
users. A request that failed on a replica before producing text moves on to
the next replica in the user's order that it has not tried.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

#: How many request -> replica records :meth:`ReplicaPool.served_by` keeps.
ROUTING_MEMORY = 4096


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
    # blake2b, not hash(): the order must be the same in every gateway process.
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogatepass") + b"\x00" + replica.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """``replicas`` from the key's most to least preferred."""
    return sorted(replicas, key=lambda r: (rendezvous_weight(key, r), r), reverse=True)


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

    @property
    def routable(self) -> bool:
        return self.healthy and self.model_ok and self.warmed

    @contextmanager
    def stream_open(self) -> Iterator[None]:
        """Counts one of this engine's streams (a warm-up too) as in flight on the replica."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def record_scrape(self, running: int | None, waiting: int | None, now: float) -> None:
        """The replica's ``/metrics`` counts, as read at ``now``."""
        self.upstream_running = running
        self.upstream_waiting = waiting
        # What other clients run there; this engine's own share is counted live.
        self.others_running = max(0, running - self.inflight) if running is not None else None
        self.metrics_at = now

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


class ServedModel:
    """Which model the pool serves: the one asked for, then the one the first replica's card named.

    ``requested`` is a served model name or a model folder (matched against a
    card's ``root``); None takes the first model the first replica lists.
    Once a card is adopted, every other replica must serve that same name.
    """

    def __init__(self, requested: str | None) -> None:
        self.requested = requested or None
        self.served_name: str | None = None
        self.root: str | None = None  # the model folder the adopted card reports

    @property
    def request_name(self) -> str | None:
        """The ``model`` field of a chat completion request."""
        return self.served_name or self.requested

    def match(self, cards: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The card of ``/v1/models`` (each with an ``id``) that is this model, if any."""
        wanted = self.served_name or self.requested
        if wanted is None:
            return cards[0]
        for card in cards:
            if card["id"] == wanted:
                return card
        if self.served_name is None:
            # A model folder given as --model: match the card's root path.
            norm = os.path.normpath(wanted)
            for card in cards:
                root = card.get("root")
                if root and os.path.normpath(str(root)) == norm:
                    return card
        return None

    def adopt(self, card: dict[str, Any]) -> bool:
        """Take the first matched card's name and root; True if this card was the first."""
        if self.served_name is not None:
            return False
        self.served_name = str(card["id"])
        root = card.get("root")
        self.root = str(root) if root else None
        return True


class PoolLoad(NamedTuple):
    running: int
    waiting: int
    routable: int


class ReplicaPool:
    """The replicas, their health state and the user -> replica routing.

    Raises ValueError when ``urls`` (normalised, duplicates dropped) is empty.
    """

    def __init__(self, urls: Iterable[str]) -> None:
        normalized = list(dict.fromkeys(normalize_upstream(u) for u in urls))
        if not normalized:
            raise ValueError("the remote engine needs at least one upstream URL")
        self.replicas: list[Replica] = [Replica(u) for u in normalized]
        self._by_url = {r.url: r for r in self.replicas}
        self._served_by: OrderedDict[str, str] = OrderedDict()

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def any_routable(self) -> bool:
        return any(r.routable for r in self.replicas)

    # ------------------------------------------------------------------ routing

    def preference(self, key: str) -> list[str]:
        """Every replica URL, from the key's most to least preferred (health ignored)."""
        return rendezvous_order(key, [r.url for r in self.replicas])

    def pick(self, key: str, tried: Container[str] = ()) -> Replica | None:
        """The key's most preferred routable replica not in ``tried`` (None: none left)."""
        for url in self.preference(key):
            replica = self._by_url[url]
            if url not in tried and replica.routable:
                return replica
        return None

    def remember(self, request_id: str, url: str) -> None:
        """Record which replica a request went to (the newest ``ROUTING_MEMORY`` are kept)."""
        self._served_by[request_id] = url
        self._served_by.move_to_end(request_id)
        while len(self._served_by) > ROUTING_MEMORY:
            self._served_by.popitem(last=False)

    def served_by(self, request_id: str) -> str | None:
        """The replica that served (or is serving) a recent request."""
        return self._served_by.get(request_id)

    # ------------------------------------------------------------------ health

    def mark_down(self, replica: Replica, reason: str) -> None:
        """A health check or a request failed on ``replica``: no new requests go there."""
        replica.last_error = reason
        if replica.healthy:
            replica.healthy = False
            replica.down_since = time.monotonic()
            log.warning("upstream %s marked down: %s", replica.url, reason)

    def mark_up(self, replica: Replica) -> None:
        """A health check passed on ``replica``."""
        if not replica.healthy:
            replica.healthy = True
            replica.last_error = None
            was = replica.down_since
            replica.down_since = None
            if replica.routable:
                log.info("upstream %s is up%s", replica.url,
                         f" after {time.monotonic() - was:.1f}s down" if was else "")

    def max_model_len(self, cap: int | None = None) -> int | None:
        """The smallest context window the replicas' cards report, or ``cap`` if smaller."""
        lens = [r.max_model_len for r in self.replicas if r.max_model_len]
        if cap:
            lens.append(cap)
        return min(lens) if lens else None

    def describe(self, placeholder: str, *, unroutable_only: bool = False) -> str:
        """``url: last error`` for each replica (``placeholder`` when it has none), for messages."""
        return "; ".join(f"{r.url}: {r.last_error or placeholder}"
                         for r in self.replicas if not (unroutable_only and r.routable))

    # ------------------------------------------------------------------ load

    def load(self, now: float, scraped_max_age_s: float | None) -> PoolLoad:
        """Requests in flight over the pool.

        ``running`` per replica is this engine's open streams (always current)
        plus, on routable replicas, what other clients ran there at the last
        ``/metrics`` scrape; ``waiting`` is the scraped waiting count of the
        routable replicas. Scrapes older than ``scraped_max_age_s`` (or any,
        when it is None) are ignored.
        """
        running = waiting = routable = 0
        for r in self.replicas:
            fresh = (scraped_max_age_s is not None and r.metrics_at
                     and now - r.metrics_at <= scraped_max_age_s)
            others = r.others_running if fresh and r.others_running is not None else 0
            if r.routable:
                routable += 1
                running += r.inflight + others
                if fresh and r.upstream_waiting is not None:
                    waiting += r.upstream_waiting
            else:
                running += r.inflight
        return PoolLoad(running=running, waiting=waiting, routable=routable)

    def inflight(self) -> int:
        """This engine's open streams over all replicas."""
        return sum(r.inflight for r in self.replicas)

    def request_counts(self) -> dict[str, int]:
        """Generation requests sent to each replica (warm-ups excluded)."""
        return {r.url: r.requests for r in self.replicas}

    def snapshots(self) -> list[dict[str, Any]]:
        return [r.snapshot() for r in self.replicas]
