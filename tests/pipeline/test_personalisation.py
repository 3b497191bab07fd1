"""Candidate sources, learned fusion and rerankers, on the real embedding model and Qdrant."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.app import Agent
from agent.config import ConfigError, Settings
from agent.context import AgentContext
from agent.hooks.manager import get_plugin_manager
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog
from agent.pipeline.extras import ITEM_VECTORS, PROFILE
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.user_state import UserState, UserStore
from agent.pipeline.values import Candidates, Query, Scored
from agent.serving.metrics import Metrics
from agent.vectors.item_neighbours import ItemNeighbours
from agent.vectors.item_vectors import ItemVectors
from agent.wire.contract import Event, InvalidMessage, Item
from plugins.content import PROFILE_VECTOR, ProfileVector, Taste
from plugins.fusion import LearnedFusion
from plugins.rerankers import Diversity, category_jaccard
from tests.builders import Client, event, offline_settings, running_pipeline

FILMS = [
    Item("sw", "Star Wars", "A farm boy joins rebels against a galactic empire", ("Sci-Fi", "Adventure")),
    Item("alien", "Alien", "The crew of a spaceship meets a deadly creature", ("Sci-Fi", "Horror")),
    Item("trek", "Star Trek", "A starship crew explores strange new worlds in space", ("Sci-Fi",)),
    Item(
        "interstellar", "Interstellar", "Astronauts travel through a wormhole to find a new planet", ("Sci-Fi", "Drama")
    ),
    Item("dune", "Dune", "A noble family fights for a desert planet and its spice", ("Sci-Fi", "Adventure")),
    Item("notting", "Notting Hill", "A bookshop owner falls in love with a film star", ("Romance", "Comedy")),
    Item("pretty", "Pretty Woman", "A businessman falls for a woman in Los Angeles", ("Romance", "Comedy")),
    Item("love", "Love Actually", "Interwoven love stories at Christmas in London", ("Romance", "Comedy")),
    Item("notebook", "The Notebook", "A poor young man and a rich young woman fall in love", ("Romance", "Drama")),
    Item(
        "harry",
        "When Harry Met Sally",
        "Two friends wonder whether men and women can be friends",
        ("Romance", "Comedy"),
    ),
    Item("matrix", "The Matrix", "A hacker learns that reality is a simulation run by machines", ("Sci-Fi", "Action")),
    Item("blade", "Blade Runner", "A detective hunts escaped androids in a future city", ("Sci-Fi", "Thriller")),
    Item("martian", "The Martian", "An astronaut stranded on Mars must survive alone", ("Sci-Fi", "Drama")),
    Item(
        "sleepless",
        "Sleepless in Seattle",
        "A widower's son calls a radio show to find him a new love",
        ("Romance", "Comedy"),
    ),
]
SCIFI = {"sw", "alien", "trek", "interstellar", "dune", "matrix", "blade", "martian"}
T0 = 1_700_000_000.0

# the films, upserted and taken in by every stage, on a clock that stands still at T0
pipeline_on = partial(running_pipeline, items=FILMS, clock=T0, settle=True)
# ev(n, user, item, kind="view", value=None): at T0 + n, its id "<user>-<n>-<item>"
ev = partial(event, t0=T0, id_format="{user}-{n}-{item}")


async def sources_for(pipeline: Pipeline, user: str) -> dict[str, Candidates]:
    query = pipeline.make_query(user, 5)
    found: dict[str, Candidates] = {}
    for _, answer in await pipeline.hooks.call("recsys_candidates", query=query):
        for cands in answer if isinstance(answer, list) else [answer]:
            found[cands.source] = cands
    return found


def ids(pipeline: Pipeline, cands: Candidates) -> list[str]:
    return [pipeline.catalog.ids[s] for s in cands.slots.tolist()]


@pytest.mark.parametrize("search", ["auto", "scan", "neighbours", "qdrant"])
async def test_content_source_follows_the_users_taste_with_reasons(tmp_path: Path, search: str) -> None:
    # "qdrant": a catalog above vector_cache_max_items is searched in Qdrant itself
    options = {"search": "scan" if search == "qdrant" else search, "neighbours": 4}
    limit = 0 if search == "qdrant" else 500_000
    async with pipeline_on(tmp_path, plugins={"content": options}, vector_cache_max_items=limit) as pipeline:
        # auto, the default, keeps a neighbour table for a catalog of this size
        assert pipeline.pm.get_plugin("content").neighbours.ready == (search in ("auto", "neighbours"))
        for n, item in enumerate(["sw", "trek"]):
            await pipeline.apply_event(ev(n, "ann", item))
        found = await sources_for(pipeline, "ann")
        recent = ids(pipeline, found["content_recent"])
        assert set(recent[:3]) <= SCIFI - {"sw", "trek"}, recent
        reason = found["content_recent"].reason_for(found["content_recent"].slots[0])
        assert reason.startswith("similar to ") and ("Star Wars" in reason or "Star Trek" in reason)
        await pipeline.apply_event(ev(5, "ann", "alien", kind="dislike"))
        taste = pipeline.pm.get_plugin("content").taste(pipeline.users.get("ann"))
        assert isinstance(taste, Taste) and len(taste.positives) == 2, "a dislike is not a reason to recommend"


async def test_unchanged_items_are_not_embedded_again_even_after_a_restart(
    tmp_path: Path, embed_calls: list[int]
) -> None:
    calls = embed_calls
    async with pipeline_on(tmp_path) as pipeline:
        assert sum(calls) == len(FILMS)
        await pipeline.upsert_items(FILMS[:3])
        await pipeline.settle()
        assert sum(calls) == len(FILMS), "identical items cost nothing"
        changed = Item("sw", "Star Wars", "Now with a new description", ("Sci-Fi",))
        await pipeline.upsert_items([changed])
        await pipeline.settle()
        assert sum(calls) == len(FILMS) + 1
    calls.clear()
    async with pipeline_on(tmp_path, items=[changed, *FILMS[1:]]) as pipeline:
        assert calls == [], "vectors come back from Qdrant, not from the model"
        assert pipeline.context.extras[ITEM_VECTORS].count == len(FILMS)


async def test_deleted_item_leaves_qdrant_and_the_lists(tmp_path: Path) -> None:
    async with pipeline_on(tmp_path) as pipeline:
        await pipeline.apply_event(ev(0, "bo", "sw"))
        assert await pipeline.delete_item("trek")
        await pipeline.settle()
        found = await sources_for(pipeline, "bo")
        assert all("trek" not in ids(pipeline, c) for c in found.values())
        content = pipeline.pm.get_plugin("content")
        assert content.store.count() == len(FILMS) - 1


async def test_a_delete_before_content_is_ready_still_leaves_qdrant(tmp_path: Path, embed_calls: list[int]) -> None:
    # A restart replays the catalog stream (upsert, then delete) while the model and Qdrant are
    # still opening; a live delete can land while the item's batch waits to be encoded.
    async with pipeline_on(tmp_path) as first:
        # a first run leaves every item's point in Qdrant, as a restart finds them
        assert first.pm.get_plugin("content").store.count() == len(FILMS)
    embed_calls.clear()
    settings = offline_settings(tmp_path)
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    async with pipeline.running():
        fresh = Item("new", "Solaris", "A psychologist is sent to a station orbiting an ocean planet", ("Sci-Fi",))
        await pipeline.upsert_items([*FILMS, fresh])
        assert await pipeline.delete_item("trek") and await pipeline.delete_item("new")
        await pipeline.settle()
        content = pipeline.pm.get_plugin("content")
        assert content.store.count() == len(FILMS) - 1, "the stored point of the deleted item is gone"
        assert embed_calls == [], "an item deleted before its turn is not embedded"
        assert not content.vectors.has(pipeline.catalog.slot("trek"))
        # upserted again after the delete: back in Qdrant and in the lists
        await pipeline.upsert_items([FILMS[2]])
        await pipeline.settle()
        assert content.store.count() == len(FILMS) and content.vectors.has(pipeline.catalog.slot("trek"))


async def test_an_llm_profile_becomes_a_query_held_with_the_user(tmp_path: Path) -> None:
    async with pipeline_on(tmp_path) as pipeline:
        await pipeline.apply_event(ev(0, "cy", "notting"))
        user = pipeline.users.get("cy")
        user.extras[PROFILE] = {
            "source": "llm",
            "summary": "Loves space exploration films",
            "interests": ["astronauts", "planets"],
        }
        assert "profile" not in await sources_for(pipeline, "cy"), "embedded off the hot path, not while ranking"
        content = pipeline.pm.get_plugin("content")
        for task in list(content._tasks):
            await task
        found = ids(pipeline, (await sources_for(pipeline, "cy"))["profile"])
        assert set(found[:3]) <= SCIFI, found
        # kept in the user's extras: gone with the user, so never more than the users held
        assert isinstance(user.extras.get(PROFILE_VECTOR), ProfileVector)
        assert await pipeline.forget_user("cy")
        assert pipeline.users.get("cy") is None


async def test_a_user_forgotten_while_ranked_leaves_no_ranking_behind(tmp_path: Path) -> None:
    gate, entered = asyncio.Event(), asyncio.Event()

    class SlowSource:
        """A source that answers asynchronously (as a remote one would), held at a gate."""

        @hookimpl
        def recsys_candidates(self, query: Query) -> Any:
            async def answer() -> None:
                entered.set()
                await gate.wait()

            return answer()

    async with pipeline_on(tmp_path, ("slow", SlowSource())) as pipeline:
        for n, item in enumerate(["sw", "trek"]):
            await pipeline.apply_event(ev(n, "di", item))
        fusion = pipeline.pm.get_plugin("fusion")
        gate.set()
        await pipeline.recommend("di")
        assert "di" in fusion.pending, "a ranking is kept to learn from the user's next event"
        gate.clear()
        entered.clear()
        ranking = asyncio.create_task(pipeline.recommend("di"))
        await entered.wait()
        assert await pipeline.forget_user("di")
        gate.set()
        await ranking
        assert "di" not in fusion.pending


async def test_transitions_and_co_occurrence_are_learned_online(tmp_path: Path) -> None:
    async with pipeline_on(tmp_path) as pipeline:
        for user in ("u1", "u2", "u3"):
            for n, item in enumerate(["notting", "pretty", "dune"]):
                await pipeline.apply_event(ev(n, user, item))
        await pipeline.apply_event(ev(0, "new", "notting"))
        found = await sources_for(pipeline, "new")
        after = found["transitions"]
        assert ids(pipeline, after)[0] == "pretty"
        assert after.reason_for(after.slots[0]) == "often chosen after Notting Hill"
        assert set(ids(pipeline, found["co_occurrence"])) == {"pretty", "dune"}


async def test_trending_sources_decay_with_time(tmp_path: Path) -> None:
    async with pipeline_on(tmp_path) as pipeline:
        day = 86_400.0
        for n in range(5):  # an old burst
            await pipeline.apply_event(Event("view", f"old{n}", 1_700_000_000.0, id=f"o{n}", item_id="alien"))
        for n in range(2):  # a little, but recent
            await pipeline.apply_event(Event("view", f"new{n}", 1_700_000_000.0 + 10 * day, id=f"n{n}", item_id="dune"))
        found = await sources_for(pipeline, "someone")
        assert ids(pipeline, found["trending"])[0] == "dune"
        assert ids(pipeline, found["popular_month"])[0] == "alien"
        assert found["freshness"] is not None and len(found["freshness"]) == len(FILMS)


class Oracle:
    """A fake source that always has the user's next item first: fusion must learn to trust it."""

    def __init__(self, nexts: dict[str, str]) -> None:
        self.nexts = nexts

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates | None:
        wanted = self.nexts.get(query.user.user_id)
        slot = query.catalog.slot(wanted) if wanted else None
        if slot is None:
            return None
        others = [s for s in range(query.catalog.size) if s != slot][:4]
        return Candidates("oracle", np.array([slot, *others]), np.array([5.0, 4, 3, 2, 1]))


