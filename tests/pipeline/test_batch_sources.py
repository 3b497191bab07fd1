"""The batch forms of the built-in sources, rerankers and learners give what their one-item forms
give: the same candidates (slots, scores, reasons, scores of other items) for every query of a
batch, and the same learned state after a batch of events as after those events one at a time.

``tests/pipeline/test_batching.py`` checks the whole pipeline; these check each stage on its own, on
queries chosen to take every path of the batch forms (new users, excluded items, categories,
users who excluded most of the popular items).
"""

from __future__ import annotations

import copy
import inspect
import math
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import Event, Item
from agent.hooks.manager import get_plugin_manager
from agent.llm.profiles import PROFILE_KEY
from agent.llm.summary_options import SummaryOptions
from agent.pipeline.catalog import Catalog, grow
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.taste_signals import event_signal
from agent.pipeline.user_state import Interaction, UserState, UserStore
from agent.pipeline.values import Candidates, Query, Scored
from plugins.item_to_item import QUERY_ITEMS, RECENCY, TRANSITION_STEPS, ItemToItem, Neighbours
from plugins.summariser import Summariser
from plugins.trending import DecayedCounts, Trending
from tests.builders import offline_settings

SHELVES = ("garden", "kitchen", "camping", "books", "toys", "music", "tools", "bath")
KINDS = ("view", "view", "view", "click", "add_to_cart", "purchase", "like", "dislike", "skip", "rate")
START = 1_700_000_000.0
N_ITEMS = 1_500


def shop() -> list[Item]:
    rng = random.Random(7)
    return [
        Item(id=f"p{i}", title=f"{SHELVES[i % 8]} thing {i}", categories=(SHELVES[i % 8], rng.choice(SHELVES)))
        for i in range(N_ITEMS)
    ]


def traffic(n_events: int = 2_500, n_users: int = 80, seed: int = 11) -> list[Event]:
    """A few heavy users and many light ones, popular items and a long tail, bursts that share
    a timestamp, ratings, and negative feedback (which teaches the sources nothing)."""
    rng = random.Random(seed)
    events, ts = [], START
    for n in range(n_events):
        user = f"u{min(int(rng.paretovariate(1.1)), n_users)}"
        kind = rng.choice(KINDS)
        ts += rng.choice((0.0, 0.0, 0.5, 30.0, 120.0))
        item = f"p{int(rng.triangular(0, N_ITEMS - 1, 5))}"
        value = float(rng.randint(1, 10)) if kind == "rate" else None
        events.append(Event(type=kind, user_id=user, item_id=item, ts=ts, id=f"e{seed}-{n}", value=value))
    return events


@asynccontextmanager
async def shop_pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    """The built-in sources without the content model (not what this is about), on a catalog of
    old items, items new within the freshness window and one deleted item, after a stream of
    events applied in batches."""
    settings = offline_settings(
        tmp_path, disabled_plugins=["content", "cross_encoder", "nats_publisher"], trending_half_life_s=3_600.0
    )
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    events = traffic()
    async with pipeline.running():
        items = shop()
        await pipeline.upsert_items(items[:1_000], ts=START - 30 * 86_400.0)  # no longer fresh
        await pipeline.upsert_items(items[1_000:1_300], ts=START - 5_000.0)
        for start in range(0, len(events), 64):
            batch = events[start : start + 64]
            await pipeline.apply_events([(event, start + i + 1) for i, event in enumerate(batch)])
        await pipeline.upsert_items(items[1_300:], ts=events[-1].ts - 1_000.0)
        await pipeline.delete_item("p1")
        pipeline.clock = lambda: events[-1].ts + 60.0
        yield pipeline


def popular(pipeline: Pipeline, n: int) -> tuple[str, ...]:
    """The ``n`` items with the most events: excluding them leaves a user little of the head."""
    counts = pipeline.pm.get_plugin("trending").counters["popular_month"].view(pipeline.catalog.size)
    return tuple(pipeline.catalog.ids[slot] for slot in np.argsort(-counts, kind="stable")[:n].tolist())


