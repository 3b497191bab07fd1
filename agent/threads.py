"""Blocking work off the event loop in daemon threads.

``asyncio.to_thread`` uses the loop's default executor, and ``asyncio.run`` waits for its
threads at exit: a model still loading would hold a stopping agent for tens of seconds. Work
that is safe to abandon at exit (loading a model, embedding) runs in a daemon thread instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_daemon_thread(function: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
            loop.call_soon_threadsafe(deliver, lambda: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(deliver, lambda: future.set_result(result))

    threading.Thread(target=run, name=getattr(function, "__name__", "worker"), daemon=True).start()
    return await future
