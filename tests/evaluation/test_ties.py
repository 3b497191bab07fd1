"""The tie protocol: a user's events with one timestamp (a basket) are one step, ranked once before
any of them is applied; ``ties="order"`` keeps one event per step for comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from agent.cli.main import main
from agent.evaluation.baselines import BaselineProcess, ItemKNN
from agent.evaluation.events import shuffle_ties
from agent.evaluation.replay import batch_bounds, step_bounds
from agent.hooks.manager import BUILTIN_PLUGINS
from tests.builders import FIXTURES
from tests.evaluation.test_replay import G2, CountSource, SumFusion, ev, run_stream

# k = 2; CountSource ranks by counts of positive events, ties in slot order (A B C D E), the
# user's seen items excluded; the popularity baseline ranks the same way.
#
#  step        basket: one list per step                  order: one event per step
#  u1 A, u2 A  -- no history
#  u3 B C      -- no history (u3's first basket)           C: u3 saw B; A2 B1 -> A, C: 2nd
#  u1 B C D    A2 B1 C1, A seen: list B C                  B: B1 C1 -> 1st; C (B2 now): C1 D0 -> 1st;
#              -> B 1st, C 2nd, D missed                   D (C2): D0 E0 -> 1st
BASKETS = [
    ev(0, "u1", "A"),
    ev(0, "u2", "A"),
    ev(1, "u3", "B"),
    ev(1, "u3", "C"),
    ev(2, "u1", "B"),
    ev(2, "u1", "C"),
    ev(2, "u1", "D"),
]
# u1's basket in the opposite order: in order mode D is ranked first (B1 C1 D0: 3rd, a miss),
# then C (B1 C1 -> 2nd), then B (C and D seen now: B1 E0 -> 1st)
REVERSED = BASKETS[:4] + BASKETS[4:][::-1]


def count_pipeline() -> list[tuple[str, Any]]:
    return [("count", CountSource()), ("sum", SumFusion())]


async def replay_gains(tmp_path: Path, events: list[Any], ties: str, **options: Any) -> tuple[list[float], Any]:
    result = await run_stream(
        tmp_path,
        count_pipeline(),
        disabled=list(BUILTIN_PLUGINS),
        events=events,
        k=2,
        ties=ties,
        baselines=("popularity",),
        **options,
    )
    return result.pipeline.ndcg[: result.pipeline.count].tolist(), result


def assert_same_figures(report: dict[str, Any], expected: dict[str, Any]) -> None:
    """The same metrics for the pipeline and every baseline (up to float32 rounding: the same
    gains summed in another order)."""
    assert report["metrics"] == pytest.approx(expected["metrics"])
    assert set(report["baselines"]) == set(expected["baselines"])
    for name, metrics in expected["baselines"].items():
        assert report["baselines"][name] == pytest.approx(metrics), name


@pytest.mark.parametrize("batch", [1, 32])
async def test_a_basket_is_scored_against_one_list_ranked_before_any_of_it_is_applied(
    tmp_path: Path, batch: int
) -> None:
    gains, result = await replay_gains(tmp_path, BASKETS, "basket", batch=batch)
    report = result.report()
    # u3's first basket is not evaluated at all: u3 had no history before it
    assert gains == pytest.approx([1.0, G2, 0.0])
    assert report["ties"] == "basket" and report["steps"] == 4 and report["lists"] == 1
    assert report["mean_step"] == pytest.approx(7 / 4)
    assert report["counts"]["no_history"] == 4 and report["evaluated"] == 3
    # the baseline ranks each step once too: here it is the pipeline by another hand
    assert report["baselines"]["popularity"] == report["metrics"]


@pytest.mark.parametrize("batch", [1, 32])
async def test_the_order_inside_a_basket_does_not_change_the_scores(tmp_path: Path, batch: int) -> None:
    forward, first = await replay_gains(tmp_path / "forward", BASKETS, "basket", batch=batch)
    backward, second = await replay_gains(tmp_path / "backward", REVERSED, "basket", batch=batch)
    # the same list scores the same items, whatever order they come in
    assert backward == forward[::-1]
    assert_same_figures(second.report(), first.report())


async def test_ties_in_order_score_each_event_after_the_ones_before_it(tmp_path: Path) -> None:
    forward, result = await replay_gains(tmp_path / "forward", BASKETS, "order")
    report = result.report()
    assert forward == pytest.approx([G2, 1.0, 1.0, 1.0])
    assert report["ties"] == "order" and report["steps"] == 7 and report["lists"] == 4
    assert report["baselines"]["popularity"] == report["metrics"]
    # ... so the order inside a basket changes what is measured: the artifact basket ties remove
    backward, _ = await replay_gains(tmp_path / "backward", REVERSED, "order")
    assert backward == pytest.approx([G2, 0.0, G2, 1.0])


async def test_an_item_twice_in_one_basket_is_scored_once(tmp_path: Path) -> None:
    # two invoices of u1 in one minute that both hold C
    events = [*BASKETS[:4], ev(2, "u1", "C"), ev(2, "u1", "C", invoice="2"), ev(2, "u1", "B")]
    gains, result = await replay_gains(tmp_path, events, "basket")
    assert gains == pytest.approx([G2, 1.0])
    assert result.report()["counts"]["repeats"] == 1


async def test_baselines_in_a_second_process_wait_for_a_whole_basket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chunks of 2 verdicts cut every basket of the stream in two
    monkeypatch.setattr(BaselineProcess, "CHUNK", 2)
    _, inline = await replay_gains(tmp_path / "inline", BASKETS, "basket")
    _, beside = await replay_gains(tmp_path / "process", BASKETS, "basket", baselines_process=True)
    assert beside.report()["baselines"] == inline.report()["baselines"]


async def test_no_baseline_learns_anything_from_the_order_inside_a_basket(tmp_path: Path) -> None:
    # 40 baskets of 1 to 6 of the 5 items for 8 users over 10 days
    rng = np.random.default_rng(4)
    events = [
        ev(day, f"u{user}", item)
        for day in range(10)
        for user in rng.choice(8, size=4, replace=False)
        for item in sorted(rng.choice(list("ABCDE"), size=rng.integers(1, 6), replace=False))
    ]
    options = {"k": 2, "ties": "basket", "als_every": 7, "als_factors": 2, "knn_window": 2}
    results = []
    for seed in (None, 1, 2):
        stream = events if seed is None else shuffle_ties(events, seed)
        assert seed is None or stream != events
        result = await run_stream(
            tmp_path / str(seed), count_pipeline(), disabled=list(BUILTIN_PLUGINS), events=stream, **options
        )
        results.append(result.report())
    assert results[0]["evaluated"] > 10 and results[0]["baseline_training"]["als"]["fits"] > 5
    for report in results[1:]:
        assert_same_figures(report, results[0])
    # one event a step, the same shuffles change what is measured
    options["ties"] = "order"
    in_order = [
        (
            await run_stream(tmp_path / f"order{seed}", [], disabled=list(BUILTIN_PLUGINS), events=stream, **options)
        ).report()["baselines"]
        for seed, stream in ((0, events), (1, shuffle_ties(events, 1)))
    ]
    assert in_order[0] != in_order[1]


def test_item_knn_pairs_a_basket_as_a_set() -> None:
    ordered, reversed_ = ItemKNN(5, window=2, similarity="count"), ItemKNN(5, window=2, similarity="count")
    for knn, basket in ((ordered, [1, 2, 3]), (reversed_, [3, 2, 1])):
        knn.observe("u", 0, 0.0)
        knn.observe_step("u", basket, 1.0)
    # 0 (the window before) and the basket's items are all pairs, whatever the order
    expected = [[0, 1, 1, 1, 0], [1, 0, 1, 1, 0], [1, 1, 0, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert ordered.cooccurrence.tolist() == reversed_.cooccurrence.tolist() == expected
    assert list(ordered.recent["u"]) == list(reversed_.recent["u"]) == [2, 3]


def test_steps_are_a_users_events_with_one_timestamp_and_batches_hold_distinct_users() -> None:
    users = ["a", "b", "b", "c", "a", "a", "d", "b"]
    days = [0, 0, 0, 0, 0, 1, 1, 1]
    events = [ev(day, user, "A") for user, day in zip(users, days)]
    # a t0 | b b t0 | c t0 | a t0 | a t1 | d t1 | b t1
    assert list(step_bounds(events)) == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    assert list(step_bounds(events, "order")) == [(i, i + 1) for i in range(8)]
    # at most 2 steps (lists) a batch, and a user's second step starts a new batch
    assert list(batch_bounds(events, 2)) == [(0, 3), (3, 5), (5, 7), (7, 8)]
    assert list(batch_bounds(events, 32)) == [(0, 4), (4, 5), (5, 8)]
    assert list(batch_bounds(events, 2, "order")) == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 8)]
    with pytest.raises(ValueError, match="ties must be one of basket, order"):
        list(step_bounds(events, "random"))


def test_shuffling_ties_moves_events_only_inside_a_users_timestamp() -> None:
    events = [ev(0, "u1", item) for item in "ABCDE"] + [ev(0, "u2", "A"), ev(1, "u1", "A"), ev(1, "u1", "B")]
    shuffled = shuffle_ties(events, seed=3)
    assert shuffled != events
    assert sorted(shuffled[:5], key=lambda e: e.item_id or "") == events[:5]
    assert shuffled[5] == events[5] and set(map(id, shuffled[6:])) == set(map(id, events[6:]))
    assert shuffle_ties(events, seed=3) == shuffled


def test_the_command_runs_both_tie_protocols_and_says_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    fixture = ["--format", "movietweetings", str(FIXTURES / "movietweetings-mini"), str(tmp_path)]
    assert main(["dataset", "convert", *fixture]) == 0
    config = tmp_path / "replay.toml"
    config.write_text('disabled_plugins = ["content"]\nload_entry_points = false\n')
    files = ["--items", str(tmp_path / "items.jsonl"), "--events", str(tmp_path / "events.jsonl")]
    reports = {}
    for ties in ("basket", "order"):
        path = tmp_path / f"{ties}.json"
        flags = ["--config", str(config), "--report", str(path), "--no-progress", "--ties", ties, "--shuffle-ties", "1"]
        assert main(["replay", *files, *flags]) == 0
        out = capsys.readouterr().out
        assert f"ties: {ties} (" in out and "pipeline / best baseline (" in out
        reports[ties] = orjson.loads(path.read_bytes())
    assert reports["basket"]["ties"] == "basket" and reports["order"]["ties"] == "order"
    assert reports["basket"]["rules"]["steps"] != reports["order"]["rules"]["steps"]
    assert reports["basket"]["shuffled_ties_seed"] == 1
    for report in reports.values():
        assert set(report["intervals"]["ndcg"]) == {"pipeline", *report["baselines"]}
        assert report["ratio_to_best_baseline"] == report["intervals"]["ratio_to_best_baseline"]
    with pytest.raises(SystemExit) as refused:
        main(["replay", *files, "--ties", "random", "--no-progress"])
    assert refused.value.code == 2 and "invalid choice: 'random'" in capsys.readouterr().err
