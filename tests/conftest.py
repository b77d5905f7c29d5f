"""Shared fixtures: real Redis, real uvicorn processes on 127.0.0.1, real sockets.

The machinery (ports, server processes, prefix cleaning) lives in ``testkit``,
which the scripts under bench/ share; the names tests import from here
(``ServerProcess``, ``clean_prefix``, ``free_port``, ...) stay importable.

Two Redis backends: the single Redis at :data:`REDIS_URL`, and a Redis Cluster
(three primaries, three replicas; :mod:`testkit.redis_cluster`) started once per
session, only when a test asks for it. ``redis_url`` (and every fixture built on
it: ``sim_prefix``, ``sim_server``, ``sim_server_b``, ``jwt_server``) follows the
session-scoped ``redis_backend`` fixture, ``"single"`` unless a module
parametrizes it, as the end-to-end suites do with :data:`BOTH_BACKENDS`::

    pytestmark = BOTH_BACKENDS
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from server.redis_clients import async_client
from testkit import servers
from testkit.ports import free_port
from testkit.redis_cluster import RedisCluster
from testkit.redis_prefix import clean_prefix as _clean_prefix

__all__ = ["BOTH_BACKENDS", "JWT_SECRET", "REDIS_URL", "ROOT", "SIM_FLAGS", "ServerProcess", "clean_prefix",
           "free_port", "make_token", "redis_client"]

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("RAPPORT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
JWT_SECRET = "test-secret-" + "x" * 32


class ServerProcess(servers.ServerProcess):
    """``rapport serve`` on the test Redis, signing and verifying JWTs with :data:`JWT_SECRET`."""

    def __init__(self, *, prefix: str, redis_url: str = REDIS_URL, **kwargs: Any) -> None:
        kwargs.setdefault("jwt_secret", JWT_SECRET)
        kwargs.setdefault("name", "rapport-test-server")
        super().__init__(prefix=prefix, redis_url=redis_url, **kwargs)


def clean_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete the keys a test wrote under ``prefix`` (on the test Redis unless told otherwise)."""
    _clean_prefix(prefix, url)


#: ``pytestmark = BOTH_BACKENDS``: every test of the module runs on the single Redis and on the cluster.
#: Session scope, so the session's servers are started once per backend, not once per test.
BOTH_BACKENDS = pytest.mark.parametrize("redis_backend", ["single", "cluster"], indirect=True, scope="session")


def redis_client(url: str) -> Any:
    """An asyncio client (decoding replies) for a URL ``rapport serve`` takes: one server or a cluster."""
    return async_client(url, decode_responses=True)


@pytest.fixture(scope="session")
def redis_backend(request: pytest.FixtureRequest) -> str:
    """``"single"`` or ``"cluster"``: which Redis ``redis_url`` names (see :data:`BOTH_BACKENDS`)."""
    return str(getattr(request, "param", "single"))


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-primary, 3-replica Redis Cluster for the session, stopped (every node, by pid) at its end."""
    cluster = RedisCluster()
    try:
        cluster.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.fail(f"could not start a Redis Cluster from redis-server/redis-cli: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_url(redis_backend: str, request: pytest.FixtureRequest) -> str:
    if redis_backend == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.ping()
    except redis.ConnectionError:
        pytest.fail(f"these tests need the real Redis at {REDIS_URL}; `make test` starts one")
    finally:
        r.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def sim_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    yield prefix
    clean_prefix(prefix, redis_url)


SIM_FLAGS = ["--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "5"]


@pytest.fixture(scope="session")
def sim_server(sim_prefix: str, redis_url: str) -> Iterator[ServerProcess]:
    """One simulated-engine server in dev mode (JWT also accepted), shared by the session."""
    server = ServerProcess(prefix=sim_prefix, redis_url=redis_url, extra=[*SIM_FLAGS, "--auth", "dev"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim_server_b(sim_prefix: str, sim_server: ServerProcess) -> Iterator[ServerProcess]:
    """A second process sharing the first one's Redis and prefix."""
    server = ServerProcess(prefix=sim_prefix, redis_url=sim_server.redis_url,
                           extra=[*SIM_FLAGS, "--auth", "dev"]).start()
    yield server
    server.stop()


def make_token(user: str, *, ttl: int = 600, secret: str = JWT_SECRET, **extra: object) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl, **extra}, secret, algorithm="HS256")


@pytest.fixture(scope="session")
def jwt_server(sim_prefix: str, redis_url: str) -> Iterator[ServerProcess]:
    """A simulated-engine server that accepts only JWTs."""
    server = ServerProcess(prefix=sim_prefix, redis_url=redis_url, extra=[*SIM_FLAGS, "--auth", "jwt"]).start()
    yield server
    server.stop()
