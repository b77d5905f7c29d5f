"""``rapport serve --workers N``: one port, N gateway processes, one Redis.

The supervisor (this module, in the process the user started) binds the
listening socket once and starts N worker processes that each run the whole
app on it (:func:`server.serving.serve`): their own Runtime, engine client,
Redis pools and event loop. Everything a turn needs lives in Redis, so a
socket may land on any worker and a turn started on one is resumed on another
exactly as across separate machines.

Why one shared socket rather than SO_REUSEPORT: with SO_REUSEPORT each worker
binds its own socket and the kernel hashes every new connection to one of them
(socket(7)); a connection queued on the socket of a worker that dies is reset
with it (unless the ``net.ipv4.tcp_migrate_req`` sysctl of Linux 5.14 is on).
A socket shared by inheritance has one accept queue that every live worker
drains, so a SIGKILLed worker loses only the connections it had accepted. (The
kernel wakes one waiting acceptor per connection; the spread is less even than
SO_REUSEPORT's hash, which matters little with long-lived WebSockets.)

Engines. ``--engine simulated``: every worker simulates its own engine (a
timing simulation; N workers simulate N times the capacity). ``--engine
remote``: every worker uses the same upstream servers. ``--engine vllm`` with
N > 1: loading the model N times would take N times the memory and cores, so
the supervisor starts vLLM's own OpenAI server once, as a child, and the
workers run the remote engine against it. vLLM's own multi-front-end mode
(several API processes on one engine core, ``--api-server-count``) lives
inside vLLM's server; Rapport's workers are not vLLM API processes, so the
OpenAI server is the supported interface they can share.

Restarts. A worker that dies is logged (exit code or signal) and started
again after a back-off (1 s, doubling to 30 s while it keeps dying within a
minute of its start): its turns are meanwhile ended ``interrupted`` by the
other workers when their leases run out, as for any dead process. A worker
that fails before it accepts connections -- at the first start or at a
restart -- is a configuration or code fault, not bad luck: the supervisor then
stops every worker and exits 1.

Signals. SIGTERM or SIGINT to the supervisor is forwarded to every worker as
SIGTERM; each drains (sockets closed 1001, running turns given
``--shutdown-drain-s``) and the supervisor waits for all of them, then stops
the vLLM child. Workers ask the kernel for SIGTERM should the supervisor die
(prctl(2) PR_SET_PDEATHSIG), so they never outlive it.

Metrics are per worker: each worker's ``/metrics`` reports that process only,
and every response carries ``X-Rapport-Worker``. A scrape through the shared
port lands on whichever worker accepts it. Workers are named ``rapport-wN``
(``/proc/PID/comm``), so ``ps`` and ``top`` tell them apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from types import FrameType

from .config import Settings

log = logging.getLogger("rapport.workers")

#: How long a worker may take from its start to accepting connections.
START_TIMEOUT_S = 120.0
#: How long vLLM's server may take to load the model and answer /health.
VLLM_START_TIMEOUT_S = 900.0
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
#: A worker that lived this long before dying is restarted after the shortest delay again.
STABLE_AFTER_S = 60.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PR_SET_NAME = 15


def worker_comm(worker: str) -> str:
    """The name a worker gives its process (``/proc/PID/comm``, ``ps``, ``top``)."""
    return f"rapport-w{worker}"[:15]  # the kernel keeps 15 bytes


def _linux_worker_setup(worker: str) -> None:
    """Name the process and ask for SIGTERM when the parent exits (prctl(2)); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(worker_comm(worker).encode()), 0, 0, 0)


def _worker_main(settings: Settings, sock: socket.socket, worker: str, started: EventType,
                 parent: int) -> None:
    """The body of one worker process (spawned: a fresh interpreter)."""
    _linux_worker_setup(worker)
    if os.getppid() != parent:
        return  # the supervisor died before prctl took effect
    from .serving import serve

    serve(settings, sock=sock, worker=worker, on_started=started.set)


@dataclasses.dataclass(eq=False)
class _Slot:
    """One worker position; its process is replaced when it dies."""

    index: int
    process: SpawnProcess | None = None
    started: EventType | None = None
    started_at: float = 0.0
    delay_s: float = RESTART_DELAY_S
    restart_at: float | None = None


class Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i + 1) for i in range(count)]
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._vllm: subprocess.Popen[bytes] | None = None
        self._worker_settings = settings

    # ------------------------------------------------------------ running

    def run(self) -> int:
        from .serving import listening_socket

        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.settings.engine == "vllm":
                self._worker_settings = self._start_vllm()
            self._sock = listening_socket(self.settings)
            log.info("supervisor: %d workers on %s:%d", self.count, self.settings.host,
                     self._sock.getsockname()[1])
            for slot in self._slots:
                self._spawn(slot)
            if not all(self._wait_started(slot) for slot in self._slots):
                return 1
            # Once for the whole port, not once per worker (protocol addition 21).
            from .dev_link import announce_development_link

            announce_development_link(self.settings, int(self._sock.getsockname()[1]))
            return self._watch()
        except _VllmFailed as exc:
            log.error("supervisor: %s", exc)
            return 1
        finally:
            self._stop_workers()
            self._stop_vllm()
            if self._sock is not None:
                self._sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def _spawn(self, slot: _Slot) -> None:
        assert self._sock is not None
        slot.started = self._ctx.Event()
        # spawn (not fork): a fresh interpreter per worker, no event loop or
        # threads copied from here; the socket travels by descriptor passing.
        slot.process = self._ctx.Process(
            target=_worker_main, name=f"rapport-worker-{slot.index}",
            args=(self._worker_settings, self._sock, str(slot.index), slot.started, os.getpid()))
        slot.process.start()
        slot.started_at = time.monotonic()
        slot.restart_at = None

    def _wait_started(self, slot: _Slot) -> bool:
        """True once the worker accepts connections; False if it died or hung first (or we were stopped)."""
        assert slot.process is not None and slot.started is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not slot.started.wait(0.1):
            if self._stop.is_set():
                return False
            if not slot.process.is_alive():
                log.error("supervisor: worker %d failed at start (exit code %s); stopping", slot.index,
                          slot.process.exitcode)
                return False
            if time.monotonic() > deadline:
                log.error("supervisor: worker %d did not start within %.0f s; stopping", slot.index,
                          START_TIMEOUT_S)
                return False
        return True

    def _watch(self) -> int:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        log.warning("supervisor: restarting worker %d", slot.index)
                        self._spawn(slot)
                        if not self._wait_started(slot):
                            return 0 if self._stop.is_set() else 1
                    continue
                assert slot.process is not None
                if slot.process.is_alive():
                    continue
                lived = now - slot.started_at
                code = slot.process.exitcode
                cause = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                slot.delay_s = (RESTART_DELAY_S if lived >= STABLE_AFTER_S
                                else min(RESTART_DELAY_MAX_S, slot.delay_s * 2))
                log.error("supervisor: worker %d (pid %s) died (%s) after %.1f s; its turns end interrupted "
                          "when their leases run out; restarting it in %.0f s", slot.index, slot.process.pid,
                          cause, lived, slot.delay_s)
                slot.process.close()
                slot.process = None
                slot.restart_at = now + slot.delay_s
        return 0

    # ------------------------------------------------------------ stopping

    def _stop_workers(self) -> None:
        """SIGTERM every worker, wait for their drain, SIGKILL what overstays."""
        live = [s.process for s in self._slots if s.process is not None and s.process.is_alive()]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid or 0, signal.SIGTERM)
        # uvicorn's graceful shutdown is bounded by shutdown_drain_s + 2 s (server.serving).
        deadline = time.monotonic() + self.settings.shutdown_drain_s + 10.0
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("supervisor: worker pid %s did not drain in time; killing it", process.pid)
                process.kill()
                process.join(5.0)
        for slot in self._slots:
            if slot.process is not None and not slot.process.is_alive():
                slot.process.close()
            slot.process = None

    # ------------------------------------------------------------ one shared vLLM

    def _start_vllm(self) -> Settings:
        """vLLM's OpenAI server as a child; the workers' settings point the remote engine at it."""
        import httpx

        from .model_prep import prepare_default_model
        from .runtime import parse_engine_args

        s = self.settings
        model = s.model or str(prepare_default_model())
        default_cpu = not s.model
        max_model_len = s.max_model_len or (2048 if default_cpu else 0)
        dtype = s.dtype if s.dtype != "auto" or not default_cpu else "float32"
        port = _free_loopback_port()
        served = Path(model.rstrip("/")).name or model
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", served, "--dtype", dtype, "--enforce-eager",
               "--enable-prompt-tokens-details", "--host", "127.0.0.1", "--port", str(port)]
        if max_model_len:
            cmd += ["--max-model-len", str(max_model_len)]
        for key, value in parse_engine_args(s.vllm_arg).items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is not False:
                cmd += [flag, str(value)]
        log.info("supervisor: starting vLLM's OpenAI server for %d workers: %s", self.count, " ".join(cmd))
        # Its own session: a Ctrl-C meant for the supervisor must not kill the
        # engine under the draining workers; it is stopped last, as a group
        # (its engine core is a process of its own).
        self._vllm = subprocess.Popen(cmd, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        while True:
            if self._stop.wait(0.5):
                raise _VllmFailed("stopped while vLLM's server was starting")
            if self._vllm.poll() is not None:
                raise _VllmFailed(f"vLLM's server exited with {self._vllm.returncode} at start")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise _VllmFailed(f"vLLM's server did not answer /health within {VLLM_START_TIMEOUT_S:.0f} s")
        return dataclasses.replace(s, engine="remote", upstream=[url], model=model,
                                   max_model_len=max_model_len)

    def _stop_vllm(self) -> None:
        proc = self._vllm
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever its engine core left
        self._vllm = None


class _VllmFailed(Exception):
    pass


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_workers(settings: Settings) -> int:
    """``rapport serve`` with ``--workers`` > 1; the exit status."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s supervisor %(name)s: %(message)s")
    return Supervisor(settings, settings.worker_count()).run()
