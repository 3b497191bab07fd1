"""Each item's nearest items by content, precomputed, so that content retrieval reads a few
hundred candidates per user instead of scanning the catalog.

A user's taste vectors are decayed sums of the vectors of the items they engaged with
recently, so many of the items nearest to a taste lie among the nearest items of those recent
items (about 0.7 of the exact top 10 on the dev set). Retrieval therefore takes the union of the
precomputed neighbours of the user's recent items, plus the items embedded since the table was
built (so a new item can be found at once), and scores that union against the taste vectors
with the projected item vectors.

The table is built off the event loop (see :class:`ItemVectors` for the thread rule) from the
projected vectors, and rebuilt once enough items have changed since. A build compares every
item with every other, so its cost grows with the square of the catalog (one core: 0.6 s at
10,500 items, 11 s at 50,000): a table may be given a ``max_items`` beyond which it is neither
built nor served, and the catalog is scanned instead.
"""

from __future__ import annotations

import numpy as np

from agent.pipeline.values import sorted_unique
from agent.vectors.item_vectors import ItemVectors

NEIGHBOURS = 32
BLOCK_ROWS = 512
# rebuild once this share of the catalog (or REBUILD_MIN items) was embedded since the last build
REBUILD_SHARE = 0.05
REBUILD_MIN = 64
# a table dropped beyond max_items is built again only once the catalog is back below this
# share of it: a catalog that churns around the limit is not rebuilt at every dip
REBUILD_BELOW = 0.9


class ItemNeighbours:
    def __init__(self, k: int = NEIGHBOURS, max_items: int | None = None) -> None:
        self.k = k
        # None: no limit
        self.max_items = max_items
        # slot -> its neighbours' slots, best first; -1 pads
        self.table = np.full((0, k), -1, dtype=np.int64)
        self.built_on = 0
        # slots embedded (or changed) since the table was built, oldest first, each with the
        # generation of its last change; they stay candidates until a build that saw them
        # is installed
        self.unindexed: dict[int, int] = {}
        self._generation = 0
        self._building: dict[int, int] = {}
        # neighbours found on demand for unindexed anchors, until the next build
        self._on_demand: dict[int, np.ndarray] = {}
        # the catalog outgrew max_items: the table was dropped, and changes are not tracked
        # until it is back within the limit (and a whole build follows)
        self._beyond = False

    @property
    def ready(self) -> bool:
        return self.built_on > 0

    def within_limit(self, vectors: ItemVectors) -> bool:
        return self.max_items is None or vectors.count <= self.max_items

    def serves(self, vectors: ItemVectors) -> bool:
        """Whether searches should read the table: built, and the catalog not grown past
        ``max_items`` since (a table that no longer covers most items would leave every query
        to score all the unindexed ones)."""
        return self.ready and self.within_limit(vectors)

    def follow_limit(self, vectors: ItemVectors) -> None:
        """Drops the table once the catalog has outgrown ``max_items``, and stops tracking
        changes until it is back below ``REBUILD_BELOW`` of it, when a whole build follows."""
        if self.max_items is None:
            return
        if vectors.count > self.max_items:
            self._beyond = True
        elif vectors.count <= REBUILD_BELOW * self.max_items:
            self._beyond = False
        if self._beyond and (self.ready or self.unindexed):
            self.table = np.full((0, self.k), -1, dtype=np.int64)
            self.built_on = 0
            self.unindexed.clear()
            self._on_demand = {}

    def changed(self, slots: list[int]) -> None:
        if self._beyond:
            return
        self._generation += 1
        for slot in slots:
            self.unindexed.pop(slot, None)
            self.unindexed[slot] = self._generation
            self._on_demand.pop(slot, None)

    def needs_build(self, vectors: ItemVectors, idle: bool = True) -> bool:
        """Whether to rebuild: after 5 % of the catalog changed when nothing more is queued,
        else only once it doubled (a catalog loading in batches is not rebuilt per batch); never
        beyond ``max_items``, nor after a drop until ``follow_limit`` saw the catalog back below
        ``REBUILD_BELOW`` of it."""
        if vectors.count <= self.k or self._beyond or not self.within_limit(vectors):
            return False
        if not self.ready:
            return True
        share = REBUILD_SHARE if idle else 1.0
        return len(self.unindexed) >= max(REBUILD_MIN, share * self.built_on)

    def start_build(self) -> None:
        self._building = dict(self.unindexed)

    def build(self, vectors: ItemVectors) -> tuple[np.ndarray, int]:
        """The neighbour table of every item with a vector; reads only (worker thread)."""
        slots, matrix = vectors.snapshot()
        table = np.full((vectors.capacity, self.k), -1, dtype=np.int64)
        k = min(self.k, len(slots) - 1)
        for start in range(0, len(slots), BLOCK_ROWS):
            block = matrix[start : start + BLOCK_ROWS]
            sims = block @ matrix.T
            rows = np.arange(len(block))
            sims[rows, start + rows] = -np.inf  # an item is not its own neighbour
            best = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sims, best, axis=1), axis=1)
            table[slots[start : start + len(block)], :k] = slots[np.take_along_axis(best, order, axis=1)]
        return table, len(slots)

    def install(self, built: tuple[np.ndarray, int]) -> None:
        self.table, self.built_on = built
        self._on_demand = {}
        # the build saw these slots as they were then; a slot changed again since stays unindexed
        for slot, generation in self._building.items():
            if self.unindexed.get(slot) == generation:
                del self.unindexed[slot]
        self._building = {}

    def candidates(self, anchors: list[int], vectors: ItemVectors, allowed: np.ndarray) -> np.ndarray:
        """Sorted candidate slots for a user whose recent items are ``anchors``."""
        parts = [np.fromiter(self.unindexed, dtype=np.int64, count=len(self.unindexed))]
        for anchor in anchors:
            if anchor in self.unindexed or anchor >= len(self.table) or self.table[anchor, 0] < 0:
                row = self._on_demand.get(anchor)
                if row is None:
                    vector = vectors.get(anchor)
                    if vector is None:
                        continue
                    row = self._on_demand[anchor] = vectors.search(vector, self.k + 1, vectors.present(len(allowed)))[0]
                parts.append(row)
            else:
                parts.append(self.table[anchor])
        found = sorted_unique(np.concatenate(parts))
        found = found[(found >= 0) & (found < len(allowed))]
        return found[allowed[found] & vectors.present(len(allowed))[found]]
