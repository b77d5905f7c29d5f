"""Shared fixtures: real Redis, real uvicorn processes on 127.0.0.1, real sockets."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("RAPPORT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
JWT_SECRET = "test-secret-" + "x" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``rapport serve`` in a child process, as a user would run it."""

    def __init__(self, *, prefix: str, extra: list[str] | None = None, env: dict[str, str] | None = None,
                 redis_url: str = REDIS_URL, port: int | None = None) -> None:
        self.port = port or free_port()
        self.prefix = prefix
        self.redis_url = redis_url
        self.extra = extra or []
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(f"/tmp/rapport-test-server-{self.port}.log")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "rapport.cli", "serve", "--port", str(self.port),
               "--redis-url", self.redis_url, "--redis-prefix", self.prefix,
               "--jwt-secret", JWT_SECRET, "--log-level", "warning", *self.extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "wb")
        # Its own process group, so that killing it also kills an engine's children
        # (vLLM's engine core runs in a spawned process).
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        finally:
            # Whatever the server left behind in its group goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def clean_prefix(prefix: str, url: str = REDIS_URL) -> None:
    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=prefix.replace("[", "\\[") + "*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


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
