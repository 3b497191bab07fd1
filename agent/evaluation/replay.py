"""``recsys-agent replay``: prequential evaluation of the live pipeline against simple baselines.

Events are replayed in time order (ties by user, then item) through the same plugin pipeline
the agent runs. Before an event of a user who already has history is applied, the pipeline
and every baseline rank all catalog items that user has not interacted with, and the true item
is scored: hit rate@k, and NDCG@k with one relevant item (1 / log2(rank + 1), rank from 1).

Rules, identical for the pipeline and the baselines:

- Only users with at least one applied event before this one are evaluated.
- A repeat (the user already interacted with the true item) is applied but not evaluated:
  nobody is allowed to recommend a seen item, so it would be a guaranteed miss for all.
- ``dislike`` and ``skip`` events are applied but not evaluated (the user did not want the
  item) and teach the baselines nothing.
- An event whose item is not in the catalog is evaluated as a miss: it cannot be recommended.
- An event the pipeline refuses (a validation plugin) or ignores (duplicate id) is neither
  evaluated nor shown to the baselines.
- Baseline ties go in catalog order (the order of ``items.jsonl``).

Loading the files and the catalog (which may embed every item) are separate, timed phases;
``events_per_s`` covers the event loop: pipeline ranking and applying, the harness, and the
baselines (in a second process by default, so only waiting for their last chunk counts).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import math
import pstats
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from agent.cli.settings_flags import add_pipeline_flags, configure_logging, settings_from_args
from agent.config import ConfigError, Settings
from agent.evaluation.baselines import (
    APPLIED,
    BASELINES,
    DAY_S,
    EVALUATED,
    NEGATIVE_TYPES,
    SKIPPED,
    BaselineConfig,
    BaselineProcess,
    InlineBaselines,
    ItemKNN,
    StreamArrays,
)
from agent.evaluation.datasets import DatasetError, read_items, read_jsonl, stream_order_key
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import ApplyOutcome, Pipeline
from agent.wire.contract import Event, InvalidMessage, Item, parse_event

PIPELINE = "pipeline"
UPSERT_BATCH = 1_024
PROGRESS_EVERY = 256
# A turn of the event loop costs ~10 us: every event would be a measurable share of the budget.
YIELD_EVERY = 16


# -- input -----------------------------------------------------------------------------------


def load_events(path: Path) -> list[Event]:
    """Events from ``path`` in replay order. Every event needs a timestamp: without one there is
    no order to replay."""
    events = []
    for number, obj in read_jsonl(path):
        if isinstance(obj, dict) and obj.get("ts") is None:
            raise DatasetError(f"{path}:{number}: invalid event: missing field 'ts' (needed to replay in time order)")
        try:
            events.append(parse_event(obj, now=0.0))
        except InvalidMessage as exc:
            raise DatasetError(f"{path}:{number}: invalid event: {exc}") from None
    events.sort(key=stream_order_key)
    return events


def select_events(events: list[Event], *, sample_users: float | None = None, limit: int | None = None) -> list[Event]:
    """A reproducible subset: the events of a hashed fraction of users, then the first ``limit``.

    Users are sampled by a hash of their id (not at random) so that the same fraction always
    keeps the same users, whatever the order or size of the file.
    """
    if sample_users is not None:
        if not 0.0 < sample_users <= 1.0:
            raise ValueError("sample_users must be in (0, 1]")
        threshold = sample_users * 2**32
        events = [e for e in events if zlib.crc32(e.user_id.encode()) < threshold]
    if limit is not None:
        events = events[:limit]
    return events


# -- scoring ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Score:
    """One system's results: the NDCG of every evaluated event (0 for a miss, so hit = ndcg > 0)."""

    name: str
    ndcg: np.ndarray
    count: int = 0
    hits: int = 0

    @classmethod
    def from_ranks(cls, name: str, ranks: np.ndarray, gains: np.ndarray) -> Score:
        """From the true item's rank at each evaluated event (0: a miss)."""
        clipped = np.where(ranks < len(gains), ranks, 0)
        ndcg = gains[clipped].astype(np.float32)
        return cls(name, ndcg, count=len(ranks), hits=int(np.count_nonzero(ndcg)))

    def add(self, rank: int, gains: np.ndarray) -> None:
        # gains[r] = 1 / log2(r + 1) for r in 1..k, 0 for r = 0 (miss) and r > k.
        gain = gains[rank] if rank < len(gains) else 0.0
        self.ndcg[self.count] = gain
        self.count += 1
        if gain > 0.0:
            self.hits += 1

    def metrics(self, k: int) -> dict[str, float]:
        if self.count == 0:
            return {f"hit_rate@{k}": 0.0, f"ndcg@{k}": 0.0}
        return {f"hit_rate@{k}": self.hits / self.count, f"ndcg@{k}": float(self.ndcg[: self.count].sum() / self.count)}


