"""A user's taste vectors, from their recent history, and the "similar to X" reasons.

Computed when needed from the recent history the core keeps: a fast vector (the last few
items) and a slow one (the longer run), each a sum of item vectors weighted by event signal
(dislike and skip push away) and decayed by position. Being a function of the history, they
are exactly what they were before a restart.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent.pipeline.catalog import Catalog
from agent.pipeline.user_state import UserState
from agent.vectors.item_vectors import ItemVectors

# per-event decay of the taste vectors: about 2 and about 10 recent items dominate
SHORT_DECAY = 0.5
LONG_DECAY = 0.9
RECENT_POSITIVES = 8
# the newest interactions the taste vectors read: beyond 50, LONG_DECAY leaves older items
# under 0.5 % of the weight, so reading a 200-event history whole would cost 4x for nothing
TASTE_ITEMS = 50
DECAYS = np.array([[SHORT_DECAY], [LONG_DECAY]], dtype=np.float32)
VERBS = {
    "view": "viewed",
    "click": "opened",
    "like": "liked",
    "add_to_cart": "added to your cart",
    "purchase": "bought",
    "rate": "rated",
}


@dataclass(slots=True)
class Taste:
    short: np.ndarray
    long: np.ndarray
    # (slot, event type) of recent positive interactions, newest last, for "similar to X" reasons
    positives: list[tuple[int, str]] = field(default_factory=list)


def taste_of(user: UserState, vectors: ItemVectors | None) -> Taste | None:
    """The user's taste vectors, from their recent history (newest counts most)."""
    if vectors is None or not user.recent:
        return None
    recent = list(itertools.islice(user.recent, max(len(user.recent) - TASTE_ITEMS, 0), None))
    slots = np.fromiter((i.slot for i in recent), dtype=np.int64, count=len(recent))
    present = vectors.present(int(slots.max()) + 1)[slots]
    if not present.any():
        return None
    history = [i for i, ok in zip(recent, present.tolist(), strict=True) if ok]
    signals = np.fromiter((i.signal for i in history), dtype=np.float32, count=len(history))
    ages = np.arange(len(history) - 1, -1, -1, dtype=np.float32)
    # both vectors in one product (on the hot path for every user ranked): a row of weights each
    short, long = (signals * DECAYS**ages) @ vectors.rows(slots[present])
    positives = [(i.slot, i.type) for i, s in zip(history, signals.tolist(), strict=True) if s > 0][-RECENT_POSITIVES:]
    return Taste(short=short, long=long, positives=positives)


def taste_queries(taste: Taste, enabled_sources: set[str]) -> list[tuple[str, np.ndarray]]:
    """(source, unit query vector) for the enabled taste sources that point somewhere."""
    queries = []
    for source, vector in (("content_recent", taste.short), ("content_long", taste.long)):
        norm = float(np.linalg.norm(vector))
        if source in enabled_sources and norm > 1e-6:
            queries.append((source, (vector / norm).astype(np.float32)))
    return queries


def taste_reasons(taste: Taste, vectors: ItemVectors, catalog: Catalog) -> str | Callable[[int], str]:
    """The liked item most similar to a recommended one names the reason (computed lazily)."""
    liked = [(s, kind) for s, kind in taste.positives if vectors.has(s)]
    if not liked:
        return "similar to what you like"
    liked_matrix = vectors.rows(np.array([s for s, _ in liked]))

    def reason(slot: int) -> str:
        anchor, kind = liked[int(np.argmax(liked_matrix @ vectors.rows(np.array([slot]))[0]))]
        return f"similar to {catalog.title(anchor)}, which you {VERBS.get(kind, 'viewed')}"

    return reason
