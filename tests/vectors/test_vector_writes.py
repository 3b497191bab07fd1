"""Writes to Qdrant that fail are retried with backoff, counted, and reported by /healthz.

The store is a real local-mode Qdrant. Running as root, a read-only data dir does not stop
writes, so the failure is made by the store's ``upsert`` raising what a full disk raises, for
as long as the test says; the point is our retry logic, not Qdrant's error.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from agent.app import Agent
from agent.config import Settings
from agent.vectors.qdrant_store import VectorStore
from agent.vectors.retried_writes import RetriedWrites, backoff_delays
from agent.wire.contract import Item

ITEMS = [
    Item("sw", "Star Wars", "A farm boy joins rebels against a galactic empire", ("Sci-Fi",)),
    Item("notting", "Notting Hill", "A bookshop owner falls in love with a film star", ("Romance",)),
    Item("dune", "Dune", "A noble family fights for a desert planet and its spice", ("Sci-Fi",)),
]


class FailingUpserts:
    """Wraps a store's ``upsert``: raises as a full disk does while ``failing``; records the
    (item id, content hash) pairs of every write that went through."""

    def __init__(self, store: VectorStore) -> None:
        self.real = store.upsert
        self.failing = True
        self.calls = 0
        self.written: list[tuple[str, str]] = []
        store.upsert = self  # type: ignore[method-assign]

    def __call__(self, item_ids: list[str], vectors: np.ndarray, hashes: list[str], payloads: Any) -> None:
        self.calls += 1
        if self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(item_ids, vectors, hashes, payloads)
        self.written.extend(zip(item_ids, hashes, strict=True))


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def stored_hashes(store: VectorStore) -> dict[str, str]:
    return {item_id: digest for item_id, digest, _ in store.scan()}


def test_backoff_doubles_from_half_a_second_up_to_thirty() -> None:
    assert list(itertools.islice(backoff_delays(), 9)) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


async def test_a_later_write_of_an_item_supersedes_its_pending_one(tmp_path: Path) -> None:
    store = VectorStore("items", 4, path=tmp_path / "qdrant")
    upserts = FailingUpserts(store)
    failures: list[str] = []
    writes = RetriedWrites(store, lambda op, error: failures.append(op), first_delay_s=0.01, max_delay_s=0.05)
    try:
        vectors = np.eye(4, dtype=np.float32)
        writes.upsert(["a", "b", "c"], vectors[:3], ["a1", "b1", "c1"], [{}, {}, {}])
        await writes.flush()
        assert failures == ["upsert"] and writes.pending == 3
        problems = writes.problems()
        assert problems is not None and problems["vector_writes_pending"] == 3
        assert "No space left on device" in str(problems["last_error"])
        # while the retry waits: a new version of a, and b deleted
        writes.upsert(["a"], vectors[3:], ["a2"], [{}])
        writes.delete(["b"])
        await wait_until(lambda: upserts.calls >= 3)
        upserts.failing = False
        await wait_until(lambda: writes.pending == 0)
        assert writes.problems() is None
        assert stored_hashes(store) == {"a": "a2", "c": "c1"}
        assert ("a", "a1") not in upserts.written and ("b", "b1") not in upserts.written
    finally:
        await writes.close()
        store.close()


async def test_a_failed_vector_write_is_retried_counted_and_reported_in_health(settings: Settings) -> None:
    async with Agent(settings) as agent:
        await agent.pipeline.settle()  # the model and Qdrant are open
        content = agent.pm.get_plugin("content")
        upserts = FailingUpserts(content.store)
        writes = content.index.writes
        # the test's backoff: the same logic, on a shorter clock
        writes.first_delay_s, writes.max_delay_s = 0.05, 0.2

        def failures() -> float:
            return agent.metrics.value(
                "recsys_plugin_failures_total", plugin="content", hook="recsys_catalog_upsert", kind="error"
            )

        await agent.pipeline.upsert_items(ITEMS)
        await wait_until(lambda: failures() >= 3)
        # served from memory meanwhile; Qdrant has nothing yet
        assert content.vectors.count == len(ITEMS) and content.store.count() == 0
        async with aiohttp.ClientSession(agent.http_url) as http:
            health = await (await http.get("/healthz")).json()
            assert health["status"] == "degraded", health
            problem = health["problems"]["content"]
            assert problem["vector_writes_pending"] == len(ITEMS)
            assert "No space left on device" in problem["last_error"]
            # a batch tool waiting on the work hears why it is not done
            failed = await agent.pipeline.settle()
            assert len(failed) == 1 and "could not be written to Qdrant" in failed[0], failed

            upserts.failing = False
            await wait_until(lambda: writes.pending == 0)
            assert content.store.count() == len(ITEMS)
            health = await (await http.get("/healthz")).json()
            assert health["status"] == "ok" and health["problems"] == {}, health
        assert await agent.pipeline.settle() == []
        assert stored_hashes(content.store) == dict(upserts.written)
        assert {item_id for item_id, _ in upserts.written} == {item.id for item in ITEMS}
        counted = failures()
        await asyncio.sleep(0.3)
        assert failures() == counted, "no attempts once everything is written"
