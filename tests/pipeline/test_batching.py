"""The batched hot path gives what one event and one query at a time give.

Every built-in stage on (content with the bundled MiniLM and Qdrant local mode), a synthetic
shop: the same events applied one at a time and in batches leave the same state, and a batch of
queries is ranked exactly as each query alone.
"""

from __future__ import annotations

import random
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from agent import Event, Item
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.values import Scored
from tests.builders import running_pipeline

pytestmark = pytest.mark.slow

KINDS = ("view", "view", "view", "click", "add_to_cart", "purchase", "like", "dislike", "skip", "rate")
SHELVES = ("garden", "kitchen", "camping", "books", "toys", "music", "tools", "bath")


def shop(n_items: int = 240) -> list[Item]:
    rng = random.Random(7)
    items = []
    for i in range(n_items):
        shelf = SHELVES[i % len(SHELVES)]
        other = rng.choice(SHELVES)
        items.append(Item(id=f"p{i}", title=f"{shelf} thing number {i}", categories=(shelf, other)))
    return items


def traffic(n_events: int = 2_400, n_users: int = 120, n_items: int = 240) -> list[Event]:
    rng = random.Random(11)
    events = []
    ts = 1_700_000_000.0
    for n in range(n_events):
        user = f"u{min(int(rng.paretovariate(1.2)), n_users)}"  # a few heavy users, many light
        kind = rng.choice(KINDS)
        ts += rng.choice((0.0, 0.5, 3.0, 60.0))  # bursts share a timestamp
        value = float(rng.randint(1, 10)) if kind == "rate" else None
        item = f"p{int(rng.triangular(0, n_items - 1, 10))}"
        events.append(Event(type=kind, user_id=user, item_id=item, ts=ts, id=f"e{n}", value=value))
    return events


def pipeline_at(data_dir: Path) -> AbstractAsyncContextManager[Pipeline]:
    """The shop, upserted and taken in by every stage, on a clock that stands still."""
    return running_pipeline(data_dir, items=shop(), clock=1_700_000_000.0, settle=True)


def summary(ranked: list[Scored]) -> list[tuple[int, float, tuple[str, ...]]]:
    return [(entry.slot, round(entry.score, 6), tuple(entry.reasons)) for entry in ranked]


async def apply_in_batches(pipeline: Pipeline, events: list[Event], size: int) -> None:
    for start in range(0, len(events), size):
        batch = events[start : start + size]
        pipeline.clock = lambda ts=batch[-1].ts: ts
        outcomes = await pipeline.apply_events([(event, start + i + 1) for i, event in enumerate(batch)])
        assert not [o for o in outcomes if isinstance(o, Exception)]


async def test_events_applied_in_batches_leave_the_state_that_one_at_a_time_leaves(tmp_path: Path) -> None:
    events = traffic()
    async with pipeline_at(tmp_path / "one") as one, pipeline_at(tmp_path / "many") as many:
        await apply_in_batches(one, events, 1)
        await apply_in_batches(many, events, 64)
        users = sorted({event.user_id for event in events})
        for pipeline in (one, many):
            pipeline.clock = lambda: events[-1].ts
        singles = [summary(await one.rank(one.make_query(user, 10))) for user in users]
        batched = [summary(await many.rank(many.make_query(user, 10))) for user in users]
        assert singles == batched


async def test_a_batch_of_queries_is_ranked_as_each_query_alone(tmp_path: Path) -> None:
    events = traffic()
    async with pipeline_at(tmp_path) as pipeline:
        await apply_in_batches(pipeline, events, 32)
        pipeline.clock = lambda: events[-1].ts
        users = sorted({event.user_id for event in events})
        alone = [summary(await pipeline.rank(pipeline.make_query(user, 10))) for user in users]
        together = [summary(r) for r in await pipeline.rank_batch([pipeline.make_query(u, 10) for u in users])]
        assert together == alone
        assert all(alone), "every user gets a list"