def queries_for(pipeline: Pipeline) -> list[Query]:
    """Fresh queries (their masks not yet computed) for every user and a new one, with lists of
    two lengths, categories, excluded items, and users who excluded most of the head."""
    users = sorted({user for user in (f"u{i}" for i in range(1, 81)) if pipeline.users.get(user) is not None})
    heavy = popular(pipeline, 400)
    queries = []
    for i, user in enumerate([*users, "someone-new"]):
        categories = ("garden",) if i % 5 == 1 else ("toys", "bath") if i % 11 == 2 else ()
        exclude = heavy if i % 9 == 4 else ("p0", "p2", "p1200") if i % 7 == 3 else ()
        queries.append(pipeline.make_query(user, 25 if i % 3 == 0 else 10, categories=categories, exclude=exclude))
    return queries


def described(answer: Candidates | list[Candidates] | None, probe: np.ndarray) -> list[tuple[Any, ...]]:
    """Everything a source's answer tells fusion and the explanations, in comparable form."""
    found = [] if answer is None else [answer] if isinstance(answer, Candidates) else answer
    return [
        (
            cands.source,
            cands.slots.dtype.str,
            cands.slots.tolist(),
            cands.scores.tolist(),
            [cands.reason_for(slot) for slot in cands.slots.tolist()],
            cands.score_of(probe).tolist() if cands.score_of is not None else None,
            cands.counts,
        )
        for cands in found
    ]