def gains_table(k: int) -> np.ndarray:
    """Index r (1..k) -> 1 / log2(r + 1); index 0 means a miss and gains nothing."""
    gains = np.zeros(k + 1)
    gains[1:] = 1.0 / np.log2(np.arange(2, k + 2))
    return gains


@dataclass(slots=True)
class ReplayOptions:
    k: int = 10
    baselines: tuple[str, ...] = BASELINES
    half_life_s: float = 7 * DAY_S
    knn_window: int = 10
    knn_similarity: str = "cosine"
    # run the baselines in a second process, beside the event loop
    baselines_process: bool = False
    progress: bool = True


@dataclass
class ReplayResult:
    k: int
    events: int
    n_items: int
    pipeline: Score
    baselines: list[Score]
    counts: dict[str, int]
    source_hits: dict[str, int]
    rank_ms: np.ndarray
    apply_ms: np.ndarray
    latency_ms: np.ndarray
    timings_s: dict[str, float]
    plugins: list[str] = field(default_factory=list)
    first_rejection: str | None = None
    # what the fusion learned, by segment then source (empty without a learning fusion)
    fusion_weights: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        seconds = self.timings_s.get("replay", 0.0)
        return self.events / seconds if seconds > 0 else 0.0

    def report(self) -> dict[str, Any]:
        k = self.k
        hits = self.pipeline.hits
        return {
            "events": self.events,
            "evaluated": self.pipeline.count,
            "k": k,
            "items": self.n_items,
            "metrics": self.pipeline.metrics(k),
            "baselines": {score.name: score.metrics(k) for score in self.baselines},
            "sources": {
                name: {"share_of_hits": (count / hits if hits else 0.0), "hits": count}
                for name, count in sorted(self.source_hits.items())
            },
            "events_per_s": self.events_per_s,
            "latency_ms": _percentiles(self.latency_ms),
            "stage_latency_ms": {"rank": _percentiles(self.rank_ms), "apply": _percentiles(self.apply_ms)},
            "counts": dict(self.counts),
            "time_s": {name: round(value, 3) for name, value in self.timings_s.items()},
            "plugins": self.plugins,
            "fusion_weights": self.fusion_weights,
            "rules": {
                "order": "ts, then user, then item",
                "evaluated": "events of users with history; not repeats, dislike or skip",
                "baseline_ties": "catalog order",
            },
        }


def _percentiles(values_ms: np.ndarray) -> dict[str, float]:
    if len(values_ms) == 0:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0}
    p50, p99 = np.percentile(values_ms, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "mean": float(values_ms.mean()), "max": float(values_ms.max())}


# -- the replay ------------------------------------------------------------------------------


async def load_catalog(pipeline: Pipeline, items: list[Item], progress: bool) -> None:
    """Upsert the catalog in batches (plugins may embed each batch; that is why it is timed apart)."""
    with tqdm(total=len(items), desc="catalog", unit="item", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(items), UPSERT_BATCH):
            batch = items[start : start + UPSERT_BATCH]
            await pipeline.upsert_items(batch)
            bar.update(len(batch))
    # Plugins embed in the background; the replay starts once every item has its vector.
    failures = await pipeline.settle()
    if failures:
        # a figure for a pipeline missing a stage would be reported as the full one's
        raise ValueError(
            "a stage cannot do its work, so the replay would not measure the configured pipeline: "
            + "; ".join(failures)
        )


