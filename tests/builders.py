"""What the tests build, one copy of each: settings, events, catalogs, running pipelines, and the
bus client an app would be.

The fixtures that hand these out are in ``tests/conftest.py``; the real processes the tests start
(nats-server, ``recsys-agent run``) are in ``tests/processes.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import nats
import orjson

from agent.config import Settings, load_settings
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Event, Item
from agent.wire.user_tokens import user_token

PluginT = TypeVar("PluginT")

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


# --- settings ------------------------------------------------------------------------------


def offline_settings(data_dir: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings from ``overrides`` alone: no environment, no entry-point plugins, and ``data_dir``
    (as a string) when one is given."""
    values: dict[str, Any] = {"load_entry_points": False}
    if data_dir is not None:
        values["data_dir"] = str(data_dir)
    values.update(overrides)
    return load_settings(env={}, overrides=values)


def make_settings(nats_url: str, data_dir: Path, **overrides: Any) -> Settings:
    """Offline settings for an agent on ``nats_url`` with subjects, streams and a consumer of its
    own, so that tests share the server without seeing each other's messages; any HTTP port."""
    tag = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "subject_prefix": f"t{tag}",
        "stream_name": f"EV_{tag}",
        "catalog_stream_name": f"CAT_{tag}",
        "consumer_name": f"agent-{tag}",
        "http_port": 0,
    }
    values.update(overrides)
    return offline_settings(data_dir, **values)


# --- events and items ----------------------------------------------------------------------


def event(
    n: int,
    user: str = "u1",
    item: str | None = None,
    kind: str = "view",
    value: float | None = None,
    *,
    t0: float = 1_000.0,
    id_format: str = "e{n}",
) -> Event:
    """The ``n``-th event: at ``t0 + n``, on ``item`` (``item-<n>`` when none), its id
    ``id_format`` filled with ``n``, ``user`` and ``item``."""
    item = item or f"item-{n}"
    return Event(
        type=kind, user_id=user, ts=t0 + n, id=id_format.format(n=n, user=user, item=item), item_id=item, value=value
    )


def numbered_items(n: int, category: str = "c") -> list[Item]:
    """``item-0`` .. ``item-<n-1>``, titled ``Item <i>``, all in one category."""
    return [Item(id=f"item-{i}", title=f"Item {i}", categories=(category,)) for i in range(n)]


def catalog(n: int, categories: tuple[str, ...] = ("drama", "comedy", "horror")) -> list[dict[str, Any]]:
    """``n`` items as a catalog upsert carries them, their categories in turn."""
    return [
        {"id": f"item-{i}", "title": f"Item {i}", "categories": [categories[i % len(categories)]]} for i in range(n)
    ]


# --- pipelines -----------------------------------------------------------------------------


@asynccontextmanager
async def running_pipeline(
    data_dir: Path,
    *plugins: tuple[str, Any],
    items: list[Item] | None = None,
    clock: float | None = None,
    settle: bool = False,
    **overrides: Any,
) -> AsyncIterator[Pipeline]:
    """A running pipeline on offline settings with ``plugins`` (name, plugin) besides the
    built-ins, and ``items`` upserted (30 numbered items when none).

    ``clock``: the pipeline's clock stands still at that time. ``settle``: the upserts have been
    taken in by every stage (the content vectors written) before the pipeline is handed out.
    """
    settings = offline_settings(data_dir, **overrides)
    pipeline = Pipeline(settings, get_plugin_manager(settings, plugins))
    if clock is not None:
        now = [clock]
        pipeline.clock = lambda: now[0]
    async with pipeline.running():
        await pipeline.upsert_items(numbered_items(30) if items is None else items)
        if settle:
            await pipeline.settle()
        yield pipeline


# --- the bus -------------------------------------------------------------------------------


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

    async def publish_event(self, event: dict[str, Any] | bytes, subject: str | None = None) -> None:
        """Publish as an app would: on the event's own v2 subject, or on ``subject`` (a raw body
        has no user to name)."""
        data = event if isinstance(event, bytes) else orjson.dumps(event)
        if subject is None:
            assert isinstance(event, dict), "a raw body needs its subject"
            subject = self.event_subject(event["type"], event["user_id"])
        await self.js.publish(subject, data)

    def event_subject(self, event_type: str, user_id: str) -> str:
        return self.settings.subject("events", event_type, user_token(user_id))

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


def plugin_of(pipeline: Pipeline, name: str, kind: type[PluginT]) -> PluginT:
    """The pipeline's registered plugin ``name``, checked to be a ``kind``."""
    plugin = pipeline.pm.get_plugin(name)
    assert isinstance(plugin, kind)
    return plugin


def proposed_by(pipeline: Pipeline, name: str, user_id: str, k: int = 10) -> list[str]:
    """The item ids that candidate source ``name`` (a batch source answering one list)
    proposes to the user for a list of ``k``, best first."""
    answers = pipeline.pm.get_plugin(name).recsys_candidates_batch([pipeline.make_query(user_id, k)])
    assert answers is not None and answers[0] is not None
    assert answers[0].source == name
    return [pipeline.catalog.ids[slot] for slot in answers[0].slots.tolist()]
