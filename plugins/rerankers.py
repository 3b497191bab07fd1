"""Built-in rerankers: diversity and the safety net that keeps only what a query allows.

Both answer a batch of queries at once (``recsys_rerank_batch``), each exactly as if alone; the
one-query hooks are thin wrappers for direct callers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog
from agent.pipeline.extras import ITEM_VECTORS
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
        kept = self.recsys_rerank_batch([query], [ranked])[0]
        return ranked if kept is None else kept

    @hookimpl(trylast=True)
    def recsys_rerank_batch(self, queries: list[Query], ranked: list[list[Scored]]) -> list[list[Scored] | None]:
        return [_allowed_only(query, found) for query, found in zip(queries, ranked, strict=True)]


def _allowed_only(query: Query, ranked: list[Scored]) -> list[Scored] | None:
    """The entries of ``ranked`` that ``query`` allows; None when it allows them all (the
    usual case: the sources proposed from the mask), so that the list is not copied."""
    allowed = query.allowed()
    slots = np.fromiter((s.slot for s in ranked), dtype=np.int64, count=len(ranked))
    ok = slots < len(allowed)
    ok[ok] = allowed[slots[ok]]
    if ok.all():
        return None
    return [s for s, keep in zip(ranked, ok.tolist(), strict=True) if keep]


@dataclass(frozen=True, slots=True)
class DiversityOptions:
    trade_off: float = field(default=0.9, metadata={"option": "lambda"})
    depth: int = 3

    def problems(self) -> list[tuple[str, str]]:
        return [
            (name, message)
            for name, bad, message in (
                ("lambda", not 0 <= self.trade_off <= 1, "must be in [0, 1]"),
                ("depth", self.depth < 1, "must be at least 1"),
            )
            if bad
        ]


class Diversity:
    """Maximal marginal relevance over the top of the list: each next item maximises
    ``lambda * relevance - (1 - lambda) * (similarity to the items already picked)``.

    Similarity is the cosine of item embeddings when the content source shares them
    (``ctx.extras[ITEM_VECTORS]``) and every item of the pool has one, else the Jaccard
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
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("diversity", DiversityOptions)
        self.trade_off, self.depth_factor = options.trade_off, options.depth
        self.ctx = ctx
        yield

    def _similarity(self, query: Query, slots: list[int]) -> np.ndarray:
        return self._similarities([query], np.array([slots], dtype=np.int64))[0]

    def _similarities(self, queries: list[Query], pools: np.ndarray) -> list[np.ndarray]:
        """Pairwise similarity within each pool (pools: one row of slots per query, all of one
        length): cosines where every item of the pool has a vector, else category overlaps."""
        vectors = self.ctx.extras.get(ITEM_VECTORS) if self.ctx else None
        if vectors is None:
            with_vectors = np.zeros(len(queries), dtype=bool)
        else:
            with_vectors = vectors.present(max(query.catalog.size for query in queries))[pools].all(axis=1)
        similarity = [
            np.empty(0) if cosine else category_jaccard(query.catalog, pool)
            for query, pool, cosine in zip(queries, pools.tolist(), with_vectors.tolist(), strict=True)
        ]
        cosine = np.flatnonzero(with_vectors)
        if len(cosine) and vectors is not None:
            rows = vectors.rows(pools[cosine])
            # one product per pool: numpy multiplies stacked pools one by one, each as if alone
            # (by a contiguous copy of the transpose: a general product costs less than the
            # symmetric one numpy picks for rows times their own transpose)
            products = np.clip(np.matmul(rows, np.ascontiguousarray(rows.transpose(0, 2, 1))), 0.0, 1.0)
            for i, product in zip(cosine.tolist(), products, strict=True):
                similarity[i] = product
        return similarity

    @hookimpl
    def recsys_rerank(self, query: Query, ranked: list[Scored]) -> list[Scored] | None:
        return self.recsys_rerank_batch([query], [ranked])[0]

    @hookimpl
    def recsys_rerank_batch(self, queries: list[Query], ranked: list[list[Scored]]) -> list[list[Scored] | None] | None:
        if self.trade_off >= 1.0:
            return None
        answers: list[list[Scored] | None] = [None] * len(queries)
        # queries whose pools are as deep and who pick as many items run the greedy steps of
        # MMR together, as arrays with one row per query
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (query, found) in enumerate(zip(queries, ranked, strict=True)):
            if len(found) > 2:
                depth = min(len(found), query.k * self.depth_factor)
                groups.setdefault((depth, min(query.k, depth)), []).append(i)
        for (depth, picks), members in groups.items():
            orders = self._mmr([queries[i] for i in members], [ranked[i][:depth] for i in members], picks)
            for i, order in zip(members, orders, strict=True):
                pool = ranked[i]
                answers[i] = [pool[j] for j in order] + pool[depth:]
        return answers

    def _mmr(self, queries: list[Query], pools: list[list[Scored]], picks: int) -> list[list[int]]:
        """Each pool's new order (positions in the pool): the ``picks`` MMR choices, then the
        rest as they were. Pools are of one length; row by row the arithmetic is that of one
        pool alone."""
        scores = np.array([[s.score for s in pool] for pool in pools])
        low = scores.min(axis=1, keepdims=True)
        spread = scores.max(axis=1, keepdims=True) - low
        relevance = np.divide(scores - low, spread, out=np.ones_like(scores), where=spread > 0)
        # the penalty is scaled once; a picked item is blocked by an infinite one
        value = self.trade_off * relevance
        slots = np.array([[s.slot for s in pool] for pool in pools], dtype=np.int64)
        # scaled pool by pool, each in its own precision (float32 cosines), as one pool alone
        penalty = np.stack([(1 - self.trade_off) * similarity for similarity in self._similarities(queries, slots)])
        pools_count, depth = value.shape
        closest = np.zeros_like(value)
        gain = np.empty_like(value)
        # flat positions (pool, item) -> pool * depth + item: 1-D indexing costs less per step
        offsets = np.arange(pools_count) * depth
        flat_value = value.reshape(-1)
        flat_penalty = penalty.reshape(pools_count * depth, depth)
        choices = []
        for _ in range(picks):
            choice = np.subtract(value, closest, out=gain).argmax(axis=1)
            choices.append(choice)
            chosen = choice + offsets
            flat_value[chosen] = -np.inf
            np.maximum(closest, flat_penalty.take(chosen, axis=0), out=closest)
        orders = []
        for picked in np.stack(choices, axis=1).tolist():
            taken = set(picked)
            orders.append(picked + [i for i in range(depth) if i not in taken])
        return orders
