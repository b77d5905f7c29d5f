"""What the stores do differently when their client is a Redis Cluster client.

Rapport's keys are laid out so that every multi-key script touches one slot
(see :mod:`sessions.keys`), so most commands need nothing special on a cluster:
redis-py's ``RedisCluster`` routes each command or script by its keys. Three
things differ, and are handled here so that the single-node path stays exactly
what it was:

Scripts in a batch
    On one Redis node, several script calls travel in one non-transactional
    pipeline (one round trip). redis-py's cluster pipeline refuses ``EVALSHA``
    (it cannot reload a script a node lacks in the middle of a pipeline), so on
    a cluster the calls run concurrently instead, each routed to its own slot's
    node: the same latency (one round trip per node, in parallel), no
    atomicity lost (a pipeline never made the calls atomic together).

Scanning one user's keys
    ``SCAN`` on a cluster walks one node. All of a user's keys share the hash
    tag ``{u:<id>}``, hence one slot and one node, so the scan goes to that
    node only instead of to every primary.

Pub/sub
    See :mod:`server.coordination`: sharded pub/sub on a cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

__all__ = ["ScriptCall", "is_cluster", "run_scripts", "scan_slot_of"]

#: One script call: the script, its KEYS, its ARGV.
ScriptCall = tuple[AsyncScript, Sequence[str], Sequence[Any]]


def is_cluster(client: object) -> bool:
    """True for redis-py's asyncio Redis Cluster client."""
    return isinstance(client, RedisCluster)


async def run_scripts(client: Any, calls: Sequence[ScriptCall], *, raise_on_error: bool = True) -> list[Any]:
    """Run ``calls`` in one round trip where the client allows it; the replies, in order.

    Single node: one non-transactional pipeline. Cluster: concurrent calls.
    With ``raise_on_error`` false a failed call's exception stands in its
    reply (as ``Pipeline.execute(raise_on_error=False)`` does); otherwise the
    first failure is raised.
    """
    if not calls:
        return []
    if is_cluster(client):
        replies = await asyncio.gather(*(script(keys=list(keys), args=list(args)) for script, keys, args in calls),
                                       return_exceptions=True)
        for reply in replies:
            # Cancellation and other non-Exception failures are never replies.
            if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                raise reply
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return list(replies)
    pipe = client.pipeline(transaction=False)
    for script, keys, args in calls:
        await script(keys=list(keys), args=list(args), client=pipe)
    return list(await pipe.execute(raise_on_error=raise_on_error))


async def scan_slot_of(client: Any, key: str, *, match: str, count: int = 1000) -> AsyncIterator[str]:
    """Every key matching ``match``, scanning only the node that holds ``key``'s slot on a cluster.

    ``match`` must only match keys of ``key``'s hash tag (one slot), which is
    what makes scanning that one node complete. On a single node: a plain SCAN.
    """
    if is_cluster(client):
        node = client.get_node_from_key(key)
        async for found in client.scan_iter(match=match, count=count, target_nodes=node):
            yield found
        return
    async for found in client.scan_iter(match=match, count=count):
        yield found