@pytest.mark.parametrize("name", ["item_to_item", "trending", "freshness"])
async def test_a_sources_answer_to_a_batch_is_its_answer_to_each_query_alone(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the trending head's one-query path, which a batch takes for users who excluded most of
    # the head, is counted
    scans = []
    one_query_top = DecayedCounts.top

    def top(self: DecayedCounts, n: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scans.append(n)
        return one_query_top(self, n, allowed)

    monkeypatch.setattr(DecayedCounts, "top", top)
    async with shop_pipeline(tmp_path) as pipeline:
        source = pipeline.pm.get_plugin(name)
        probe = np.arange(0, pipeline.catalog.size, 3)
        alone = [described(source.recsys_candidates(query), probe) for query in queries_for(pipeline)]
        scans.clear()
        # the whole batch, and batches on either side of the sizes where the vectorised forms start
        for size in (len(alone), 8, 3):
            queries = queries_for(pipeline)
            together = []
            for start in range(0, len(queries), size):
                together += source.recsys_candidates_batch(queries[start : start + size])
            assert [described(answer, probe) for answer in together] == alone, f"batches of {size}"
        assert sum(1 for answer in alone if answer) > len(alone) // 2, "most users get candidates"
        assert alone[-1] == [] or name != "item_to_item", "a new user has no recent items to start from"
        if name == "trending":
            assert scans, "some user excluded so much of the head that a full scan was needed"


def dense_scores(source: ItemToItem, query: Query, neighbours: Neighbours) -> np.ndarray:
    """Item-to-item scores over the whole catalog as a plain sum, written independently: each
    recent item's neighbours, weighted by its recency and both items' counts."""
    counts = source.counts
    totals = np.zeros(len(query.allowed()))
    for age, anchor in enumerate(query.user.recent_positive(QUERY_ITEMS)):
        row = neighbours.row(anchor)
        if row is not None:
            slots, weights = row
            scale = (RECENCY**age) / math.sqrt(max(float(counts[anchor]), 1.0))
            np.add.at(totals, slots, weights * scale / np.sqrt(np.maximum(counts[slots], 1.0)))
    return totals


async def test_item_to_item_scores_are_the_sum_over_the_recent_items_neighbours(tmp_path: Path) -> None:
    async with shop_pipeline(tmp_path) as pipeline:
        source: ItemToItem = pipeline.pm.get_plugin("item_to_item")
        queries = queries_for(pipeline)
        probe = np.arange(pipeline.catalog.size)
        checked = 0
        for query, answer in zip(queries, source.recsys_candidates_batch(queries)):
            for cands in answer:
                totals = dense_scores(source, query, source.co if cands.source == "co_occurrence" else source.after)
                assert cands.score_of is not None
                assert cands.score_of(probe).tolist() == totals.tolist()
                # the best allowed items, best first
                assert cands.scores.tolist() == totals[cands.slots].tolist()
                assert query.allowed()[cands.slots].all()
                best = np.sort(totals[query.allowed() & (totals > 0)])[::-1][: query.n_candidates]
                assert cands.scores.tolist() == best.tolist()
                checked += 1
        assert checked > len(queries)


def record(users: UserStore, catalog: Catalog, event: Event) -> tuple[UserState, int, float]:
    """The core's own change for one event (``Pipeline._record``), before any plugin sees it."""
    assert event.item_id is not None
    slot = catalog.ensure_slot(event.item_id)
    user = users.get_or_create(event.user_id)
    signal = event_signal(event.type, event.value, 10.0)
    user.recent.append(Interaction(slot=slot, type=event.type, ts=event.ts, signal=signal, value=event.value))
    user.seen.add(slot)
    user.event_count += 1
    return user, slot, signal


def waves(events: list[Event], most: int = 64) -> list[list[Event]]:
    """The runs of events in which no user appears twice, as the pipeline hands them over."""
    out: list[list[Event]] = [[]]
    for event in events:
        if len(out[-1]) == most or event.user_id in {e.user_id for e in out[-1]}:
            out.append([])
        out[-1].append(event)
    return out


def call(hook: Any, **arguments: Any) -> Any:
    """Call a hook implementation with the arguments it asks for, as the hook runner does."""
    return hook(**{name: arguments[name] for name in inspect.signature(hook).parameters})


def learn(plugin: Any, events: list[Event], *, batched: bool) -> None:
    """Feed ``events`` to ``plugin`` one at a time, or a wave at a time."""
    users, catalog = UserStore(history_length=50, max_users=1_000), Catalog()
    for wave in waves(events):
        if not batched:
            for event in wave:
                user, slot, signal = record(users, catalog, event)
                call(plugin.recsys_apply_event, event=event, user=user, slot=slot, signal=signal, catalog=catalog)
            continue
        recorded = [record(users, catalog, event) for event in wave]
        call(
            plugin.recsys_apply_events,
            events=wave,
            users=[user for user, _, _ in recorded],
            slots=[slot for _, slot, _ in recorded],
            signals=[signal for _, _, signal in recorded],
            catalog=catalog,
        )


def small_item_to_item() -> ItemToItem:
    # few neighbours per item, so that rows are pruned often
    plugin = ItemToItem()
    plugin.co.max_neighbours = plugin.after.max_neighbours = 10
    return plugin


def neighbour_state(neighbours: Neighbours) -> dict[int, list[tuple[int, float]]]:
    # positions included: what a prune keeps depends on them
    return {
        anchor: list(zip(row.slots[: len(row)].tolist(), row.weights[: len(row)].tolist()))
        for anchor, row in neighbours.edges.items()
    }


def plainly_learned(events: list[Event]) -> ItemToItem:
    """What item-to-item learns, by its rule written plainly, one event at a time: a positive
    event counts its item, links it both ways with each of the user's previous positive items
    (co-occurrence), and follows each of the last few of them (transitions, weaker with the
    distance)."""
    plugin = small_item_to_item()
    users, catalog = UserStore(history_length=50, max_users=1_000), Catalog()
    for event in events:
        user, slot, signal = record(users, catalog, event)
        if signal <= 0:
            continue
        plugin.counts = grow(plugin.counts, slot + 1)
        plugin.counts[slot] += 1.0
        for distance, other in enumerate(user.recent_positive(plugin.window, skip_last=True), start=1):
            if other != slot:
                plugin.co.add(other, slot, 1.0)
                plugin.co.add(slot, other, 1.0)
                if distance <= TRANSITION_STEPS:
                    plugin.after.add(other, slot, 1.0 / distance)
    return plugin


def test_item_to_item_learns_from_a_batch_what_it_learns_one_event_at_a_time() -> None:
    events = traffic(4_000, seed=3)
    one, many, plain = small_item_to_item(), small_item_to_item(), plainly_learned(events)
    learn(one, events, batched=False)
    learn(many, events, batched=True)
    for learned in (one, many):
        size = max(len(learned.counts), len(plain.counts))
        assert _padded(learned.counts, size).tolist() == _padded(plain.counts, size).tolist()
        assert neighbour_state(learned.co) == neighbour_state(plain.co)
        assert neighbour_state(learned.after) == neighbour_state(plain.after)
    assert sum(len(row) for row in plain.co.edges.values()) > 1_000, "the rows were filled and pruned"


def _padded(values: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size)
    out[: len(values)] = values
    return out


def small_trending() -> Trending:
    # short half-lives, so that the reference time moves on (scores rescaled) within the
    # stream, and a shallow head, so that it is trimmed often
    plugin = Trending()
    plugin.counters = {"trending": DecayedCounts(600.0, depth=8), "popular_week": DecayedCounts(7 * 86_400.0, depth=8)}
    return plugin


def test_trending_learns_from_a_batch_what_it_learns_one_event_at_a_time() -> None:
    events = traffic(4_000, seed=5)
    assert (events[-1].ts - events[0].ts) * math.log(2) / 600.0 > 100, "the stream outlasts a rescaling"
    one, many = small_trending(), small_trending()
    learn(one, events, batched=False)
    learn(many, events, batched=True)
    for name in one.counters:
        a, b = one.counters[name], many.counters[name]
        size = max(len(a.scores), len(b.scores))
        assert _padded(a.scores, size).tolist() == _padded(b.scores, size).tolist(), name
        assert (a.reference_ts, a.head_floor, a.order, a.keys, a.head) == (
            b.reference_ts,
            b.head_floor,
            b.order,
            b.keys,
            b.head,
        ), name
    assert one.counters["trending"].reference_ts != events[0].ts, "the scores were rescaled"


class NotedEvents:
    """Stands in for the summary scheduler: records what the summariser tells it."""

    running = True

    def __init__(self) -> None:
        self.noted: list[tuple[str, int, bool]] = []

    def note_event(self, user_id: str, new_events: int, has_profile: bool = True) -> None:
        self.noted.append((user_id, new_events, has_profile))


def test_the_summariser_notes_a_batch_of_events_as_it_notes_them_one_at_a_time() -> None:
    events = traffic(600, seed=9)
    now, max_age = events[-1].ts + 60.0, 3_600.0
    # each recent event, with how many events its user has had so far (none summarised yet);
    # the older ones are too old to wake a summary
    counts: dict[str, int] = {}
    expected = []
    for event in events:
        counts[event.user_id] = counts.get(event.user_id, 0) + 1
        if now - event.ts <= max_age:
            expected.append((event.user_id, counts[event.user_id], False))
    assert 0 < len(expected) < len(events)
    for batched in (False, True):
        summariser = Summariser()
        summariser.options = SummaryOptions(max_event_age_s=max_age)
        summariser.clock = lambda: now
        scheduler = NotedEvents()
        summariser.scheduler = scheduler  # type: ignore[assignment]
        learn(summariser, events, batched=batched)
        assert scheduler.noted == expected


async def test_the_summariser_explains_a_batch_as_it_explains_each_list_alone(tmp_path: Path) -> None:
    async with shop_pipeline(tmp_path) as pipeline:
        summariser = pipeline.pm.get_plugin("summariser")
        queries = queries_for(pipeline)
        interests = (["garden tools", "Books"], ["kitchen"], ["garden tools", "Books"], [])
        for i, query in enumerate(queries[:-4]):
            query.user.extras[PROFILE_KEY] = {"interests": interests[i % 4], "based_on_events": 1}
        rng = random.Random(2)
        lists = [
            [Scored(slot=slot, score=1.0, reasons=["a reason"]) for slot in rng.sample(range(N_ITEMS), 40)]
            for _ in queries
        ]
        alone = copy.deepcopy(lists)
        for query, ranked in zip(queries, alone):
            assert summariser.recsys_rerank(query=query, ranked=ranked) is None
        assert summariser.recsys_rerank_batch(queries=queries, ranked=lists) is None
        assert [[entry.reasons for entry in ranked] for ranked in lists] == [
            [entry.reasons for entry in ranked] for ranked in alone
        ]
        explained = sum(len(entry.reasons) > 1 for ranked in alone for entry in ranked)
        assert explained > len(queries), "interests matched"


@pytest.mark.parametrize("n_items", [150, 2_000])
def test_a_trending_head_answers_a_batch_as_it_answers_each_query(n_items: int) -> None:
    # 150 items: the head holds them all (not full: what it has is all there is); 2,000: the
    # head is full, and users who excluded most of it get a full scan
    rng = random.Random(n_items)
    counter = DecayedCounts(86_400.0)
    counter.add_many([(rng.randrange(n_items), float(rng.choice((1, 1, 2, 3))), START) for _ in range(6_000)])
    assert (len(counter.head) < counter.depth) == (n_items == 150)
    catalog = Catalog()
    for i in range(n_items):
        catalog.upsert(Item(id=f"i{i}", title=f"item {i}", categories=(f"c{i % 10}", "all")))
    user = UserState(user_id="u", recent=deque(maxlen=5))
    queries = []
    for i in range(40):
        # everything, one category in ten, or everything but the most popular
        categories = ("c3",) if i % 3 == 1 else ("all",)
        exclude = set(counter.order[: 20 * i]) if i % 3 == 2 else set()
        queries.append(
            Query(
                user=user, k=10, now=START, catalog=catalog, n_candidates=10 + i, exclude=exclude, categories=categories
            )
        )
    together = counter.top_batch(queries, np.array(counter.order[:60]), _allowed_at(queries, counter.order[:60]))
    alone = [counter.top(query.n_candidates, query.allowed()) for query in queries]
    assert [(a.tolist(), b.tolist()) for a, b in together] == [(a.tolist(), b.tolist()) for a, b in alone]


def test_trending_items_whose_scores_decayed_to_zero_are_not_proposed_in_a_batch() -> None:
    # A half-life of a second: a day later the first items' scores are below float range (0),
    # yet they stay in the head until it is trimmed.
    counter = DecayedCounts(1.0)
    counter.add_many([(slot, 1.0, START) for slot in range(20)])
    counter.add_many([(slot, 1.0, START + 86_400.0) for slot in range(20, 25)])
    assert len(counter.head) == 25 and counter.scores[:20].max() == 0.0
    catalog = Catalog()
    for i in range(25):
        catalog.upsert(Item(id=f"i{i}", title=f"item {i}"))
    user = UserState(user_id="u", recent=deque(maxlen=5))
    queries = [Query(user=user, k=10, now=START, catalog=catalog, n_candidates=10 + i) for i in range(10)]
    together = counter.top_batch(queries, np.array(counter.order), _allowed_at(queries, counter.order))
    alone = [counter.top(query.n_candidates, query.allowed()) for query in queries]
    assert [a.tolist() for a, _ in together] == [a.tolist() for a, _ in alone]
    assert [sorted(a.tolist()) for a, _ in together] == [list(range(20, 25))] * 10


def _allowed_at(queries: list[Query], slots: list[int]) -> np.ndarray:
    return np.array([query.allowed()[slots] for query in queries])


async def test_freshness_answers_a_batch_of_queries_made_at_different_times(tmp_path: Path) -> None:
    async with shop_pipeline(tmp_path) as pipeline:
        freshness = pipeline.pm.get_plugin("freshness")
        probe = np.arange(0, pipeline.catalog.size, 3)
        now = pipeline.clock()

        def queries() -> list[Query]:
            # the second batch of new items (added 1,000 s before the last event) leaves the
            # seven-day window during these queries' times
            made = []
            for i, user in enumerate(["u1", "u2", "u3", "someone-new"] * 3):
                pipeline.clock = lambda i=i: now + 7 * 86_400.0 - 2_000.0 + 300.0 * i
                made.append(pipeline.make_query(user, 10, categories=("garden",) if i % 4 == 1 else ()))
            return made

        alone = [described(freshness.recsys_candidates(query), probe) for query in queries()]
        together = [described(answer, probe) for answer in freshness.recsys_candidates_batch(queries())]
        assert together == alone
        assert len({len(answer[0][2]) if answer else 0 for answer in alone}) > 1, "fewer fresh items later"


def test_a_query_with_a_mask_from_a_smaller_catalog_is_answered_in_a_batch() -> None:
    # A query's mask is made once; the catalog may grow (an event naming a new item) before a
    # source reads it. Slots past the mask are not allowed, in a batch as alone.
    catalog = Catalog()
    for i in range(20):
        catalog.upsert(Item(id=f"i{i}", title=f"item {i}"))
    trending = small_trending()
    user = UserState(user_id="u", recent=deque(maxlen=5))
    queries = [Query(user=user, k=3, now=START, catalog=catalog, n_candidates=5) for _ in range(9)]
    for query in queries:
        query.allowed()
    for i in range(20, 40):
        catalog.upsert(Item(id=f"i{i}", title=f"item {i}"))
    for counter in trending.counters.values():
        counter.add_many([(slot, 1.0 + slot, START) for slot in range(40)])
    alone = [described(trending.recsys_candidates(query), np.arange(40)) for query in queries]
    together = [described(answer, np.arange(40)) for answer in trending.recsys_candidates_batch(queries)]
    assert together == alone
    assert all(slot < 20 for answer in alone for cands in answer for slot in cands[2])
