"""The training worker process's main: ``python -m plugins.sequence.worker_process FD NICE``.

Kept apart from ``worker.py`` (the agent's side), which the package imports: a module run with
``-m`` must not be imported before it runs.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection


def serve(connection: Connection, nice: int) -> None:
    """The worker process: rounds, one at a time, until the pipe closes."""
    # an interrupt at the terminal reaches the whole process group: the agent stops this
    # worker itself, so the worker does not die of it first with a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    from plugins.sequence.training import train

    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        try:
            connection.send(("ok", train(job)))
        except Exception:
            connection.send(("error", traceback.format_exc(limit=8)))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
