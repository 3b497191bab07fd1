"""Blocking work off the event loop in daemon threads.

``asyncio.to_thread`` uses the loop's default executor, and ``asyncio.run`` waits for its
threads at exit: a model still loading would hold a stopping agent for tens of seconds. Work
that is safe to abandon at exit (loading a model, embedding) runs in a daemon thread instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

T = TypeVar("T")
# running threads -> the group they were started in
_RUNNING: dict[threading.Thread, str] = {}


def join_running(timeout_s: float, group: str | None = None) -> None:
    """Wait, at most ``timeout_s`` in all, for daemon threads still at work (those of ``group``,
    or all): native code such as torch aborts the process when the interpreter exits under it.

    A plugin that stops waits for its own threads only: waiting for every thread would make
    each stopping plugin wait again for another's slow one (a model still loading)."""
    deadline = time.monotonic() + timeout_s
    for thread, of in list(_RUNNING.items()):
        if group is None or of == group:
            thread.join(max(0.0, deadline - time.monotonic()))


async def in_daemon_thread(function: Callable[..., T], *args: Any, group: str = "") -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def hand_back(outcome: Callable[[], None]) -> None:
        # RuntimeError: the loop closed while the work ran (its program is stopping, or an
        # abandoned caller's loop is gone), so nobody is waiting for the outcome any more.
        with suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, outcome)

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
            hand_back(lambda: future.set_exception(error))
        else:
            hand_back(lambda: future.set_result(result))
        finally:
            _RUNNING.pop(threading.current_thread(), None)

    thread = threading.Thread(target=run, name=getattr(function, "__name__", "worker"), daemon=True)
    _RUNNING[thread] = group
    thread.start()
    return await future
