"""The sequence model: trained on the stream, swapped atomically, shared through NATS, serving
items by their text before any event names them, and disabled clearly without torch.

The rounds here are real (a small model trained in the worker process on a small stream); the
stream follows a fixed pattern, each user walking a cycle of the catalog (item i is followed by
item 7i + 3 mod N), which no popularity or co-occurrence count of single items reveals.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
import pytest_asyncio

from agent.config import ConfigError, Settings
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.recent_events import RecentEvents
from agent.pipeline.values import Candidates
from agent.wire.contract import Event, Item
from plugins.sequence import SEQUENCE_MODEL, SequenceSource
from plugins.sequence.forward import encode, score_rows
from plugins.sequence.options import ModelShape
from plugins.sequence.version import ItemTable, Served, Version
from tests.builders import make_settings, offline_settings

pytestmark = pytest.mark.slow

N_ITEMS = 40
WORDS = (
    "apple banana cherry grape lemon mango melon olive peach pear plum "
    "anchor bucket candle drum feather guitar hammer kettle ladder mirror "
    "needle pillow rocket saddle tunnel violin wagon yacht zipper basket "
    "castle dragon forest island jungle meadow planet river valley"
).split()
T0 = 1_700_000_000.0
# a small model and short rounds: the pattern needs no more
SMALL = {
    "enabled": True,
    "dim": 32,
    "heads": 2,
    "max_length": 8,
    "negatives": 32,
    "batch_size": 64,
    "min_steps": 150,
    "dropout": 0.0,
    "every_events": 2_500,
    # the tests wait for their rounds: on a busy machine a lower priority only makes them slower
    "nice": 0,
}
# everything but what these tests are about (content joins where text vectors are the point)
OTHERS = ["cross_encoder", "nats_publisher", "summariser"]


def successor(i: int) -> int:
    return (7 * i + 3) % N_ITEMS


def shop(n: int = N_ITEMS) -> list[Item]:
    return [Item(id=f"p{i}", title=f"{WORDS[i]} {'ornament' if i % 2 else 'souvenir'}") for i in range(n)]


def walks(n_users: int = 150, length: int = 20, seed: int = 1) -> list[Event]:
    """Each user walks the cycle from a random item, the users' events interleaved in time."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        item = rng.randrange(N_ITEMS)
        start = T0 + rng.random() * 1_000
        for step in range(length):
            rows.append((start + 60 * step, f"u{u}", f"p{item}"))
            item = successor(item)
    rows.sort()
    return [Event(type="view", user_id=u, item_id=i, ts=ts, id=f"w{n}") for n, (ts, u, i) in enumerate(rows)]


def pipeline_settings(data_dir: Path, content: bool = False, **options: Any) -> Settings:
    disabled = OTHERS if content else [*OTHERS, "content"]
    return offline_settings(data_dir, disabled_plugins=disabled, plugins={"sequence": {**SMALL, **options}})


@asynccontextmanager
async def running(settings: Settings, clock: list[float] | None = None, js: Any = None) -> AsyncIterator[Pipeline]:
    """A running pipeline on ``settings`` with the shop upserted (and embedded, with content);
    ``clock``: a one-element list holding the pipeline's time; ``js``: its JetStream context."""
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    if clock is not None:
        pipeline.clock = lambda: clock[0]
    pipeline.context.js = js
    async with pipeline.running():
        await pipeline.upsert_items(shop())
        await pipeline.settle()
        yield pipeline


async def apply(pipeline: Pipeline, events: list[Event], clock: list[float] | None = None, batch: int = 32) -> None:
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        if clock is not None:
            clock[0] = chunk[-1].ts
        outcomes = await pipeline.apply_events([(event, start + i + 1) for i, event in enumerate(chunk)])
        assert not [outcome for outcome in outcomes if isinstance(outcome, Exception)]


def sequence_of(pipeline: Pipeline) -> SequenceSource:
    plugin = pipeline.pm.get_plugin("sequence")
    assert isinstance(plugin, SequenceSource)
    return plugin


async def probe(pipeline: Pipeline, first: int, ts: float, user: str) -> None:
    """A new user who viewed ``first`` and its successor."""
    events = [
        Event(type="view", user_id=user, item_id=f"p{first}", ts=ts, id=f"{user}-a"),
        Event(type="view", user_id=user, item_id=f"p{successor(first)}", ts=ts + 1, id=f"{user}-b"),
    ]
    await apply(pipeline, events)


