"""Built-in rerankers: diversity and the safety net that keeps only what a query allows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog
from agent.pipeline.values import Query, Scored


def category_jaccard(catalog: Catalog, slots: list[int]) -> np.ndarray:
    """Jaccard similarity of the items' category sets, pairwise; 0 on the diagonal and for two
    items without categories (a deleted or unknown item has none).

    One matrix product instead of a Python loop over the pairs (a pool of 3 x k items is
    hundreds to thousands of pairs per request): with ``member`` the item x category 0/1 matrix,
    ``member @ member.T`` counts the shared categories and ``|A | B| = |A| + |B| - |A & B|``.
    The counts are small whole numbers, exact in floats, so the values are those of the set
    arithmetic. Dense, not sparse: a pool has a few dozen distinct categories at most, and
    scipy is no dependency of the core.
    """
    columns: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for row, slot in enumerate(slots):
        item = catalog.item(slot)
        # a set: a category named twice by an item counts once
        for category in set(item.categories) if item is not None else ():
            rows.append(row)
            cols.append(columns.setdefault(category, len(columns)))
    member = np.zeros((len(slots), len(columns)))
    member[rows, cols] = 1.0
    shared = member @ member.T
    sizes = member.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - shared
    similarity = np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)
    # An item is never compared with itself (a picked item is blocked, not penalised): the
    # diagonal stays 0, as it always was.
    np.fill_diagonal(similarity, 0.0)
    return similarity


class ExcludeSeen:
    """Keeps only what the query allows: not seen by the user, not excluded by the request, not
    deleted, in the requested categories (``Query.allowed``).

    Sources are asked to propose from that mask already; this reranker guarantees it for any
    third-party source that does not. It runs last in the chain.
    """

    @hookimpl(trylast=True)
    def recsys_rerank(self, query: Query, ranked: list[Scored]) -> list[Scored]:
        allowed = query.allowed()
        return [s for s in ranked if s.slot < len(allowed) and allowed[s.slot]]


class Diversity:
    """Maximal marginal relevance over the top of the list: each next item maximises
    ``lambda * relevance - (1 - lambda) * (similarity to the items already picked)``.

    Similarity is the cosine of item embeddings when the content source shares them
    (``ctx.extras["item_vectors"]``) and every item of the pool has one, else the Jaccard
    overlap of categories (:func:`category_jaccard`) for every pair: one scale for the whole
    penalty, not cosines and overlaps side by side. Options (``[plugins.diversity]``):
    ``lambda`` (default 0.9; 1 switches diversity off), ``depth`` (how many of the fused items
    compete, default 3 x k).
    """

    def __init__(self) -> None:
        self.trade_off = 0.9
        self.depth_factor = 3
        self.ctx: AgentContext | None = None

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._configure(ctx)

    @asynccontextmanager
    async def _configure(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("diversity")
        self.trade_off = float(options.get("lambda", self.trade_off))
        self.depth_factor = int(options.get("depth", self.depth_factor))
        if not 0 <= self.trade_off <= 1 or self.depth_factor < 1:
            raise ValueError("[plugins.diversity] lambda must be in [0, 1] and depth at least 1")
        self.ctx = ctx
        yield

    def _similarity(self, query: Query, slots: list[int]) -> np.ndarray:
        vectors = self.ctx.extras.get("item_vectors") if self.ctx else None
        if vectors is not None and vectors.present(query.catalog.size)[slots].all():
            rows = vectors.rows(np.array(slots))
            return np.clip(rows @ rows.T, 0.0, 1.0)
        return category_jaccard(query.catalog, slots)

    @hookimpl
    def recsys_rerank(self, query: Query, ranked: list[Scored]) -> list[Scored] | None:
        if self.trade_off >= 1.0 or len(ranked) <= 2:
            return None
        depth = min(len(ranked), query.k * self.depth_factor)
        pool, rest = ranked[:depth], ranked[depth:]
        scores = np.array([s.score for s in pool])
        spread = scores.max() - scores.min()
        relevance = (scores - scores.min()) / spread if spread > 0 else np.ones(len(pool))
        # the penalty is scaled once; a picked item is blocked by an infinite one
        value = self.trade_off * relevance
        penalty = (1 - self.trade_off) * self._similarity(query, [s.slot for s in pool])
        closest = np.zeros(len(pool))
        picked: list[int] = []
        for _ in range(min(query.k, len(pool))):
            choice = int(np.argmax(value - closest))
            picked.append(choice)
            value[choice] = -np.inf
            np.maximum(closest, penalty[choice], out=closest)
        chosen = set(picked)
        order = picked + [i for i in range(len(pool)) if i not in chosen]
        return [pool[i] for i in order] + rest
