"""The training worker: a process of its own, started at the first round and kept for the next.

Training in the agent's process would compete with the hot path twice: for the GIL (torch's
many small calls take it back between kernels) and for the cores. In a process of its own, at a
lower priority (``nice``), training takes only the CPU the agent leaves idle, and torch's
thread settings there (one intra-op thread) are its own, not the embedding model's. A job goes
over a pipe and its result comes back the same way; the process is spawned, not forked (the
agent runs threads, which a fork would copy in whatever state they are), and started as
``python -m plugins.sequence.worker_process`` rather than through ``multiprocessing``'s spawn, which
would import the agent's main module again in the worker (a script without a main guard would
run twice).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from plugins.sequence.stream import TrainingJob, TrainingResult

log = logging.getLogger(__name__)

STOP_WAIT_S = 2.0


class TrainingFailed(RuntimeError):
    """A round failed in the worker (its traceback is the message), or the worker died."""


class TrainingWorker:
    def __init__(self, nice: int) -> None:
        self.nice = nice
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def train(self, job: TrainingJob) -> TrainingResult:
        """Run one round in the worker (blocking: call it from a thread, or where blocking is the
        point). Raises TrainingFailed."""
        with self._lock:
            connection = self._start()
            try:
                connection.send(job)
                status, payload = connection.recv()
            except (EOFError, OSError) as exc:
                self._stop()
                raise TrainingFailed(f"the training worker stopped: {exc.__class__.__name__}: {exc}") from None
            if status != "ok":
                raise TrainingFailed(str(payload))
            if not isinstance(payload, TrainingResult):
                raise TrainingFailed(f"the training worker answered {type(payload).__name__}")
            return payload

    def _start(self) -> Connection:
        if self._closed:
            raise TrainingFailed("the training worker is closed")
        if self._process is not None and self._process.poll() is None and self._connection is not None:
            return self._connection
        self._stop()
        ours, theirs = socket.socketpair()
        # the worker imports this package from where the agent does
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "plugins.sequence.worker_process", str(theirs.fileno()), str(self.nice)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path},
            )
        finally:
            theirs.close()
        self._process, self._connection = process, Connection(ours.detach())
        log.info("sequence model: training worker started (pid %s, nice %d)", process.pid, self.nice)
        return self._connection

    def _stop(self) -> None:
        process, connection = self._process, self._connection
        self._process = self._connection = None
        if connection is not None:
            connection.close()
        if process is not None:
            _end(process)

    def close(self) -> None:
        """Stop the worker, abandoning a round in flight (its caller gets TrainingFailed)."""
        self._closed = True
        process = self._process
        # not under the lock: a round in flight holds it until the process is gone, and its
        # thread then closes the connection (closing it here could close another's descriptor)
        if process is not None:
            _end(process)
        if self._lock.acquire(timeout=STOP_WAIT_S):
            try:
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None
            finally:
                self._lock.release()


def _end(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_WAIT_S)
