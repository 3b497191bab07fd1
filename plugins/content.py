"""Content retrieval: item embeddings in Qdrant, user taste vectors, nearest items.

Every item is embedded once per distinct text (title, categories, text, attributes) and stored
in Qdrant with its content hash; an upsert whose text did not change costs nothing. Loading the
model and embedding happen in a background worker, so the agent serves (with its other sources)
from the first second; an item joins content retrieval as soon as its vector exists.

A user's taste vectors are computed when needed from their recent history (the core keeps it):
a fast one (the last few items) and a slow one (the longer run), each a sum of item vectors
weighted by event signal (dislike and skip push away) and decayed by position. Being a function
of the history, they are exactly what they were before a restart. The LLM profile, when a
summariser has written one (``user.extras["profile"]``), is embedded off the hot path and used as
one more query vector.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.llm.summaries import profile_text
from agent.pipeline.catalog import Catalog
from agent.pipeline.user_state import UserState
from agent.pipeline.values import Candidates, Query, top_slots
from agent.serving.metrics import Metrics
from agent.threads import in_daemon_thread, join_running
from agent.vectors.embeddings import Embedder, content_hash, item_text, shared_embedder
from agent.vectors.item_neighbours import NEIGHBOURS, ItemNeighbours
from agent.vectors.item_vectors import ItemVectors
from agent.vectors.qdrant_store import VectorStore
from agent.wire.contract import Item

log = logging.getLogger(__name__)

# per-event decay of the taste vectors: about 2 and about 10 recent items dominate
SHORT_DECAY = 0.5
LONG_DECAY = 0.9
RECENT_POSITIVES = 8
# "scan": every query scans the projected catalog (best recall); "neighbours": it scores only
# the precomputed nearest items of the user's recent items (cost independent of catalog size)
SEARCH_MODES = ("scan", "neighbours")
EMBED_CHUNK = 256
THREAD_JOIN_S = 2.0
PROGRESS_FROM = 1_000
PROFILE_REASON = "matches your interest profile"
# the embedded LLM profile's key in UserState.extras
PROFILE_VECTOR = "content.profile_vector"
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


@dataclass(frozen=True, slots=True)
class Deletion:
    """An item delete, queued behind the upserts before it (see ``recsys_catalog_delete``)."""

    item_id: str
    slot: int


@dataclass(slots=True)
class ProfileVector:
    text: str = ""
    vector: np.ndarray | None = None


class ContentRetrieval:
    """Options (``[plugins.content]``): ``sources`` (which of ``content_recent``,
    ``content_long``, ``profile`` to propose; default all); ``search`` (``scan``, the default,
    or ``neighbours``: see SEARCH_MODES and the README's benchmark figures); ``neighbours``
    (how many nearest items the ``neighbours`` mode keeps per item, default 32)."""

    def __init__(self) -> None:
        self.embedder: Embedder | None = None
        self.store: VectorStore | None = None
        self.vectors: ItemVectors | None = None
        self.neighbours = ItemNeighbours()
        self.search_mode = "scan"
        self.cache_max_items = 500_000
        self.enabled_sources = {"content_recent", "content_long", "profile"}
        # vectors found in Qdrant at start, waiting for their item to be upserted again
        self._stored: dict[str, tuple[str, np.ndarray]] = {}
        # catalog work in stream order: upsert batches and deletes
        self._queue: asyncio.Queue[list[tuple[Item, int]] | Deletion] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._catalog: Catalog | None = None
        # why the model or Qdrant could not be opened, for recsys_settle to report
        self._failure: str | None = None
        self._metrics: Metrics | None = None

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._run(ctx)

    @asynccontextmanager
    async def _run(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("content")
        sources = options.get("sources")
        if sources is not None:
            self.enabled_sources = set(sources)
        self.search_mode = str(options.get("search", "scan"))
        neighbours = options.get("neighbours", NEIGHBOURS)
        if not isinstance(neighbours, int) or isinstance(neighbours, bool) or neighbours < 1:
            raise ValueError(f"[plugins.content] neighbours must be a whole number of at least 1, not {neighbours!r}")
        self.neighbours = ItemNeighbours(neighbours)
        if self.search_mode not in SEARCH_MODES:
            raise ValueError(
                f"[plugins.content] search must be one of {', '.join(SEARCH_MODES)}, not {self.search_mode!r}"
            )
        self.cache_max_items = ctx.settings.vector_cache_max_items
        self._catalog = ctx.catalog
        self._metrics = ctx.metrics
        worker = asyncio.create_task(self._work(ctx), name="content-embedding")
        try:
            yield
        finally:
            for task in [worker, *self._tasks]:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            # an embedding in flight finishes (bounded) before the process may exit under it
            await asyncio.to_thread(join_running, THREAD_JOIN_S)
            ctx.extras.pop("item_vectors", None)
            if self.store is not None:
                await asyncio.to_thread(self.store.close)

    async def _open(self, ctx: AgentContext) -> None:
        settings = ctx.settings
        self.embedder = await in_daemon_thread(shared_embedder, settings.embedding_model, settings.embedding_device)
        store = await asyncio.to_thread(
            VectorStore,
            settings.qdrant_collection,
            self.embedder.dim,
            path=settings.data_dir / "qdrant",
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key or None,
        )
        self.store = store
        self._stored = {item_id: (h, v) for item_id, h, v in await asyncio.to_thread(lambda: list(store.scan()))}
        self.vectors = ItemVectors(self.embedder.dim)
        ctx.extras["item_vectors"] = self.vectors
        log.info("content retrieval ready: %d item vectors in Qdrant (%s)", len(self._stored), store.where)

    async def _work(self, ctx: AgentContext) -> None:
        """Load the model and Qdrant, then embed queued catalog batches, in order."""
        try:
            await self._open(ctx)
        except Exception as exc:
            # Degrade, do not die: the other sources keep serving; the failure is reported.
            self._failure = f"content retrieval could not start: {exc}"
            log.exception("content retrieval unavailable")
            self._ready.set()
            while True:
                await self._queue.get()
                self._queue.task_done()
        self._ready.set()
        while True:
            work = await self._queue.get()
            try:
                if isinstance(work, Deletion):
                    await self._delete(work)
                else:
                    await self._embed(self._needing_vectors(work))
                    await self._project_if_grown()
                self._metrics_gauge()
            except Exception:
                log.exception(
                    "catalog work failed in content retrieval (%s)",
                    "a delete" if isinstance(work, Deletion) else "embedding a batch",
                )
            finally:
                self._queue.task_done()

    def _changed(self, slots: list[int]) -> None:
        # only the neighbours mode keeps a table that must learn of new vectors
        if self.search_mode == "neighbours":
            self.neighbours.changed(slots)

    async def _project_if_grown(self) -> None:
        # The projection's SVD and the neighbour table take a second or two for 10k items:
        # never on the hot path.
        vectors, neighbours = self.vectors, self.neighbours
        if vectors is not None and vectors.needs_projection():
            vectors.start_fit()
            try:
                fitted = await in_daemon_thread(vectors.fit_projection)
            except BaseException:
                vectors.cancel_fit()
                raise
            vectors.install_projection(fitted)
        idle = self._queue.qsize() == 0
        if vectors is not None and self.search_mode == "neighbours" and neighbours.needs_build(vectors, idle):
            neighbours.start_build()
            neighbours.install(await in_daemon_thread(neighbours.build, vectors))

    @hookimpl
    def recsys_settle(self) -> Any:
        return self._settled()

    async def _settled(self) -> str | None:
        await self._ready.wait()
        await self._queue.join()
        return self._failure

    # -- catalog -------------------------------------------------------------------------------

    @hookimpl
    def recsys_catalog_upsert(self, items: list[Item], slots: list[int], changed: list[bool]) -> None:
        # Queued, not awaited: the upsert is applied (the catalog knows the item) and its vector
        # follows. If the agent stops first, the catalog replay at start queues it again.
        self._queue.put_nowait(list(zip(items, slots, strict=True)))

    def _metrics_gauge(self) -> None:
        if self._metrics is not None and self.vectors is not None:
            self._metrics.item_vectors.set(self.vectors.count)

    def _needing_vectors(self, batch: list[tuple[Item, int]]) -> list[tuple[Item, int, str, str]]:
        assert self.vectors is not None and self.embedder is not None and self._catalog is not None
        todo = []
        for item, slot in batch:
            if self._catalog.item(slot) is not item:
                continue  # replaced or deleted since it was queued
            text = item_text(item)
            digest = content_hash(text, self.embedder.name)
            if self.vectors.hashes.get(slot) == digest:
                continue
            stored = self._stored.pop(item.id, None)
            if stored is not None and stored[0] == digest:
                self.vectors.set([slot], stored[1][None, :], [digest])
                self._changed([slot])
                continue
            todo.append((item, slot, text, digest))
        return todo

    async def _embed(self, todo: list[tuple[Item, int, str, str]]) -> None:
        assert self.vectors is not None and self.embedder is not None and self.store is not None
        progress = tqdm(total=len(todo), desc="embedding items", unit="item", disable=len(todo) < PROGRESS_FROM or None)
        # The Qdrant write of one chunk overlaps the encoding of the next: in local mode it
        # costs about a tenth of the encoding, which would otherwise be added to it.
        writing: asyncio.Future[None] | None = None
        # Texts of similar length share a chunk, as the model's own encode sorts them within a
        # call: less padding, and the rate of encoding everything in one call.
        todo = sorted(todo, key=lambda entry: len(entry[2]))
        try:
            for start in range(0, len(todo), EMBED_CHUNK):
                chunk = todo[start : start + EMBED_CHUNK]
                vectors = await in_daemon_thread(self.embedder.encode, [text for _, _, text, _ in chunk])
                payloads: list[dict[str, object]] = [
                    {"title": item.title, "categories": list(item.categories)} for item, _, _, _ in chunk
                ]
                if writing is not None:
                    # shielded: a cancel must not look like the write's end while its thread runs
                    await asyncio.shield(writing)
                writing = asyncio.ensure_future(  # noqa: RUF006 (awaited below)
                    asyncio.to_thread(
                        self.store.upsert,
                        [item.id for item, _, _, _ in chunk],
                        vectors,
                        [d for _, _, _, d in chunk],
                        payloads,
                    )
                )
                # Serving from memory before Qdrant has the point is safe: if the agent stops
                # first, the item has no stored vector and is embedded again at the next start.
                self.vectors.set([slot for _, slot, _, _ in chunk], vectors, [d for _, _, _, d in chunk])
                self._changed([slot for _, slot, _, _ in chunk])
                progress.update(len(chunk))
                self._metrics_gauge()
            if writing is not None:
                await asyncio.shield(writing)
        finally:
            if writing is not None and not writing.done():
                # stopping: the write in flight finishes before the store may be closed
                with suppress(Exception):
                    await asyncio.shield(writing)
            progress.close()

    @hookimpl
    def recsys_catalog_delete(self, item_id: str, slot: int) -> None:
        # Queued behind the upserts before it, like them: a delete that arrives while the
        # model or Qdrant is still opening (a restart replays the catalog stream), or while
        # the item's batch is being encoded, must still leave Qdrant without the item. The
        # catalog has already made the item inactive, so no list shows it meanwhile.
        self._queue.put_nowait(Deletion(item_id, slot))

    async def _delete(self, deletion: Deletion) -> None:
        assert self.vectors is not None and self.store is not None and self._catalog is not None
        if self._catalog.item(deletion.slot) is not None:
            return  # upserted again since: that upsert, queued after this, decides
        self._stored.pop(deletion.item_id, None)
        self.vectors.remove(deletion.slot)
        await asyncio.to_thread(self.store.delete, [deletion.item_id])

    # -- taste ---------------------------------------------------------------------------------

    def taste(self, user: UserState) -> Taste | None:
        """The user's taste vectors, from their recent history (newest counts most)."""
        vectors = self.vectors
        if vectors is None or not user.recent:
            return None
        recent = list(user.recent)
        slots = np.fromiter((i.slot for i in recent), dtype=np.int64, count=len(recent))
        present = vectors.present(int(slots.max()) + 1)[slots]
        if not present.any():
            return None
        history = [i for i, ok in zip(recent, present.tolist(), strict=True) if ok]
        signals = np.fromiter((i.signal for i in history), dtype=np.float64, count=len(history))
        ages = np.arange(len(history) - 1, -1, -1)
        rows = vectors.rows(slots[present])
        short = (signals * SHORT_DECAY**ages) @ rows
        long = (signals * LONG_DECAY**ages) @ rows
        positives = [(i.slot, i.type) for i, s in zip(history, signals.tolist(), strict=True) if s > 0][
            -RECENT_POSITIVES:
        ]
        return Taste(short=short, long=long, positives=positives)

    # -- retrieval -----------------------------------------------------------------------------

    def _queries(self, user: UserState, taste: Taste) -> list[tuple[str, np.ndarray]]:
        queries = []
        for source, vector in (("content_recent", taste.short), ("content_long", taste.long)):
            norm = float(np.linalg.norm(vector))
            if source in self.enabled_sources and norm > 1e-6:
                queries.append((source, (vector / norm).astype(np.float32)))
        profile_dict = user.extras.get("profile")
        # Only an LLM's profile adds something: a heuristic one is built from the same history
        # that the taste vectors already embed, and re-embedding it after every event would
        # cost more CPU than everything else on the hot path.
        from_llm = isinstance(profile_dict, dict) and profile_dict.get("source") == "llm"
        text = profile_text(profile_dict) if from_llm else ""  # type: ignore[arg-type]
        if "profile" in self.enabled_sources and text:
            # in the user's extras, so it goes when the user is evicted or forgotten
            profile = user.extras.get(PROFILE_VECTOR)
            if not isinstance(profile, ProfileVector):
                profile = user.extras[PROFILE_VECTOR] = ProfileVector()
            if text != profile.text:
                self._embed_profile_later(user.user_id, profile, text)
            if profile.vector is not None:
                queries.append(("profile", profile.vector))
        return queries

    def _embed_profile_later(self, user_id: str, profile: ProfileVector, text: str) -> None:
        # Embedding a text costs milliseconds of CPU: never on the hot path. Until it is done
        # the previous profile vector (if any) keeps serving.
        embedder = self.embedder
        # One profile embedding at a time, whoever asks: a user skipped now is served at a
        # later push, and the CPU the hot path needs is never taken by a queue of these.
        if embedder is None or any(t.get_name().startswith("profile:") for t in self._tasks):
            return

        async def embed() -> None:
            vector = (await in_daemon_thread(embedder.encode, [text]))[0]
            profile.vector, profile.text = vector, text

        try:
            task = asyncio.get_running_loop().create_task(embed(), name=f"profile:{user_id}")
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reasons(self, taste: Taste, catalog: Catalog) -> str | Callable[[int], str]:
        """The liked item most similar to a recommended one names the reason (computed lazily)."""
        vectors = self.vectors
        assert vectors is not None
        liked = [(s, kind) for s, kind in taste.positives if vectors.has(s)]
        if not liked:
            return "similar to what you like"
        liked_matrix = vectors.rows(np.array([s for s, _ in liked]))

        def reason(slot: int) -> str:
            anchor, kind = liked[int(np.argmax(liked_matrix @ vectors.rows(np.array([slot]))[0]))]
            return f"similar to {catalog.title(anchor)}, which you {VERBS.get(kind, 'viewed')}"

        return reason

    @hookimpl
    def recsys_candidates(self, query: Query) -> Any:
        taste = self.taste(query.user)
        if taste is None or self.vectors is None:
            return None
        queries = self._queries(query.user, taste)
        if not queries:
            return None
        catalog = query.catalog
        if catalog.size > self.cache_max_items:
            return self._search_qdrant(query, taste, queries)
        found = self._search(query, taste, queries)
        # both taste sources explain by the same liked items: one closure serves them
        taste_reasons = self._reasons(taste, catalog)
        results = []
        for (source, vector), (slots, scores) in zip(queries, found, strict=True):
            if len(slots):
                results.append(
                    Candidates(
                        source,
                        slots,
                        scores,
                        PROFILE_REASON if source == "profile" else taste_reasons,
                        score_of=self.vectors.scorer(vector),
                    )
                )
        return results

    def _search(
        self, query: Query, taste: Taste, queries: list[tuple[str, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        vectors = self.vectors
        assert vectors is not None
        allowed = query.allowed()
        anchors = [slot for slot, _ in taste.positives]
        if not self.neighbours.ready or not anchors:
            return vectors.search_many([vector for _, vector in queries], query.n_candidates, allowed)
        # Taste queries score the neighbours of the user's recent items (by the projected
        # vectors: a few hundred rows, no scan); a profile query has no anchor items and scans.
        pool = self.neighbours.candidates(anchors, vectors, allowed)
        found = []
        for source, vector in queries:
            if source == "profile":
                found.append(vectors.search(vector, query.n_candidates, allowed))
                continue
            best, best_scores = top_slots(vectors.scorer(vector)(pool), query.n_candidates)
            found.append((pool[best], best_scores))
        return found

    async def _search_qdrant(
        self, query: Query, taste: Taste, queries: list[tuple[str, np.ndarray]]
    ) -> list[Candidates]:
        # Catalogs beyond the in-memory scan's size are searched in Qdrant (HNSW on a server):
        # a blocking client call, so in a thread, never on the event loop.
        store = self.store
        assert store is not None
        catalog = query.catalog
        results = []
        for source, vector in queries:
            hits = await asyncio.to_thread(store.search, vector, query.n_candidates + len(query.exclude))
            pairs = [(catalog.slot(item_id), score) for item_id, score in hits]
            allowed = query.allowed()
            kept = [(s, sc) for s, sc in pairs if s is not None and s < len(allowed) and allowed[s]][
                : query.n_candidates
            ]
            if kept:
                slots = np.array([s for s, _ in kept], dtype=np.int64)
                results.append(
                    Candidates(
                        source,
                        slots,
                        np.array([sc for _, sc in kept]),
                        PROFILE_REASON if source == "profile" else self._reasons(taste, catalog),
                    )
                )
        return results
