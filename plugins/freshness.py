"""Freshness: items new to the catalog get shown before anyone has engaged with them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import grow
from agent.pipeline.values import Candidates, Query, first_allowed

DEFAULT_WINDOW_S = 7 * 86_400.0


class Freshness:
    """Proposes the most recently added items, newest first; an item stops being fresh after
    ``window_s`` (option in ``[plugins.freshness]``, default 7 days). Fusion decides how much
    this is worth: nothing on a stream where new items do not get engagement."""

    def __init__(self) -> None:
        self.added_at = np.full(1024, -np.inf)
        self.window_s = DEFAULT_WINDOW_S
        # slots, newest first, and their times; recomputed only when an item is added
        self._newest_first: np.ndarray | None = None
        self._newest_keys = np.empty(0)

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._configure(ctx)

    @asynccontextmanager
    async def _configure(self, ctx: AgentContext) -> AsyncIterator[None]:
        self.window_s = float(ctx.options("freshness").get("window_s", DEFAULT_WINDOW_S))
        if self.window_s <= 0:
            raise ValueError("[plugins.freshness] window_s must be positive")
        yield

    @hookimpl
    def recsys_catalog_upsert(self, slots: list[int], ts: float) -> None:
        self.added_at = grow(self.added_at, max(slots) + 1, fill=-np.inf)
        for slot in slots:
            # an edit does not make an item new again
            if not np.isfinite(self.added_at[slot]):
                self.added_at[slot] = ts
                self._newest_first = None

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates | None:
        size = query.catalog.size
        self.added_at = grow(self.added_at, size, fill=-np.inf)
        added = self.added_at[:size]
        if self._newest_first is None or len(self._newest_first) > size:
            known = np.flatnonzero(np.isfinite(added))
            self._newest_first = known[np.argsort(-added[known], kind="stable")]
            # negated, so that they ascend along the list: the fresh items are a prefix of it
            self._newest_keys = -added[self._newest_first]
        fresh = int(np.searchsorted(self._newest_keys, -(query.now - self.window_s), side="right"))
        slots = first_allowed(self._newest_first[:fresh], query.n_candidates, query.allowed())
        if len(slots) == 0:
            return None
        now = query.now

        def age_hours(wanted: np.ndarray) -> np.ndarray:
            # whole hours: items added in the same batch are equally fresh, not ordered by
            # the milliseconds between them
            return -np.floor((now - added[wanted]) / 3_600.0)

        return Candidates(
            source="freshness", slots=slots, scores=age_hours(slots), reasons="new in the catalog", score_of=age_hours
        )
