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
from dataclasses import dataclass

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
            # the same addition as numpy's +=, without making a numpy scalar
            self.weights[position] = self.weights.item(position) + weight
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

    def add_all(self, a: int, others: list[int], weight: float) -> None:
        """``add(a, b, weight)`` for each of ``others`` in turn, finding ``a``'s row once."""
        if not others:
            return
        row = self.edges.get(a)
        if row is None:
            row = self.edges[a] = Row()
        most = 2 * self.max_neighbours
        for b in others:
            if row.add(b, weight) > most:
                row.prune(self.max_neighbours)

    def row(self, a: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Views of ``a``'s neighbours and weights (read them before the next ``add``)."""
        row = self.edges.get(a)
        if row is None:
            return None
        size = len(row.index)
        return (row.slots[:size], row.weights[:size]) if size else None

    def weight(self, a: int, b: int) -> float:
        row = self.edges.get(a)
        position = row.index.get(b) if row is not None else None
        return float(row.weights[position]) if row is not None and position is not None else 0.0


@dataclass(frozen=True, slots=True)
class ItemToItemOptions:
    window: int = WINDOW
    max_neighbours: int = 200

    def problems(self) -> list[tuple[str, str]]:
        return [
            (name, message)
            for name, bad, message in (
                ("window", self.window < 1, "must be at least 1"),
                ("max_neighbours", self.max_neighbours < 10, "must be at least 10"),
            )
            if bad
        ]


class ItemToItem:
    """Options (``[plugins.item_to_item]``): ``max_neighbours`` (default 200), ``window``."""

    def __init__(self) -> None:
        self.window = WINDOW
        self.co = Neighbours(200)
        self.after = Neighbours(200)
        self.counts = np.zeros(1024)

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("item_to_item", ItemToItemOptions)
        self.window = options.window
        self.co.max_neighbours = self.after.max_neighbours = options.max_neighbours
        yield

    @hookimpl
    def recsys_apply_event(self, user: UserState, slot: int, signal: float) -> None:
        self.recsys_apply_events([user], [slot], [signal])

    @hookimpl
    def recsys_apply_events(self, users: list[UserState], slots: list[int], signals: list[float]) -> None:
        # No user appears twice in a batch, and each event changes only the counts and the rows
        # of its own items: applying them in order leaves what one at a time leaves.
        positive = [(user, slot) for user, slot, signal in zip(users, slots, signals) if signal > 0]
        if not positive:
            return
        self.counts = counts = grow(self.counts, max(slot for _, slot in positive) + 1)
        co, after, window = self.co, self.after, self.window
        for user, slot in positive:
            counts[slot] += 1.0
            previous = user.recent_positive(window, skip_last=True)
            others = [other for other in previous if other != slot]
            # each row sees its edges in the order one event at a time gives them (the rows
            # are independent of one another)
            co.add_all(slot, others, 1.0)
            for distance, other in enumerate(previous, start=1):
                if other == slot:
                    continue
                co.add(other, slot, 1.0)
                if distance <= TRANSITION_STEPS:
                    after.add(other, slot, 1.0 / distance)

    @hookimpl
    def recsys_candidates(self, query: Query) -> list[Candidates]:
        return self.recsys_candidates_batch([query])[0]

    @hookimpl
    def recsys_candidates_batch(self, queries: list[Query]) -> list[list[Candidates]]:
        if not queries:
            return []
        # the counts grow once for the batch; each query then reads the same array
        self.counts = counts = grow(self.counts, max(query.catalog.size for query in queries))
        sources = (
            (self.co, "co_occurrence", "often enjoyed together with {}"),
            (self.after, "transitions", "often chosen after {}"),
        )
        # Every (query, source) pair's neighbour rows in one array, so that weighing them (the
        # same arithmetic for all) costs a few numpy calls for the batch, not for each pair.
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        row_scales: list[float] = []
        # (query, source, recent items, how many entries of the arrays)
        pairs: list[tuple[int, int, list[int], int]] = []
        for i, query in enumerate(queries):
            recent = query.user.recent_positive(QUERY_ITEMS)
            if not recent:
                continue
            # each recent item's weight, the same in both sources: newer ones weigh more, and
            # popular ones less (they co-occur with everything)
            scale = [(RECENCY**age) / math.sqrt(max(float(counts[anchor]), 1.0)) for age, anchor in enumerate(recent)]
            for source, (neighbours, _, _) in enumerate(sources):
                entries = 0
                for age, anchor in enumerate(recent):
                    row = neighbours.row(anchor)
                    if row is not None:
                        rows.append(row)
                        row_scales.append(scale[age])
                        entries += len(row[0])
                if entries:
                    pairs.append((i, source, recent, entries, scale))
        answers: list[list[Candidates]] = [[] for _ in queries]
        if not pairs:
            return answers
        slots = np.concatenate([row[0] for row in rows])
        weights = np.concatenate([row[1] for row in rows])
        lengths = [len(row[0]) for row in rows]
        values = weights * np.repeat(np.array(row_scales), lengths) / np.sqrt(np.maximum(counts[slots], 1.0))
        start = 0
        for i, source, recent, entries, scale in pairs:
            neighbours, name, template = sources[source]
            end = start + entries
            anchors = [
                (anchor, row, weight) for anchor, weight in zip(recent, scale) if (row := neighbours.edges.get(anchor))
            ]
            found = self._score(queries[i], anchors, slots[start:end], values[start:end], name, template)
            start = end
            if found is not None:
                answers[i].append(found)
        return answers

    def _score(
        self,
        query: Query,
        anchors: list[tuple[int, Row, float]],
        slots: np.ndarray,
        values: np.ndarray,
        source: str,
        template: str,
    ) -> Candidates | None:
        """One source's candidates for one query: ``slots`` are the neighbours of the query's
        recent items (``anchors``: item, its row and its weight, newest first) and ``values``
        their weighted edges."""
        allowed = query.allowed()
        # the mask's length, not the catalog's: the catalog may grow while a query is answered
        size = len(allowed)
        # Sparse in, dense for the sum (summing into a catalog-sized array is far cheaper than
        # sorting the neighbours to merge them), sparse out: only the items reached are kept,
        # so a batch of queries does not hold a catalog-sized array each until fusion reads it.
        totals = np.bincount(slots, weights=values, minlength=size)[:size]
        # every edge weight is positive: the items reached are those with a positive total
        reached = (totals > 0).nonzero()[0]
        sums = totals[reached]
        proposable = allowed[reached]
        found = reached[proposable]
        if not len(found):
            return None
        best, best_scores = top_slots(sums[proposable], query.n_candidates)
        catalog = query.catalog

        def reason(slot: int) -> str:
            # the recent item that contributed most to the score names the reason (the newest
            # of equal ones); only the final list asks, so the rows are read as they are now
            strongest, named = 0.0, -1
            for anchor, row, weight in anchors:
                position = row.index.get(slot)
                if position is not None and (strength := weight * row.weights.item(position)) > strongest:
                    strongest, named = strength, anchor
            return template.format(catalog.title(named)) if named >= 0 else ""

        def score_of(wanted: np.ndarray) -> np.ndarray:
            # an item not reached scores 0, as in the dense sum
            at = np.minimum(np.searchsorted(reached, wanted), len(reached) - 1)
            return np.where(reached[at] == wanted, sums[at], 0.0)

        return Candidates(
            source=source,
            slots=found[best],
            scores=best_scores,
            reasons=reason,
            score_of=score_of,
            counts=True,
        )
