"""Chaos: 200 turns whose sockets are cut mid-reply, resumed on either of two processes.

Two real gateway processes share one Redis key prefix. Every user talks
through its own fault-injecting proxy (tests/faultproxy.py) whose upstream for
the next connection the test picks: after a cut the client lands on the turn's
own process or on the other one, alternately. Every turn's socket is cut at a
random delta, half of the time by the client itself (it aborts its socket),
half by the proxy (TCP RST, FIN, or a cut some bytes later, mid-frame). The
reference ResilientClient reconnects and sends ``turn.resume`` after the last
seq it holds. Some turns are cut a second time after their resume.

Asserted (guarantees 1-3): nothing lost, nothing delivered twice (seqs 1..n,
concatenation == turn.end.text), every turn ends by itself (stop/length), and
every history in Redis is exact: one user/assistant pair per turn, in order.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter

import pytest
from conftest import BOTH_BACKENDS, ServerProcess, clean_prefix, redis_client
from faultproxy import FaultProxy

from clients.client import ResilientClient
from sessions.keys import KeySpace
from sessions.store import ConversationStore
from testkit.servers import running

# On the single Redis and on a Redis Cluster (tests/conftest.py).
pytestmark = [pytest.mark.timeout(240), BOTH_BACKENDS]

USERS = 20
TURNS_PER_USER = 10
REPLY_TOKENS = 40
SERVER_FLAGS = [
    "--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "10",
    "--sim-reply-tokens", str(REPLY_TOKENS), "--auth", "dev",
    # Limits are not under test here; keep them out of the way.
    "--turns-per-minute", "100000", "--max-connections-per-user", "64",
]


@pytest.fixture(scope="module")
def two_processes(redis_url):
    prefix = f"rapport-chaos:{uuid.uuid4().hex[:10]}:"
    servers = [ServerProcess(prefix=prefix, redis_url=redis_url, extra=SERVER_FLAGS) for _ in range(2)]
    try:
        with running(*servers, timeout=90):
            yield servers
    finally:
        clean_prefix(prefix, redis_url)


def local_port(client: ResilientClient) -> int | None:
    conn = client.connection
    if conn is None:
        return None
    return conn.local_address[1]


async def test_two_hundred_cut_turns_lose_nothing_and_duplicate_nothing(two_processes, redis_url):
    seed = int(os.environ.get("RAPPORT_CHAOS_SEED", time.time_ns() % 1_000_000))
    print(f"\nchaos seed {seed} (RAPPORT_CHAOS_SEED={seed} replays the same plan)")
    rng = random.Random(seed)
    total = USERS * TURNS_PER_USER
    # Exactly half of the first cuts by the client, half by the proxy; half of
    # the resumes go to the turn's own process, half to the other one.
    by_client = [True] * (total // 2) + [False] * (total - total // 2)
    cross = [True] * (total // 2) + [False] * (total - total // 2)
    rng.shuffle(by_client)
    rng.shuffle(cross)
    plans = []
    for k in range(total):
        first = rng.randint(1, 28)
        second = rng.randint(first + 2, 34) if rng.random() < 0.25 else None
        plans.append({"cuts": [c for c in (first, second) if c is not None],
                      "by_client": [by_client[k], rng.random() < 0.5],
                      "cross": [cross[k], rng.random() < 0.5],
                      "proxy_mode": [rng.choice(["rst", "close", "after"]) for _ in range(2)],
                      "after_bytes": [rng.randint(1, 120) for _ in range(2)]})

    ports = [s.port for s in two_processes]
    counts: Counter[str] = Counter()
    results: dict[str, list[tuple[str, str, str]]] = {}  # user -> [(text, reply, turn_id)]
    tag = uuid.uuid4().hex[:6]

    async def user_session(i: int) -> None:
        user = f"chaos-{tag}-{i}"
        proxy = await FaultProxy(ports, start_index=i % 2).start()
        client = ResilientClient(proxy.url(), user=user, backoff_base=0.05, backoff_cap=0.5,
                                 open_timeout=15.0, rng=random.Random(seed + i))
        exchanged: list[tuple[str, str, str]] = []
        try:
            await client.connect(timeout=30)
            for n in range(TURNS_PER_USER):
                plan = plans[i * TURNS_PER_USER + n]
                text = f"user {i} says {n}: how was your day?"
                turn = client.send(text, options={"max_tokens": 64})
                seqs: list[int] = []
                parts: list[str] = []
                owner: int | None = None
                cut_conns: list[int] = []  # proxy index of each cut that a resume must follow
                cuts_made = 0
                async for delta in turn:
                    seqs.append(delta["seq"])
                    parts.append(delta["text"])
                    port = local_port(client)
                    here = proxy.find(peer_port=port) if port is not None else None
                    if owner is None:
                        assert here is not None, "the first delta came without a connection"
                        owner = here.upstream_index
                    c = cuts_made
                    if c < len(plan["cuts"]) and delta["seq"] >= plan["cuts"][c]:
                        if here is None or here.closed or here.cut_after_down is not None:
                            continue  # between connections, or a byte-count cut is pending
                        cuts_made += 1
                        by_client_now = plan["by_client"][c]
                        mode = "abort" if by_client_now else plan["proxy_mode"][c]
                        if turn.done:
                            # The reader already holds the end: this cut leads to no resume.
                            counts["cuts_after_end_arrived"] += 1
                        elif mode != "after":
                            # (A byte-count cut lands later, maybe only in the next turn.)
                            cut_conns.append(here.index)
                        # Where the resume goes: the owner's process or the other one.
                        proxy.pin_next(1 - owner if plan["cross"][c] else owner)
                        if by_client_now:
                            counts["cuts_by_client"] += 1
                            client.connection.abort()
                        else:
                            counts["cuts_by_proxy"] += 1
                            counts[f"proxy_{mode}"] += 1
                            if mode == "after":
                                proxy.cut_after(here, plan["after_bytes"][c], mode="rst")
                            else:
                                proxy.cut(here, mode)
                end = turn.end
                assert end is not None and turn.error is None, (user, n, turn.error)
                # The application got every delta exactly once, in order.
                assert seqs == list(range(1, len(seqs) + 1)), (user, n, seqs)
                assert "".join(parts) == end["text"], (user, n)
                assert end["seq"] == len(seqs)
                assert end["finish_reason"] in ("stop", "length"), end
                counts["turns"] += 1
                counts["deltas"] += len(seqs)
                # Each cut was followed by a resume on the next connection this user opened.
                for cut_index in cut_conns:
                    after = [c for c in proxy.connections.values() if c.index > cut_index]
                    assert after, ("no reconnect after a cut", user, n, plan)
                    counts["resumes_observed"] += 1
                    if after[0].upstream_index != owner:
                        counts["cross_process_resumes"] += 1
                exchanged.append((text, end["text"], turn.turn_id))
            for key, value in client.stats.items():
                counts[key] += value
            for key, value in proxy.stats.items():
                if key.startswith("cuts"):
                    counts[f"proxy_{key}"] += value
        finally:
            await client.close()
            await proxy.close()
        results[user] = exchanged

    started = time.monotonic()
    # Two groups of ten users, each user's ten turns one after another.
    group = USERS // 2
    for g in range(0, USERS, group):
        await asyncio.gather(*(user_session(i) for i in range(g, g + group)))
    elapsed = time.monotonic() - started

    r = redis_client(redis_url)
    store = ConversationStore(r, KeySpace(two_processes[0].prefix))
    try:
        for user, exchanged in results.items():
            messages = await store.history(user_id=user, conversation_id="default", limit=100)
            expected = [(role, body, turn_id) for text, reply, turn_id in exchanged
                        for role, body in (("user", text), ("assistant", reply))]
            assert [(m.role, m.text, m.turn_id) for m in messages] == expected, user
            assert len({m.id for m in messages}) == len(messages)
            assert all(m.status == "complete" for m in messages if m.role == "user")
            assert all(m.status in ("stop", "length") for m in messages if m.role == "assistant")
            for _, reply, turn_id in exchanged:
                record = await store.get_turn(user_id=user, turn_id=turn_id)
                assert record is not None and record.status == "ended" and record.text == reply
            assert await store.active_turns(user_id=user) == []
    finally:
        await r.aclose()

    print(f"chaos: {counts['turns']} turns in {elapsed:.1f} s; "
          f"cuts by client {counts['cuts_by_client']}, by proxy {counts['cuts_by_proxy']} "
          f"(rst {counts['proxy_rst']}, close {counts['proxy_close']}, after-bytes {counts['proxy_after']}); "
          f"reconnects {counts['reconnects']}, resumes {counts['resumes']} "
          f"(cross-process {counts['cross_process_resumes']} of {counts['resumes_observed']} observed), "
          f"re-sent starts {counts['resends']}, deltas {counts['deltas']}, "
          f"duplicates dropped by the client {counts['duplicates_dropped']}, "
          f"dead connections {counts['dead_connections']}")
    assert counts["turns"] == total
    assert counts["cuts_by_client"] + counts["cuts_by_proxy"] >= total
    assert counts["reconnects"] >= total
    assert counts["cross_process_resumes"] > 0
