"""Writes to the vector store that are retried, with backoff, until they succeed.

A write to Qdrant can fail for a while: a full disk, a read-only data dir, a server that
restarts. The item's vector already serves from memory, so nothing on the hot path waits for
the write; what must not happen is that Qdrant silently stays without it (missing from search
in Qdrant, embedded again at every start). So a failed write stays pending, per item, and is
tried again after 0.5 s, 1 s, 2 s, ... up to every 30 s, for as long as it takes. A later write
of the same item (a new version, or its delete) replaces the pending one: only the latest
state of an item is ever written, and never after a newer one.

If the agent stops with writes pending, nothing is lost: an item without its point in Qdrant
is embedded again at the next start, and a delete is replayed from the catalog stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass

import numpy as np

from agent.vectors.qdrant_store import VectorStore

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
# points per store call when a backlog is written: a request of a few MB to a Qdrant server
WRITE_BATCH = 256
# a store's error text can be long (a server's response body); health shows the start of it
ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class _Upsert:
    vector: np.ndarray
    content_hash: str
    payload: dict[str, object]


class _Delete:
    """A pending delete: the item's point must leave the store."""


_DELETE = _Delete()
# (which write failed: "upsert" or "delete", the exception)
Failure = tuple[str, Exception]


def backoff_delays(first_s: float = FIRST_DELAY_S, max_s: float = MAX_DELAY_S) -> Iterator[float]:
    """The waits between failed attempts: doubling from ``first_s``, never above ``max_s``."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


class RetriedWrites:
    """Upserts and deletes for one store, written in the background and retried until done.

    Everything runs on the event loop except the store calls, which run in a worker thread,
    one attempt at a time. ``on_failure`` is told of every failed attempt (to count it).
    """

    def __init__(
        self,
        store: VectorStore,
        on_failure: Callable[[str, Exception], None] = lambda op, error: None,
        first_delay_s: float = FIRST_DELAY_S,
        max_delay_s: float = MAX_DELAY_S,
        redact: Callable[[str], str] = lambda text: text,
    ) -> None:
        self.store = store
        self.on_failure = on_failure
        # health and the log show the last error: never with a credential in it (a URL's password)
        self.redact = redact
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        # item id -> the latest write not yet in the store
        self._pending: dict[str, _Upsert | _Delete] = {}
        # one attempt at a time, so that writes of the same item reach the store in order
        self._lock = asyncio.Lock()
        self._in_flight: asyncio.Future[tuple[list[str], Failure | None]] | None = None
        # waiting out a backoff; while it runs, new writes wait for it instead of trying at once
        self._retrying: asyncio.Task[None] | None = None
        # failed attempts since the last one that wrote everything
        self.failed_attempts = 0
        self.last_error = ""

    @property
    def pending(self) -> int:
        return len(self._pending)

    def upsert(
        self, item_ids: list[str], vectors: np.ndarray, hashes: list[str], payloads: list[dict[str, object]]
    ) -> None:
        """Queue points (replacing any write of the same items still pending); see :meth:`flush`."""
        for item_id, vector, content_hash, payload in zip(item_ids, vectors, hashes, payloads, strict=True):
            self._pending[item_id] = _Upsert(vector, content_hash, payload)

    def delete(self, item_ids: list[str]) -> None:
        for item_id in item_ids:
            self._pending[item_id] = _DELETE

    async def flush(self) -> None:
        """Write what is pending; on failure, retry in the background. Never raises.

        While a retry waits out its backoff, this returns at once: the retry writes the new
        points too, and a failing store is not hit by every batch.
        """
        if self._retrying is None and self._pending and not await self.attempt():
            self._retrying = asyncio.get_running_loop().create_task(self._retry(), name="vector-write-retries")

    def problems(self) -> dict[str, object] | None:
        """None while writes succeed; otherwise what health reports."""
        if not self.failed_attempts or not self._pending:
            return None
        return {
            "vector_writes_pending": len(self._pending),
            "vector_write_failures": self.failed_attempts,
            "last_error": self.last_error,
        }

    async def attempt(self) -> bool:
        """One try at writing everything pending; True when nothing is left."""
        async with self._lock:
            if self._in_flight is not None:
                # a cancelled attempt's thread may still be writing: nothing may overtake it
                with suppress(Exception):
                    await asyncio.shield(self._in_flight)
            snapshot = dict(self._pending)
            if not snapshot:
                return True
            self._in_flight = asyncio.ensure_future(asyncio.to_thread(self._write, snapshot))
            # shielded: a cancelled caller must not leave the thread writing unseen (close waits for it)
            written, failure = await asyncio.shield(self._in_flight)
            self._in_flight = None
            for item_id in written:
                # an item written again meanwhile keeps its newer write pending
                if self._pending.get(item_id) is snapshot[item_id]:
                    del self._pending[item_id]
        if failure is None:
            if self.failed_attempts:
                log.info("vector writes succeed again after %d failed attempts", self.failed_attempts)
            self.failed_attempts, self.last_error = 0, ""
            return not self._pending
        op, error = failure
        self.failed_attempts += 1
        self.last_error = self.redact(f"{op}: {type(error).__name__}: {error}")[:ERROR_CHARS]
        log.warning(
            "vector store %s failed (attempt %d, %d items pending, retried with backoff): %s",
            op,
            self.failed_attempts,
            len(self._pending),
            self.last_error,
        )
        self.on_failure(op, error)
        return False

    def _write(self, snapshot: dict[str, _Upsert | _Delete]) -> tuple[list[str], Failure | None]:
        """In a worker thread: the store calls, batch by batch, up to the first failure."""
        upserts = [(item_id, w) for item_id, w in snapshot.items() if isinstance(w, _Upsert)]
        deletes = [item_id for item_id, w in snapshot.items() if isinstance(w, _Delete)]
        written: list[str] = []
        for start in range(0, len(upserts), WRITE_BATCH):
            batch = upserts[start : start + WRITE_BATCH]
            try:
                self.store.upsert(
                    [item_id for item_id, _ in batch],
                    np.stack([w.vector for _, w in batch]),
                    [w.content_hash for _, w in batch],
                    [w.payload for _, w in batch],
                )
            except Exception as exc:
                return written, ("upsert", exc)
            written.extend(item_id for item_id, _ in batch)
        for start in range(0, len(deletes), WRITE_BATCH):
            batch_ids = deletes[start : start + WRITE_BATCH]
            try:
                self.store.delete(batch_ids)
            except Exception as exc:
                return written, ("delete", exc)
            written.extend(batch_ids)
        return written, None

    async def _retry(self) -> None:
        delays = backoff_delays(self.first_delay_s, self.max_delay_s)
        while self._pending:
            await asyncio.sleep(next(delays))
            if await self.attempt():
                break
            if not self.failed_attempts:
                # it wrote what it took, but newer writes came meanwhile: the backoff starts again
                delays = backoff_delays(self.first_delay_s, self.max_delay_s)
        # no await since nothing was found pending: a write queued now sees no retry, flushes itself
        self._retrying = None

    async def close(self) -> None:
        """Stop retrying; the attempt in flight finishes first (the store may close after)."""
        if self._retrying is not None:
            self._retrying.cancel()
            with suppress(asyncio.CancelledError):
                await self._retrying
            self._retrying = None
        if self._in_flight is not None:
            with suppress(Exception):
                await self._in_flight
        if self._pending:
            log.warning(
                "%d vector writes were still pending at shutdown (%s); the next start redoes them "
                "(the items are embedded again, deletes replay from the catalog stream)",
                len(self._pending),
                self.last_error or "not tried yet",
            )
