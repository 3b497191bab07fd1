"""The ease source: the closed-form item-to-item regression fitted on the stream's window.

Real fits on the shelf shoppers of ``shelves.py``; the lifecycle it shares with the factors
source (cadence, background fits, forgetting during a fit) is tested in ``test_factors.py``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import ConfigError, Settings
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.window_models import FitJob
from agent.wire.contract import Event
from plugins.ease import EaseSource, modelled_mask
from plugins.ease.model import fit
from plugins.ease.options import EaseOptions
from tests.builders import offline_settings, plugin_of, proposed_by
from tests.pipeline.shelves import OTHERS, T0, apply, baskets, enter, purchases, running

SMALL = {"first_events": 400, "every_events": 400, "training": "inline"}


def settings_for(data_dir: Path, **options: Any) -> Settings:
    return offline_settings(data_dir, disabled_plugins=[*OTHERS, "factors"], plugins={"ease": {**SMALL, **options}})


def ease_of(pipeline: Pipeline) -> EaseSource:
    return plugin_of(pipeline, "ease", EaseSource)


def proposed(pipeline: Pipeline, user_id: str, k: int = 10) -> list[str]:
    return proposed_by(pipeline, "ease", user_id, k)


async def test_on_by_default_proposes_the_rest_of_the_shelf_and_swaps_versions(tmp_path: Path) -> None:
    settings = offline_settings(tmp_path, disabled_plugins=OTHERS)
    async with running(settings) as pipeline:
        source = ease_of(pipeline)
        assert source.enabled and source.options.training == "background"
        events = baskets(400)
        await apply(pipeline, events)
        await pipeline.settle()
        # 1,200 events: the first fit at 1,000 (the default cadence)
        first = source.served
        assert first is not None and first.number == 1 and first.info["items"] == 40
        held = first.weights.copy()
        source.start_fit(pipeline.catalog)
        await pipeline.settle()
        assert source.served is not None and source.served.number == 2
        assert np.array_equal(first.weights, held), "a served version is replaced, never changed"
        await apply(pipeline, purchases("new", (10, 11)), first=10_000)
        top = proposed(pipeline, "new")
        assert set(top[:3]) == {"p12", "p13", "p14"}, top
        assert not {"p10", "p11"} & set(top), "what the user bought is not proposed again"
        answer = source.recsys_candidates_batch([pipeline.make_query("new", 10)])[0]
        assert answer is not None and "new" not in answer.reason_for(int(answer.slots[0]))
        # fusion may ask for any item's score: the proposed ones score as proposed
        assert np.allclose(answer.score_of(answer.slots), answer.scores)
        # and the pipeline's own list leads with the rest of the shelf, saying why as ease does
        listed = (await pipeline.recommend("new")).items
        assert {item.item_id for item in listed[:3]} == {"p12", "p13", "p14"}
        assert any("goes with what you chose" in reason for item in listed[:3] for reason in item.reasons)


def test_weights_are_the_closed_form() -> None:
    """Against the formula written out in float64: B = I - P diag(1 / diag P), P the inverse of
    the regularised Gram matrix of the binary user x item matrix."""
    rng = np.random.default_rng(1)
    n_users, n_items, n = 60, 12, 400
    users, slots = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    job = FitJob(3, users, slots, rng.choice([1.0, 3.0], n).astype(np.float32), n_items, n)
    version = fit(job, EaseOptions(regularization=0.5))
    matrix = np.zeros((n_users, n_items))
    matrix[users, slots] = 1.0  # repeated pairs count once
    gram = matrix.T @ matrix
    penalty = 0.5 * np.diag(gram).mean()
    inverse = np.linalg.inv(gram + penalty * np.eye(n_items))
    expected = np.eye(n_items) - inverse / np.diag(inverse)
    assert version.number == 3 and version.info["items"] == n_items
    assert np.allclose(version.weights, expected, atol=1e-5)
    assert np.all(np.diag(version.weights) == 0)


def test_only_the_most_engaged_items_are_modelled() -> None:
    # item 5 by 4 users, item 2 by 3, item 7 by 2 (one of them twice), item 0 by 1
    users = np.array([0, 1, 2, 3, 0, 1, 2, 0, 1, 1, 3])
    slots = np.array([5, 5, 5, 5, 2, 2, 2, 7, 7, 7, 0])
    job = FitJob(1, users, slots, np.ones(len(users), dtype=np.float32), 9, len(users))
    version = fit(job, EaseOptions(max_items=3))
    assert version.modelled.tolist() == [2, 5, 7]
    assert (version.column >= 0).tolist() == [i in (2, 5, 7) for i in range(9)]
    assert version.columns_of(np.array([0, 2, 7, 8, 40])).tolist() == [-1, 0, 2, -1, -1]


def test_a_query_mask_is_read_at_the_modelled_slots_and_a_newer_slot_is_blocked() -> None:
    modelled = np.array([1, 4, 6, 9])
    # a mask made when the catalog had 7 slots: slot 9 came later, so no one may have it yet
    allowed = np.array([True, True, False, True, True, False, True])
    assert modelled_mask(modelled, allowed).tolist() == [True, True, True, False]
    assert modelled_mask(modelled, np.ones(12, dtype=bool)).tolist() == [True] * 4
    assert modelled_mask(modelled, np.ones(0, dtype=bool)).tolist() == [False] * 4


async def test_an_item_it_does_not_model_scores_nan(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, max_items=20)) as pipeline:
        await apply(pipeline, baskets())
        version = ease_of(pipeline).served
        assert version is not None and len(version.modelled) == 20
        await apply(pipeline, purchases("new", tuple(version.modelled[:2].tolist())), first=10_000)
        answer = ease_of(pipeline).recsys_candidates_batch([pipeline.make_query("new", 40)])[0]
        assert answer is not None and set(answer.slots.tolist()) <= set(version.modelled.tolist())
        outside = [slot for slot in range(40) if slot not in set(version.modelled.tolist())]
        assert np.isnan(answer.score_of(np.array(outside))).all()


async def test_forget_takes_the_users_events_out_of_the_window(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path)) as pipeline:
        source = ease_of(pipeline)
        await apply(pipeline, baskets(200))
        held = len(source.window)
        exported = source.recsys_export_user("u5", pipeline.catalog)
        assert exported is not None and len(exported["training_window"]) == 3
        assert await pipeline.forget_user("u5")
        assert len(source.window) == held - 3 and source.recsys_export_user("u5", pipeline.catalog) is None
        source.start_fit(pipeline.catalog)
        assert source.served is not None and source.served.info["users"] == 199


async def test_an_early_purchase_still_counts_after_a_long_run_of_other_events(tmp_path: Path) -> None:
    """Ease scores a user from the whole history the core keeps (``history_length``, 200 by
    default): a customer's earlier order still says what goes with it after 150 skips of
    other shelves' items, which a 50-event history would have dropped."""
    assert Settings().history_length == 200
    async with running(settings_for(tmp_path)) as pipeline:
        await apply(pipeline, baskets())
        await apply(pipeline, purchases("loyal", (10, 11)), first=10_000)
        skips = [
            Event(type="skip", user_id="loyal", item_id=f"p{25 + n % 15}", ts=T0 + 9e4 + 1 + n, id=f"skip{n}")
            for n in range(150)
        ]
        await apply(pipeline, skips, first=20_000)
        assert len(pipeline.users.get("loyal").recent) == 152
        assert set(proposed(pipeline, "loyal")[:3]) == {"p12", "p13", "p14"}


async def test_without_scipy_it_is_disabled_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what an install without the ml extra looks like to the importer
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)
    async with running(settings_for(tmp_path)) as pipeline:
        await apply(pipeline, baskets(150))
        source = ease_of(pipeline)
        assert not source.enabled and source.served is None
        assert source.disabled_reason is not None
        assert "pip install 'recsys-agent[ml]'" in source.disabled_reason
        assert 'disabled_plugins = ["ease"]' in source.disabled_reason
        assert source.recsys_candidates_batch([pipeline.make_query("u1", 10)]) is None
        assert (await pipeline.recommend("u1")).items


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_items", 1), ("regularization", 0.0), ("recency", 1.5), ("training", "later"), ("window_events", 1)],
)
def test_bad_options_stop_the_start_with_the_option_named(tmp_path: Path, option: str, value: Any) -> None:
    settings = settings_for(tmp_path, **{option: value})
    with pytest.raises(ConfigError, match=rf"\[plugins.ease\] option '{option}'"):
        asyncio.run(enter(settings))