def proposals(pipeline: Pipeline, users: list[str]) -> list[Candidates | None]:
    answers = sequence_of(pipeline).recsys_candidates_batch([pipeline.make_query(user, 10) for user in users])
    return answers if answers is not None else [None] * len(users)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trained(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pipeline]:
    """A pipeline that has trained one round on the walks (shared: a round takes a while)."""
    async with running(pipeline_settings(tmp_path_factory.mktemp("trained"))) as pipeline:
        # in batches that end at the cadence's 2,500th event
        await apply(pipeline, walks(), batch=25)
        # the round runs in the background, on the events applied before it came due;
        # settling waits for it, as a replay would
        await pipeline.settle()
        yield pipeline


@pytest.mark.asyncio(loop_scope="module")
async def test_the_model_learns_the_order_of_the_stream(trained: Pipeline) -> None:
    pipeline = trained
    plugin = sequence_of(pipeline)
    assert plugin.served is not None and plugin.served.version.number == 1
    info = plugin.served.version.info
    assert info["events_seen"] == 2_500 and info["steps"] >= 150
    users = [f"learner{k}" for k in range(N_ITEMS)]
    for k, user in enumerate(users):
        await probe(pipeline, k, time.time(), user)
    hits = 0
    for k, answer in enumerate(proposals(pipeline, users)):
        assert answer is not None and answer.source == "sequence"
        hits += pipeline.catalog.ids[int(answer.slots[0])] == f"p{successor(successor(k))}"
    # chance is 1 in 38; the pattern is all there is to learn
    assert hits >= 0.8 * N_ITEMS, f"next item first for {hits} of {N_ITEMS} users"
    metrics = pipeline.metrics
    assert metrics.value("recsys_sequence_model_version") == 1
    assert b"recsys_sequence_model_version 1.0" in metrics.render()
    assert pipeline.context.extras[SEQUENCE_MODEL]["version"] == 1


async def test_a_version_serves_from_its_trigger_plus_its_training_time(tmp_path: Path) -> None:
    # inline training under an event clock, as in a replay: the round starts at the event that
    # completes the cadence, and what it trains on is the events applied before it
    clock = [T0]
    async with running(pipeline_settings(tmp_path, training="inline"), clock=clock) as pipeline:
        plugin = sequence_of(pipeline)
        events = walks()
        await apply(pipeline, events[:2_496], clock)
        assert plugin.latest is None, "no round before the cadence"
        await apply(pipeline, events[2_496:2_500], clock)
        assert plugin.latest is not None and plugin.latest.info["events_seen"] == 2_500
        trained_at, seconds = events[2_499].ts, plugin.rounds[-1]["seconds"]
        assert seconds > 0
        # until the event clock has passed the training's time, the stream is ranked without it
        await probe(pipeline, 0, trained_at, "early")
        assert plugin.served is None and proposals(pipeline, ["early"]) == [None]
        clock[0] = trained_at + seconds + 1
        assert plugin.served is None
        (answer,) = proposals(pipeline, ["early"])
        assert answer is not None and plugin.served is not None and plugin.served.version.number == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_a_query_during_a_swap_gets_a_whole_answer_from_one_version(trained: Pipeline) -> None:
    pipeline = trained
    plugin = sequence_of(pipeline)
    assert plugin.served is not None
    one = plugin.served
    # a second version: every array of the first, moved a little
    rng = np.random.default_rng(5)
    params = {
        name: (array + 0.1 * rng.standard_normal(array.shape)).astype(np.float32)
        for name, array in one.version.params.items()
    }
    other = Version(2, one.version.shape, one.version.text_dim, one.version.item_ids, params)
    table = ItemTable(other)
    table.build(pipeline.catalog.ids, np.empty(0, dtype=np.int64), np.zeros((0, other.text_dim)))
    two = Served(other, table, ready_at=0.0)
    users = [f"swapped{k}" for k in range(12)]
    for k, user in enumerate(users):
        await probe(pipeline, k, time.time(), user)
    union = np.arange(N_ITEMS)

    def answers(served: Served) -> list[tuple[list[int], list[float], list[float]]]:
        plugin.served = served
        found = proposals(pipeline, users)
        return [summary(answer) for answer in found]

    def summary(answer: Candidates | None) -> tuple[list[int], list[float], list[float]]:
        assert answer is not None and answer.score_of is not None
        return answer.slots.tolist(), answer.scores.tolist(), answer.score_of(union).tolist()

    expected = {1: answers(one), 2: answers(two)}
    assert expected[1] != expected[2]
    stop = threading.Event()

    def swapping() -> None:
        while not stop.is_set():
            plugin.served = two if plugin.served is one else one

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    swapper = threading.Thread(target=swapping)
    swapper.start()
    try:
        seen = set()
        for _ in range(200):
            # a swap may come between the batch and fusion's reading of it: fusion still
            # reads the version that the batch was answered by
            got = [summary(answer) for answer in proposals(pipeline, users)]
            number = next((number for number, answer in expected.items() if got == answer), None)
            assert number is not None, "an answer mixes two versions"
            seen.add(number)
    finally:
        stop.set()
        swapper.join()
        sys.setswitchinterval(interval)
        plugin.served = one
    assert seen == {1, 2}


