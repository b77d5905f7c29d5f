"""Shared fixtures: real Redis, real uvicorn processes on 127.0.0.1, real sockets.

The machinery (ports, server processes, prefix cleaning) lives in ``testkit``,
which the scripts under bench/ share; the names tests import from here
(``ServerProcess``, ``clean_prefix``, ``free_port``, ...) stay importable.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from testkit import servers
from testkit.ports import free_port
from testkit.redis_prefix import clean_prefix as _clean_prefix

__all__ = ["JWT_SECRET", "REDIS_URL", "ROOT", "SIM_FLAGS", "ServerProcess", "clean_prefix", "free_port",
           "make_token"]

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


@pytest.fixture(scope="session")
def redis_url() -> str:
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
    clean_prefix(prefix)


SIM_FLAGS = ["--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "5"]


@pytest.fixture(scope="session")
def sim_server(sim_prefix: str) -> Iterator[ServerProcess]:
    """One simulated-engine server in dev mode (JWT also accepted), shared by the session."""
    server = ServerProcess(prefix=sim_prefix, extra=[*SIM_FLAGS, "--auth", "dev"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim_server_b(sim_prefix: str, sim_server: ServerProcess) -> Iterator[ServerProcess]:
    """A second process sharing the first one's Redis and prefix."""
    server = ServerProcess(prefix=sim_prefix, extra=[*SIM_FLAGS, "--auth", "dev"]).start()
    yield server
    server.stop()


def make_token(user: str, *, ttl: int = 600, secret: str = JWT_SECRET, **extra: object) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl, **extra}, secret, algorithm="HS256")


@pytest.fixture(scope="session")
def jwt_server(sim_prefix: str) -> Iterator[ServerProcess]:
    """A simulated-engine server that accepts only JWTs."""
    server = ServerProcess(prefix=sim_prefix, extra=[*SIM_FLAGS, "--auth", "jwt"]).start()
    yield server
    server.stop()
