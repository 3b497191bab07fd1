"""The peer baseline: implicit's ALS, retrained every N events, users folded in at query time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse

from agent.evaluation.baselines import ALS, check_baselines
from agent.evaluation.datasets import convert, read_items
from agent.evaluation.events import load_events
from agent.evaluation.replay import ReplayOptions, replay
from agent.hooks.manager import BUILTIN_PLUGINS, get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Event, Item
from tests.builders import FIXTURES, offline_settings

N_ITEMS = 20


def two_tastes(n_users: int = 60, seed: int = 0) -> list[tuple[int, int]]:
    """(user, item): even users buy among items 0-9, odd users among 10-19, 6 items each."""
    rng = np.random.default_rng(seed)
    pairs = []
    for user in range(n_users):
        low = 0 if user % 2 == 0 else 10
        pairs += [(user, int(item)) for item in rng.choice(np.arange(low, low + 10), size=6, replace=False)]
    return pairs


def trained(every: int) -> ALS:
    # two factors for two tastes: with as many factors as items a model of 20 items overfits
    als = ALS(N_ITEMS, every=every, factors=2)
    for user, item in two_tastes():
        als.observe(user, item, 0.0)
    return als


def test_als_retrains_every_n_events_and_scores_nothing_before_its_first_fit() -> None:
    als = ALS(N_ITEMS, every=100, factors=8)
    als.observe("u", 3, 0.0)
    assert als.model is None and not als.scores("u", 0.0).any()
    als = trained(every=100)
    # 360 interactions: fits after the 100th, 200th and 300th, the last on the first 50 users
    assert als.fits == 3 and als.model is not None
    assert als.model.user_factors.shape[0] == 50


def test_the_first_fits_come_early_and_a_basket_is_never_split_by_one() -> None:
    als = ALS(N_ITEMS, every=10_000, factors=2)
    fits_at = []
    for n, (user, item) in enumerate(two_tastes(n_users=1_500), start=1):
        als.observe(user, item, 0.0)
        if als.fits > len(fits_at):
            fits_at.append(n)
    # the interval doubles from 1,000 up to every (10,000): 1k, 2k, 4k, 8k, then 8k + 8k...
    assert fits_at[:4] == [1_000, 2_000, 4_000, 8_000]
    als = ALS(N_ITEMS, every=4, factors=2)
    als.observe_step("u", [1, 2, 3], 0.0)
    assert als.fits == 0
    als.observe_step("u", [4, 5], 0.0)
    assert als.fits == 1 and als.model.item_factors.shape[0] == N_ITEMS


def test_a_user_the_model_never_saw_is_folded_in_from_their_history() -> None:
    als = trained(every=360)
    assert als.fits == 1
    # a new user with two items of the first taste: its other items rank above all of the second
    als.observe("newcomer", 0, 1.0)
    als.observe("newcomer", 1, 1.0)
    assert als.fits == 1
    scores = als.scores("newcomer", 1.0)
    first, second = scores[2:10], scores[10:]
    assert first.min() > second.max()
    # and a user who changed taste since the fit is scored from the current history, not the model's
    for item in range(10, 16):
        als.observe(0, item, 1.0)
    assert als.scores(0, 1.0)[16:].min() > als.scores("newcomer", 1.0)[16:].max()


def test_the_scores_rank_as_implicits_own_fold_in_recommend_does() -> None:
    als = trained(every=360)
    history = {3: 1, 5: 2, 14: 1}
    for item, count in history.items():
        for _ in range(count):
            als.observe("probe", item, 1.0)
    row = scipy.sparse.csr_matrix(
        (np.array(list(history.values()), dtype=np.float32), (np.zeros(3, dtype=np.int32), list(history))),
        shape=(1, N_ITEMS),
    )
    ids, _ = als.model.recommend(0, row, N=10, recalculate_user=True, filter_already_liked_items=True)
    scores = als.scores("probe", 1.0).astype(np.float64)
    scores[list(history)] = -np.inf
    assert list(np.argsort(-scores, kind="stable")[:10]) == list(ids)


async def test_als_runs_through_the_replay_protocol_beside_the_other_baselines(tmp_path: Path) -> None:
    # two tastes replayed as a stream in a random order; retrained every 100 events
    items = [Item(id=f"i{n}", title=f"Item {n}") for n in range(N_ITEMS)]
    pairs = two_tastes(n_users=120)
    order = np.random.default_rng(1).permutation(len(pairs))
    events = [
        Event(type="purchase", user_id=f"u{pairs[i][0]}", item_id=f"i{pairs[i][1]}", ts=float(t))
        for t, i in enumerate(order)
    ]
    settings = offline_settings(tmp_path, disabled_plugins=list(BUILTIN_PLUGINS))
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    options = ReplayOptions(progress=False, baselines=("popularity", "als"), als_every=100, als_factors=2)
    async with pipeline.running():
        result = await replay(pipeline, items, events, options)
    report = result.report()
    assert report["baseline_training"]["als"]["fits"] == len(events) // 100
    # the tastes are invisible to popularity, plain to a collaborative filter
    assert report["baselines"]["als"]["ndcg@10"] > 1.3 * report["baselines"]["popularity"]["ndcg@10"]
    assert report["best_baseline"] == "als"


async def test_als_on_the_movielens_fixture(tmp_path: Path) -> None:
    convert("movielens", FIXTURES / "movielens-100k-mini", tmp_path / "ml")
    items, events = read_items(tmp_path / "ml" / "items.jsonl"), load_events(tmp_path / "ml" / "events.jsonl")
    settings = offline_settings(tmp_path, disabled_plugins=list(BUILTIN_PLUGINS))
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    options = ReplayOptions(progress=False, baselines=("als",), als_every=2, als_factors=4, baselines_process=True)
    async with pipeline.running():
        report = (await replay(pipeline, items, events, options)).report()
    # 196's and 22's later events (186's two are one basket, its first)
    assert report["evaluated"] == 2 and report["baseline_training"]["als"]["fits"] == 4
    assert 0.0 <= report["baselines"]["als"]["ndcg@10"] <= report["baselines"]["als"]["hit_rate@10"] <= 1.0


def test_bad_als_settings_and_a_missing_library_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="at least 1 event"):
        ALS(N_ITEMS, every=0)
    with pytest.raises(ValueError, match="factors must be at least 1"):
        ALS(N_ITEMS, factors=0)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "implicit" else real(name, *a))
    with pytest.raises(ValueError, match="needs the implicit library"):
        check_baselines(("popularity", "als"), N_ITEMS)
    check_baselines(("popularity",), N_ITEMS)
