"""Trending: popularity with exponential time decay, learned from every event."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from agent.catalog import Catalog, grow
from agent.context import AgentContext
from agent.hookspecs import hookimpl
from agent.models import Event
from agent.ranking import Candidates, Query, top_slots
from agent.state import UserState

# How much one event says about an item's appeal. Negative feedback adds nothing rather than
# subtracting: one user's skip says little about the crowd.
EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 1.0,
    "like": 2.0,
    "add_to_cart": 2.0,
    "purchase": 3.0,
    "rate": 1.0,
    "dislike": 0.0,
    "skip": 0.0,
}


class Trending:
    """Scores are kept in units relative to a moving reference time: adding an event costs
    O(1) and every score decays by the same factor, so ranking never needs a sweep.

    Options (``[plugins.trending]``): ``half_life_s`` (default: the ``trending_half_life_s``
    setting).
    """

    source = "trending"

    def __init__(self) -> None:
        self.half_life_s = 86_400.0
        self.scores = np.zeros(1024)
        self.reference_ts: float | None = None

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._configure(ctx)

    @asynccontextmanager
    async def _configure(self, ctx: AgentContext) -> AsyncIterator[None]:
        self.half_life_s = float(ctx.options("trending").get("half_life_s", ctx.settings.trending_half_life_s))
        yield

    def _weight(self, event: Event) -> float:
        weight = EVENT_WEIGHTS.get(event.type, 0.0)
        if event.type == "rate" and event.value is not None:
            # A rating counts as an interaction whatever its value; high ratings a bit more.
            weight = 1.0 + max(0.0, min(event.value, 10.0)) / 10.0
        return weight

    @hookimpl
    def recsys_apply_event(self, event: Event, user: UserState, slot: int, catalog: Catalog) -> None:
        weight = self._weight(event)
        if weight <= 0.0:
            return
        if self.reference_ts is None:
            self.reference_ts = event.ts
        rate = math.log(2) / self.half_life_s
        exponent = (event.ts - self.reference_ts) * rate
        if exponent > 50:
            # Move the reference forward before exp() overflows; rescaling keeps the order.
            self.scores *= math.exp(-exponent)
            self.reference_ts = event.ts
            exponent = 0.0
        self.scores = grow(self.scores, slot + 1)
        self.scores[slot] += weight * math.exp(exponent)

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates | None:
        size = query.catalog.size
        if size == 0:
            return None
        self.scores = grow(self.scores, size)
        scores = self.scores[:size]
        allowed = query.catalog.active.copy()
        if query.exclude:
            allowed[list(query.exclude)] = False
        slots, values = top_slots(scores, query.n_candidates, allowed)
        if len(slots) == 0:
            return None
        return Candidates(source=self.source, slots=slots, scores=values, reasons="trending now")

    @hookimpl
    def recsys_forget_user(self, user_id: str) -> None:
        # Aggregate counts hold no per-user data; nothing to erase.
        return None
