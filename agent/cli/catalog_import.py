"""``recsys-agent catalog import``: bulk-load items into Qdrant and the catalog stream.

The expensive part, embedding, runs here in batches with a progress bar, through the same
content plugin the agent uses, into the same Qdrant (the data dir's local store, or
``--qdrant-url``). The items are then published to the catalog stream, so the agent knows them
at its next start (or at once, when it is running against ``--nats-url``); their vectors are
found in Qdrant by content hash and nothing is embedded twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

import nats
import orjson
from tqdm import tqdm

from agent.bus.embedded_server import embedded_nats_server
from agent.bus.ingest import ensure_streams
from agent.cli.settings_flags import add_settings_flags, configure_logging, settings_from_args
from agent.config import Settings, redact_url
from agent.evaluation.datasets import DatasetError, read_items
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Item

log = logging.getLogger(__name__)

PUBLISH_BATCH = 256


class CatalogImportError(ValueError):
    """Items the import could not embed; the text says why."""


async def embed_items(settings: Settings, items: list[Item]) -> float:
    """Embed (what is new or changed) into Qdrant; returns the seconds it took."""
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    started = time.perf_counter()
    async with pipeline.running():
        await pipeline.upsert_items(items)
        failures = await pipeline.settle()
        if failures:
            raise CatalogImportError("; ".join(failures))
    return time.perf_counter() - started


async def publish_items(settings: Settings, items: list[Item]) -> None:
    async def publish(servers: list[str]) -> None:
        nc = await nats.connect(servers)
        try:
            js = nc.jetstream()
            await ensure_streams(js, settings)
            subject = settings.subject("catalog", "upsert")
            for start in tqdm(range(0, len(items), PUBLISH_BATCH), desc="publishing", unit="batch", disable=None):
                batch = [item.to_dict() for item in items[start : start + PUBLISH_BATCH]]
                await js.publish(subject, orjson.dumps(batch))
        finally:
            await nc.drain()

    if settings.nats_servers():
        await publish(settings.nats_servers())
        return
    async with embedded_nats_server(settings.data_dir / "nats", 0, binary=settings.nats_server_bin) as server:
        await publish([server.url])


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="catalog_command", required=True)
    load = sub.add_parser("import", help="embed items.jsonl into Qdrant and publish it to the catalog stream")
    load.add_argument("items", type=Path, help="JSON lines of Items (the wire contract)")
    add_settings_flags(load)


def run_command(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    try:
        items = read_items(args.items)
        seconds = asyncio.run(embed_items(settings, items))
        print(
            f"embedded {len(items)} items in {seconds:.1f} s into Qdrant ({redact_url(settings.qdrant_url) or settings.data_dir / 'qdrant'})"
        )
        asyncio.run(publish_items(settings, items))
    except (CatalogImportError, DatasetError, OSError) as exc:
        print(f"recsys-agent catalog import: {exc}", file=sys.stderr)
        return 1
    print(f"published {len(items)} items to {settings.subject('catalog', 'upsert')}")
    return 0