def item_numbers(items: list[Item], events: list[Event]) -> tuple[int, np.ndarray]:
    """The baselines' item numbering and each event's item number.

    Catalog items are numbered in catalog order (first occurrence wins, as in the catalog);
    items that only appear in events get numbers past the catalog, so repeats of them are
    still recognised but no baseline can recommend them.
    """
    index: dict[str, int] = {}
    for item in items:
        index.setdefault(item.id, len(index))
    n_items = len(index)
    numbers = np.fromiter(
        (index.setdefault(e.item_id or "", len(index)) for e in events), dtype=np.int64, count=len(events)
    )
    return n_items, numbers


def stream_arrays(events: list[Event], numbers: np.ndarray) -> StreamArrays:
    codes: dict[str, int] = {}
    users = np.fromiter((codes.setdefault(e.user_id, len(codes)) for e in events), dtype=np.int64, count=len(events))
    ts = np.fromiter((e.ts for e in events), dtype=np.float64, count=len(events))
    negative = np.fromiter((e.type in NEGATIVE_TYPES for e in events), dtype=bool, count=len(events))
    return StreamArrays(users=users, items=numbers, ts=ts, negative=negative)


async def replay(
    pipeline: Pipeline,
    items: list[Item],
    events: list[Event],
    options: ReplayOptions,
    *,
    profiler: cProfile.Profile | None = None,
) -> ReplayResult:
    """Load ``items`` into ``pipeline`` (which must be running), then replay ``events``.

    ``profiler``, when given, profiles the event loop alone (not the catalog load).
    """
    timings: dict[str, float] = {}
    n_items, numbers = item_numbers(items, events)
    if "item_knn" in options.baselines:
        # refused before the catalog is loaded (and embedded), not after
        ItemKNN.check_size(n_items)
    started = time.perf_counter()
    await load_catalog(pipeline, items, options.progress)
    timings["catalog"] = time.perf_counter() - started
    config = BaselineConfig(
        names=options.baselines,
        n_items=n_items,
        k=options.k,
        half_life_s=options.half_life_s,
        knn_window=options.knn_window,
        knn_similarity=options.knn_similarity,
    )
    stream = stream_arrays(events, numbers)
    runner: InlineBaselines | BaselineProcess = (
        BaselineProcess(config, stream)
        if options.baselines_process and options.baselines
        else InlineBaselines(config, stream)
    )
    try:
        loop = _EventLoop(pipeline, n_items, numbers.tolist(), runner, options, len(events))
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            await loop.run(events)
        finally:
            if profiler is not None:
                profiler.disable()
        waited = time.perf_counter()
        baseline_results = runner.finish()
        finished = time.perf_counter()
    finally:
        runner.close()
    timings["replay"] = finished - started
    timings["pipeline_rank"] = loop.rank_s
    timings["pipeline_apply"] = loop.apply_s
    # the plugins' own tasks (slow path), run while the loop yields between events
    timings["pipeline_background"] = loop.background_s
    pipeline_s = loop.rank_s + loop.apply_s + loop.background_s
    if isinstance(runner, InlineBaselines):
        timings["baselines"] = baseline_results.busy_s
        timings["harness"] = waited - started - pipeline_s - baseline_results.busy_s
    else:
        # The baselines ran beside the event loop; only waiting for their last chunk delays it.
        timings["baselines_in_parallel"] = baseline_results.busy_s
        timings["baselines_wait"] = finished - waited
        timings["harness"] = waited - started - pipeline_s
    evaluated = loop.pipeline_score.count
    baseline_scores = []
    for name, ranks in baseline_results.ranks.items():
        if len(ranks) != evaluated:
            raise RuntimeError(f"baseline {name} evaluated {len(ranks)} events, the pipeline {evaluated}")
        baseline_scores.append(Score.from_ranks(name, ranks, loop.gains))
    return ReplayResult(
        k=options.k,
        events=len(events),
        n_items=n_items,
        pipeline=loop.pipeline_score,
        baselines=baseline_scores,
        counts=loop.counts,
        source_hits=loop.source_hits,
        rank_ms=loop.rank_ms[:evaluated],
        apply_ms=loop.apply_ms[: loop.counts["applied"]],
        latency_ms=loop.rank_ms[:evaluated] + loop.apply_ms_evaluated[:evaluated],
        timings_s=timings,
        plugins=[name for name, _ in pipeline.pm.list_name_plugin()],
        first_rejection=loop.first_rejection,
        fusion_weights=_fusion_weights(pipeline),
    )


