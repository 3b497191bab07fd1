"""The item catalog as dense integer slots, so stages can keep numpy arrays indexed by item."""

from __future__ import annotations

import numpy as np

from agent.wire.contract import Item


class Catalog:
    """Maps item ids to stable slots.

    An event may name an item before its catalog entry arrives; it gets a slot at once (so
    counts learned from events are not lost) but stays inactive, and is never recommended,
    until the item is upserted. Deleting an item deactivates its slot; the slot is kept so
    that arrays indexed by slot never shift.
    """

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self.ids: list[str] = []
        self.items: list[Item | None] = []
        self._active = np.zeros(1024, dtype=bool)
        self._by_category: dict[str, set[int]] = {}

    @property
    def size(self) -> int:
        """Number of slots ever handed out; arrays indexed by slot need at least this length."""
        return len(self.ids)

    @property
    def active(self) -> np.ndarray:
        """Boolean mask over slots: True where the item is in the catalog now."""
        return self._active[: len(self.ids)]

    def active_count(self) -> int:
        return int(self.active.sum())

    def slot(self, item_id: str) -> int | None:
        return self._index.get(item_id)

    def ensure_slot(self, item_id: str) -> int:
        slot = self._index.get(item_id)
        if slot is None:
            slot = len(self.ids)
            self._index[item_id] = slot
            self.ids.append(item_id)
            self.items.append(None)
            if slot >= len(self._active):
                grown = np.zeros(len(self._active) * 2, dtype=bool)
                grown[: len(self._active)] = self._active
                self._active = grown
        return slot

    def upsert(self, item: Item) -> tuple[int, bool]:
        """Store ``item``; returns its slot and whether anything about it changed."""
        slot = self.ensure_slot(item.id)
        previous = self.items[slot]
        changed = previous != item or not self._active[slot]
        if previous is not None:
            for category in previous.categories:
                self._by_category.get(category, set()).discard(slot)
        for category in item.categories:
            self._by_category.setdefault(category, set()).add(slot)
        self.items[slot] = item
        self._active[slot] = True
        return slot, changed

    def delete(self, item_id: str) -> int | None:
        slot = self._index.get(item_id)
        if slot is None or not self._active[slot]:
            return None
        self._active[slot] = False
        return slot

    def category_mask(self, categories: tuple[str, ...]) -> np.ndarray:
        """Boolean mask over slots: active items in at least one of ``categories``."""
        mask = np.zeros(self.size, dtype=bool)
        for category in categories:
            members = self._by_category.get(category)
            if members:
                mask[list(members)] = True
        return mask & self.active

    def item(self, slot: int) -> Item | None:
        return self.items[slot] if self._active[slot] else None

    def title(self, slot: int) -> str:
        item = self.items[slot]
        return item.title if item is not None else self.ids[slot]

    def __contains__(self, item_id: str) -> bool:
        slot = self._index.get(item_id)
        return slot is not None and bool(self._active[slot])


def grow(array: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
    """Return ``array`` extended (by doubling) to hold at least ``size`` slots along axis 0."""
    if len(array) >= size:
        return array
    new_len = max(size, 2 * len(array), 1024)
    grown = np.full((new_len, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