async def test_fusion_learns_which_source_predicts_the_next_event(tmp_path: Path) -> None:
    nexts: dict[str, str] = {}
    oracle = Oracle(nexts)
    async with pipeline_on(tmp_path, ("oracle", oracle)) as pipeline:
        fusion = pipeline.pm.get_plugin("fusion")
        assert isinstance(fusion, LearnedFusion)
        rng = np.random.default_rng(1)
        names = [item.id for item in FILMS]
        for user in range(40):
            uid = f"user{user}"
            order = list(rng.permutation(names))
            await pipeline.apply_event(ev(0, uid, order[0]))
            for n, item in enumerate(order[1:5], start=1):
                nexts[uid] = item
                await pipeline.rank(pipeline.make_query(uid, 5))
                await pipeline.apply_event(ev(n, uid, item))
        weights = fusion.weights
        segment = max(weights, key=lambda s: len(weights[s]))
        table = weights[segment]
        assert table["oracle"] == max(table.values()), table
        assert fusion.feedbacks > 100


@pytest.mark.parametrize("with_unscored", [False, True])
def test_fusion_features_put_count_like_scores_on_a_log_scale(with_unscored: bool) -> None:
    rows = [
        [0.0, 1.0, 2.0, 4.0, 400.0],  # counts: one blockbuster
        [0.1, 0.2, 0.3, 0.4, 0.9],  # cosines, all positive here: not counts, so linear
        [-2.0, -1.0, 0.0, 1.0, 2.0],  # a signed score stays linear
    ]
    if with_unscored:
        rows.append([1.0, np.nan, 3.0, 2.0, 5.0])  # an item the source cannot score
    raw = np.array(rows)

    def z(row: np.ndarray) -> np.ndarray:
        return (row - row.mean()) / row.std()

    features = LearnedFusion._standardised(raw.copy(), counts=[0])
    # the order within each source is kept
    for row in range(3):
        assert list(np.argsort(features[row])) == [0, 1, 2, 3, 4]
    # the blockbuster still leads, but no longer squeezes the other items together: they are
    # told apart by more than twice what linear z-scores leave them
    assert features[0, 4] == features[0].max()
    assert features[0, 3] - features[0, 0] > 2 * (z(raw[0])[3] - z(raw[0])[0])
    # a source that did not declare counts keeps linear z-scores, whatever its signs
    assert np.allclose(features[1], z(raw[1])) and np.allclose(features[2], z(raw[2]))
    if with_unscored:
        assert features[3, 1] == features[3].min()


