"""Pushes after events, coalesced per user and ranked in batches when the agent falls behind.

Applying an event only marks its user as owed a push. One worker computes and publishes pushes
in the order users became owed: whenever it is free it takes every user owed a push at that
moment (up to ``push_batch``) and ranks them together, so the stages' per-call cost is shared
under load while an idle agent ranks one user at once (it never waits for a batch to fill:
the dynamic batching of model servers). Events of a user that arrive before the worker reaches
that user join the same push, listed in ``event_ids``; the push is computed after the latest
of them was applied, so the latest event is always reflected and none is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
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
    def __init__(self, pipeline: Pipeline, max_batch: int = 64) -> None:
        self.pipeline = pipeline
        self.max_batch = max_batch
        self._publish = pipeline.hooks.caller("recsys_publish")
        # taken from _owed and not published yet (a stop may cut a batch short)
        self._unsent_in_batch = 0
        # when set by the events consumer: a batch of pushes waits until what the stream holds
        # has been applied (ingest comes first; the pushes of a burst then coalesce per user)
        self.ingest_caught_up: asyncio.Event | None = None
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

    def forget(self, user_id: str) -> None:
        """A push owed to a user who was just forgotten is not made: it would name their events."""
        self._owed.pop(user_id, None)

    def _take(self) -> list[tuple[str, list[str], float]]:
        """The users owed longest, up to ``max_batch``: (user id, event ids, owed since)."""
        taken = []
        for user_id in list(itertools.islice(self._owed, self.max_batch)):
            event_ids, owed_since = self._owed.pop(user_id)
            taken.append((user_id, event_ids, owed_since))
        return taken

    async def _push(self, batch: list[tuple[str, list[str], float]]) -> None:
        pipeline = self.pipeline
        queries = [pipeline.make_query(user_id, pipeline.settings.default_k) for user_id, _, _ in batch]
        recommendations = await pipeline.recommend_batch(queries, [event_ids for _, event_ids, _ in batch])
        metrics = pipeline.metrics
        self._unsent_in_batch = len(batch)
        for (user_id, event_ids, owed_since), recs in zip(batch, recommendations):
            await self._publish(recommendations=recs, user_token=user_token(user_id))
            self._unsent_in_batch -= 1
            metrics.pushes.inc()
            metrics.pushed_events.inc(len(event_ids))
            metrics.push_lag_seconds.observe(time.perf_counter() - owed_since)
        metrics.push_batch_size.observe(len(batch))

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._owed:
                if self.ingest_caught_up is not None:
                    await self.ingest_caught_up.wait()
                try:
                    await self._push(self._take())
                except Exception:
                    self._unsent_in_batch = 0
                    # The events are applied and acknowledged already; a failed push is
                    # reported and the next event of these users brings a fresh one.
                    log.exception("push failed")
                # Let the consumers run between batches so that ingestion never starves.
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
            unsent = len(self._owed) + self._unsent_in_batch
            if unsent:
                # Their events are applied and acknowledged: state and the next pushes reflect
                # them; only these pushes are not sent.
                log.warning("stopping with %d owed pushes unsent after %.1f s", unsent, FLUSH_TIMEOUT_S)