@pytest.mark.asyncio(loop_scope="module")
async def test_a_batch_of_queries_gets_what_each_query_gets_alone(trained: Pipeline) -> None:
    pipeline = trained
    users = [f"batched{k}" for k in range(6)]
    for k, user in enumerate(users):
        await probe(pipeline, k, time.time(), user)
    together = proposals(pipeline, users)
    for user, batched in zip(users, together):
        (alone,) = proposals(pipeline, [user])
        assert alone is not None and batched is not None
        assert (alone.slots.tolist(), alone.scores.tolist()) == (batched.slots.tolist(), batched.scores.tolist())


async def test_a_second_agent_on_the_same_nats_loads_the_published_version(nats_url: str, tmp_path: Path) -> None:
    settings = make_settings(
        nats_url,
        tmp_path / "a",
        disabled_plugins=[*OTHERS, "content"],
        plugins={"sequence": {**SMALL, "poll_s": 0.2, "lease_s": 30.0}},
    )
    second = make_settings(
        nats_url,
        tmp_path / "b",
        stream_name=settings.stream_name,
        disabled_plugins=settings.disabled_plugins,
        plugins=settings.plugins,
    )
    nc = await nats.connect(nats_url)
    try:
        async with running(settings, js=nc.jetstream()) as a, running(second, js=nc.jetstream()) as b:
            trainer, loader = sequence_of(a), sequence_of(b)
            await apply(a, walks())
            await a.settle()
            assert trainer.served is not None and trainer.sharing is not None and trainer.sharing.trains
            # the second agent's round comes due too: it does not train, it loads
            await apply(b, walks(seed=2))
            await b.settle()
            async with asyncio.timeout(30):
                while loader.served is None:
                    await asyncio.sleep(0.05)
            assert loader.served.version.number == trainer.served.version.number == 1
            assert [r["outcome"] for r in loader.rounds] == ["loaded"]
            assert loader.sharing is not None and not loader.sharing.trains
            for name, array in trainer.served.version.params.items():
                assert np.array_equal(array, loader.served.version.params[name]), name
            # the same user history gets the same candidates on either agent
            for pipeline in (a, b):
                await probe(pipeline, 5, time.time(), "both")
            (on_a,), (on_b,) = proposals(a, ["both"]), proposals(b, ["both"])
            assert on_a is not None and on_b is not None
            assert [a.catalog.ids[s] for s in on_a.slots] == [b.catalog.ids[s] for s in on_b.slots]
            assert b.metrics.value("recsys_sequence_model_version") == 1
    finally:
        await nc.drain()


async def test_a_new_item_with_a_text_vector_is_rankable_before_any_event_names_it(tmp_path: Path) -> None:
    async with running(pipeline_settings(tmp_path, content=True)) as pipeline:
        plugin = sequence_of(pipeline)
        await apply(pipeline, walks())
        await pipeline.settle()
        assert plugin.served is not None and plugin.served.version.text_dim == 384
        # a new listing of the item that follows p5's successor, under the same title
        following = successor(successor(5))
        twin = Item(id="twin", title=shop()[following].title)
        await pipeline.upsert_items([twin])
        await pipeline.settle()
        assert "twin" not in plugin.served.version.item_ids
        await probe(pipeline, 5, time.time(), "shopper")
        query = pipeline.make_query("shopper", 10)
        query.n_candidates = N_ITEMS
        answers = plugin.recsys_candidates_batch([query])
        assert answers is not None and answers[0] is not None
        ranked = [pipeline.catalog.ids[slot] for slot in answers[0].slots]
        assert "twin" in ranked, "an item with a vector is rankable at once"
        # and it is scored by its text: it ranks with the item it shares a title with
        assert ranked.index("twin") < len(ranked) // 4, ranked
        assert answers[0].score_of is not None
        assert np.isfinite(answers[0].score_of(np.array([pipeline.catalog.slot("twin")]))).all()


