"""A private Redis Cluster for tests: three primaries, three replicas, on free ports.

Each node is a ``redis-server --cluster-enabled yes`` child process with a
directory of its own (its ``nodes.conf``), no persistence, and the cluster is
formed with ``redis-cli --cluster create ... --cluster-replicas 1``. A node
also listens on its port + 10000 (the cluster bus), so ports are chosen at or
below 55535 with both ports free. Every node started is stopped by its pid and
its directory removed by :meth:`RedisCluster.stop`, so no node outlives the run
and keeps ports busy for the next one.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: The cluster bus of a node listens on the node's port plus this offset (Redis' fixed rule).
BUS_OFFSET = 10000
_HIGHEST_PORT = 65535 - BUS_OFFSET


#: Sharded pub/sub (SPUBLISH/SSUBSCRIBE), which Rapport uses on a cluster, arrived in Redis 7.
MIN_VERSION = (7, 0)


def redis_server_version() -> tuple[int, ...]:
    """``redis-server --version`` as numbers, e.g. (7, 0, 15)."""
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+(?:\.\d+)*)", out)
    if match is None:
        raise RuntimeError(f"cannot tell the version of redis-server from {out.strip()!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cluster_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` ports at or below 55535 whose cluster-bus twins (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port <= _HIGHEST_PORT and port not in ports and _port_free(port + BUS_OFFSET, host):
            ports.append(port)
    return ports


class RedisCluster:
    """``primaries`` primaries with ``replicas_per_primary`` replicas each, on loopback ports."""

    def __init__(self, *, primaries: int = 3, replicas_per_primary: int = 1) -> None:
        self.primaries = primaries
        self.replicas_per_primary = replicas_per_primary
        self.ports = cluster_ports(primaries * (1 + replicas_per_primary))
        self.dir = Path(tempfile.mkdtemp(prefix="rapport-cluster-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The URL Rapport takes for a cluster: any one node is enough to discover the rest."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    @property
    def seed_url(self) -> str:
        """A plain ``redis://`` URL of the first node (for redis-py's ``RedisCluster.from_url``)."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, form the cluster and wait for ``cluster_state:ok`` on each node.

        RuntimeError when ``redis-server`` is older than 7 (Rapport's cluster
        mode needs sharded pub/sub) or the cluster does not form in time.
        """
        version = redis_server_version()
        if version < MIN_VERSION:
            raise RuntimeError(f"redis-server {'.'.join(map(str, version))} is too old for the cluster tests: "
                               f"sharded pub/sub needs {'.'.join(map(str, MIN_VERSION))} or newer")
        try:
            for port in self.ports:
                node_dir = self.dir / str(port)
                node_dir.mkdir()
                self.procs.append(subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
                     "--dir", str(node_dir), "--save", "", "--appendonly", "no",
                     "--logfile", str(node_dir / "redis.log")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + timeout
            for port in self.ports:
                self._wait(functools.partial(self._answers, port), deadline, f"node {port} up")
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout)
            for port in self.ports:
                self._wait(functools.partial(self._cluster_ok, port), deadline, f"cluster_state:ok on {port}")
        except BaseException:
            self.stop()
            raise

    def _answers(self, port: int) -> bool:
        return self._cli(port, "ping").strip() == "PONG"

    def _cluster_ok(self, port: int) -> bool:
        return "cluster_state:ok" in self._cli(port, "cluster", "info")

    def _cli(self, port: int, *args: str) -> str:
        try:
            done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                                  timeout=5)
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ready: {what}; logs under {self.dir}")
            if any(proc.poll() is not None for proc in self.procs):
                raise RuntimeError(f"a Redis Cluster node exited; logs under {self.dir}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node this object started (by pid) and remove their directories."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(**kwargs: int) -> Iterator[RedisCluster]:
    """A started :class:`RedisCluster`, stopped on the way out."""
    cluster = RedisCluster(**kwargs)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
