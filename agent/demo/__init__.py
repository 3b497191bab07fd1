"""The demo: a small shop's catalog shipped with the package (``catalog.jsonl``, written by
``make_catalog.py``), and the users the live page may act as in ``recsys-agent run --demo``.

The page may mint tokens for demo users alone: ids ``demo-`` followed by 1 to 24 lower-case
letters and digits. The demo keeps its own data dir, so its catalog and users never mix with
those of a real deployment.
"""

from __future__ import annotations

import asyncio
import logging
import re
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from agent.config import Settings
from agent.wire.contract import Item, parse_item

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger(__name__)

DEMO_USER = re.compile(r"demo-[a-z0-9]{1,24}")
# a demo token lives an hour: the page mints another when one expires
DEMO_TTL_S = 3_600
PUBLISH_BATCH = 100


def is_demo_user(user_id: str) -> bool:
    return DEMO_USER.fullmatch(user_id) is not None


def demo_data_dir() -> Path:
    """Beside the default data dir, under its own name."""
    return Settings().data_dir.with_name("recsys-agent-demo")


def demo_items() -> list[Item]:
    text = files(__name__).joinpath("catalog.jsonl").read_text(encoding="utf-8")
    return [parse_item(orjson.loads(line)) for line in text.splitlines() if line.strip()]


async def load_demo_catalog(agent: Agent, timeout_s: float = 600.0) -> int:
    """Publish the demo items the agent's catalog lacks (or holds in another version) to the
    catalog stream, as a client would, and wait until they are applied and their vectors
    built; the number published."""
    pipeline = agent.pipeline
    js = pipeline.context.js
    assert js is not None, "the agent is running: it has a bus"
    catalog = pipeline.catalog
    wanted = [item for item in demo_items() if _held(agent, item) != item]
    subject = agent.settings.subject("catalog", "upsert")
    for start in range(0, len(wanted), PUBLISH_BATCH):
        await js.publish(subject, orjson.dumps([item.to_dict() for item in wanted[start : start + PUBLISH_BATCH]]))
    async with asyncio.timeout(timeout_s):
        while any(_held(agent, item) != item for item in wanted):
            await asyncio.sleep(0.05)
        failures = await pipeline.settle()
    for failure in failures:
        log.warning("demo: %s", failure)
    log.info("demo: %d items in the catalog (%d published now)", catalog.active_count(), len(wanted))
    return len(wanted)


def _held(agent: Agent, item: Item) -> Item | None:
    slot = agent.pipeline.catalog.slot(item.id)
    return agent.pipeline.catalog.item(slot) if slot is not None else None
