"""Content retrieval: item embeddings in Qdrant, user taste vectors, nearest items.

Every item is embedded once per distinct text and stored in Qdrant with its content hash, in a
background worker (``indexing``); the agent serves with its other sources meanwhile. A user's
taste vectors are computed when needed from their recent history (``taste``). The LLM
profile, when a summariser has written one, is embedded off the hot path and used as one more
query vector (``profile``). The nearest items to those vectors come from the in-memory copy or,
for catalogs larger than it, from Qdrant (``search``). The agent asks for a batch of users at
once (``recsys_candidates_batch``); each gets exactly what it would get alone.

This module holds the plugin itself: its options, lifespan and hooks. It lives in the package
root because ``plugins.content:ContentRetrieval`` is its registered path, and because it opens
the model through this module's ``shared_embedder`` (the name a test replaces).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

from agent.config import REDACTED, redact_url
from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.extras import ITEM_VECTORS
from agent.pipeline.user_state import UserState
from agent.pipeline.values import Candidates, Query
from agent.threads import in_daemon_thread, join_running
from agent.vectors.embeddings import Embedder, shared_embedder
from agent.vectors.item_neighbours import NEIGHBOURS, ItemNeighbours
from agent.vectors.item_vectors import ItemVectors
from agent.vectors.qdrant_store import VectorStore
from agent.vectors.retried_writes import RetriedWrites
from agent.wire.contract import Item
from plugins.content.indexing import CatalogIndex
from plugins.content.profile import PROFILE_REASON, PROFILE_VECTOR, ProfileVector, profile_query
from plugins.content.search import AUTO_NEIGHBOURS_MAX_ITEMS, SEARCH_MODES, Asked, search_memory, search_qdrant
from plugins.content.taste import Taste, taste_of, taste_queries, taste_reasons

__all__ = ["PROFILE_VECTOR", "SEARCH_MODES", "ContentRetrieval", "ProfileVector", "Taste"]

log = logging.getLogger(__name__)

THREAD_JOIN_S = 2.0
# the name this plugin is registered under (agent/hooks/manager.py), for its failure counts
PLUGIN_NAME = "content"
# the hook whose work a failed Qdrant write belongs to, by write
WRITE_HOOKS = {"upsert": "recsys_catalog_upsert", "delete": "recsys_catalog_delete"}


@dataclass(frozen=True, slots=True)
class ContentOptions:
    sources: list[str] | None = None  # None: every content source
    search: str = "auto"
    neighbours: int = NEIGHBOURS

    def problems(self) -> list[tuple[str, str]]:
        return [
            (name, message)
            for name, bad, message in (
                ("search", self.search not in SEARCH_MODES, f"must be one of {', '.join(SEARCH_MODES)}"),
                ("neighbours", self.neighbours < 1, "must be at least 1"),
            )
            if bad
        ]


class ContentRetrieval:
    """Options (``[plugins.content]``): ``sources`` (which of ``content_recent``,
    ``content_long``, ``profile`` to propose; default all); ``search`` (``auto``, the default,
    ``scan`` or ``neighbours``: see SEARCH_MODES and the README's benchmark figures); ``neighbours``
    (how many nearest items the ``neighbours`` and ``auto`` modes keep per item, default 32)."""

    def __init__(self) -> None:
        self.index = CatalogIndex()
        self.search_mode = "auto"
        self.cache_max_items = 500_000
        self.enabled_sources = {"content_recent", "content_long", "profile"}
        # profile embeddings in flight (see profile.py)
        self._tasks: set[asyncio.Task[None]] = set()

    # what the index holds, by the names callers (and tests) have always used
    @property
    def embedder(self) -> Embedder | None:
        return self.index.embedder

    @property
    def store(self) -> VectorStore | None:
        return self.index.store

    @property
    def vectors(self) -> ItemVectors | None:
        return self.index.vectors

    @property
    def neighbours(self) -> ItemNeighbours:
        return self.index.neighbours

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options(PLUGIN_NAME, ContentOptions)
        if options.sources is not None:
            self.enabled_sources = set(options.sources)
        self.search_mode = options.search
        limit = AUTO_NEIGHBOURS_MAX_ITEMS if self.search_mode == "auto" else None
        self.index.configure(
            ctx.catalog, ctx.metrics, ItemNeighbours(options.neighbours, limit), keep=self.search_mode != "scan"
        )
        self.cache_max_items = ctx.settings.vector_cache_max_items
        worker = asyncio.create_task(self.index.work(lambda: self._open(ctx)), name="content-embedding")
        try:
            yield
        finally:
            for task in [worker, *self._tasks]:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            # an embedding in flight finishes (bounded) before the process may exit under it
            await asyncio.to_thread(join_running, THREAD_JOIN_S)
            ctx.extras.pop(ITEM_VECTORS, None)
            await self.index.close()

    async def _open(self, ctx: AgentContext) -> None:
        settings = ctx.settings
        embedder = await in_daemon_thread(shared_embedder, settings.embedding_model, settings.embedding_device)
        store = await asyncio.to_thread(
            VectorStore,
            settings.qdrant_collection,
            embedder.dim,
            path=settings.data_dir / "qdrant",
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key or None,
        )

        def count_failure(op: str, error: Exception) -> None:
            ctx.metrics.plugin_failures.labels(plugin=PLUGIN_NAME, hook=WRITE_HOOKS[op], kind="error").inc()

        key = settings.qdrant_api_key

        def redact(text: str) -> str:
            # a client's error may quote the server's URL, or (echoing a request) the key
            text = redact_url(text)
            return text.replace(key, REDACTED) if key else text

        writes = RetriedWrites(store, count_failure, redact=redact)
        await self.index.attach(embedder, store, writes)
        ctx.extras[ITEM_VECTORS] = self.index.vectors
        log.info("content retrieval ready: %d item vectors in Qdrant (%s)", self.index.stored_count, store.where)

    @hookimpl
    def recsys_settle(self) -> Any:
        return self.index.settled()

    @hookimpl
    def recsys_health(self) -> dict[str, object] | None:
        return self.index.problems()

    # -- catalog -------------------------------------------------------------------------------

    @hookimpl
    def recsys_catalog_upsert(self, items: list[Item], slots: list[int], changed: list[bool]) -> None:
        # Queued, not awaited: the upsert is applied (the catalog knows the item) and its vector
        # follows. If the agent stops first, the catalog replay at start queues it again.
        self.index.queue_upsert(items, slots)

    @hookimpl
    def recsys_catalog_delete(self, item_id: str, slot: int) -> None:
        self.index.queue_delete(item_id, slot)

    # -- retrieval -----------------------------------------------------------------------------

    def taste(self, user: UserState) -> Taste | None:
        """The user's taste vectors, from their recent history (newest counts most)."""
        return taste_of(user, self.index.vectors)

    @hookimpl
    def recsys_candidates(self, query: Query) -> Any:
        # for direct callers: the agent calls the batch form
        answers = self.recsys_candidates_batch([query])
        if answers is None or isinstance(answers, list):
            return answers[0] if answers else None
        return _first(answers)

    @hookimpl
    def recsys_candidates_batch(self, queries: list[Query]) -> list[Any] | Awaitable[list[Any]] | None:
        vectors = self.index.vectors
        if vectors is None:
            return None
        answers: list[Any] = [None] * len(queries)
        in_memory: list[tuple[int, Asked]] = []
        in_qdrant: list[tuple[int, Asked]] = []
        for i, query in enumerate(queries):
            asked = self._asked(query, vectors)
            if asked is not None:
                (in_qdrant if query.catalog.size > self.cache_max_items else in_memory).append((i, asked))
        found = search_memory([asked for _, asked in in_memory], vectors, self.index.neighbours)
        for (i, asked), hits in zip(in_memory, found, strict=True):
            # both taste sources explain by the same liked items: one closure serves them
            reasons = taste_reasons(asked.taste, vectors, asked.query.catalog)
            answers[i] = [
                Candidates(
                    source,
                    slots,
                    scores,
                    PROFILE_REASON if source == "profile" else reasons,
                    score_of=vectors.scorer(vector),
                )
                for (source, vector), (slots, scores) in zip(asked.vectors, hits, strict=True)
                if len(slots)
            ]
        if not in_qdrant:
            return answers
        store = self.index.store
        assert store is not None

        async def from_qdrant() -> list[Any]:
            # one search at a time, as when queries came one by one: each waits for the store in a
            # thread, and the client is not known to be safe to call from several at once
            for i, asked in in_qdrant:
                reasons = partial(taste_reasons, asked.taste, vectors, asked.query.catalog)
                answers[i] = await search_qdrant(asked.query, asked.vectors, store, reasons)
            return answers

        return from_qdrant()

    def _asked(self, query: Query, vectors: ItemVectors) -> Asked | None:
        """What the query's user is searched by, or None when nothing (no taste yet)."""
        taste = taste_of(query.user, vectors)
        if taste is None:
            return None
        searches = taste_queries(taste, self.enabled_sources)
        if "profile" in self.enabled_sources:
            profile = profile_query(query.user, self.index.embedder, self._tasks)
            if profile is not None:
                searches.append(("profile", profile))
        return Asked(query, taste, searches) if searches else None


async def _first(answers: Awaitable[list[Any]]) -> Any:
    return (await answers)[0]
