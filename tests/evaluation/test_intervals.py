"""Paired bootstrap intervals: known cases, and what pairing buys."""

from __future__ import annotations

import numpy as np
import pytest

from agent.evaluation.intervals import paired_bootstrap

N_EVENTS, N_USERS = 6_000, 400


def stream(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users, a baseline's NDCG per event (a hit one time in five, users of unequal skill), and
    a uniform draw per event to build other systems from."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, N_EVENTS)
    skill = rng.uniform(0.05, 0.35, N_USERS)[users]
    hits = rng.random(N_EVENTS) < skill
    baseline = np.where(hits, 1.0 / np.log2(rng.integers(2, 12, N_EVENTS)), 0.0)
    return users, baseline, rng.random(N_EVENTS)


def test_identical_systems_have_ratio_one_with_an_interval_around_it() -> None:
    users, baseline, _ = stream()
    result = paired_bootstrap(baseline.copy(), {"popularity": baseline}, users)
    assert result.best_baseline == "popularity" and result.users == N_USERS
    assert result.ratio is not None
    assert result.ratio.value == pytest.approx(1.0)
    assert result.ratio.low == pytest.approx(1.0) and result.ratio.high == pytest.approx(1.0)
    point = result.ndcg["pipeline"]
    assert point.value == pytest.approx(baseline.mean()) and point.low < point.value < point.high


def test_a_clearly_better_system_has_a_ratio_interval_above_one() -> None:
    users, baseline, draw = stream()
    # the baseline's hits, plus a hit at rank 1 on 1.5 % of the events it missed
    better = np.where((baseline == 0) & (draw < 0.015), 1.0, baseline)
    result = paired_bootstrap(better, {"item_knn": baseline}, users)
    assert result.ratio is not None
    assert 1.0 < result.ratio.low < result.ratio.value < result.ratio.high
    # Unpaired, the two systems' own intervals overlap: pairing is what separates them.
    assert result.ndcg["pipeline"].low < result.ndcg["item_knn"].high


def test_a_worse_system_is_below_one_and_the_bar_is_the_best_baseline_of_each_resample() -> None:
    users, baseline, draw = stream(1)
    worse = np.where(draw < 0.5, baseline, 0.0)
    # two baselines so close that either may be the better in a resample
    twin = np.where(draw < 0.01, 0.0, baseline)
    result = paired_bootstrap(worse, {"a": twin, "b": baseline}, users, seed=5)
    assert result.best_baseline == "b"
    assert result.ratio is not None and result.ratio.high < 1.0
    # against the maximum of both the ratio cannot be higher than against either one
    alone = paired_bootstrap(worse, {"b": baseline}, users, seed=5)
    assert alone.ratio is not None and result.ratio.high <= alone.ratio.high + 1e-12
    # the same seed gives the same interval
    again = paired_bootstrap(worse, {"a": twin, "b": baseline}, users, seed=5)
    assert again.ratio == result.ratio


def test_resampling_users_widens_the_interval_of_clustered_scores() -> None:
    # every user either always hits or never does: 40 users, 150 events each
    users = np.repeat(np.arange(40), 150)
    scores = (users % 2).astype(np.float64)
    by_user = paired_bootstrap(scores, {}, users).ndcg["pipeline"]
    by_event = paired_bootstrap(scores, {}, np.arange(len(users))).ndcg["pipeline"]
    assert by_user.high - by_user.low > 5 * (by_event.high - by_event.low)


def test_edge_cases_give_no_figure_instead_of_a_crash() -> None:
    empty = np.zeros(0)
    result = paired_bootstrap(empty, {"popularity": empty}, empty.astype(np.int64))
    assert result.ratio is None and result.users == 0
    # a baseline that never hits: the ratio has no finite value, and its JSON says so
    users = np.arange(10)
    result = paired_bootstrap(np.ones(10), {"popularity": np.zeros(10)}, users)
    assert result.to_dict()["ratio_to_best_baseline"] == {"value": None, "low": None, "high": None}
    with pytest.raises(ValueError, match="3 scores for 10 evaluated events"):
        paired_bootstrap(np.ones(10), {"popularity": np.zeros(3)}, users)
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(np.ones(10), {}, users, resamples=0)
