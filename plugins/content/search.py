"""Nearest items to the query vectors: in memory (scan or neighbours), or in Qdrant.

"scan": every query scans the projected catalog (best recall); "neighbours": a taste query
scores only the precomputed nearest items of the user's recent items (cost independent of
catalog size, a table whose build grows with the square of the catalog); "auto", the default:
neighbours while the catalog holds at most AUTO_NEIGHBOURS_MAX_ITEMS vectors, scan beyond.
Catalogs larger than the in-memory cache are searched in Qdrant.

A batch of queries (the users owed a push at one moment) is answered at once: every vector
that scans joins one scan of the projection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.pipeline.values import Candidates, Query, top_slots
from agent.vectors.item_neighbours import ItemNeighbours
from agent.vectors.item_vectors import ItemVectors
from agent.vectors.qdrant_store import VectorStore
from plugins.content.profile import PROFILE_REASON
from plugins.content.taste import Taste

SEARCH_MODES = ("auto", "scan", "neighbours")
# "auto" keeps a neighbour table up to this many item vectors: its build then costs under a
# minute of one core, in a worker thread (see agent/vectors/item_neighbours.py)
AUTO_NEIGHBOURS_MAX_ITEMS = 100_000
# (slots, scores) per query vector, best first
Hits = list[tuple[np.ndarray, np.ndarray]]


@dataclass(slots=True)
class Asked:
    """What one query searches by: the user's taste and the (source, unit vector) pairs."""

    query: Query
    taste: Taste
    vectors: list[tuple[str, np.ndarray]]


def search_memory(asked: list[Asked], vectors: ItemVectors, neighbours: ItemNeighbours) -> list[Hits]:
    """(slots, scores) per query vector, best first, for every query of a batch.

    Every vector that scans the catalog joins one scan for the whole batch (per candidate
    count), which costs little more than one query's scan; a query's answer is still exactly
    what it gets alone (``ItemVectors.search_rows``)."""
    found: list[list[tuple[np.ndarray, np.ndarray] | None]] = [[None] * len(one.vectors) for one in asked]
    scans: dict[int, list[tuple[int, int]]] = {}  # candidate count -> (query, vector) positions
    for i, one in enumerate(asked):
        query = one.query
        anchors = [slot for slot, _ in one.taste.positives]
        # Taste queries score the neighbours of the user's recent items (by the projected
        # vectors: a few hundred rows, no scan); a profile query has no anchor items and scans.
        pool = (
            neighbours.candidates(anchors, vectors, query.allowed()) if anchors and neighbours.serves(vectors) else None
        )
        for j, (source, vector) in enumerate(one.vectors):
            if pool is None or source == "profile":
                scans.setdefault(query.n_candidates, []).append((i, j))
            else:
                best, best_scores = top_slots(vectors.scorer(vector)(pool), query.n_candidates)
                found[i][j] = (pool[best], best_scores)
    for n, rows in scans.items():
        masks = [asked[i].query.allowed() for i, _ in rows]
        # a query's mask covers the catalog as it was when the query was made: the slots added
        # since are allowed to none of them
        allowed = np.zeros((len(rows), max(len(mask) for mask in masks)), dtype=bool)
        for row, mask in zip(allowed, masks, strict=True):
            row[: len(mask)] = mask
        stacked = np.stack([asked[i].vectors[j][1] for i, j in rows])
        for (i, j), answer in zip(rows, vectors.search_rows(stacked, n, allowed), strict=True):
            found[i][j] = answer
    return [[answer for answer in hits if answer is not None] for hits in found]


async def search_qdrant(
    query: Query,
    queries: list[tuple[str, np.ndarray]],
    store: VectorStore,
    taste_reasons: Callable[[], str | Callable[[int], str]],
) -> list[Candidates]:
    # Catalogs beyond the in-memory scan's size are searched in Qdrant (HNSW on a server):
    # a blocking client call, so in a thread, never on the event loop.
    catalog = query.catalog
    results = []
    for source, vector in queries:
        hits = await asyncio.to_thread(store.search, vector, query.n_candidates + len(query.exclude))
        pairs = [(catalog.slot(item_id), score) for item_id, score in hits]
        allowed = query.allowed()
        kept = [(s, sc) for s, sc in pairs if s is not None and s < len(allowed) and allowed[s]][: query.n_candidates]
        if kept:
            slots = np.array([s for s, _ in kept], dtype=np.int64)
            results.append(
                Candidates(
                    source,
                    slots,
                    np.array([sc for _, sc in kept]),
                    PROFILE_REASON if source == "profile" else taste_reasons(),
                )
            )
    return results
