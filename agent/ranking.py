"""Value types that flow between the recommendation stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from agent.catalog import Catalog
    from agent.models import Event
    from agent.state import UserState


@dataclass(slots=True)
class Query:
    """What a candidate source, the fusion and the rerankers are asked about."""

    user: UserState
    k: int
    now: float
    catalog: Catalog
    # how many candidates each source should return; several times k so rerankers have room
    n_candidates: int
    # item slots that must not be recommended (seen by the user, excluded by the request)
    exclude: set[int] = field(default_factory=set)
    categories: tuple[str, ...] = ()
    # the event that triggered this request, None for a pull (request/reply, HTTP)
    event: Event | None = None


@dataclass(slots=True)
class Candidates:
    """One source's answer: item slots with scores (higher is better, any scale)."""

    source: str
    slots: np.ndarray
    scores: np.ndarray
    # one reason per slot, or one reason shared by all
    reasons: list[str] | str = ""

    def reason(self, position: int) -> str:
        return self.reasons if isinstance(self.reasons, str) else self.reasons[position]

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
