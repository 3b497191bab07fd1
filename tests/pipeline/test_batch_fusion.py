"""The learned fusion answers a batch of queries, and learns from a batch of events, exactly as
it does one at a time.

Synthetic candidate lists shaped like the built-in sources' (popularity counts, co-occurrence
with a dense ``score_of``, content cosines in single precision, a source without ``score_of``),
for users in every history segment; no pipeline, no model. ``python -m tests.pipeline.test_batch_fusion``
measures the fusion's cost per query at batch 1 and batch 32.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import pytest

from agent.pipeline.catalog import Catalog
from agent.pipeline.user_state import UserState, UserStore
from agent.pipeline.values import Candidates, Query, Scored
from plugins.fusion import AGREEMENT, LearnedFusion, Ranking

N_ITEMS = 1_500
# history lengths across the segments (new, short, medium, long); 0: a user the agent does not
# hold yet, whose ranking is not remembered
EVENT_COUNTS = (0, 1, 3, 5, 8, 15, 30, 80)


class Shop:
    """Source scores over a synthetic catalog, fixed by a seed: for a user with some history,
    nine sources of 30 candidates, as the built-in ones give."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        horizons = ("trending", "popular_week", "popular_month")
        self.popularity = {name: rng.pareto(1.2, N_ITEMS) * 10 for name in horizons}
        self.vectors = rng.standard_normal((N_ITEMS, 64)).astype(np.float32)
        # whole hours since each item was added; NaN: an item freshness cannot date
        self.hours = -np.floor(rng.uniform(0, 3_600 * 300, N_ITEMS) / 3_600.0)
        self.hours[rng.choice(N_ITEMS, N_ITEMS // 3, replace=False)] = np.nan

    def lists(self, event_count: int, n: int = 30) -> list[Candidates]:
        rng = self.rng
        found = []

        def add(plugin: str, candidates: Candidates) -> None:
            candidates.plugin = plugin
            found.append(candidates)

        for name, counts in self.popularity.items():
            slots = rng.choice(N_ITEMS, n, replace=False)
            add("trending", Candidates(name, slots, counts[slots], "popular", lambda w, c=counts: c[w], counts=True))
        hours = self.hours
        slots = rng.choice(np.flatnonzero(np.isfinite(hours)), n, replace=False)
        add("freshness", Candidates("freshness", slots, hours[slots], "new", lambda w: hours[w]))
        if event_count > 2:
            for name in ("co_occurrence", "transitions"):
                totals = np.zeros(N_ITEMS)
                hit = rng.choice(N_ITEMS, 2 * n, replace=False)
                totals[hit] = rng.pareto(1.5, 2 * n)
                slots = hit[np.argsort(-totals[hit])][:n]
                add("item_to_item", Candidates(name, slots, totals[slots], "x", lambda w, t=totals: t[w], counts=True))
            for name in ("content_recent", "content_long", "profile"):
                taste = rng.standard_normal(64).astype(np.float32)
                scores = self.vectors @ taste
                slots = np.argsort(-scores)[:n]
                add("content", Candidates(name, slots, scores[slots], "c", lambda w, v=taste: self.vectors[w] @ v))
        if event_count > 10:
            # no score_of: rank gains; a repeated slot and a short list
            slots = rng.choice(N_ITEMS, n // 2, replace=False)
            slots = np.concatenate([slots, slots[:2]])
            add("search", Candidates("search", slots, np.linspace(1, 0, len(slots)), "s"))
        add("empty", Candidates("empty", np.empty(0, dtype=np.int64), np.empty(0)))
        return found


def queries_for(
    shop: Shop, users: UserStore, n_queries: int, catalog: Catalog, *, round_: int = 0
) -> tuple[list[Query], list[list[Candidates]]]:
    queries, lists = [], []
    for q in range(n_queries):
        count = EVENT_COUNTS[q % len(EVENT_COUNTS)]
        user_id = f"u{q}"
        user = users.get(user_id) if count else None
        if user is None:
            user = UserState(user_id=user_id, recent=deque(maxlen=50))
            if count:
                users._users[user_id] = user  # the agent holds this user
        user.event_count = count + round_
        k = (5, 10, 20)[q % 3]
        queries.append(Query(user=user, k=k, now=0.0, catalog=catalog, n_candidates=max(3 * k, 30)))
        # a user with no candidates at all, now and then
        lists.append([] if q % 11 == 7 else shop.lists(user.event_count))
    return queries, lists


def fusion(users: UserStore) -> LearnedFusion:
    plugin = LearnedFusion()
    plugin._users = users
    return plugin


def summary(ranked: list[Scored] | None) -> list[tuple[int, float, tuple[str, ...]]]:
    return [(s.slot, s.score, tuple(s.sources)) for s in ranked or []]


def assert_same_rankings(one: dict[str, Ranking], other: dict[str, Ranking]) -> None:
    assert list(one) == list(other), "the same users, remembered in the same order"
    for user_id, ranking in one.items():
        twin = other[user_id]
        assert ranking.segment == twin.segment and ranking.sources == twin.sources
        assert np.array_equal(ranking.union, twin.union)
        assert ranking.features.dtype == twin.features.dtype == np.float32
        assert np.array_equal(ranking.features, twin.features)
        assert np.array_equal(ranking.shown, twin.shown)
        assert ranking.chosen == twin.chosen


def rank_both(seed: int, n_queries: int) -> tuple[LearnedFusion, LearnedFusion, list[Query], list[list[Candidates]]]:
    """Two fusions over the same users: one ranks query by query, the other all at once."""
    users = UserStore(50, 10_000)
    queries, lists = queries_for(Shop(seed), users, n_queries, Catalog())
    alone, together = fusion(users), fusion(users)
    singles = [alone.recsys_fuse(query, found) for query, found in zip(queries, lists, strict=True)]
    batched = together.recsys_fuse_batch(queries, lists)
    assert [summary(r) for r in batched] == [summary(r) for r in singles]
    return alone, together, queries, lists


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fused_batch_is_each_query_fused_alone(seed: int) -> None:
    alone, together, queries, lists = rank_both(seed, 40)
    assert_same_rankings(alone.pending, together.pending)
    assert alone.weights == together.weights
    assert set(together.weights) == {"new", "short", "medium", "long"}
    remembered = {q.user.user_id for q, found in zip(queries, lists, strict=True) if q.user.event_count and found}
    assert set(together.pending) == remembered, "rankings of users the agent holds, with candidates"
    ranked = together.recsys_fuse_batch(queries, lists)
    for query, found, entries in zip(queries, lists, ranked, strict=True):
        assert entries is not None
        if not [c for c in found if len(c.slots)]:
            assert entries == []
            continue
        union = {slot for c in found for slot in c.slots.tolist()}
        assert len(entries) == min(query.n_candidates, len(union))
        assert [e.score for e in entries] == sorted((e.score for e in entries), reverse=True)
        for entry in entries:
            proposers = {c.source for c in found if entry.slot in set(c.slots.tolist())}
            assert set(entry.sources) == proposers and len(entry.sources) == len(proposers)
            assert AGREEMENT not in entry.sources


def test_ties_are_broken_by_slot_whatever_the_batch() -> None:
    # a source that scores every item alike: all tie, in the lists of any batch
    slots = np.array([7, 3, 5, 9])
    scores = np.array([2.0, 1.0, 1.0, 0.5])

    def query(user_id: str) -> Query:
        user = UserState(user_id=user_id, recent=deque(maxlen=5), event_count=4)
        return Query(user=user, k=2, now=0.0, catalog=Catalog(), n_candidates=30)

    def lists() -> list[Candidates]:
        return [Candidates("only", slots, scores, score_of=lambda w: np.ones(len(w)))]

    plugin = LearnedFusion()
    alone = plugin.recsys_fuse(query("a"), lists())
    batched = plugin.recsys_fuse_batch([query("b"), query("c")], [lists(), lists()])
    assert alone is not None and [s.slot for s in alone] == [3, 5, 7, 9]
    assert [summary(r) for r in batched] == [summary(alone)] * 2


def test_a_source_failing_on_one_query_fails_that_query_alone() -> None:
    users = UserStore(50, 100)
    queries, lists = queries_for(Shop(6), users, 12, Catalog())
    broken = next(c for c in lists[3] if len(c.slots))
    broken.score_of = lambda w: np.ones(len(w) + 1)  # the wrong length
    failing = [c for c in lists[9] if len(c.slots)][-1]

    def fails(slots: np.ndarray) -> np.ndarray:
        raise RuntimeError("no scores today")

    failing.score_of = fails
    alone = fusion(users)
    singles = [alone.recsys_fuse(query, found) for query, found in zip(queries, lists, strict=True)]
    batched = fusion(users).recsys_fuse_batch(queries, lists)
    assert singles[3] is None and singles[9] is None
    assert [summary(r) for r in batched] == [summary(r) for r in singles]
    assert all(ranked for n, ranked in enumerate(batched) if n not in (3, 9) and lists[n])


def choices(queries: list[Query], rankings: dict[str, Ranking], round_: int) -> tuple[list[int], list[float]]:
    """Each user's next event: mostly a positive one on a candidate, some negative, some on an
    item no source proposed."""
    slots, signals = [], []
    for n, query in enumerate(queries):
        ranking = rankings.get(query.user.user_id)
        union = ranking.union if ranking is not None else np.arange(10)
        kind = (n + round_) % 7
        slots.append(N_ITEMS + 1 if kind == 5 else int(union[(3 * n + round_) % len(union)]))
        signals.append(-1.0 if kind == 6 else 0.5 + kind / 4)
    return slots, signals


@pytest.mark.parametrize("seed", [0, 3])
def test_learning_from_a_batch_of_events_gives_the_weights_one_at_a_time_gives(seed: int) -> None:
    users = UserStore(50, 10_000)
    shop = Shop(seed)
    catalog = Catalog()
    alone, together = fusion(users), fusion(users)
    for round_ in range(4):
        queries, lists = queries_for(shop, users, 48, catalog, round_=round_)
        singles = [alone.recsys_fuse(query, found) for query, found in zip(queries, lists, strict=True)]
        assert [summary(r) for r in together.recsys_fuse_batch(queries, lists)] == [summary(r) for r in singles]
        assert_same_rankings(alone.pending, together.pending)
        slots, signals = choices(queries, together.pending, round_)
        people = [query.user for query in queries]
        for user, slot, signal in zip(people, slots, signals, strict=True):
            alone.recsys_apply_event(user, slot, signal)
        # in waves of distinct users, as the pipeline hands them over
        for start in range(0, len(people), 20):
            end = start + 20
            together.recsys_apply_events(people[start:end], slots[start:end], signals[start:end])
        assert alone.feedbacks == together.feedbacks > 0
        assert alone.weights == together.weights, "the same steps, bit for bit"
        assert_same_rankings(alone.pending, together.pending)
    # the weights did learn, in every segment that saw feedback
    assert all(table["trending"] != 1 / 3 for table in together.weights.values())


def test_an_event_without_a_ranking_or_with_a_negative_signal_teaches_nothing() -> None:
    users = UserStore(50, 100)
    queries, lists = queries_for(Shop(5), users, 8, Catalog())
    plugin = fusion(users)
    plugin.recsys_fuse_batch(queries, lists)
    before = {segment: dict(table) for segment, table in plugin.weights.items()}
    held = [q.user for q in queries if q.user.user_id in plugin.pending]
    chosen = [int(plugin.pending[user.user_id].union[0]) for user in held]
    plugin.recsys_apply_events(held, chosen, [-1.0] * len(held))
    assert plugin.weights == before and plugin.feedbacks == 0
    assert not plugin.pending, "a rejection ends what the ranking can teach"
    plugin.recsys_apply_events(held, chosen, [1.0] * len(held))
    assert plugin.weights == before and plugin.feedbacks == 0


def test_a_new_ranking_ends_the_old_one_even_when_it_keeps_nothing() -> None:
    users = UserStore(50, 100)
    queries, lists = queries_for(Shop(5), users, 8, Catalog())
    plugin = fusion(users)
    plugin.recsys_fuse_batch(queries, lists)
    held = [q for q in queries if q.user.user_id in plugin.pending]
    assert held
    # ranked again with no candidates at all: nothing is kept, and the old list teaches no more
    assert plugin.recsys_fuse_batch(held, [[] for _ in held]) == [[] for _ in held]
    assert not plugin.pending


def test_every_item_of_a_basket_teaches_from_the_list_it_was_chosen_from() -> None:
    users = UserStore(50, 100)
    queries, lists = queries_for(Shop(5), users, 8, Catalog())
    plugin = fusion(users)
    plugin.recsys_fuse_batch(queries, lists)
    user = next(q.user for q in queries if q.user.user_id in plugin.pending)
    ranking = plugin.pending[user.user_id]
    first, second = (int(position) for position in ranking.shown[1:3])
    negatives_of_second = len(plugin._differences([(ranking, second)])[0])
    plugin.recsys_apply_events([user], [int(ranking.union[first])], [1.0])
    assert plugin.feedbacks == 1 and plugin.pending[user.user_id] is ranking, "the list stays for the next item"
    # the first choice is no negative of the second any more
    assert len(plugin._differences([(ranking, second)])[0]) == negatives_of_second - 1
    plugin.recsys_apply_events([user], [int(ranking.union[second])], [1.0])
    assert plugin.feedbacks == 2 and ranking.chosen == [first, second]
    # the same item again teaches nothing more
    plugin.recsys_apply_events([user], [int(ranking.union[second])], [1.0])
    assert plugin.feedbacks == 2


def test_weights_reset_between_a_ranking_and_its_feedback_start_again_alike() -> None:
    # the tables may change under pending rankings (weights loaded, a source removed by hand):
    # a source missing at feedback time starts at its initial weight in both forms
    alone, together, queries, _ = rank_both(4, 24)
    for plugin in (alone, together):
        for table in plugin.weights.values():
            table.pop("trending", None)
        plugin.weights.pop("long", None)
    slots, signals = choices(queries, together.pending, 1)
    people = [query.user for query in queries]
    for user, slot, signal in zip(people, slots, signals, strict=True):
        alone.recsys_apply_event(user, slot, signal)
    together.recsys_apply_events(people, slots, signals)
    assert together.feedbacks == alone.feedbacks > 0
    assert together.weights == alone.weights
    assert list(together.weights["long"]) == list(alone.weights["long"]), "in the same order too"


def per_query_microseconds(batch: int, rounds: int = 60) -> float:
    """Median microseconds of fusion per query, fusing 64 queries (about 9 sources of 30
    candidates each for most users) in batches of ``batch``."""
    users = UserStore(50, 10_000)
    shop = Shop(0)
    queries, lists = queries_for(shop, users, 64, Catalog())
    queries = [q for q, found in zip(queries, lists, strict=True) if found]
    lists = [found for found in lists if found]
    plugin = fusion(users)
    runs: list[Callable[[], object]] = [
        lambda s=start: plugin.recsys_fuse_batch(queries[s : s + batch], lists[s : s + batch])
        for start in range(0, len(queries), batch)
    ]
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for run in runs:
            run()
        samples.append((time.perf_counter() - started) / len(queries) * 1e6)
    return statistics.median(samples)


if __name__ == "__main__":
    for size in (1, 8, 32, 64):
        print(f"batch {size:2d}: {per_query_microseconds(size):6.1f} µs per query (median)")
