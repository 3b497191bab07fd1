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


DEFAULT_HALF_LIVES: dict[str, float] = {"trending": 0.0, "popular_week": 7 * 86_400.0, "popular_month": 30 * 86_400.0}
REASONS = {"trending": "trending now", "popular_week": "popular this week", "popular_month": "popular this month"}


class DecayedCounts:
    """Popularity with exponential time decay.

    Scores are kept in units relative to a moving reference time: adding an event costs O(1)
    and every score decays by the same factor, so ranking never needs a sweep.
    """

    def __init__(self, half_life_s: float) -> None:
        self.rate = math.log(2) / half_life_s
        self.scores = np.zeros(1024)
        self.reference_ts: float | None = None

    def add(self, slot: int, weight: float, ts: float) -> None:
        if self.reference_ts is None:
            self.reference_ts = ts
        exponent = (ts - self.reference_ts) * self.rate
        if exponent > 50:
            # Move the reference forward before exp() overflows; rescaling keeps the order.
            self.scores *= math.exp(-exponent)
            self.reference_ts = ts
            exponent = 0.0
        self.scores = grow(self.scores, slot + 1)
        self.scores[slot] += weight * math.exp(exponent)

    def view(self, size: int) -> np.ndarray:
        self.scores = grow(self.scores, size)
        return self.scores[:size]


class Trending:
    """One candidate source per half-life, so that fusion learns which horizon predicts best
    (news wants hours, films weeks). Sources: ``trending`` (the ``trending_half_life_s``
    setting), ``popular_week`` and ``popular_month``.

    Options (``[plugins.trending]``): ``half_lives_s`` (source name -> half-life in seconds,
    replacing the defaults).
    """

    def __init__(self) -> None:
        self.counters: dict[str, DecayedCounts] = {}

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._configure(ctx)

    @asynccontextmanager
    async def _configure(self, ctx: AgentContext) -> AsyncIterator[None]:
        configured = ctx.options("trending").get("half_lives_s")
        half_lives = dict(configured) if configured else dict(DEFAULT_HALF_LIVES)
        if "trending" in half_lives and not half_lives["trending"]:
            half_lives["trending"] = ctx.settings.trending_half_life_s
        for name, half_life in half_lives.items():
            if not isinstance(half_life, (int, float)) or half_life <= 0:
                raise ValueError(f"[plugins.trending] half_lives_s.{name} must be a positive number of seconds")
        self.counters = {name: DecayedCounts(float(h)) for name, h in half_lives.items()}
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
        for counter in self.counters.values():
            counter.add(slot, weight, event.ts)

    @hookimpl
    def recsys_candidates(self, query: Query) -> list[Candidates] | None:
        size = query.catalog.size
        if size == 0:
            return None
        allowed = query.allowed()
        found = []
        for name, counter in self.counters.items():
            scores = counter.view(size)
            slots, values = top_slots(scores, query.n_candidates, allowed & (scores > 0))
            if len(slots):
                found.append(
                    Candidates(
                        source=name, slots=slots, scores=values, reasons=REASONS.get(name, name),
                        score_of=lambda wanted, scores=scores: scores[wanted],
                    )
                )
        return found or None
