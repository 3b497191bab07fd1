"""Item-to-item sources learned online from the event stream.

- ``co_occurrence``: items engaged with by the same user within a short window, in either order
  ("often viewed together with X"). Scores are cosine-normalised by both items' counts, so
  popular items do not co-occur with everything.
- ``transitions``: what users engage with right after an item ("often viewed after X").

Both are sparse neighbour maps, pruned per item to the strongest ``max_neighbours`` so memory
stays bounded however long the stream runs.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import grow
from agent.pipeline.user_state import UserState
from agent.pipeline.values import Candidates, Query, top_slots

WINDOW = 10
TRANSITION_STEPS = 3
QUERY_ITEMS = 8
# recent items weigh more: the last one counts fully, older ones fade geometrically
RECENCY = 0.8


class Row:
    """One item's neighbours: a dict from neighbour to position, and the weights as an array,
    so a query reads the row without copying it out of a dict."""

    __slots__ = ("index", "slots", "weights")

    def __init__(self) -> None:
        self.index: dict[int, int] = {}
        self.slots = np.empty(8, dtype=np.int64)
        self.weights = np.empty(8, dtype=np.float64)

    def add(self, neighbour: int, weight: float) -> int:
        """Adds ``weight`` to the edge; returns how many neighbours the row has."""
        position = self.index.get(neighbour)
        if position is not None:
            self.weights[position] += weight
            return len(self.index)
        position = len(self.index)
        if position == len(self.slots):
            self.slots = np.resize(self.slots, 2 * position)
            self.weights = np.resize(self.weights, 2 * position)
        self.index[neighbour] = position
        self.slots[position] = neighbour
        self.weights[position] = weight
        return position + 1

    def prune(self, keep: int) -> None:
        size = len(self.index)
        strongest = np.argpartition(-self.weights[:size], keep - 1)[:keep]
        self.slots = self.slots[strongest].copy()
        self.weights = self.weights[strongest].copy()
        self.index = {slot: position for position, slot in enumerate(self.slots.tolist())}

    def __len__(self) -> int:
        return len(self.index)


class Neighbours:
    """slot -> its neighbours and weights, pruned per item to the strongest ``max_neighbours``."""

    def __init__(self, max_neighbours: int) -> None:
        self.max_neighbours = max_neighbours
        self.edges: dict[int, Row] = {}

    def add(self, a: int, b: int, weight: float) -> None:
        row = self.edges.get(a)
        if row is None:
            row = self.edges[a] = Row()
        if row.add(b, weight) > 2 * self.max_neighbours:
            row.prune(self.max_neighbours)

    def row(self, a: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Views of ``a``'s neighbours and weights (read them before the next ``add``)."""
        row = self.edges.get(a)
        if row is None or not len(row):
            return None
        size = len(row)
        return row.slots[:size], row.weights[:size]

    def weight(self, a: int, b: int) -> float:
        row = self.edges.get(a)
        position = row.index.get(b) if row is not None else None
        return float(row.weights[position]) if row is not None and position is not None else 0.0


class ItemToItem:
    """Options (``[plugins.item_to_item]``): ``max_neighbours`` (default 200), ``window``."""

    def __init__(self) -> None:
        self.window = WINDOW
        self.co = Neighbours(200)
        self.after = Neighbours(200)
        self.counts = np.zeros(1024)

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._configure(ctx)

    @asynccontextmanager
    async def _configure(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("item_to_item")
        self.window = int(options.get("window", WINDOW))
        max_neighbours = int(options.get("max_neighbours", 200))
        if max_neighbours < 10 or self.window < 1:
            raise ValueError("[plugins.item_to_item] max_neighbours must be at least 10 and window at least 1")
        self.co.max_neighbours = self.after.max_neighbours = max_neighbours
        yield

    @hookimpl
    def recsys_apply_event(self, user: UserState, slot: int, signal: float) -> None:
        if signal <= 0:
            return
        self.counts = grow(self.counts, slot + 1)
        self.counts[slot] += 1.0
        previous = user.recent_positive(self.window, skip_last=True)
        for distance, other in enumerate(previous, start=1):
            if other == slot:
                continue
            self.co.add(other, slot, 1.0)
            self.co.add(slot, other, 1.0)
            if distance <= TRANSITION_STEPS:
                self.after.add(other, slot, 1.0 / distance)

    def _score(
        self, query: Query, recent: list[int], neighbours: Neighbours, source: str, template: str
    ) -> Candidates | None:
        rows = [(age, anchor, neighbours.row(anchor)) for age, anchor in enumerate(recent)]
        rows = [(age, anchor, row) for age, anchor, row in rows if row is not None]
        if not rows:
            return None
        # the mask's length, not the catalog's: the catalog may grow while a query is answered
        size = len(query.allowed())
        self.counts = grow(self.counts, query.catalog.size)
        counts = self.counts
        lengths = [len(row[0]) for _, _, row in rows]
        anchor_scale = [(RECENCY**age) / math.sqrt(max(float(counts[anchor]), 1.0)) for age, anchor, _ in rows]
        slots = np.concatenate([row[0] for _, _, row in rows])
        weights = np.concatenate([row[1] for _, _, row in rows])
        values = weights * np.repeat(anchor_scale, lengths) / np.sqrt(np.maximum(counts[slots], 1.0))
        # Sparse in, dense out: summing into a catalog-sized array is far cheaper than sorting
        # the neighbours to merge them, and makes score_of a lookup.
        totals = np.bincount(slots, weights=values, minlength=size)[:size]
        # every edge weight is positive: a positive total is a proposed item
        found = np.flatnonzero((totals > 0) & query.allowed())
        if not len(found):
            return None
        best, best_scores = top_slots(totals[found], query.n_candidates)
        catalog = query.catalog

        def reason(slot: int) -> str:
            # the recent item that contributed most to the score names the reason; only the
            # final list asks, so the weights are read again, as they are now
            strength = [
                (RECENCY**age) * neighbours.weight(anchor, slot) / math.sqrt(max(float(counts[anchor]), 1.0))
                for age, anchor in enumerate(recent)
            ]
            strongest = max(strength)
            return template.format(catalog.title(recent[strength.index(strongest)])) if strongest > 0 else ""

        def score_of(wanted: np.ndarray) -> np.ndarray:
            return np.where(wanted < size, totals[np.minimum(wanted, size - 1)], 0.0)

        return Candidates(
            source=source,
            slots=found[best],
            scores=best_scores,
            reasons=reason,
            score_of=score_of,
            counts=True,
        )

    @hookimpl
    def recsys_candidates(self, query: Query) -> list[Candidates]:
        recent = query.user.recent_positive(QUERY_ITEMS)
        if not recent:
            return []
        found = [
            self._score(query, recent, self.co, "co_occurrence", "often enjoyed together with {}"),
            self._score(query, recent, self.after, "transitions", "often chosen after {}"),
        ]
        return [c for c in found if c is not None]
