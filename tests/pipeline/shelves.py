"""A shop of eight shelves of five items, whose shoppers each buy three items of one shelf: what a
shopper buys next is the rest of their shelf, which only who-bought-with-whom reveals (every item
is about as popular as every other). Shared by the tests of the window-fitted sources."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.config import Settings
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Event, Item

SHELVES, SHELF = 8, 5
N_ITEMS = SHELVES * SHELF
T0 = 1_700_000_000.0
# what ranks around a source under test, less what is not the point (content's model, the LLM)
OTHERS = ["content", "sequence", "cross_encoder", "nats_publisher", "summariser"]


def shop() -> list[Item]:
    return [Item(id=f"p{i}", title=f"shelf {i // SHELF} item {i}") for i in range(N_ITEMS)]


def baskets(n_users: int = 300, seed: int = 3) -> list[Event]:
    """Each shopper buys 3 of the 5 items of one shelf, at one time per purchase."""
    rng = random.Random(seed)
    events = []
    for u in range(n_users):
        shelf = rng.randrange(SHELVES)
        for n, item in enumerate(rng.sample(range(shelf * SHELF, shelf * SHELF + SHELF), 3)):
            events.append(
                Event(type="purchase", user_id=f"u{u}", item_id=f"p{item}", ts=T0 + 10 * u + n, id=f"e{u}-{n}")
            )
    return events


def purchases(user_id: str, items: tuple[int, ...]) -> list[Event]:
    return [Event(type="purchase", user_id=user_id, item_id=f"p{i}", ts=T0 + 9e4, id=f"{user_id}{i}") for i in items]


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Pipeline]:
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    async with pipeline.running():
        await pipeline.upsert_items(shop())
        yield pipeline


async def apply(pipeline: Pipeline, events: list[Event], first: int = 1, batch: int = 32) -> None:
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        outcomes = await pipeline.apply_events([(event, first + start + i) for i, event in enumerate(chunk)])
        assert not [outcome for outcome in outcomes if isinstance(outcome, Exception)]


async def enter(settings: Settings) -> None:
    async with Pipeline(settings, get_plugin_manager(settings)).running():
        await asyncio.sleep(0)  # entering the lifespans is the test: a bad option refuses the start
