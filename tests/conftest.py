"""Shared fixtures: one real nats-server per test session, and agents wired to it.

Every test gets its own subject prefix and stream names, so tests share the server without
seeing each other's messages.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from agent.bus.embedded_server import find_binary
from agent.config import Settings, load_settings

_LISTENING = re.compile(r"Listening for client connections on [^:]+:(\d+)")


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("nats-store")
    process = subprocess.Popen(
        [find_binary(), "--addr", "127.0.0.1", "--port", "-1", "--jetstream", "--store_dir", str(store)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    port = None
    for line in process.stderr:
        match = _LISTENING.search(line)
        if match:
            port = int(match.group(1))
        if "Server is ready" in line:
            break
    assert port is not None, "nats-server did not start"
    # keep draining the server's log so its pipe never fills
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
    yield f"nats://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


def make_settings(nats_url: str, data_dir: Path, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "data_dir": str(data_dir),
        "subject_prefix": f"t{tag}",
        "stream_name": f"EV_{tag}",
        "catalog_stream_name": f"CAT_{tag}",
        "consumer_name": f"agent-{tag}",
        "http_port": 0,
        "load_entry_points": False,
    }
    values.update(overrides)
    return load_settings(env={}, overrides=values)


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> Settings:
    return make_settings(nats_url, tmp_path)


class Client:
    """A plain nats.py client, as an app would use the agent."""

    def __init__(self, nc: nats.aio.client.Client, settings: Settings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.pushes: list[dict[str, Any]] = []
        self.dead_letters: list[dict[str, Any]] = []
        self._push_arrived = asyncio.Event()

    async def listen(self) -> None:
        async def on_push(msg: Any) -> None:
            self.pushes.append(orjson.loads(msg.data))
            self._push_arrived.set()

        async def on_dlq(msg: Any) -> None:
            self.dead_letters.append(orjson.loads(msg.data))

        await self.nc.subscribe(self.settings.subject("recs", ">"), cb=on_push)
        await self.nc.subscribe(self.settings.subject("dlq"), cb=on_dlq)
        await self.nc.flush()

    async def publish_event(self, event: dict[str, Any] | bytes, event_type: str | None = None) -> None:
        data = event if isinstance(event, bytes) else orjson.dumps(event)
        kind = event_type or (event["type"] if isinstance(event, dict) else "view")
        await self.js.publish(self.settings.subject("events", kind), data)

    async def upsert(self, items: list[dict[str, Any]] | dict[str, Any] | bytes) -> None:
        data = items if isinstance(items, bytes) else orjson.dumps(items)
        await self.js.publish(self.settings.subject("catalog", "upsert"), data)

    def reflected_event_ids(self) -> list[str]:
        ids: list[str] = []
        for push in self.pushes:
            ids.extend(push.get("event_ids") or [push["event_id"]])
        return ids

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)


@pytest.fixture
async def client(settings: Settings, nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    c = Client(nc, settings)
    await c.listen()
    yield c
    await nc.drain()


def catalog(n: int, categories: tuple[str, ...] = ("drama", "comedy", "horror")) -> list[dict[str, Any]]:
    return [
        {"id": f"item-{i}", "title": f"Item {i}", "categories": [categories[i % len(categories)]]} for i in range(n)
    ]


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
