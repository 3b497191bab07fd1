"""Shared fixtures: one real nats-server per test session, and agents wired to it.

Every test gets its own subject prefix and stream names, so tests share the server without
seeing each other's messages. What the fixtures build is in ``tests/builders.py`` and
``tests/processes.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from agent.config import Settings
from tests.builders import Client, make_settings
from tests.processes import nats_server


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("nats-store")
    with nats_server("--jetstream", "--store_dir", str(store)) as port:
        yield f"nats://127.0.0.1:{port}"


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> Settings:
    return make_settings(nats_url, tmp_path)


@pytest.fixture
async def client(settings: Settings, nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    c = Client(nc, settings)
    await c.listen()
    yield c
    await nc.drain()


@pytest.fixture
def embed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every call to the real embedding model during the test."""
    from agent.vectors.embeddings import Embedder

    calls: list[int] = []
    original = Embedder.encode

    def counting(self: Embedder, texts: list[str], show_progress: bool = False) -> Any:
        calls.append(len(texts))
        return original(self, texts, show_progress)

    monkeypatch.setattr(Embedder, "encode", counting)
    return calls