def _fusion_weights(pipeline: Pipeline) -> dict[str, dict[str, float]]:
    weights = pipeline.context.extras.get("fusion_weights")
    if not isinstance(weights, dict):
        return {}
    return {
        str(segment): {str(source): round(float(w), 4) for source, w in table.items()}
        for segment, table in weights.items()
    }


class _EventLoop:
    """The per-event work of :func:`replay`, with its counters; kept lean, it runs 100k times."""

    def __init__(
        self,
        pipeline: Pipeline,
        n_items: int,
        numbers: list[int],
        runner: InlineBaselines | BaselineProcess,
        options: ReplayOptions,
        n_events: int,
    ) -> None:
        self.pipeline = pipeline
        self.n_items = n_items
        self.numbers = numbers
        self.runner = runner
        self.options = options
        self.gains = gains_table(options.k)
        self.pipeline_score = Score(PIPELINE, np.zeros(n_events, dtype=np.float32))
        self.rank_ms = np.zeros(n_events)
        self.apply_ms_evaluated = np.zeros(n_events)
        self.apply_ms = np.zeros(n_events)
        self.history: dict[str, set[int]] = {}
        self.source_hits: dict[str, int] = {}
        self.counts = {
            "applied": 0,
            "rejected": 0,
            "duplicates": 0,
            "no_history": 0,
            "repeats": 0,
            "negative_feedback": 0,
            "not_in_catalog": 0,
        }
        self.first_rejection: str | None = None
        self.rank_s = self.apply_s = self.background_s = 0.0
        self.now = 0.0

    async def run(self, events: list[Event]) -> None:
        pipeline = self.pipeline
        wall_clock = pipeline.clock
        # Event time, not wall time, for every time-aware stage.
        pipeline.clock = lambda: self.now
        try:
            with tqdm(
                total=len(events),
                desc="replay",
                unit="ev",
                disable=not self.options.progress,
                file=sys.stderr,
                mininterval=0.5,
            ) as bar:
                for position, event in enumerate(events):
                    await self._one(event, position)
                    if position % YIELD_EVERY == 0:
                        # Hooks that return plain values never suspend; let the plugins'
                        # background tasks (the slow path) make progress as they would live.
                        started = time.perf_counter()
                        await asyncio.sleep(0)
                        self.background_s += time.perf_counter() - started
                    if (position + 1) % PROGRESS_EVERY == 0:
                        bar.update(PROGRESS_EVERY)
                bar.update(len(events) % PROGRESS_EVERY)
        finally:
            pipeline.clock = wall_clock

    async def _one(self, event: Event, position: int) -> None:
        self.now = event.ts
        item_id = event.item_id
        assert item_id is not None
        number = self.numbers[position]
        history = self.history.get(event.user_id)
        evaluate = self._should_evaluate(event, history, number)
        pipeline = self.pipeline
        ranked_position, sources = 0, ()
        rank_ms = 0.0
        if evaluate:
            started = time.perf_counter()
            ranked = await pipeline.rank(pipeline.make_query(event.user_id, self.options.k))
            elapsed = time.perf_counter() - started
            self.rank_s += elapsed
            rank_ms = elapsed * 1000.0
            ranked_position, sources = _position(ranked, pipeline.catalog.slot(item_id))
        started = time.perf_counter()
        try:
            # Stream sequences start at 1; 0 means "no stream" to the deduplicator.
            outcome = await pipeline.apply_event(event, position + 1)
        except InvalidMessage as exc:
            self.counts["rejected"] += 1
            self.first_rejection = self.first_rejection or f"event {position + 1}: {exc}"
            self.runner.push(SKIPPED)
            return
        finally:
            elapsed = time.perf_counter() - started
            self.apply_s += elapsed
        if outcome is not ApplyOutcome.APPLIED:
            self.counts["duplicates"] += 1
            self.runner.push(SKIPPED)
            return
        self.apply_ms[self.counts["applied"]] = elapsed * 1000.0
        self.counts["applied"] += 1
        if evaluate:
            self.rank_ms[self.pipeline_score.count] = rank_ms
            self.apply_ms_evaluated[self.pipeline_score.count] = elapsed * 1000.0
            self.pipeline_score.add(ranked_position, self.gains)
            if 0 < ranked_position <= self.options.k:
                for source in set(sources):
                    self.source_hits[source] = self.source_hits.get(source, 0) + 1
        self.runner.push(EVALUATED if evaluate else APPLIED)
        if history is None:
            history = self.history[event.user_id] = set()
        history.add(number)

    def _should_evaluate(self, event: Event, history: set[int] | None, number: int) -> bool:
        if history is None:
            self.counts["no_history"] += 1
            return False
        if event.type in NEGATIVE_TYPES:
            self.counts["negative_feedback"] += 1
            return False
        if number in history:
            self.counts["repeats"] += 1
            return False
        if number >= self.n_items:
            self.counts["not_in_catalog"] += 1
        return True


