"""Pushes after events, coalesced per user when the agent falls behind.

Applying an event only marks its user as owed a push. One worker computes and publishes pushes
in the order users became owed. Events of a user that arrive before the worker reaches that
user join the same push, listed in ``event_ids``; the push is computed after the latest of
them was applied, so the latest event is always reflected and none is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from agent.pipeline.pipeline import Pipeline
from agent.wire.user_tokens import user_token

log = logging.getLogger(__name__)

# how long a stop waits for owed pushes (an orchestrator's grace period is longer)
FLUSH_TIMEOUT_S = 5.0


class PushScheduler:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        # insertion-ordered: the user owed longest is served first, so nobody starves
        self._owed: dict[str, tuple[list[str], float]] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # read when metrics are scraped, not set per event
        pipeline.metrics.push_backlog.set_function(lambda: len(self._owed))

    def schedule(self, user_id: str, event_key: str) -> None:
        entry = self._owed.get(user_id)
        if entry is None:
            self._owed[user_id] = ([event_key], time.perf_counter())
        else:
            entry[0].append(event_key)
        self._idle.clear()
        self._wake.set()

    async def _push(self, user_id: str, event_ids: list[str], owed_since: float) -> None:
        recs = await self.pipeline.recommend(user_id, event_ids=event_ids)
        await self.pipeline.hooks.call_all("recsys_publish", recommendations=recs, user_token=user_token(user_id))
        metrics = self.pipeline.metrics
        metrics.pushes.inc()
        metrics.pushed_events.inc(len(event_ids))
        metrics.push_lag_seconds.observe(time.perf_counter() - owed_since)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._owed:
                user_id = next(iter(self._owed))
                event_ids, owed_since = self._owed.pop(user_id)
                try:
                    await self._push(user_id, event_ids, owed_since)
                except Exception:
                    # The event is applied and acknowledged already; a failed push is reported
                    # and the next event of this user brings a fresh one.
                    log.exception("push failed")
                # Let the consumers run between pushes so that ingestion never starves.
                await asyncio.sleep(0)
            self._idle.set()

    async def flush(self, timeout: float | None = None) -> None:
        with suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_TIMEOUT_S if timeout is None else timeout):
                await self._idle.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[PushScheduler]:
        task = asyncio.create_task(self.run(), name="push-scheduler")
        try:
            yield self
            await self.flush()
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            if self._owed:
                # Their events are applied and acknowledged: state and the next pushes reflect
                # them; only these pushes are not sent.
                log.warning("stopping with %d owed pushes unsent after %.1f s", len(self._owed), FLUSH_TIMEOUT_S)
