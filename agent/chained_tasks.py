"""Waiting for background work that may chain another task when it ends.

A window-fitted source's fit, or the sequence model's training round, starts one more when
events came due while it ran: ``recsys_settle`` (wait until what is under way is done) must
wait for the last of the chain, not the task it saw first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

CurrentTask = Callable[[], "asyncio.Task[Any] | None"]


def settle_chain(current: CurrentTask) -> Awaitable[None] | None:
    """None when ``current()`` names no running task (nothing to wait for, so a settle costs
    no await); else an awaitable that returns once the task ``current()`` names is done, and
    the one it names then, until none runs."""
    task = current()
    if task is None or task.done():
        return None
    return _last_of(current)


async def _last_of(current: CurrentTask) -> None:
    while (task := current()) is not None and not task.done():
        await asyncio.wait([task])