def _position(ranked: Sequence[Any], slot: int | None) -> tuple[int, Sequence[str]]:
    """1-based position of ``slot`` in the pipeline's list and the sources that proposed it."""
    if slot is not None:
        for position, entry in enumerate(ranked, start=1):
            if entry.slot == slot:
                return position, entry.sources
    return 0, ()


# -- report, table and plot ------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    """The dev-set table (markdown): pipeline and baselines, hit rate and NDCG at k, events/s."""
    k = report["k"]
    rows = [(PIPELINE, report["metrics"])] + list(report["baselines"].items())
    lines = [f"| system | hit rate@{k} | NDCG@{k} |", "|---|---:|---:|"]
    for name, metrics in rows:
        lines.append(f"| {name} | {metrics[f'hit_rate@{k}']:.4f} | {metrics[f'ndcg@{k}']:.4f} |")
    latency = report["latency_ms"]
    lines.append("")
    lines.append(
        f"{report['events']:,} events, {report['evaluated']:,} evaluated, {report['items']:,} items; "
        f"{report['events_per_s']:,.0f} events/s; latency (rank + apply) p50 {latency['p50']:.2f} ms, "
        f"p99 {latency['p99']:.2f} ms"
    )
    return "\n".join(lines)


def format_details(report: dict[str, Any]) -> str:
    times = report["time_s"]
    replay_s = times.get("replay", 0.0) or 1.0
    parts = [
        f"{name} {times[name]:.1f} s ({100 * times[name] / replay_s:.0f}%)"
        for name in ("pipeline_rank", "pipeline_apply", "pipeline_background", "baselines", "baselines_wait", "harness")
        if name in times
    ]
    lines = [
        f"time: load {times.get('load', 0.0):.1f} s, catalog {times.get('catalog', 0.0):.1f} s, "
        f"replay {times.get('replay', 0.0):.1f} s = " + ", ".join(parts)
    ]
    if "baselines_in_parallel" in times:
        lines.append(
            f"baselines ran in a second process: {times['baselines_in_parallel']:.1f} s of work beside the event loop"
        )
    stages = report["stage_latency_ms"]
    lines.append(
        f"stage latency: rank p50 {stages['rank']['p50']:.2f} ms p99 {stages['rank']['p99']:.2f} ms; "
        f"apply p50 {stages['apply']['p50']:.3f} ms p99 {stages['apply']['p99']:.3f} ms"
    )
    if report["sources"]:
        lines.append(
            "share of hits: "
            + ", ".join(f"{name} {value['share_of_hits']:.2f}" for name, value in report["sources"].items())
        )
    for segment, table in report.get("fusion_weights", {}).items():
        lines.append(
            f"fusion weights ({segment}): "
            + ", ".join(f"{name} {value:.2f}" for name, value in sorted(table.items(), key=lambda kv: -kv[1]))
        )
    counts = report["counts"]
    lines.append(
        "not evaluated: "
        + ", ".join(
            f"{name} {counts[name]:,}"
            for name in ("no_history", "repeats", "negative_feedback", "rejected", "duplicates")
        )
    )
    return "\n".join(lines)


def _rolling(values: np.ndarray, window: int) -> np.ndarray:
    sums = np.cumsum(np.concatenate(([0.0], values.astype(np.float64))))
    return (sums[window:] - sums[:-window]) / window


