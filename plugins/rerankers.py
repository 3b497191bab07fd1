"""Built-in rerankers: request filters and the never-show-seen safety net."""

from __future__ import annotations

from agent.hookspecs import hookimpl
from agent.ranking import Query, Scored


class ExcludeSeen:
    """Drops items the user already interacted with, excluded items and deleted items.

    Sources are asked to leave these out already; this reranker guarantees it for any
    third-party source that does not. It runs last in the chain.
    """

    @hookimpl(trylast=True)
    def recsys_rerank(self, query: Query, ranked: list[Scored]) -> list[Scored]:
        active = query.catalog.active
        return [s for s in ranked if s.slot not in query.exclude and s.slot < len(active) and active[s.slot]]


class RequestFilters:
    """Keeps only items in one of the requested categories, when the request names any."""

    @hookimpl
    def recsys_rerank(self, query: Query, ranked: list[Scored]) -> list[Scored] | None:
        if not query.categories:
            return None
        wanted = set(query.categories)
        kept = []
        for entry in ranked:
            item = query.catalog.item(entry.slot)
            if item is not None and wanted.intersection(item.categories):
                kept.append(entry)
        return kept
