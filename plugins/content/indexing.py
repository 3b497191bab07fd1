"""The catalog's item vectors: embedding queue, Qdrant writes, the in-memory copy.

Every item is embedded once per distinct text (title, categories, text, attributes) and stored
in Qdrant with its content hash; an upsert whose text did not change costs nothing. Loading the
model and embedding happen in a background worker, so the agent serves (with its other sources)
from the first second; an item joins content retrieval as soon as its vector exists. Writes to
Qdrant that fail are retried until they succeed (``agent/vectors/retried_writes.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from agent.config import redact_url
from agent.pipeline.catalog import Catalog
from agent.serving.metrics import Metrics
from agent.threads import in_daemon_thread
from agent.vectors.embeddings import Embedder, content_hash, item_text
from agent.vectors.item_neighbours import ItemNeighbours
from agent.vectors.item_vectors import ItemVectors
from agent.vectors.qdrant_store import VectorStore
from agent.vectors.retried_writes import RetriedWrites
from agent.wire.contract import Item

log = logging.getLogger(__name__)

EMBED_CHUNK = 256
PROGRESS_FROM = 1_000


@dataclass(frozen=True, slots=True)
class Deletion:
    """An item delete, queued behind the upserts before it (see :meth:`CatalogIndex.queue_delete`)."""

    item_id: str
    slot: int


class CatalogIndex:
    """Item vectors by catalog slot, kept in step with the catalog by one background worker."""

    def __init__(self) -> None:
        self.embedder: Embedder | None = None
        self.store: VectorStore | None = None
        self.vectors: ItemVectors | None = None
        self.writes: RetriedWrites | None = None
        self.neighbours = ItemNeighbours()
        # only the neighbours and auto search modes keep a table that must learn of new vectors
        self.keep_neighbours = False
        # why the model or Qdrant could not be opened, for recsys_settle and health to report
        self.failure: str | None = None
        # vectors found in Qdrant at start, waiting for their item to be upserted again
        self._stored: dict[str, tuple[str, np.ndarray]] = {}
        # catalog work in stream order: upsert batches and deletes
        self._queue: asyncio.Queue[list[tuple[Item, int]] | Deletion] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._catalog: Catalog | None = None
        self._metrics: Metrics | None = None

    def configure(self, catalog: Catalog, metrics: Metrics, neighbours: ItemNeighbours, keep: bool) -> None:
        self._catalog = catalog
        self._metrics = metrics
        self.neighbours = neighbours
        self.keep_neighbours = keep

    async def attach(self, embedder: Embedder, store: VectorStore, writes: RetriedWrites) -> None:
        """Adopt the opened model and store; the vectors Qdrant holds wait for their items."""
        self.embedder = embedder
        self.store = store
        self.writes = writes
        self._stored = {item_id: (h, v) for item_id, h, v in await asyncio.to_thread(lambda: list(store.scan()))}
        self.vectors = ItemVectors(embedder.dim)

    @property
    def stored_count(self) -> int:
        return len(self._stored)

    # -- the queue ------------------------------------------------------------------------------

    def queue_upsert(self, items: list[Item], slots: list[int]) -> None:
        self._queue.put_nowait(list(zip(items, slots, strict=True)))

    def queue_delete(self, item_id: str, slot: int) -> None:
        # Queued behind the upserts before it, like them: a delete that arrives while the
        # model or Qdrant is still opening (a restart replays the catalog stream), or while
        # the item's batch is being encoded, must still leave Qdrant without the item. The
        # catalog has already made the item inactive, so no list shows it meanwhile.
        self._queue.put_nowait(Deletion(item_id, slot))

    @property
    def idle(self) -> bool:
        return self._queue.qsize() == 0

    async def settled(self) -> str | None:
        """Once the work queued so far is done: why it cannot be done, or None."""
        await self._ready.wait()
        await self._queue.join()
        if self.failure is not None:
            return self.failure
        writes = self.writes
        # a batch tool (catalog import) must not report vectors stored that Qdrant refused:
        # one more try now, in case the store has just recovered, before saying so
        if writes is not None and writes.problems() is not None and not await writes.attempt():
            return f"{writes.pending} item vectors could not be written to Qdrant ({writes.last_error})"
        return None

    def problems(self) -> dict[str, object] | None:
        if self.failure is not None:
            return {"unavailable": self.failure}
        return self.writes.problems() if self.writes is not None else None

    # -- the worker -----------------------------------------------------------------------------

    async def work(self, opening: Callable[[], Awaitable[None]]) -> None:
        """Open the model and Qdrant (``opening``), then apply queued catalog work, in order."""
        try:
            await opening()
        except Exception as exc:
            # Degrade, do not die: the other sources keep serving; the failure is reported.
            # (health shows it: a Qdrant URL in the error keeps its password hidden)
            self.failure = redact_url(f"content retrieval could not start: {exc}")
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
                self.update_gauge()
            except Exception:
                log.exception(
                    "catalog work failed in content retrieval (%s)",
                    "a delete" if isinstance(work, Deletion) else "embedding a batch",
                )
            finally:
                self._queue.task_done()

    def update_gauge(self) -> None:
        if self._metrics is not None and self.vectors is not None:
            self._metrics.item_vectors.set(self.vectors.count)

    def _changed(self, slots: list[int]) -> None:
        if self.keep_neighbours:
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
        if vectors is None or not self.keep_neighbours:
            return
        neighbours.follow_limit(vectors)
        if neighbours.needs_build(vectors, self.idle):
            neighbours.start_build()
            neighbours.install(await in_daemon_thread(neighbours.build, vectors))

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
        assert self.vectors is not None and self.embedder is not None and self.writes is not None
        writes = self.writes
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
                # A failed write is retried in the background (never raised here): the next
                # chunks are embedded and served meanwhile.
                writes.upsert([item.id for item, _, _, _ in chunk], vectors, [d for _, _, _, d in chunk], payloads)
                writing = asyncio.ensure_future(writes.flush())
                # Serving from memory before Qdrant has the point is safe: if the agent stops
                # first, the item has no stored vector and is embedded again at the next start.
                self.vectors.set([slot for _, slot, _, _ in chunk], vectors, [d for _, _, _, d in chunk])
                self._changed([slot for _, slot, _, _ in chunk])
                progress.update(len(chunk))
                self.update_gauge()
            if writing is not None:
                await asyncio.shield(writing)
        finally:
            if writing is not None and not writing.done():
                # stopping: the write in flight finishes before the store may be closed
                with suppress(Exception):
                    await asyncio.shield(writing)
            progress.close()

    async def _delete(self, deletion: Deletion) -> None:
        assert self.vectors is not None and self.writes is not None and self._catalog is not None
        if self._catalog.item(deletion.slot) is not None:
            return  # upserted again since: that upsert, queued after this, decides
        self._stored.pop(deletion.item_id, None)
        self.vectors.remove(deletion.slot)
        # replaces a write of the item still pending (a failed upsert must not bring it back)
        self.writes.delete([deletion.item_id])
        await self.writes.flush()

    async def close(self) -> None:
        """After the worker has stopped: the pending writes end, then the store closes."""
        if self.writes is not None:
            await self.writes.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