def plot_report(result: ReplayResult, path: Path) -> None:
    """Rolling hit rate and NDCG over the stream for every system, and the latency histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result.k
    scores = [result.pipeline, *result.baselines]
    evaluated = result.pipeline.count
    window = max(1, min(5_000, max(evaluated // 40, 200), evaluated))
    fig, axes = plt.subplots(3, 1, figsize=(11, 12), constrained_layout=True)
    for score in scores:
        ndcg = score.ndcg[: score.count]
        if score.count < window:
            continue
        x = np.arange(window, score.count + 1)
        style = {"linewidth": 2.2, "color": "black"} if score.name == PIPELINE else {"linewidth": 1.2}
        axes[0].plot(x, _rolling(ndcg > 0, window), label=score.name, **style)
        axes[1].plot(x, _rolling(ndcg, window), label=score.name, **style)
    for axis, metric in zip(axes[:2], (f"hit rate@{k}", f"NDCG@{k}")):
        axis.set_title(f"{metric}, rolling mean over {window:,} evaluated events")
        axis.set_xlabel("evaluated events (time order)")
        axis.set_ylabel(metric)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left")
    latency = result.latency_ms
    axis = axes[2]
    if len(latency):
        low, high = max(float(latency.min()), 1e-3), max(float(latency.max()), 1e-2)
        bins = np.logspace(math.log10(low), math.log10(high * 1.01), 60)
        axis.hist(latency, bins=bins, color="tab:gray")
        axis.set_xscale("log")
        for name, value, color in (
            ("p50", np.percentile(latency, 50), "tab:blue"),
            ("p99", np.percentile(latency, 99), "tab:red"),
        ):
            axis.axvline(value, color=color, linestyle="--", label=f"{name} {value:.2f} ms")
        axis.legend()
    axis.set_title(f"pipeline latency per evaluated event (rank + apply), {result.events_per_s:,.0f} events/s overall")
    axis.set_xlabel("ms (log scale)")
    axis.set_ylabel("events")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- profiling -------------------------------------------------------------------------------


_FunctionKey = tuple[str, int, str]


def _module(filename: str) -> str | None:
    """The project module a profiled function belongs to (a plugin, the core, the harness), or
    None for library code and C functions."""
    path = filename.replace("\\", "/")
    for package in ("plugins", "agent"):
        marker = f"/{package}/"
        if marker in path and "/site-packages/" not in path:
            module = path.rsplit(marker, 1)[1]
            if package == "agent" and module in {"replay.py", "baselines.py"}:
                return f"harness: agent/{module}"
            return f"{package}/{module}"
    return None


def time_by_module(stats: pstats.Stats) -> dict[str, float]:
    """Own time per project module, library time included: the time of a numpy or C function
    is charged to the project functions that called it, in proportion to their calls' time, so
    "argpartition" shows up where it is asked for, in the plugin that sorts."""
    table: dict[_FunctionKey, Any] = stats.stats  # type: ignore[attr-defined]
    memo: dict[_FunctionKey, dict[str, float]] = {}

    def shares(function: _FunctionKey, visiting: set[_FunctionKey]) -> dict[str, float]:
        module = _module(function[0])
        if module is not None:
            return {module: 1.0}
        if function in memo:
            return memo[function]
        callers: dict[_FunctionKey, tuple[int, int, float, float]] = table[function][4]
        weights = {caller: max(entry[3], 1e-12) for caller, entry in callers.items() if caller not in visiting}
        total = sum(weights.values())
        if not weights:
            return {"other (event loop, libraries)": 1.0}
        result: dict[str, float] = {}
        for caller, weight in weights.items():
            for name, share in shares(caller, visiting | {function}).items():
                result[name] = result.get(name, 0.0) + share * weight / total
        memo[function] = result
        return result

    by_module: dict[str, float] = {}
    for function, (_, _, tottime, _, _) in table.items():
        for name, share in shares(function, set()).items():
            by_module[name] = by_module.get(name, 0.0) + tottime * share
    return by_module


def profile_summary(profile: cProfile.Profile, top: int = 25) -> str:
    """Time by project module (library calls charged to their callers), then the functions with
    the most own time."""
    stats = pstats.Stats(profile)
    by_module = time_by_module(stats)
    total = sum(by_module.values()) or 1.0
    lines = ["time by module, numpy and C calls charged to their callers (cProfile slows Python code ~2x):"]
    for name, seconds in sorted(by_module.items(), key=lambda kv: -kv[1]):
        if seconds / total >= 0.005:
            lines.append(f"  {seconds:7.2f} s  {100 * seconds / total:5.1f}%  {name}")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    start = text.find("   ncalls")
    lines.append(text[start:] if start >= 0 else text)
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Prequential evaluation of the agent's pipeline on a recorded event stream, with baselines."
    parser.add_argument("--items", type=Path, required=True, help="items.jsonl (one Item per line)")
    parser.add_argument("--events", type=Path, required=True, help="events.jsonl (one Event per line, with ts)")
    parser.add_argument("--k", type=int, default=10, help="list length for hit rate and NDCG (default 10)")
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, help="write the PNG plot here (needs matplotlib: extra 'eval')")
    parser.add_argument("--limit", type=int, help="replay only the first N events (after --sample-users)")
    parser.add_argument(
        "--sample-users",
        type=float,
        metavar="FRACTION",
        help="replay only the events of this fraction of users (chosen by a hash of the id)",
    )
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma-separated, from {', '.join(BASELINES)} (default all); empty for none",
    )
    parser.add_argument("--half-life-days", type=float, default=7.0, help="decayed popularity half-life (default 7)")
    parser.add_argument("--knn-window", type=int, default=10, help="item-kNN: recent items per user (default 10)")
    parser.add_argument(
        "--knn-similarity",
        choices=("cosine", "count"),
        default="cosine",
        help="item-kNN: cosine-normalised co-occurrence (default) or raw counts",
    )
    parser.add_argument(
        "--inline-baselines",
        action="store_true",
        help="run the baselines in the event loop's process (default: a second process beside it)",
    )
    # Only the pipeline's settings: the replay runs in-process, with no NATS and no HTTP API.
    add_pipeline_flags(
        parser,
        log_level="WARNING",
        data_dir_help="plugin data directory (default: a temporary one; reuse one to keep item embeddings)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the event loop under cProfile and print where the time goes (slows it down)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args: argparse.Namespace) -> ReplayOptions:
    if args.k < 1:
        raise ValueError("--k must be at least 1")
    names = tuple(name.strip() for name in args.baselines.split(",") if name.strip())
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
    if args.half_life_days <= 0:
        raise ValueError("--half-life-days must be positive")
    if args.knn_window < 1:
        raise ValueError("--knn-window must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    return ReplayOptions(
        k=args.k,
        baselines=names,
        half_life_s=args.half_life_days * DAY_S,
        knn_window=args.knn_window,
        knn_similarity=args.knn_similarity,
        baselines_process=not args.inline_baselines,
        progress=not args.no_progress,
    )


async def _run_replay(
    settings: Settings, options: ReplayOptions, items: list[Item], events: list[Event], profiled: bool
) -> tuple[ReplayResult, cProfile.Profile | None]:
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    profile = cProfile.Profile() if profiled else None
    async with pipeline.running():
        result = await replay(pipeline, items, events, options, profiler=profile)
    return result, profile


def run_command(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
        with tempfile.TemporaryDirectory(prefix="recsys-replay-") as scratch:
            # Not the data dir of the settings file or environment: that is the agent's, whose
            # local Qdrant store a running agent holds. A replay starts empty unless --data-dir.
            settings = settings_from_args(args, defaults={"data_dir": scratch})
            configure_logging(settings.log_level)
            started = time.perf_counter()
            items = read_items(args.items)
            events = select_events(load_events(args.events), sample_users=args.sample_users, limit=args.limit)
            load_s = time.perf_counter() - started
            print(f"loaded {len(items):,} items and {len(events):,} events in {load_s:.1f} s", file=sys.stderr)
            if not events:
                raise DatasetError(f"{args.events}: no events to replay")
            result, profile = asyncio.run(_run_replay(settings, options, items, events, args.profile))
    except (DatasetError, ValueError, ConfigError) as exc:
        print(f"recsys-agent replay: {exc}", file=sys.stderr)
        return 2
    result.timings_s["load"] = load_s
    report = result.report()
    print(f"catalog loaded in {result.timings_s['catalog']:.1f} s (not counted in events/s)")
    print(format_table(report))
    print(format_details(report))
    if result.first_rejection:
        print(f"first rejected event: {result.first_rejection}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        print(f"report: {args.report}")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_report(result, args.plot)
        print(f"plot: {args.plot}")
    if profile is not None:
        print(profile_summary(profile))
    return 0
