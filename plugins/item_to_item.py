"""Item-to-item sources learned online from the event stream.

- ``co_occurrence``: items engaged with by the same user within a short window, in either order
  ("often viewed together with X"). Scores are cosine-normalised by both items' counts, so
  popular items do not co-occur with everything.
- ``transitions``: what users engage with right after an item ("often viewed after X").

Both are sparse neighbour maps, pruned per item to the strongest ``max_neighbours`` so memory
stays bounded however long the stream runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from agent.catalog import grow
from agent.context import AgentContext
from agent.hookspecs import hookimpl
from agent.models import Event
from agent.ranking import Candidates, Query, top_slots
from agent.signals import event_signal
from agent.state import UserState

WINDOW = 10
TRANSITION_STEPS = 3
QUERY_ITEMS = 8
# recent items weigh more: the last one counts fully, older ones fade geometrically
RECENCY = 0.8


class Neighbours:
    """slot -> {neighbour slot: weight}, with per-item pruning."""

    def __init__(self, max_neighbours: int) -> None:
        self.max_neighbours = max_neighbours
        self.edges: dict[int, dict[int, float]] = {}

    def add(self, a: int, b: int, weight: float) -> None:
        row = self.edges.get(a)
        if row is None:
            row = self.edges[a] = {}
        row[b] = row.get(b, 0.0) + weight
        if len(row) > 2 * self.max_neighbours:
            keep = sorted(row.items(), key=lambda kv: kv[1], reverse=True)[: self.max_neighbours]
            self.edges[a] = dict(keep)

    def row(self, a: int) -> tuple[np.ndarray, np.ndarray] | None:
        row = self.edges.get(a)
        if not row:
            return None
        return np.fromiter(row.keys(), dtype=np.int64, count=len(row)), np.fromiter(row.values(), dtype=np.float64, count=len(row))


class ItemToItem:
    """Options (``[plugins.item_to_item]``): ``max_neighbours`` (default 200), ``window``."""

    def __init__(self) -> None:
        self.rating_max = 10.0
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
        self.rating_max = ctx.settings.rating_max
        self.window = int(options.get("window", WINDOW))
        max_neighbours = int(options.get("max_neighbours", 200))
        if max_neighbours < 10 or self.window < 1:
            raise ValueError("[plugins.item_to_item] max_neighbours must be at least 10 and window at least 1")
        self.co.max_neighbours = self.after.max_neighbours = max_neighbours
        yield

    def _recent_positive(self, user: UserState, limit: int, skip_last: bool) -> list[int]:
        """Distinct slots of the user's recent positive interactions, newest first."""
        out: list[int] = []
        history = list(user.recent)
        if skip_last and history:
            history.pop()
        for interaction in reversed(history):
            if event_signal(interaction.type, interaction.value, self.rating_max) > 0 and interaction.slot not in out:
                out.append(interaction.slot)
                if len(out) >= limit:
                    break
        return out

    @hookimpl
    def recsys_apply_event(self, event: Event, user: UserState, slot: int) -> None:
        if event_signal(event.type, event.value, self.rating_max) <= 0:
            return
        self.counts = grow(self.counts, slot + 1)
        self.counts[slot] += 1.0
        previous = self._recent_positive(user, self.window, skip_last=True)
        for distance, other in enumerate(previous, start=1):
            if other == slot:
                continue
            self.co.add(other, slot, 1.0)
            self.co.add(slot, other, 1.0)
            if distance <= TRANSITION_STEPS:
                self.after.add(other, slot, 1.0 / distance)

    def _score(self, query: Query, recent: list[int], neighbours: Neighbours, source: str, template: str) -> Candidates | None:
        parts_slots, parts_values, parts_anchor = [], [], []
        size = query.catalog.size
        self.counts = grow(self.counts, size)
        for age, anchor in enumerate(recent):
            row = neighbours.row(anchor)
            if row is None:
                continue
            slots, weights = row
            norm = np.sqrt(np.maximum(self.counts[slots], 1.0) * max(self.counts[anchor], 1.0))
            parts_slots.append(slots)
            parts_values.append((RECENCY**age) * weights / norm)
            parts_anchor.append(np.full(len(slots), anchor, dtype=np.int64))
        if not parts_slots:
            return None
        # Sparse throughout: only the neighbours of the user's recent items are touched.
        slots = np.concatenate(parts_slots)
        values = np.concatenate(parts_values)
        anchors = np.concatenate(parts_anchor)
        unique, inverse = np.unique(slots, return_inverse=True)
        totals = np.bincount(inverse, weights=values)
        # the anchor that contributed most to each item names the reason
        order = np.lexsort((-values, inverse))
        first = np.ones(len(order), dtype=bool)
        first[1:] = inverse[order][1:] != inverse[order][:-1]
        because = anchors[order][first]
        allowed = query.allowed()
        keep = (unique < len(allowed)) & (totals > 0)
        keep[keep] = allowed[unique[keep]]
        if not keep.any():
            return None
        picked, picked_scores = top_slots(np.where(keep, totals, -np.inf), query.n_candidates)
        catalog = query.catalog
        reason_anchor = dict(zip(unique[picked].tolist(), because[picked].tolist(), strict=True))

        def score_of(wanted: np.ndarray) -> np.ndarray:
            positions = np.minimum(np.searchsorted(unique, wanted), len(unique) - 1)
            return np.where(unique[positions] == wanted, totals[positions], 0.0)

        return Candidates(
            source=source, slots=unique[picked], scores=picked_scores,
            reasons=lambda slot: template.format(catalog.title(reason_anchor.get(slot, slot))),
            score_of=score_of,
        )

    @hookimpl
    def recsys_candidates(self, query: Query) -> list[Candidates]:
        recent = self._recent_positive(query.user, QUERY_ITEMS, skip_last=False)
        if not recent:
            return []
        found = [
            self._score(query, recent, self.co, "co_occurrence", "often enjoyed together with {}"),
            self._score(query, recent, self.after, "transitions", "often chosen after {}"),
        ]
        return [c for c in found if c is not None]

    def memory_bytes(self) -> int:
        # a rough figure for reports: a dict entry costs about 100 bytes in CPython
        entries = sum(len(r) for r in self.co.edges.values()) + sum(len(r) for r in self.after.edges.values())
        return int(entries * 100 + self.counts.nbytes)

