"""Content retrieval and the built-in rerankers answer a batch of queries exactly as each query
alone: the same slots, scores (bit for bit), reasons and scorers, whatever else is in the batch.

No model: the item vectors are set directly (clustered like text embeddings).
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.context import AgentContext
from agent.pipeline.catalog import Catalog
from agent.pipeline.extras import ITEM_VECTORS, PROFILE
from agent.pipeline.user_state import Interaction, UserState, UserStore
from agent.pipeline.values import Candidates, Query, Scored
from agent.serving.metrics import Metrics
from agent.vectors.item_neighbours import ItemNeighbours
from agent.vectors.item_vectors import ItemVectors, top_per_row
from agent.wire.contract import Item
from plugins.content import PROFILE_VECTOR, ContentRetrieval, ProfileVector
from plugins.rerankers import Diversity, ExcludeSeen
from tests.builders import offline_settings

SHELVES = ("garden", "kitchen", "camping", "books", "toys", "music")
DIM = 384


def shop(n_items: int, n_without_vectors: int) -> tuple[Catalog, ItemVectors]:
    """A catalog whose last ``n_without_vectors`` items have no vector yet."""
    rng = np.random.default_rng(4)
    catalog = Catalog()
    for i in range(n_items):
        catalog.upsert(Item(f"p{i}", f"thing {i}", categories=(SHELVES[i % 6], SHELVES[(i * 5) % 6])))
    centres = rng.normal(size=(12, DIM))
    matrix = (centres[rng.integers(0, 12, n_items)] + 0.3 * rng.normal(size=(n_items, DIM))).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    # two items with one vector: a tie in every search that reaches them
    matrix[1] = matrix[0]
    vectors = ItemVectors(DIM)
    with_vectors = n_items - n_without_vectors
    vectors.set(list(range(with_vectors)), matrix[:with_vectors], ["h"] * with_vectors)
    if vectors.needs_projection():
        vectors.refit()
    return catalog, vectors


def user(name: str, history: list[tuple[int, str, float]]) -> UserState:
    state = UserState(name, deque(maxlen=50))
    for n, (slot, kind, signal) in enumerate(history):
        state.recent.append(Interaction(slot, kind, float(n), signal))
        state.seen.add(slot)
    return state


def users_of(n_items: int, unvectored: list[int]) -> list[tuple[UserState, dict[str, Any]]]:
    """Varied users, each with the query options it is asked with."""
    rng = random.Random(9)

    def views(count: int) -> list[tuple[int, str, float]]:
        return [(rng.randrange(n_items - len(unvectored)), "view", 1.0) for _ in range(count)]

    profiled = user("profiled", views(6))
    profile_vector = np.ones(DIM, dtype=np.float32) / np.sqrt(DIM)
    profiled.extras[PROFILE] = {"source": "llm", "summary": "likes things", "interests": ["things"]}
    profiled.extras[PROFILE_VECTOR] = ProfileVector("likes things. things", profile_vector)
    return [
        (user("new", []), {}),
        (user("heavy", views(50)), {}),
        (user("one", views(1)), {}),
        (user("hater", [*views(8), (3, "dislike", -1.0), (0, "dislike", -1.0), (7, "skip", -0.3)]), {}),
        (user("only-dislikes", [(5, "dislike", -1.0), (9, "dislike", -1.0)]), {}),
        (user("unvectored", [(slot, "like", 2.0) for slot in unvectored]), {}),
        (user("picky", views(12)), {"categories": ("garden", "books"), "exclude": {0, 1, 2, 3, 4, 5}}),
        (user("narrow", views(4)), {"categories": ("music",), "k": 40}),
        (user("short", views(10)), {"k": 5}),
        (profiled, {}),
        (user("also-heavy", [*views(30), (0, "purchase", 3.0)]), {}),
    ]


def queries_for(catalog: Catalog, people: list[tuple[UserState, dict[str, Any]]]) -> list[Query]:
    queries = []
    for person, options in people:
        k = options.get("k", 10)
        queries.append(
            Query(
                user=person,
                k=k,
                now=0.0,
                catalog=catalog,
                n_candidates=max(3 * k, 30),
                exclude=person.seen | options.get("exclude", set()),
                categories=options.get("categories", ()),
            )
        )
    return queries


def summary(answer: Any, probe: np.ndarray) -> Any:
    if answer is None:
        return None
    lists = [answer] if isinstance(answer, Candidates) else answer
    return [
        (
            c.source,
            c.slots.tolist(),
            c.scores.tolist(),
            [c.reason_for(int(slot)) for slot in c.slots],
            c.score_of(probe).tolist() if c.score_of is not None else None,
        )
        for c in lists
    ]


@pytest.mark.parametrize(
    ("n_items", "mode"), [(1_500, "scan"), (1_500, "neighbours"), (120, "scan")], ids=["scan", "neighbours", "small"]
)
def test_content_answers_a_batch_as_each_query_alone(n_items: int, mode: str) -> None:
    # "small": too few items for a projection, an exact scan
    unvectored = [n_items - 1, n_items - 2]
    catalog, vectors = shop(n_items, len(unvectored))
    assert vectors.count == n_items - len(unvectored)
    content = ContentRetrieval()
    content.index.vectors = vectors
    if mode == "neighbours":
        content.index.neighbours = ItemNeighbours(8)
        content.index.neighbours.changed(list(range(n_items)))
        content.index.neighbours.install(content.index.neighbours.build(vectors))
    people = users_of(n_items, unvectored)
    probe = np.arange(0, n_items - len(unvectored), 7)

    alone = [summary(content.recsys_candidates(query), probe) for query in queries_for(catalog, people)]
    batch = content.recsys_candidates_batch(queries_for(catalog, people))
    assert isinstance(batch, list)
    assert [summary(answer, probe) for answer in batch] == alone
    # in another order, with the others of the batch different: still the same answers
    order = list(reversed(range(len(people))))
    reordered = content.recsys_candidates_batch(queries_for(catalog, [people[i] for i in order]))
    assert isinstance(reordered, list)
    assert [summary(answer, probe) for answer in reordered] == [alone[i] for i in order]

    by_name = dict(zip((person.user_id for person, _ in people), alone, strict=True))
    assert by_name["new"] is None and by_name["unvectored"] is None, "no taste, no answer"
    assert {source for source, *_ in by_name["profiled"]} == {"content_recent", "content_long", "profile"}
    picky = {slot for _, slots, *_ in by_name["picky"] for slot in slots}
    assert picky and not picky & {0, 1, 2, 3, 4, 5}
    assert all({"garden", "books"} & set(catalog.items[slot].categories) for slot in picky)
    heavy = by_name["heavy"][0]
    assert len(heavy[1]) == 30 and heavy[2] == sorted(heavy[2], reverse=True)
    assert heavy[3][0].startswith("similar to thing "), "reasons name a liked item"


def test_top_per_row_takes_the_highest_and_the_lower_column_of_a_tie() -> None:
    rng = np.random.default_rng(2)
    for trial in range(300):
        # widths on both sides of the sampled selection's thresholds (per row and per batch)
        rows, width, m = int(rng.integers(1, 5)), int(rng.integers(1, 16_000)), int(rng.integers(1, 80))
        scores = rng.integers(0, int(rng.integers(2, 60)), size=(rows, width)).astype(np.float32)
        scores[rng.random((rows, width)) < rng.random()] = -np.inf
        expected = [np.sort(np.lexsort((np.arange(width), -row))[: min(m, width)]).tolist() for row in scores]
        assert top_per_row(scores, m).tolist() == expected, trial
        assert [top_per_row(row[None, :], m)[0].tolist() for row in scores] == expected, trial


def test_rerankers_answer_a_batch_as_each_query_alone(tmp_path: Path) -> None:
    catalog, vectors = shop(400, 3)
    settings = offline_settings(tmp_path)
    ctx = AgentContext(settings=settings, catalog=catalog, users=UserStore(10, 10), metrics=Metrics())
    ctx.extras[ITEM_VECTORS] = vectors
    diversity = Diversity()
    diversity.ctx, diversity.trade_off = ctx, 0.7
    rng = np.random.default_rng(6)
    queries, ranked = [], []
    for length, k, with_unvectored in [
        (30, 10, False),
        (30, 10, True),
        (2, 10, False),
        (7, 3, False),
        (40, 10, False),
        (30, 10, False),
        (15, 5, True),
        (1, 1, False),
        (30, 10, False),
        (0, 10, False),
    ]:
        slots = rng.choice(396, length, replace=False)
        if with_unvectored:
            slots[length // 2] = 398  # no vector: this pool is compared by categories
        scores = np.sort(rng.random(length))[::-1]
        if length > 4:
            scores[3:5] = scores[3]  # equal scores
        queries.append(
            Query(
                user=user("u", []), k=k, now=0.0, catalog=catalog, n_candidates=3 * k, exclude=set(slots[::4].tolist())
            )
        )
        ranked.append([Scored(int(slot), float(score)) for slot, score in zip(slots, scores, strict=True)])

    def slots_of(answers: list[list[Scored] | None]) -> list[list[int]]:
        # None keeps a query's list
        return [[s.slot for s in (found if answer is None else answer)] for answer, found in zip(answers, ranked)]

    before = slots_of([None] * len(ranked))
    for reranker in (diversity, ExcludeSeen()):
        batch = reranker.recsys_rerank_batch(queries, ranked)
        assert batch is not None
        alone = [reranker.recsys_rerank(query, found) for query, found in zip(queries, ranked, strict=True)]
        assert slots_of(batch) == slots_of(alone)
        changed = [i for i, (after, was) in enumerate(zip(slots_of(batch), before)) if after != was]
        # diversity reorders every list long enough (by vectors, and by categories for the
        # pools with an item that has no vector); ExcludeSeen drops the excluded items
        assert changed == ([0, 1, 3, 4, 5, 6, 8] if reranker is diversity else [0, 1, 2, 3, 4, 5, 6, 7, 8])


def test_taste_reads_the_newest_taste_items_of_a_long_history() -> None:
    """A 200-event history gives the taste of its newest 50: older items would carry under
    0.5 % of the long vector's weight, so they are not read at all."""
    from plugins.content.taste import taste_of

    rng = np.random.default_rng(5)
    vectors = ItemVectors(16)
    vectors.set(list(range(40)), rng.normal(size=(40, 16)).astype(np.float32), [str(i) for i in range(40)])
    history = [
        Interaction(slot=int(s), type="view", ts=float(n), signal=1.0) for n, s in enumerate(rng.integers(0, 40, 200))
    ]
    whole = taste_of(UserState(user_id="u", recent=deque(history, maxlen=200)), vectors)
    newest = taste_of(UserState(user_id="u", recent=deque(history[-50:], maxlen=200)), vectors)
    assert whole is not None and newest is not None
    assert np.array_equal(whole.long, newest.long) and np.array_equal(whole.short, newest.short)
    older = taste_of(UserState(user_id="u", recent=deque(history[:-1], maxlen=200)), vectors)
    assert older is not None and not np.array_equal(whole.long, older.long)
