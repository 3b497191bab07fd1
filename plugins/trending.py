"""Trending: popularity with exponential time decay, learned from every event."""

from __future__ import annotations

import bisect
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog, grow
from agent.pipeline.taste_signals import rating_share
from agent.pipeline.user_state import UserState
from agent.pipeline.values import Candidates, Query, first_allowed, top_slots
from agent.wire.contract import Event

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


HEAD_DEPTH = 256
DEFAULT_HALF_LIVES: dict[str, float] = {"trending": 0.0, "popular_week": 7 * 86_400.0, "popular_month": 30 * 86_400.0}
REASONS = {"trending": "trending now", "popular_week": "popular this week", "popular_month": "popular this month"}


class DecayedCounts:
    """Popularity with exponential time decay.

    Scores are kept in units relative to a moving reference time: adding an event costs O(1)
    and every score decays by the same factor, so ranking never needs a sweep.
    """

    def __init__(self, half_life_s: float, depth: int = HEAD_DEPTH) -> None:
        self.rate = math.log(2) / half_life_s
        self.scores = np.zeros(1024)
        self.reference_ts: float | None = None
        # The head: a superset of the ``depth`` best items, kept exactly and in order. Scores
        # only grow (in reference units), so an item outside the head can only enter through
        # add(), and an item in it can only move up: one event costs a few swaps, not a sort.
        self.depth = depth
        self.head: dict[int, float] = {}
        # head slots, best first, and their negated scores (ascending, for bisect)
        self.order: list[int] = []
        self.keys: list[float] = []
        self.head_floor = 0.0

    def add(self, slot: int, weight: float, ts: float) -> None:
        if self.reference_ts is None:
            self.reference_ts = ts
        exponent = (ts - self.reference_ts) * self.rate
        if exponent > 50:
            # Move the reference forward before exp() overflows; rescaling keeps the order.
            factor = math.exp(-exponent)
            self.scores *= factor
            self.head = {s: v * factor for s, v in self.head.items()}
            self.keys = [k * factor for k in self.keys]
            self.head_floor *= factor
            self.reference_ts = ts
            exponent = 0.0
        self.scores = grow(self.scores, slot + 1)
        self.scores[slot] += weight * math.exp(exponent)
        value = float(self.scores[slot])
        head = self.head
        if slot in head or value > self.head_floor or len(head) < self.depth:
            previous = head.get(slot)
            head[slot] = value
            self._reposition(slot, previous, value)
            if len(self.order) > 2 * self.depth:
                for dropped in self.order[self.depth :]:
                    del head[dropped]
                del self.order[self.depth :], self.keys[self.depth :]
                self.head_floor = head[self.order[-1]]

    def _reposition(self, slot: int, previous: float | None, value: float) -> None:
        # Binary searches and list moves in C: an event costs microseconds, never a sort.
        order, keys = self.order, self.keys
        if previous is not None:
            at = bisect.bisect_left(keys, -previous)
            while order[at] != slot:  # equal scores: the slot is among them
                at += 1
            del order[at], keys[at]
        at = bisect.bisect_left(keys, -value)
        order.insert(at, slot)
        keys.insert(at, -value)

    def top(self, n: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best allowed slots with a positive score, from the head when it suffices."""
        chosen = first_allowed(self.order, n, allowed)
        if len(chosen) == n or len(self.head) < self.depth:
            scores = self.scores[chosen]
            # scores that decayed below float range read as zero: not trending any more
            keep = scores > 0
            return chosen[keep], scores[keep]
        # the user has excluded most of the head: a full scan is exact
        scores = self.view(len(allowed))
        return top_slots(scores, n, allowed & (scores > 0))

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
        self.rating_max = 10.0

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
        self.rating_max = ctx.settings.rating_max
        yield

    def _weight(self, event: Event) -> float:
        weight = EVENT_WEIGHTS.get(event.type, 0.0)
        if event.type == "rate" and event.value is not None:
            # A rating counts as an interaction whatever its value; high ratings a bit more.
            weight = 1.0 + rating_share(event.value, self.rating_max)
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
            slots, values = counter.top(query.n_candidates, allowed)
            if len(slots):
                found.append(
                    Candidates(
                        source=name,
                        slots=slots,
                        scores=values,
                        reasons=REASONS.get(name, name),
                        score_of=lambda wanted, scores=scores: scores[wanted],
                        counts=True,
                    )
                )
        return found or None
