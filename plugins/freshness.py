"""Freshness: items new to the catalog get shown before anyone has engaged with them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import grow
from agent.pipeline.values import Candidates, Query, first_allowed
from plugins.trending import allowed_at, first_allowed_batch

DEFAULT_WINDOW_S = 7 * 86_400.0
# how far down the newest items a batch looks for every query at once, in lists asked for
PREFIX_FACTOR = 16
# From this many queries a batch is answered in array operations over all of them: a dozen numpy
# calls a batch, which two queries already share at a profit (one at a time costs about five
# per query)
VECTORISED_FROM = 2


@dataclass(frozen=True, slots=True)
class FreshnessOptions:
    window_s: float = DEFAULT_WINDOW_S

    def problems(self) -> list[tuple[str, str]]:
        return [("window_s", "must be positive")] if self.window_s <= 0 else []


class Freshness:
    """Proposes the most recently added items, newest first; an item stops being fresh after
    ``window_s`` (option in ``[plugins.freshness]``, default 7 days). Fusion decides how much
    this is worth: nothing on a stream where new items do not get engagement."""

    def __init__(self) -> None:
        self.added_at = np.full(1024, -np.inf)
        self.window_s = DEFAULT_WINDOW_S
        # slots, newest first, and their times; recomputed only when an item is added
        self._newest_first: np.ndarray | None = None
        self._newest_keys = np.empty(0)

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        self.window_s = ctx.options("freshness", FreshnessOptions).window_s
        yield

    @hookimpl
    def recsys_catalog_upsert(self, slots: list[int], ts: float) -> None:
        self.added_at = grow(self.added_at, max(slots) + 1, fill=-np.inf)
        for slot in slots:
            # an edit does not make an item new again
            if not np.isfinite(self.added_at[slot]):
                self.added_at[slot] = ts
                self._newest_first = None

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates | None:
        return self.recsys_candidates_batch([query])[0]

    @hookimpl
    def recsys_candidates_batch(self, queries: list[Query]) -> list[Candidates | None]:
        if not queries:
            return []
        catalog = queries[0].catalog
        if len(queries) > 1 and any(query.catalog is not catalog for query in queries):
            return [self.recsys_candidates_batch([query])[0] for query in queries]
        size = catalog.size
        self.added_at = grow(self.added_at, size, fill=-np.inf)
        added = self.added_at[:size]
        newest = self._newest_first
        if newest is None or len(newest) > size:
            known = np.flatnonzero(np.isfinite(added))
            newest = self._newest_first = known[np.argsort(-added[known], kind="stable")]
            # negated, so that they ascend along the list: the fresh items are a prefix of it
            self._newest_keys = -added[newest]
        nows = np.fromiter((query.now for query in queries), dtype=np.float64, count=len(queries))
        # how many of the newest items are still fresh for each query (the same for a batch
        # ranked at one time)
        fresh = np.searchsorted(self._newest_keys, -(nows - self.window_s), side="right")
        if len(queries) >= VECTORISED_FROM:
            chosen = _newest_allowed(queries, newest, fresh, added, nows)
        else:
            chosen = [None] * len(queries)
        scorers: dict[float, Callable[[np.ndarray], np.ndarray]] = {}
        answers: list[Candidates | None] = []
        for query, limit, found in zip(queries, fresh.tolist(), chosen):
            if found is None:
                slots = first_allowed(newest[:limit], query.n_candidates, query.allowed())
                ages = None
            else:
                slots, ages = found
            if len(slots) == 0:
                answers.append(None)
                continue
            age_hours = scorers.get(query.now)
            if age_hours is None:
                age_hours = scorers[query.now] = _age_hours(added, query.now)
            answers.append(
                Candidates(
                    source="freshness",
                    slots=slots,
                    scores=age_hours(slots) if ages is None else ages,
                    reasons="new in the catalog",
                    score_of=age_hours,
                )
            )
        return answers


def _newest_allowed(
    queries: list[Query], newest: np.ndarray, fresh: np.ndarray, added: np.ndarray, nows: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each query's first ``n_candidates`` allowed items of ``newest[:fresh[i]]`` and their
    scores, for the batch in a few array operations over a prefix of the newest items; None for
    a query that the prefix does not answer (it excluded most of it), which then reads all its
    fresh items alone. The prefix is several times the longest list asked for, so that even a
    query for a few categories rarely needs that."""
    ns = np.fromiter((query.n_candidates for query in queries), dtype=np.int64, count=len(queries))
    looked = min(int(fresh.max()), PREFIX_FACTOR * int(ns.max()))
    prefix = newest[:looked]
    ok = allowed_at(queries, prefix) & (np.arange(looked) < fresh[:, None])
    columns, bounds, enough = first_allowed_batch(ok, ns)
    # short of n in all of its fresh items: that is all there is for this query
    answered = (enough | (fresh <= looked)).tolist()
    slots = prefix[columns]
    # _age_hours for every chosen item at once, each with its query's time
    rows = np.repeat(np.arange(len(queries)), np.diff(bounds))
    ages = -np.floor((nows[rows] - added[slots]) / 3_600.0)
    return [
        (slots[bounds[i] : bounds[i + 1]], ages[bounds[i] : bounds[i + 1]]) if answered[i] else None
        for i in range(len(queries))
    ]


def _age_hours(added: np.ndarray, now: float) -> Callable[[np.ndarray], np.ndarray]:
    def age_hours(wanted: np.ndarray) -> np.ndarray:
        # whole hours: items added in the same batch are equally fresh, not ordered by the
        # milliseconds between them
        return -np.floor((now - added[wanted]) / 3_600.0)

    return age_hours
