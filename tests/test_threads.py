"""Blocking work in daemon threads (agent/threads.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.threads import in_daemon_thread, join_running


def test_work_that_outlives_its_event_loop_ends_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))

    async def abandon() -> None:
        # the caller gives up; its loop closes while the thread still works
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await in_daemon_thread(release.wait)

    asyncio.run(abandon())
    release.set()
    join_running(5.0)
    assert failures == []


async def test_results_and_errors_reach_the_awaiting_coroutine() -> None:
    assert await in_daemon_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await in_daemon_thread(lambda: 1 / 0)


async def test_a_stop_waits_for_its_own_group_only() -> None:
    release = threading.Event()
    slow = asyncio.ensure_future(in_daemon_thread(release.wait, group="other"))
    assert await in_daemon_thread(sum, [1], group="mine") == 1
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    # the other group's thread is still blocked: waiting for "mine" returns at once
    await asyncio.to_thread(join_running, 5.0, "mine")
    assert asyncio.get_running_loop().time() - started < 4.0
    release.set()
    assert await slow is True
