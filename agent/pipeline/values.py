"""Value types that flow between the recommendation stages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from agent.pipeline.catalog import Catalog
    from agent.pipeline.user_state import UserState
    from agent.wire.contract import Event


@dataclass(slots=True)
class Query:
    """What a candidate source, the fusion and the rerankers are asked about."""

    user: UserState
    k: int
    now: float
    catalog: Catalog
    # how many candidates each source should return; several times k so rerankers have room
    n_candidates: int
    # item slots that must not be recommended (seen by the user, excluded by the request);
    # may be the user's own set: read it, never modify it
    exclude: set[int] = field(default_factory=set)
    categories: tuple[str, ...] = ()
    # the event that triggered this request, None for a pull (request/reply, HTTP)
    event: Event | None = None
    _allowed: np.ndarray | None = None

    def allowed(self) -> np.ndarray:
        """Mask over slots a source may propose: active, not excluded, in the requested
        categories. Computed once per query and shared by every source; do not modify it."""
        if self._allowed is None:
            catalog = self.catalog
            mask = catalog.category_mask(self.categories) if self.categories else catalog.active.copy()
            if self.exclude:
                excluded = np.fromiter(self.exclude, dtype=np.int64, count=len(self.exclude))
                mask[excluded[excluded < len(mask)]] = False
            self._allowed = mask
        return self._allowed


@dataclass(slots=True)
class Candidates:
    """One source's answer: item slots with scores (higher is better, any scale)."""

    source: str
    slots: np.ndarray
    scores: np.ndarray
    # One reason shared by all, one per position, or a function of the slot. A function is
    # called only for the items that make the final list, so costly reasons stay cheap.
    reasons: list[str] | str | Callable[[int], str] = ""
    # Optional: this source's score for any slots (not only those it proposed), so fusion can
    # weigh every candidate by every source. Must be computed from state at query time.
    score_of: Callable[[np.ndarray], np.ndarray] | None = None
    # True when the scores are counts or sums of counts (popularity, co-occurrence):
    # non-negative and heavy-tailed, so fusion compares them on a log scale
    counts: bool = False
    # the plugin that proposed these (filled in by the pipeline)
    plugin: str = ""

    def reason_for(self, slot: int) -> str:
        if isinstance(self.reasons, str):
            return self.reasons
        if callable(self.reasons):
            return self.reasons(slot)
        positions = np.flatnonzero(self.slots == slot)
        return self.reasons[int(positions[0])] if len(positions) else ""

    def __len__(self) -> int:
        return len(self.slots)


@dataclass(slots=True)
class Scored:
    slot: int
    score: float
    reasons: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def top_slots(scores: np.ndarray, n: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Slots of the ``n`` highest finite scores, best first; ``allowed`` masks slots out."""
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    n = min(n, len(scores))
    if n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    if n < len(scores):
        part = np.argpartition(-scores, n - 1)[:n]
    else:
        part = np.arange(len(scores))
    order = part[np.argsort(-scores[part], kind="stable")]
    keep = np.isfinite(scores[order])
    order = order[keep]
    return order.astype(np.int64), scores[order]


def first_allowed(ordered: np.ndarray | list[int], n: int, allowed: np.ndarray) -> np.ndarray:
    """The first ``n`` slots of ``ordered`` (best first) that ``allowed`` lets through.

    Looks at a short prefix first: a user has rarely excluded more than a few of the best
    items, so the whole list is read only when the prefix does not suffice.
    """
    prefix = min(len(ordered), 2 * n + 8)
    while True:
        head = np.asarray(ordered[:prefix], dtype=np.int64)
        head = head[head < len(allowed)]
        chosen = head[allowed[head]][:n]
        if len(chosen) == n or prefix >= len(ordered):
            return chosen
        prefix = len(ordered)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` for the small integer arrays of the hot path (its hashing costs more there)."""
    ordered = np.sort(values)
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]
