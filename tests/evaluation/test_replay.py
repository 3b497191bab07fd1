"""Prequential replay: metrics checked by hand on a small stream, for the baselines and for a
pipeline of known plugins; then the real plugin set and the command line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from agent.cli.main import build_parser, extra_commands, main
from agent.cli.settings_flags import settings_from_args
from agent.config import Settings, load_settings
from agent.evaluation import replay as replay_module
from agent.evaluation.baselines import DAY_S, ItemKNN, Popularity, rank_of
from agent.evaluation.datasets import DatasetError
from agent.evaluation.events import load_events, select_events
from agent.evaluation.replay import ReplayOptions, batch_bounds, replay
from agent.evaluation.replay_command import inline_training
from agent.hooks.manager import BUILTIN_PLUGINS, get_plugin_manager
from agent.hooks.specs import hookimpl
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.values import Candidates, Query, Scored
from agent.wire.contract import Event, Item
from tests.builders import FIXTURES

G2 = 1 / math.log2(3)  # NDCG gain at rank 2

ITEMS = [Item(id=name, title=f"Item {name}") for name in "ABCDE"]  # catalog order = slots 0..4


def ev(day: float, user: str, item: str, kind: str = "rate", **context: Any) -> Event:
    return Event(
        type=kind,
        user_id=user,
        item_id=item,
        ts=1_000_000.0 + day * DAY_S,
        value=8.0 if kind == "rate" else None,
        context=context,
    )


# The hand-checked stream (k = 2, decayed popularity half-life 1 day). Ranks of the true item
# among the items the user has not seen, ties in catalog order (A B C D E):
#
#  #  day user item   popularity (counts)          decayed (2**-age_days)          item-kNN (co-counts, window)
#  1  0   u1   A      -- no history
#  2  0   u2   A      -- no history
#  3  0   u3   B      -- no history
#  4  1   u1   B      A2 B1 -> B first: 1          A1 B.5 -> B first: 1            {A}: all 0, B first: 1
#  5  2   u4   C      -- no history
#  6  3   u2   C      A2 B2 C1 -> B, C: 2          B.375 C.5 -> C: 1               {A}: B1 -> B, C: 2
#  7  3   u3   E      A2 C2 D0 E0 -> E: 4 (miss)   C1.5 A.25 D0 E0 -> E: 4         {B}: A1, C0 D0 E0 -> E: 4
#  8  4   u3   D      rejected by validation: not evaluated, not learned (else D would pass E in #11)
#  9  4   u1   A      repeat: not evaluated (A still counted: 3)
# 10  4   u4   D      dislike: not evaluated, not counted
# 11  5   u5   A      -- no history (A: 4)
# 12  5   u2   E      B2 E1 D0 -> E: 2             E.25 B.094 D0 -> E: 1           {A,C}: B2 D0 E0 -> E: 3 (miss)
#
# popularity: gains 1, G2, 0, G2 -> hit rate 3/4, NDCG (1 + 2 G2) / 4
# decayed:    gains 1, 1, 0, 1   -> hit rate 3/4, NDCG 3/4
# item-kNN:   gains 1, G2, 0, 0  -> hit rate 2/4, NDCG (1 + G2) / 4
STREAM = [
    ev(0, "u1", "A"),
    ev(0, "u2", "A"),
    ev(0, "u3", "B"),
    ev(1, "u1", "B"),
    ev(2, "u4", "C"),
    ev(3, "u2", "C"),
    ev(3, "u3", "E"),
    ev(4, "u3", "D", reject=True),
    ev(4, "u1", "A"),
    ev(4, "u4", "D", kind="dislike"),
    ev(5, "u5", "A"),
    ev(5, "u2", "E"),
]
EXPECTED = {
    "popularity": (3 / 4, (1 + 2 * G2) / 4),
    "decayed_popularity": (3 / 4, 3 / 4),
    "item_knn": (2 / 4, (1 + G2) / 4),
}


class RejectMarked:
    """Validation: refuses events whose context says so."""

    @hookimpl
    def recsys_validate_event(self, event: Event) -> str | None:
        return "marked for rejection" if event.context.get("reject") else None


class CountSource:
    """A candidate source that is popularity by another hand: counts of positive events, ties
    in slot order. The pipeline built on it must score exactly like the popularity baseline."""

    def __init__(self) -> None:
        self.counts = np.zeros(16)

    @hookimpl
    def recsys_apply_event(self, event: Event, slot: int) -> None:
        if event.type not in ("dislike", "skip"):
            self.counts[slot] += 1

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates:
        slots = [s for s in range(query.catalog.size) if s not in query.exclude and query.catalog.active[s]]
        slots.sort(key=lambda s: (-self.counts[s], s))
        return Candidates("count", np.array(slots), np.array([self.counts[s] - 1e-3 * s for s in slots]))


class AlwaysE:
    """Proposes item E with score 0, so it shares the credit for hits on E without moving it."""

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates | None:
        slot = query.catalog.slot("E")
        if slot is None or slot in query.exclude:
            return None
        return Candidates("always_e", np.array([slot]), np.array([0.0]))


class SumFusion:
    @hookimpl
    def recsys_fuse(self, query: Query, candidates: list[Candidates]) -> list[Scored]:
        merged: dict[int, Scored] = {}
        for cands in candidates:
            for slot, score in zip(cands.slots.tolist(), cands.scores.tolist()):
                entry = merged.setdefault(slot, Scored(slot=slot, score=0.0))
                entry.score += score
                entry.sources.append(cands.source)
        return sorted(merged.values(), key=lambda s: -s.score)


async def run_stream(
    tmp_path: Path, plugins: list[tuple[str, Any]], disabled: list[str], events: list[Event] = STREAM, **options: Any
) -> Any:
    settings = load_settings(
        env={},
        overrides={
            "load_entry_points": False,
            "data_dir": str(tmp_path),
            "disabled_plugins": disabled,
        },
    )
    pipeline = Pipeline(settings, get_plugin_manager(settings, plugins))
    async with pipeline.running():
        return await replay(pipeline, ITEMS, events, ReplayOptions(progress=False, **options))


# Batches of STREAM at any size from 5 up (a user's second event ends one): #1-3, #4-7, #8-12.
# The pipeline's ranks are those of the table all the same: #6 ranks C second behind B in
# either case, and #12 sees A2 B2 C2 E1 instead of A4 B2 C2 E1 (A is excluded for u2).
@pytest.mark.parametrize("batch", [1, 8])
async def test_baselines_and_a_known_pipeline_match_the_hand_computed_metrics(tmp_path: Path, batch: int) -> None:
    plugins = [
        ("reject_marked", RejectMarked()),
        ("count", CountSource()),
        ("always_e", AlwaysE()),
        ("sum", SumFusion()),
    ]
    result = await run_stream(
        tmp_path,
        plugins,
        disabled=list(BUILTIN_PLUGINS),
        k=2,
        half_life_s=DAY_S,
        knn_similarity="count",
        batch=batch,
    )
    report = result.report()

    assert report["batch"] == batch
    assert report["mean_batch"] == (1.0 if batch == 1 else 4.0)
    assert report["events"] == 12
    assert report["evaluated"] == 4
    assert report["counts"] == {
        "applied": 11,
        "rejected": 1,
        "duplicates": 0,
        "no_history": 5,
        "repeats": 1,
        "negative_feedback": 1,
        "not_in_catalog": 0,
    }
    for name, (hit_rate, ndcg) in EXPECTED.items():
        assert report["baselines"][name] == {"hit_rate@2": pytest.approx(hit_rate), "ndcg@2": pytest.approx(ndcg)}, name
    # the pipeline's only ranking source is popularity in disguise
    assert report["metrics"] == {"hit_rate@2": pytest.approx(3 / 4), "ndcg@2": pytest.approx((1 + 2 * G2) / 4)}
    # three hits (B, C, E); always_e proposed only E
    assert report["sources"] == {
        "always_e": {"share_of_hits": pytest.approx(1 / 3), "hits": 1},
        "count": {"share_of_hits": 1.0, "hits": 3},
    }
    assert report["latency_ms"]["p50"] > 0 and report["latency_ms"]["p99"] >= report["latency_ms"]["p50"]
    assert report["events_per_s"] > 0
    assert len(result.latency_ms) == 4


# A stream on which batching changes what the pipeline sees (k = 2; counts by CountSource;
# ties in slot order A B C D E; A is excluded for both users):
#  #  user item  one at a time             batches of 2: 1-2, 3-4, 5     batches of 3 or more: 1-3, 4-5
#  1  u1   A     -- no history
#  2  u2   A     -- no history
#  3  u3   D     -- no history
#  4  u1   C     A2 D1: D B C -> 3rd, miss  A2 (#3 not applied): B C -> 2nd  A2 D1: D B C -> 3rd, miss
#  5  u2   C     A2 C1 D1: C 1st            A2 C1 D1: C 1st                   A2 D1 (#4 not applied): miss
BATCH_STREAM = [ev(0, "u1", "A"), ev(0, "u2", "A"), ev(0, "u3", "D"), ev(1, "u1", "C"), ev(1, "u2", "C")]


@pytest.mark.parametrize(
    ("batch", "gains", "batches"), [(1, [0.0, 1.0], 5), (2, [G2, 1.0], 3), (3, [0.0, 0.0], 2), (32, [0.0, 0.0], 2)]
)
async def test_a_batch_is_ranked_before_any_of_its_events_is_applied(
    tmp_path: Path, batch: int, gains: list[float], batches: int
) -> None:
    plugins = [("count", CountSource()), ("sum", SumFusion())]
    result = await run_stream(
        tmp_path, plugins, disabled=list(BUILTIN_PLUGINS), events=BATCH_STREAM, k=2, batch=batch, baselines=()
    )
    report = result.report()
    assert report["evaluated"] == 2 and report["counts"]["applied"] == 5
    assert result.pipeline.ndcg[:2].tolist() == pytest.approx(gains)
    assert result.batches == batches and report["batch"] == batch
    assert report["mean_batch"] == pytest.approx(5 / batches, abs=0.01)


def test_batches_are_runs_of_distinct_users_up_to_the_size() -> None:
    events = [ev(day, user, "A") for day, user in enumerate(["a", "b", "c", "a", "d", "e", "f", "g", "g"])]
    assert list(batch_bounds(events, 3)) == [(0, 3), (3, 6), (6, 8), (8, 9)]
    assert list(batch_bounds(events, 1)) == [(i, i + 1) for i in range(9)]
    assert list(batch_bounds(events, 32)) == [(0, 3), (3, 8), (8, 9)]
    assert list(batch_bounds([], 4)) == []
    # in one instant g's two events are one step (a basket), so one batch holds both
    tied = [ev(0, event.user_id, "A") for event in events]
    assert list(batch_bounds(tied, 32)) == [(0, 3), (3, 9)]
    assert list(batch_bounds(tied, 32, "order")) == [(0, 3), (3, 8), (8, 9)]


async def test_baselines_in_a_second_process_score_the_same(tmp_path: Path) -> None:
    result = await run_stream(
        tmp_path,
        [("reject_marked", RejectMarked())],
        disabled=list(BUILTIN_PLUGINS),
        k=2,
        half_life_s=DAY_S,
        knn_similarity="count",
        baselines_process=True,
    )
    report = result.report()
    for name, (hit_rate, ndcg) in EXPECTED.items():
        assert report["baselines"][name] == {"hit_rate@2": pytest.approx(hit_rate), "ndcg@2": pytest.approx(ndcg)}, name
    assert "baselines_in_parallel" in report["time_s"] and "baselines" not in report["time_s"]


async def test_cosine_item_knn_and_k_other_than_ten(tmp_path: Path) -> None:
    # With one window item cosine only rescales columns by 1/sqrt(n_j); in #12 B still leads
    # (B2 -> 2/(sqrt3*sqrt2) > 0) and D, E stay at 0, so the ranks are those of the table.
    result = await run_stream(
        tmp_path,
        [("reject_marked", RejectMarked())],
        disabled=list(BUILTIN_PLUGINS),
        k=3,
        half_life_s=DAY_S,
        baselines=("item_knn",),
    )
    report = result.report()
    # k = 3: gains 1, G2, 0 (rank 4), 1/log2(4) = 0.5 (rank 3)
    assert report["baselines"] == {
        "item_knn": {"hit_rate@3": pytest.approx(3 / 4), "ndcg@3": pytest.approx((1 + G2 + 0.5) / 4)}
    }
    # no source at all: the pipeline recommends nothing and misses everything
    assert report["metrics"] == {"hit_rate@3": 0.0, "ndcg@3": 0.0}
    assert report["sources"] == {}


def test_rank_of_orders_by_score_then_catalog_order_without_the_excluded() -> None:
    scores = np.array([3.0, 1.0, 5.0, 1.0, 1.0, 0.0])
    # ahead of slot 3: 0 (3.0), 2 (5.0), 1 (tie, earlier); 2 is excluded
    assert rank_of(scores, 3, np.array([2])) == 3
    assert rank_of(scores, 3, np.array([], dtype=np.int64)) == 4
    # with k, a rank known to be beyond k comes back as k + 1
    assert rank_of(scores, 5, np.array([], dtype=np.int64), k=2) == 3
    assert rank_of(scores, 5, np.array([], dtype=np.int64)) == 6


def test_item_knn_counts_cooccurrence_within_the_window_only() -> None:
    knn = ItemKNN(4, window=2, similarity="count")
    for item in (0, 1, 2):
        knn.observe(7, item, 0.0)
    # 2 was paired with 0 and 1 (window 2), 1 with 0; 0 dropped out of the window
    assert knn.cooccurrence.tolist() == [[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert knn.scores(7, 0.0).tolist() == [2.0, 1.0, 1.0, 0.0]
    assert knn.scores(8, 0.0).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="leave item_knn out"):
        ItemKNN(40_000)
    popularity = Popularity(3)
    popularity.observe("u", 2, 0.0)
    assert popularity.scores("u", 0.0).tolist() == [0.0, 0.0, 1.0]


async def test_the_live_plugin_set_replays_a_converted_dataset(tmp_path: Path) -> None:
    # The agent's own plugins (the embedding source aside: it loads a model, too slow for a
    # unit test). The figures depend on the plugins; the harness must hold whatever they are.
    from agent.evaluation.datasets import convert, read_items

    convert("movielens", FIXTURES / "movielens-100k-mini", tmp_path / "ml")
    items, events = read_items(tmp_path / "ml" / "items.jsonl"), load_events(tmp_path / "ml" / "events.jsonl")
    settings = load_settings(
        env={}, overrides={"load_entry_points": False, "data_dir": str(tmp_path), "disabled_plugins": ["content"]}
    )
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    async with pipeline.running():
        report = (await replay(pipeline, items, events, ReplayOptions(progress=False))).report()
    assert report["events"] == 8
    # 196 and 22 have history before their later events; 186's two events are one basket, its first,
    # and so are 22's first two
    assert report["evaluated"] == 2
    assert 0.0 <= report["metrics"]["ndcg@10"] <= report["metrics"]["hit_rate@10"] <= 1.0
    assert set(report["baselines"]) == {"popularity", "decayed_popularity", "item_knn", "als"}
    assert all(0.0 <= s["share_of_hits"] <= 1.0 for s in report["sources"].values())


def test_select_events_samples_users_stably_then_limits() -> None:
    events = [ev(i, f"user{i % 50}", "A") for i in range(500)]
    half = select_events(events, sample_users=0.5)
    assert 100 < len(half) < 400
    kept_users = {e.user_id for e in half}
    # every event of a kept user is kept, and the choice does not depend on the order
    assert len(half) == 10 * len(kept_users)
    assert {e.user_id for e in select_events(events[::-1], sample_users=0.5)} == kept_users
    assert select_events(events, limit=7) == events[:7]


def test_bad_event_lines_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b'{"type": "rate", "user_id": "1", "item_id": "A", "ts": 5, "value": 3}\n\n{"type": "rate", "user_id"\n'
    )
    with pytest.raises(DatasetError, match=rf"{path}:3: invalid JSON"):
        load_events(path)
    path.write_bytes(b'{"type": "rate", "user_id": "1", "item_id": "A", "ts": 5}\n')
    with pytest.raises(DatasetError, match=rf"{path}:1: invalid event: a 'rate' event needs a numeric 'value'"):
        load_events(path)
    path.write_bytes(b'{"type": "view", "user_id": "1", "item_id": "A"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:1: invalid event: missing field 'ts'"):
        load_events(path)


def test_replay_command_writes_report_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    assert (
        main(["dataset", "convert", "--format", "movietweetings", str(FIXTURES / "movietweetings-mini"), str(tmp_path)])
        == 0
    )
    config = tmp_path / "replay.toml"
    config.write_text('disabled_plugins = ["content"]\nload_entry_points = false\n')
    report_path, plot_path = tmp_path / "out" / "report.json", tmp_path / "out" / "report.png"
    code = main(
        [
            "replay",
            "--items",
            str(tmp_path / "items.jsonl"),
            "--events",
            str(tmp_path / "events.jsonl"),
            "--k",
            "5",
            "--report",
            str(report_path),
            "--plot",
            str(plot_path),
            "--config",
            str(config),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| pipeline |" in out and "| decayed_popularity |" in out and "events/s" in out
    report = orjson.loads(report_path.read_bytes())
    assert report["k"] == 5 and report["events"] == 7
    # users 9 and 1 each have one event after their first (user 2's two events are one basket)
    assert report["evaluated"] == 2
    assert set(report["metrics"]) == {"hit_rate@5", "ndcg@5"}
    assert {"p50", "p99"} <= set(report["latency_ms"])
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("batch", ["1", "8"])
def test_replay_command_runs_in_batches_and_reports_their_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, batch: str
) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    fixture = ["--format", "movietweetings", str(FIXTURES / "movietweetings-mini"), str(tmp_path)]
    assert main(["dataset", "convert", *fixture]) == 0
    config = tmp_path / "replay.toml"
    config.write_text('disabled_plugins = ["content"]\nload_entry_points = false\n')
    files = ["--items", str(tmp_path / "items.jsonl"), "--events", str(tmp_path / "events.jsonl")]
    report_path = tmp_path / "report.json"
    flags = ["--config", str(config), "--report", str(report_path), "--no-progress", "--batch", batch]
    assert main(["replay", *files, *flags]) == 0
    assert f"at batch {batch} (mean" in capsys.readouterr().out
    report = orjson.loads(report_path.read_bytes())
    # the same events are evaluated whatever the batch: only what the pipeline knows differs
    assert report["batch"] == int(batch) and report["events"] == 7 and report["evaluated"] == 2
    if batch == "1":
        assert report["mean_batch"] == 1.0
    else:
        assert report["mean_batch"] > 1.0


def test_replay_command_reports_bad_input_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_bytes(b'{"id": "A", "title": "A"}\n{"id": "B"}\n')
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"type": "view", "user_id": "1", "item_id": "A", "ts": 1}\n')
    assert main(["replay", "--items", str(items), "--events", str(events), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{items}:2: invalid item: missing field 'title'" in err
    assert "Traceback" not in err
    assert main(["replay", "--items", str(items), "--events", str(events), "--baselines", "nope", "--no-progress"]) == 2
    assert "unknown baseline(s) nope" in capsys.readouterr().err
    assert main(["replay", "--items", str(items), "--events", str(events), "--batch", "0", "--no-progress"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
    # an id that is a digit to str.isdigit but not a number
    events.write_bytes('{"type": "view", "user_id": "\u00b2", "item_id": "A", "ts": 1}\n'.encode())
    items.write_bytes(b'{"id": "A", "title": "A"}\n')
    config = tmp_path / "plain.toml"
    config.write_text('disabled_plugins = ["content"]\nload_entry_points = false\n')
    assert (
        main(["replay", "--items", str(items), "--events", str(events), "--config", str(config), "--no-progress"]) == 0
    )
    capsys.readouterr()


def test_a_replay_whose_stage_cannot_start_stops_instead_of_scoring_less(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_bytes(b'{"id": "A", "title": "A"}\n{"id": "B", "title": "B"}\n')
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"type": "view", "user_id": "1", "item_id": "A", "ts": 1}\n')
    config = tmp_path / "replay.toml"
    config.write_text("load_entry_points = false\n")
    # a model that is not installed here: content retrieval cannot start
    code = main(
        [
            "replay",
            "--items",
            str(items),
            "--events",
            str(events),
            "--config",
            str(config),
            "--embedding-model",
            "no-such-org/no-such-model",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "content retrieval could not start" in err and "Traceback" not in err


def test_item_knn_too_large_is_refused_before_the_catalog_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ItemKNN, "MAX_MATRIX_BYTES", 4 * 2 * 2)
    items = tmp_path / "items.jsonl"
    items.write_bytes(b'{"id": "A", "title": "A"}\n{"id": "B", "title": "B"}\n{"id": "C", "title": "C"}\n')
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"type": "view", "user_id": "1", "item_id": "A", "ts": 1}\n')
    loaded: list[int] = []
    monkeypatch.setattr(replay_module, "load_catalog", lambda *args, **kwargs: loaded.append(1))
    assert main(["replay", "--items", str(items), "--events", str(events), "--no-progress"]) == 2
    assert "item_knn needs" in capsys.readouterr().err and not loaded


def test_replay_takes_the_pipeline_settings_but_not_the_agent_data_dir_or_log_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = build_parser(extra_commands())
    files = ["replay", "--items", "items.jsonl", "--events", "events.jsonl"]
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "agent"))
    monkeypatch.setenv("RECSYS_LOG_LEVEL", "DEBUG")
    scratch = {"data_dir": str(tmp_path / "scratch")}
    settings = settings_from_args(parser.parse_args([*files, "--embedding-model", "some-model"]), defaults=scratch)
    assert settings.data_dir == tmp_path / "scratch" and settings.log_level == "WARNING"
    assert settings.embedding_model == "some-model"
    flags = [*files, "--data-dir", str(tmp_path / "kept"), "--log-level", "INFO"]
    settings = settings_from_args(parser.parse_args(flags), defaults=scratch)
    assert settings.data_dir == tmp_path / "kept" and settings.log_level == "INFO"
    # an in-process replay has no NATS and no HTTP API to configure
    for flag in ("--nats-url", "--http-port"):
        with pytest.raises(SystemExit):
            parser.parse_args([*files, flag, "1"])


def test_profile_charges_library_time_to_the_project_function_that_called_it() -> None:
    from types import SimpleNamespace

    from agent.evaluation.profiling import time_by_module

    rank = ("/src/agent/evaluation/baselines.py", 26, "rank_of")
    fuse = ("/src/plugins/fusion.py", 138, "recsys_fuse")
    rerank = ("/src/plugins/rerankers.py", 87, "recsys_rerank")
    sort = ("/venv/lib/site-packages/numpy/_core/fromnumeric.py", 10, "sort")
    count = ("~", 0, "<built-in method numpy.count_nonzero>")
    argsort = ("~", 0, "<method 'argsort' of 'numpy.ndarray' objects>")
    # function -> (calls, primitive calls, own time, cumulative time, callers: {caller: (.., .., own, cumulative)})
    table = {
        rank: (1, 1, 1.0, 9.0, {}),
        fuse: (1, 1, 1.0, 7.0, {}),
        rerank: (1, 1, 0.5, 3.5, {}),
        count: (1, 1, 8.0, 8.0, {rank: (1, 1, 8.0, 8.0)}),
        # numpy's Python wrapper, called 3 s worth by fusion and 1 s by the reranker
        sort: (2, 2, 1.0, 4.0, {fuse: (1, 1, 0.75, 3.0), rerank: (1, 1, 0.25, 1.0)}),
        argsort: (2, 2, 3.0, 3.0, {sort: (2, 2, 3.0, 3.0)}),
    }
    by_module = time_by_module(SimpleNamespace(stats=table))  # type: ignore[arg-type]
    assert by_module == {
        "harness: agent/evaluation/baselines.py": pytest.approx(9.0),
        "plugins/fusion.py": pytest.approx(1.0 + 0.75 * (1.0 + 3.0)),
        "plugins/rerankers.py": pytest.approx(0.5 + 0.25 * (1.0 + 3.0)),
    }


def test_the_shortcut_for_popularity_misses_changes_no_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.evaluation.baselines import APPLIED, EVALUATED, BaselineConfig, BaselineEvaluator, StreamArrays

    rng = np.random.default_rng(7)
    n_events, n_items = 4_000, 300
    stream = StreamArrays(
        users=rng.integers(0, 150, n_events),
        # skewed, so that popular items are often hits and the tail often misses
        items=np.minimum(rng.zipf(1.3, n_events) - 1, n_items - 1),
        # ten days with a one-hour half-life: the decayed weights are rescaled several times
        ts=np.sort(rng.uniform(0, 10 * DAY_S, n_events)),
        negative=rng.random(n_events) < 0.05,
    )
    seen: dict[int, set[int]] = {}
    verdicts = bytearray()
    for user, item in zip(stream.users.tolist(), stream.items.tolist()):
        verdicts.append(EVALUATED if user in seen and item not in seen[user] else APPLIED)
        seen.setdefault(user, set()).add(item)
    config = BaselineConfig(names=("popularity", "decayed_popularity"), n_items=n_items, k=10, half_life_s=3600.0)

    def ranks(top_size: int) -> tuple[dict[str, list[int]], int]:
        monkeypatch.setattr(BaselineEvaluator, "TOP_SIZE", top_size)
        monkeypatch.setattr(BaselineEvaluator, "TOP_REFRESH", 64)
        evaluator = BaselineEvaluator(config, stream)
        evaluator.feed(bytes(verdicts))
        return {name: r.tolist() for name, r in evaluator.results().ranks.items()}, evaluator.shortcut_misses

    exact, unused = ranks(top_size=0)
    shortcut, used = ranks(top_size=64)
    assert unused == 0 and used > 1_000
    assert shortcut == exact
    assert evaluator_rescaled(config, stream)


def evaluator_rescaled(config: Any, stream: Any) -> bool:
    from agent.evaluation.baselines import DecayedPopularity

    decayed = DecayedPopularity(config.n_items, config.half_life_s)
    for item, ts in zip(stream.items.tolist(), stream.ts.tolist()):
        decayed.observe(0, item, ts)
    return decayed.scale_generation > 1


def test_a_replay_trains_background_models_inline_unless_configured_otherwise() -> None:
    settings = Settings(plugins={"sequence": {"training": "background", "enabled": True}, "fusion": {}})
    replayed = inline_training(settings)
    assert replayed.plugins["factors"] == {"training": "inline"}
    assert replayed.plugins["sequence"] == {"training": "background", "enabled": True}, "the configuration wins"
    assert settings.plugins == {"sequence": {"training": "background", "enabled": True}, "fusion": {}}, "unchanged"
