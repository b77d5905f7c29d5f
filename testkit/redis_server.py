"""A private ``redis-server`` for tests that stop, pause or kill Redis.

The shared Redis on 6379 is never touched by such tests: each gets its own
server on a free port, with an append-only file in a directory of its own, so
that a restart on the same port and directory replays what was acknowledged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import redis

from .ports import free_port


class RedisServer:
    """``redis-server`` in a child process; ``appendfsync`` is Redis' own setting
    (``always``: every write is on disk before it is acknowledged)."""

    def __init__(self, *, appendfsync: str = "everysec") -> None:
        self.port = free_port()
        self.appendfsync = appendfsync
        self.dir = tempfile.mkdtemp(prefix="rapport-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart on the same port and directory) and wait until it answers PING."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.5) as client:
                    if client.ping():
                        return
            except redis.ConnectionError:  # includes BusyLoadingError while the AOF replays
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        """SIGSTOP pauses it (it answers nothing, as a stalled or partitioned server); SIGCONT resumes."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing after the last fsync survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server must be able to die
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