async def test_rerankers_filter_diversify_and_exclude(tmp_path: Path) -> None:
    async with pipeline_on(tmp_path, plugins={"diversity": {"lambda": 0.3}}) as pipeline:
        for n, item in enumerate(["sw", "notting"]):
            await pipeline.apply_event(ev(n, "cy", item))
        recs = await pipeline.recommend("cy", 4, categories=("Romance",))
        assert recs.items and all(
            "Romance" in pipeline.catalog.item(pipeline.catalog.slot(i.item_id)).categories for i in recs.items
        )  # type: ignore[union-attr]
        assert "notting" not in [i.item_id for i in recs.items]
        recs = await pipeline.recommend("cy", 4, exclude=("trek",))
        shown = [i.item_id for i in recs.items]
        assert "trek" not in shown and "sw" not in shown
        # strong diversity mixes both genres into the top four
        assert {i in SCIFI for i in shown} == {True, False}
        assert all(item.reasons for item in recs.items)


def test_category_similarity_is_the_jaccard_of_category_sets() -> None:
    catalog = Catalog()
    items = [
        Item("a", "A", categories=("X", "Y")),
        Item("b", "B", categories=("Y", "Z")),
        Item("c", "C", categories=("Y", "X", "X")),
        Item("d", "D"),
        Item("e", "E", categories=("Z",)),
        Item("gone", "Gone", categories=("X",)),
    ]
    slots = [catalog.upsert(item)[0] for item in items]
    catalog.delete("gone")
    # by hand: |shared| / |union|; c names X twice (one category), d has none, a deleted item
    # counts as none, and an item is not compared with itself
    third, half = 1 / 3, 1 / 2
    expected = np.array(
        [
            [0, third, 1, 0, 0, 0],
            [third, 0, third, 0, half, 0],
            [1, third, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, half, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(category_jaccard(catalog, slots), expected)
    assert category_jaccard(catalog, []).shape == (0, 0)


def test_diversity_uses_cosines_only_when_every_item_has_a_vector(tmp_path: Path) -> None:
    # a and c share their categories but not their direction; a and b the other way round
    catalog = Catalog()
    a, c, b = (
        catalog.upsert(Item(i, i.upper(), categories=cats))[0]
        for i, cats in (("a", ("X",)), ("c", ("X",)), ("b", ("Z",)))
    )
    vectors = ItemVectors(2)
    vectors.set([a, c, b], np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32), ["ha", "hc", "hb"])
    ctx = AgentContext(settings=offline_settings(tmp_path), catalog=catalog, users=UserStore(10, 10), metrics=Metrics())
    ctx.extras[ITEM_VECTORS] = vectors
    diversity = Diversity()
    diversity.ctx, diversity.trade_off = ctx, 0.5
    query = Query(user=UserState("u", deque()), k=2, now=0.0, catalog=catalog, n_candidates=6)
    ranked = [Scored(a, 1.0), Scored(c, 0.9), Scored(b, 0.5)]

    def order() -> list[int]:
        reranked = diversity.recsys_rerank(query, ranked)
        assert reranked is not None
        return [s.slot for s in reranked]

    np.testing.assert_array_equal(diversity._similarity(query, [a, c, b]), [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    # b, a's twin by vector, waits behind c
    assert order() == [a, c, b]
    vectors.remove(b)
    # one item without a vector: the whole pool is compared by categories, c is a's twin
    np.testing.assert_array_equal(diversity._similarity(query, [a, c, b]), category_jaccard(catalog, [a, c, b]))
    assert order() == [a, b, c]


async def test_cross_encoder_rescoring_runs_on_a_real_model(tmp_path: Path) -> None:
    from agent.vectors.embeddings import default_model_path

    # The bundled MiniLM loads as a CrossEncoder with a fresh scoring head: enough to check the
    # plumbing (thread, timeout, blend), not the quality of its order.
    options = {"cross_encoder": {"model": default_model_path(), "depth": 5, "weight": 1.0}}
    async with pipeline_on(tmp_path, plugins=options, stage_timeout_ms=10_000) as pipeline:
        model = pipeline.pm.get_plugin("cross_encoder").model
        scored: list[int] = []
        predict = model.predict

        def counting_predict(pairs: list[tuple[str, str]], *args: Any, **kwargs: Any) -> Any:
            scored.append(len(pairs))
            return predict(pairs, *args, **kwargs)

        model.predict = counting_predict
        await pipeline.apply_event(ev(0, "di", "sw"))
        recs = await pipeline.recommend("di", 5)
        assert len(recs.items) == 5
        assert scored == [5], "the real model scored the head of the list once"
        for kind in ("error", "timeout"):
            assert (
                pipeline.metrics.value(
                    "recsys_plugin_failures_total", plugin="cross_encoder", hook="recsys_rerank", kind=kind
                )
                == 0
            )

        # one prediction at a time: lists asked for meanwhile keep the fused order
        release = threading.Event()

        def held_predict(pairs: list[tuple[str, str]], *args: Any, **kwargs: Any) -> Any:
            release.wait(10)
            return counting_predict(pairs, *args, **kwargs)

        model.predict = held_predict
        first = asyncio.create_task(pipeline.recommend("di", 5))
        await asyncio.sleep(0.05)
        others = [await pipeline.recommend("di", 5) for _ in range(3)]
        assert all(len(r.items) == 5 for r in others) and scored == [5], "no prediction queued behind the running one"
        release.set()
        assert len((await first).items) == 5 and scored == [5, 5]


def test_projected_search_agrees_with_exact_search() -> None:
    # clustered like real text embeddings (topics), not isotropic noise, which no projection keeps
    matrix, _ = clustered_vectors(np.random.default_rng(3), 3_000)
    vectors = ItemVectors(384)
    vectors.set(list(range(3_000)), matrix, ["h"] * 3_000)
    assert vectors.needs_projection()
    vectors.refit()
    assert not vectors.needs_projection()
    query = matrix[:5].mean(axis=0)
    query /= np.linalg.norm(query)
    allowed = np.ones(3_000, dtype=bool)
    allowed[7] = False
    slots, scores = vectors.search(query, 20, allowed)
    exact = np.argsort(-(matrix @ query))
    exact = [s for s in exact if s != 7][:20]
    assert len(set(slots.tolist()) & set(exact)) >= 18
    assert 7 not in slots.tolist() and np.all(np.diff(scores) <= 1e-6)


def clustered_vectors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # clustered like real text embeddings (topics), not isotropic noise
    centres = rng.normal(size=(40, 384))
    topic = rng.integers(0, 40, n)
    matrix = (centres[topic] + 0.25 * rng.normal(size=(n, 384))).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True), topic


def test_neighbours_of_recent_items_hold_the_taste_vectors_nearest_items() -> None:
    rng = np.random.default_rng(5)
    matrix, topic = clustered_vectors(rng, 3_000)
    vectors = ItemVectors(384)
    vectors.set(list(range(3_000)), matrix, ["h"] * 3_000)
    vectors.refit()
    neighbours = ItemNeighbours()
    neighbours.changed(list(range(3_000)))
    assert neighbours.needs_build(vectors)
    neighbours.start_build()
    neighbours.install(neighbours.build(vectors))
    assert neighbours.ready and not neighbours.needs_build(vectors)
    assert 5 not in neighbours.table[5].tolist(), "an item is not its own neighbour"
    allowed = np.ones(3_000, dtype=bool)
    recalls = []
    for _ in range(20):
        # a user's recent items come from a topic or two
        topics = rng.choice(40, 2, replace=False)
        recent = rng.choice(np.flatnonzero(np.isin(topic, topics)), 5, replace=False).tolist()
        taste = (np.array([0.9**age for age in range(5)])[:, None] * matrix[recent]).sum(axis=0)
        taste /= np.linalg.norm(taste)
        pool = neighbours.candidates(recent, vectors, allowed)
        assert len(pool) <= 5 * neighbours.k and np.all(np.diff(pool) > 0)
        exact = set(np.argsort(-(matrix @ taste))[:10].tolist())
        recalls.append(len(exact & set(pool.tolist())) / 10)
    # about 0.7 on the dev set's real histories (tests/bench/bench_stages.py shows the cost it saves)
    assert np.mean(recalls) >= 0.7
    # a newly embedded item is a candidate at once, before any rebuild
    new, _ = clustered_vectors(rng, 1)
    vectors.set([3_000], new, ["h"])
    neighbours.changed([3_000])
    assert 3_000 in neighbours.candidates([0], vectors, np.ones(3_001, dtype=bool)).tolist()
    assert 3_000 not in neighbours.candidates([0], vectors, np.array([True] * 3_000 + [False])).tolist()
    # and stays one while a rebuild runs, until the build that saw it is installed
    neighbours.start_build()
    built = neighbours.build(vectors)
    assert 3_000 in neighbours.candidates([0], vectors, np.ones(3_001, dtype=bool)).tolist()
    neighbours.install(built)
    assert 3_000 not in neighbours.unindexed and len(neighbours.table) > 3_000 and neighbours.table[3_000, 0] >= 0


def test_a_neighbour_table_with_a_limit_is_dropped_once_the_catalog_outgrows_it() -> None:
    rng = np.random.default_rng(6)
    matrix, _ = clustered_vectors(rng, 600)
    vectors = ItemVectors(384)
    vectors.set(list(range(500)), matrix[:500], ["h"] * 500)
    vectors.refit()
    neighbours = ItemNeighbours(max_items=550)
    neighbours.changed(list(range(500)))
    neighbours.follow_limit(vectors)
    assert neighbours.needs_build(vectors)
    neighbours.start_build()
    neighbours.install(neighbours.build(vectors))
    assert neighbours.serves(vectors)
    vectors.set(list(range(500, 600)), matrix[500:], ["h"] * 100)
    neighbours.changed(list(range(500, 600)))
    # beyond the limit: not served (searches scan), not rebuilt, and the table's memory freed
    assert not neighbours.serves(vectors) and not neighbours.needs_build(vectors)
    neighbours.follow_limit(vectors)
    assert not neighbours.ready and len(neighbours.table) == 0 and not neighbours.unindexed
    neighbours.changed([599])
    assert not neighbours.unindexed, "changes beyond the limit are not tracked"
    # just within it again (items removed): still no build, so churn at the limit is not
    # rebuilt at every dip
    for slot in range(540, 600):
        vectors.remove(slot)
    neighbours.follow_limit(vectors)
    assert not neighbours.needs_build(vectors) and not neighbours.serves(vectors)
    # below 0.9 of it: a whole build follows
    for slot in range(490, 540):
        vectors.remove(slot)
    neighbours.follow_limit(vectors)
    assert neighbours.needs_build(vectors)
    neighbours.start_build()
    neighbours.install(neighbours.build(vectors))
    assert neighbours.serves(vectors) and neighbours.table[489, 0] >= 0 and neighbours.table[520, 0] < 0


async def test_content_search_in_auto_mode_scans_a_catalog_above_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 neighbours a film: below the limit this catalog gets a table (the parametrised test above)
    monkeypatch.setattr("plugins.content.AUTO_NEIGHBOURS_MAX_ITEMS", 3)
    async with pipeline_on(tmp_path, plugins={"content": {"neighbours": 4}}) as pipeline:
        content = pipeline.pm.get_plugin("content")
        assert content.search_mode == "auto" and not content.neighbours.serves(content.vectors)

        def no_table(*args: object) -> None:
            raise AssertionError("a catalog above the limit must be scanned, not read from the table")

        monkeypatch.setattr(content.neighbours, "candidates", no_table)
        for n, item in enumerate(["sw", "trek"]):
            await pipeline.apply_event(ev(n, "ann", item))
        found = await sources_for(pipeline, "ann")
        # answered by a scan of the catalog, as search = "scan" would
        assert set(ids(pipeline, found["content_recent"])[:3]) <= SCIFI - {"sw", "trek"}


async def test_pushes_shift_toward_the_genre_a_user_engages_with(settings: Settings, client: Client) -> None:
    genre_share: list[float] = []
    async with Agent(settings) as agent:
        await client.upsert([item.to_dict() for item in FILMS])
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == len(FILMS))
        await agent.pipeline.settle()
        # the crowd makes the romances popular
        for n in range(20):
            await client.publish_event(
                {"id": f"c{n}", "type": "view", "user_id": f"crowd{n}", "item_id": ["notting", "pretty", "love"][n % 3]}
            )
        # the fan starts like the crowd, then engages with science fiction only
        for n, (kind, item) in enumerate(
            [("view", "harry"), ("purchase", "trek"), ("purchase", "interstellar"), ("like", "dune")]
        ):
            await client.publish_event({"id": f"fan{n}", "type": kind, "user_id": "fan", "item_id": item})
            await client.wait_for(lambda n=n: f"fan{n}" in client.reflected_event_ids())
            push = next(p for p in client.pushes if p.get("event_id") == f"fan{n}")
            top = [entry["item_id"] for entry in push["items"][:4]]
            genre_share.append(sum(i in SCIFI for i in top) / len(top))
    assert genre_share[-1] > genre_share[0], genre_share
    assert genre_share[-1] >= 0.5, genre_share


async def test_restart_restores_taste_and_learned_sources(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        await client.upsert([item.to_dict() for item in FILMS])
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == len(FILMS))
        await agent.pipeline.settle()
        for n, item in enumerate(["sw", "notting", "dune"]):
            await client.publish_event({"id": f"r{n}", "type": "view", "user_id": "rex", "item_id": item})
        await client.wait_for(lambda: "r2" in client.reflected_event_ids())
        content = agent.pm.get_plugin("content")
        before = content.taste(agent.pipeline.users.get("rex")).long
        recs_before = [i.item_id for i in (await agent.pipeline.recommend("rex", 5)).items]
    async with Agent(settings) as agent:
        await agent.pipeline.settle()
        after = agent.pm.get_plugin("content").taste(agent.pipeline.users.get("rex")).long
        assert np.allclose(before, after, atol=1e-5)
        recs_after = [i.item_id for i in (await agent.pipeline.recommend("rex", 5)).items]
    assert recs_after == recs_before


async def test_fusion_weights_survive_a_restart_in_jetstream_kv(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        fusion = agent.pm.get_plugin("fusion")
        fusion.learners["shown"].weights["long"] = {"trending": 0.25, "content_recent": 1.5}
    async with Agent(settings) as agent:
        assert agent.pm.get_plugin("fusion").weights["long"] == {"trending": 0.25, "content_recent": 1.5}
        # a weight that went NaN was saved as null: learned again, not a failed start
        agent.pm.get_plugin("fusion").weights["long"]["trending"] = float("nan")
    async with Agent(settings) as agent:
        assert agent.pm.get_plugin("fusion").weights["long"] == {"content_recent": 1.5}
    # a snapshot that is not JSON at all (written by something else): start without it
    kv = await client.js.key_value(f"{settings.stream_name}_STATE")
    await kv.put("fusion.weights", b"{not json")
    async with Agent(settings) as agent:
        assert agent.pm.get_plugin("fusion").weights == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"search": "fast"}, r"\[plugins.content\] option 'search' must be one of auto, scan, neighbours"),
        ({"search": "neighbours", "neighbours": "32"}, r"option 'neighbours' must be an integer, got '32'"),
        ({"neighbours": 0}, r"option 'neighbours' must be at least 1"),
        ({"serach": "scan"}, r"\[plugins.content\] has no option 'serach'"),
    ],
)
async def test_bad_content_options_stop_the_start_with_their_names(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        async with pipeline_on(tmp_path, plugins={"content": options}):
            pass  # entering is the test


async def test_trending_weighs_a_top_rating_by_the_configured_scale(tmp_path: Path) -> None:
    async with pipeline_on(tmp_path, rating_max=5.0) as pipeline:
        await pipeline.apply_event(ev(0, "ann", "alien", kind="rate", value=5.0))
        await pipeline.apply_event(ev(0, "bob", "dune", kind="view"))
        scores = pipeline.pm.get_plugin("trending").counters["popular_month"].scores
        alien, dune = pipeline.catalog.slot("alien"), pipeline.catalog.slot("dune")
        # the top of a 5-point scale counts as much as the top of any scale: twice a view
        assert scores[alien] / scores[dune] == pytest.approx(2.0)
        # validation follows the same scale: a 7 is off a 5-point one
        with pytest.raises(InvalidMessage, match=r"outside \[0.0, 5.0\]"):
            await pipeline.apply_event(ev(1, "ann", "dune", kind="rate", value=7.0))
