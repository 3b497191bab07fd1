"""The factors source: implicit's ALS fitted on the stream, swapped whole, folded in per user.

The fits here are real (implicit on a small stream of shelf shoppers, ``shelves.py``). The
lifecycle every window-fitted source shares (``agent/pipeline/window_models.py``: cadence,
versions, settle, forgetting during a fit) is tested here, through this source.
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
from plugins.factors import FactorsSource
from plugins.factors.model import FitJob, fit, fold_in
from plugins.factors.options import FactorsOptions
from tests.builders import offline_settings, plugin_of, proposed_by
from tests.pipeline.shelves import OTHERS, apply, baskets, enter, purchases, running

# small and quick: the structure needs no more
SMALL = {"enabled": True, "factors": 8, "iterations": 8, "first_events": 400, "every_events": 400, "training": "inline"}


def settings_for(data_dir: Path, **options: Any) -> Settings:
    return offline_settings(data_dir, disabled_plugins=[*OTHERS, "ease"], plugins={"factors": {**SMALL, **options}})


def factors_of(pipeline: Pipeline) -> FactorsSource:
    return plugin_of(pipeline, "factors", FactorsSource)


def proposed(pipeline: Pipeline, user_id: str, k: int = 10) -> list[str]:
    return proposed_by(pipeline, "factors", user_id, k)


async def test_proposes_the_rest_of_the_shelf_and_swaps_versions(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path)) as pipeline:
        source = factors_of(pipeline)
        events = baskets()
        await apply(pipeline, events[:450])
        first = source.served
        assert first is not None and first.number == 1
        held = first.item_factors.copy()
        await apply(pipeline, events[450:], first=451)
        # 900 events: fits at 400 and 800 (the interval doubles up to every_events)
        assert source.served is not None and source.served.number == 2
        assert [fit["version"] for fit in source.fits] == [1, 2]
        assert np.array_equal(first.item_factors, held), "a served version is replaced, never changed"
        # someone new buys two items of shelf 2: the other three lead what the source proposes
        await apply(pipeline, purchases("new", (10, 11)), first=10_000)
        top = proposed(pipeline, "new")
        assert set(top[:3]) == {"p12", "p13", "p14"}, top
        assert not {"p10", "p11"} & set(top), "what the user bought is not proposed again"
        answer = source.recsys_candidates_batch([pipeline.make_query("new", 10)])[0]
        assert "yours" in answer.reason_for(int(answer.slots[0])) and "new" not in answer.reason_for(
            int(answer.slots[0])
        )
        # fusion may ask for any item's score: the proposed ones score as proposed
        assert np.allclose(answer.score_of(answer.slots), answer.scores, rtol=1e-4)


async def test_inline_training_is_deterministic(tmp_path: Path) -> None:
    found = []
    for run in ("a", "b"):
        async with running(settings_for(tmp_path / run)) as pipeline:
            await apply(pipeline, baskets())
            served = factors_of(pipeline).served
            assert served is not None
            found.append((served.number, served.item_factors.copy(), proposed(pipeline, "u7")))
    assert found[0][0] == found[1][0]
    assert np.array_equal(found[0][1], found[1][1])
    assert found[0][2] == found[1][2]


async def test_background_fit_is_waited_for_by_settle(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, training="background")) as pipeline:
        await apply(pipeline, baskets(150))
        await pipeline.settle()
        source = factors_of(pipeline)
        assert source.served is not None and source.served.number >= 1
        assert source.recsys_health() is None


async def test_a_due_background_fit_waits_for_the_minimum_interval(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, training="background", min_interval_s=60.0)) as pipeline:
        source = factors_of(pipeline)
        now = [1_000.0]
        source.clock = lambda: now[0]
        await apply(pipeline, baskets(150))
        await pipeline.settle()
        assert source.served is not None and source.served.number == 1, "the first fit does not wait"
        # 600 more events (baskets' ids repeat: the first 150 shoppers' are duplicates): a fit
        # is due by the count (every 400), but one started a moment ago
        await apply(pipeline, baskets(350, seed=4), first=10_000)
        await pipeline.settle()
        assert source.served.number == 1 and source.seen >= source.next_fit
        now[0] += 61.0
        await apply(pipeline, baskets(351, seed=5)[-3:], first=20_000)
        await pipeline.settle()
        assert source.served.number == 2, "the interval passed: the next event starts the due fit"
        # it learned from every event that waited, starting at the first one after the interval
        assert source.served.info["window_events"] > 1_050


async def test_a_fit_held_back_by_the_interval_starts_when_it_passes_without_another_event(
    tmp_path: Path,
) -> None:
    async with running(settings_for(tmp_path, training="background", min_interval_s=0.5)) as pipeline:
        source = factors_of(pipeline)
        await apply(pipeline, baskets(150))
        await pipeline.settle()
        assert source.served is not None and source.served.number == 1
        # due by the count; then the stream goes quiet
        await apply(pipeline, baskets(350, seed=4), first=10_000)
        for _ in range(200):
            await pipeline.settle()
            if source.served.number == 2:
                break
            await asyncio.sleep(0.05)
        assert source.served.number == 2, "the waiting fit started on its own once the interval passed"
        assert source.served.info["window_events"] == len(source.window) == 1_050


async def test_forget_takes_the_users_events_out_of_the_window(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path)) as pipeline:
        source = factors_of(pipeline)
        await apply(pipeline, baskets(100))
        held = len(source.window)
        exported = source.recsys_export_user("u5", pipeline.catalog)
        assert exported is not None and len(exported["training_window"]) == 3
        assert await pipeline.forget_user("u5")
        assert len(source.window) == held - 3
        assert source.recsys_export_user("u5", pipeline.catalog) is None
        # the next fit's input: nobody's events but the others'
        source.start_fit(pipeline.catalog)
        assert source.served is not None and source.served.info["window_events"] == held - 3
        assert source.served.info["users"] == 99


async def test_a_fit_in_flight_when_a_user_is_forgotten_is_dropped_and_redone(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, training="background")) as pipeline:
        source = factors_of(pipeline)
        await apply(pipeline, baskets(150))
        await pipeline.settle()
        before = source.served
        assert before is not None
        # a fit of the window as it is now, with u5's events in it
        source.start_fit(pipeline.catalog)
        assert source._fit is not None and not source._fit.done()
        knew_u5 = source._number
        assert await pipeline.forget_user("u5")
        await pipeline.settle()
        served = source.served
        assert served is not None and served.number > knew_u5, "a fit after the forget is served"
        assert knew_u5 not in [fit["version"] for fit in source.fits], "the fit that knew u5 was not installed"
        assert served.info["users"] == 149 and served.info["window_events"] == len(source.window)


async def test_without_implicit_it_is_disabled_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what an install without the ml extra looks like to the importer
    monkeypatch.setitem(sys.modules, "implicit", None)
    monkeypatch.setitem(sys.modules, "implicit.als", None)
    async with running(settings_for(tmp_path)) as pipeline:
        await apply(pipeline, baskets(150))
        source = factors_of(pipeline)
        assert not source.enabled and source.served is None
        assert source.disabled_reason is not None
        assert "pip install 'recsys-agent[ml]'" in source.disabled_reason
        assert 'disabled_plugins = ["factors"]' in source.disabled_reason
        assert source.recsys_candidates_batch([pipeline.make_query("u1", 10)]) is None
        # the other stages serve as before
        assert (await pipeline.recommend("u1")).items


async def test_disabled_by_its_options(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, enabled=False)) as pipeline:
        await apply(pipeline, baskets())
        source = factors_of(pipeline)
        assert not source.enabled and source.served is None and source.seen == 0
        assert source.recsys_candidates_batch([pipeline.make_query("u1", 10)]) is None


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("factors", 0),
        ("training", "later"),
        ("alpha", -1.0),
        ("recency", 0.0),
        ("every_events", 0),
        ("min_interval_s", -1.0),
        ("confidence", "rank"),
    ],
)
def test_bad_options_stop_the_start_with_the_option_named(tmp_path: Path, option: str, value: Any) -> None:
    settings = settings_for(tmp_path, **{option: value})
    with pytest.raises(ConfigError, match=rf"\[plugins.factors\] option '{option}'"):
        asyncio.run(enter(settings))


def test_fold_in_is_implicits_own_user_solve() -> None:
    """The batched numpy solve gives what implicit's recalculate_user gives, user by user."""
    import scipy.sparse
    from implicit.cpu.als import AlternatingLeastSquares

    rng = np.random.default_rng(0)
    options = FactorsOptions(factors=6, iterations=5, alpha=2.0, regularization=0.1)
    n = 2_000
    job = FitJob(
        1, rng.integers(0, 120, n), rng.integers(0, 50, n), rng.choice([1.0, 4.0], n).astype(np.float32), 50, n
    )
    version = fit(job, options)
    model = AlternatingLeastSquares(factors=6, regularization=0.1, alpha=2.0, num_threads=1)
    model.item_factors = version.item_factors.copy()
    histories = [(np.array([1, 7, 9]), np.array([1.0, 4.0, 2.0])), (np.array([3]), np.array([5.0]))]
    ours = fold_in(version, histories, options.regularization, options.alpha)
    for row, (slots, weights) in enumerate(histories):
        user_items = scipy.sparse.csr_matrix((weights, slots, [0, len(slots)]), shape=(1, 50), dtype=np.float32)
        theirs = model.recalculate_user(0, user_items)
        assert np.allclose(ours[row], theirs, rtol=1e-3, atol=1e-4)