async def test_without_torch_the_plugin_is_disabled_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # what an install without the 'ml' extra looks like to the plugin
    monkeypatch.setitem(sys.modules, "torch", None)
    caplog.set_level(logging.WARNING, logger="plugins.sequence")
    async with running(pipeline_settings(tmp_path)) as pipeline:
        plugin = sequence_of(pipeline)
        assert not plugin.enabled
        assert "sequence plugin is disabled" in caplog.text
        assert "pip install 'recsys-agent[ml]'" in caplog.text and 'disabled_plugins = ["sequence"]' in caplog.text
        await apply(pipeline, walks()[:2_600])
        await pipeline.settle()
        assert plugin.latest is None and plugin.worker is None
        # the agent serves on with its other sources
        ranked = await pipeline.rank(pipeline.make_query("u1", 10))
        assert ranked and "sequence" not in {source for entry in ranked for source in entry.sources}


def test_bad_options_stop_the_start_with_the_option_named() -> None:
    settings = offline_settings(disabled_plugins=[*OTHERS, "content"], plugins={"sequence": {"training": "later"}})
    with pytest.raises(ConfigError, match=r"\[plugins.sequence\] option 'training'"):
        asyncio.run(_enter(settings))


async def _enter(settings: Settings) -> None:
    async with Pipeline(settings, get_plugin_manager(settings)).running():
        pass  # entering the plugins' lifespans is the test: a bad option refuses the start


def test_the_serving_forward_pass_is_the_training_one() -> None:
    import torch

    from plugins.sequence.model import NextItemModel

    torch.manual_seed(3)
    shape = ModelShape(dim=32, heads=4, blocks=2, max_length=12)
    model = NextItemModel(shape, n_ids=50, text_dim=16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    model.eval()
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(9, 12, 32)).astype(np.float32)
    valid = np.arange(12)[None, :] >= rng.integers(0, 12, size=(9, 1))
    rows[~valid] = 0.0
    users = encode(model.to_numpy(), shape, rows, valid)
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(rows), torch.from_numpy(valid))[:, -1].numpy()
    np.testing.assert_allclose(users, expected, atol=1e-5)
    # one query alone gets what it gets in a batch, to the bit
    params = model.to_numpy()
    assert all(np.array_equal(users[i], encode(params, shape, rows[i : i + 1], valid[i : i + 1])[0]) for i in range(9))
    table = rng.normal(size=(300, 32)).astype(np.float32)
    scores = score_rows(table, users)
    assert all(np.array_equal(scores[i], score_rows(table, users[i : i + 1])[0]) for i in range(9))


def test_a_version_survives_its_bytes_and_refuses_anything_else() -> None:
    shape = ModelShape(dim=8, heads=2, blocks=1, max_length=4)
    from plugins.sequence.forward import param_shapes

    rng = np.random.default_rng(1)
    params = {name: rng.normal(size=dims).astype(np.float32) for name, dims in param_shapes(shape, 3, 5).items()}
    version = Version(7, shape, 5, ("a", "b", "c"), params, info={"trainer": "x"})
    again = Version.from_bytes(version.to_bytes())
    assert (again.number, again.shape, again.text_dim, again.item_ids, again.info) == (
        7,
        shape,
        5,
        ("a", "b", "c"),
        {"trainer": "x"},
    )
    assert all(np.array_equal(params[name], again.params[name]) for name in params)
    with pytest.raises(ValueError, match="not a sequence model version"):
        Version.from_bytes(b"not an archive")
    broken = dict(params, ids=np.zeros((2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="array ids"):
        Version(7, shape, 5, ("a", "b", "c"), broken)


def test_a_forgotten_user_leaves_the_training_window() -> None:
    recent = RecentEvents(capacity=5)
    recent.append(["a", "b", "a"], [1, 2, 3], [1.0, 2.0, 3.0])
    recent.append(["c", "a", "b"], [4, 5, 6], [4.0, 5.0, 6.0])
    users, slots, ts = recent.window()
    assert users.tolist() == [recent.codes[u] for u in "bacab"]
    assert slots.tolist() == [2, 3, 4, 5, 6] and ts.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    recent.forget("a")
    _, slots, _ = recent.window()
    assert slots.tolist() == [2, 4, 6] and "a" not in recent.codes
