"""``recsys-agent replay``: prequential evaluation of the live pipeline against simple baselines.

Events are replayed in time order (ties by user, then item) through the same plugin pipeline
the agent runs. Before an event of a user who already has history is applied, the pipeline
and every baseline rank all catalog items that user has not interacted with, and the true item
is scored: hit rate@k, and NDCG@k with one relevant item (1 / log2(rank + 1), rank from 1).

Steps (``ReplayOptions.ties``, ``--ties``). With ``basket`` (the default), the events of one user
that share a timestamp (a basket, a burst of ratings) are one step: ranked once, before any of
them is applied; each of them is scored against that one list; then all are applied. Ordering
such ties by item id would let a model learn the id order instead of the user, and one event
of a basket would be scored against a list that already knew the others. With ``order`` every
event is its own step, ties in replay order (the protocol before baskets, kept for comparison).
A step's list is one list whatever the order of the step's events, so with ``basket`` the
scores cannot depend on that order.

Rules, identical for the pipeline and the baselines:

- Only users with at least one applied event before the step are evaluated.
- A repeat (the user already interacted with the true item, before the step or earlier in the
  same step) is applied but not evaluated: nobody is allowed to recommend a seen item, so it
  would be a guaranteed miss for all; within a step, the item is scored once.
- ``dislike`` and ``skip`` events are applied but not evaluated (the user did not want the
  item) and teach the baselines nothing.
- An event whose item is not in the catalog is evaluated as a miss: it cannot be recommended.
- An event the pipeline refuses (a validation plugin) or ignores (duplicate id) is neither
  evaluated nor shown to the baselines.
- Baseline ties go in catalog order (the order of ``items.jsonl``).

Batches (``ReplayOptions.batch``, ``--batch``): up to ``batch`` consecutive steps of distinct
users are ranked together before any of them is applied, as the live agent ranks the users owed
a push together under load; a user's second step ends the batch. A batch of 1 is the
one-step-at-a-time protocol. The baselines are always fed one step at a time, so at larger
batches the pipeline alone pays for the staleness of ranking before the batch's other steps are
learned.

Intervals: the report gives paired bootstrap 95 % intervals (over users) for every system's
NDCG and for the pipeline's ratio to the best baseline (``intervals``).

Loading the files and the catalog (which may embed every item) are separate, timed phases;
``events_per_s`` covers the event loop: pipeline ranking and applying, the harness, and the
baselines (in a second process by default, so only waiting for their last chunk counts).

This module is the protocol loop. Beside it: ``events`` (reading, sampling and shuffling the
events), ``scoring`` (hit rate, NDCG), ``intervals`` (the bootstrap), ``report`` (the result, its
JSON, table and plot), ``profiling`` (``--profile``: time by module) and ``replay_command`` (the
``recsys-agent replay`` command).
"""

from __future__ import annotations

import asyncio
import cProfile
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from agent.evaluation.baselines import (
    ALS_EVERY,
    ALS_FACTORS,
    APPLIED,
    BASELINES,
    DAY_S,
    EVALUATED,
    NEGATIVE_TYPES,
    SKIPPED,
    BaselineConfig,
    BaselineProcess,
    InlineBaselines,
    StreamArrays,
    check_baselines,
)
from agent.evaluation.intervals import RESAMPLES, paired_bootstrap
from agent.evaluation.report import ReplayResult
from agent.evaluation.scoring import PIPELINE, Score, gains_table
from agent.pipeline.extras import FUSION_WEIGHTS
from agent.pipeline.pipeline import ApplyOutcome, Pipeline
from agent.pipeline.values import Scored
from agent.wire.contract import Event, InvalidMessage, Item

TIES_BASKET = "basket"
TIES_ORDER = "order"
TIES = (TIES_BASKET, TIES_ORDER)

UPSERT_BATCH = 1_024
PROGRESS_EVERY = 256
# A turn of the event loop costs ~10 us: every event would be a measurable share of the budget.
YIELD_EVERY = 16


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
    # steps ranked together, then applied together (1: one step at a time)
    batch: int = 32
    # "basket": a user's events with one timestamp are one step; "order": one event, one step
    ties: str = TIES_BASKET
    # implicit's ALS baseline: retrained every als_every positive events, with als_factors factors
    als_every: int = ALS_EVERY
    als_factors: int = ALS_FACTORS
    # bootstrap resamples for the intervals (0: no intervals)
    bootstrap: int = RESAMPLES


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


def stream_arrays(events: list[Event], numbers: np.ndarray, steps: list[tuple[int, int]]) -> StreamArrays:
    codes: dict[str, int] = {}
    users = np.fromiter((codes.setdefault(e.user_id, len(codes)) for e in events), dtype=np.int64, count=len(events))
    ts = np.fromiter((e.ts for e in events), dtype=np.float64, count=len(events))
    negative = np.fromiter((e.type in NEGATIVE_TYPES for e in events), dtype=bool, count=len(events))
    step_starts = np.fromiter((start for start, _ in steps), dtype=np.int64, count=len(steps))
    return StreamArrays(users=users, items=numbers, ts=ts, negative=negative, step_starts=step_starts)


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
    if options.batch < 1:
        raise ValueError("the batch size must be at least 1")
    if options.ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, got {options.ties!r}")
    if options.bootstrap < 0:
        raise ValueError("the number of bootstrap resamples must not be negative")
    timings: dict[str, float] = {}
    n_items, numbers = item_numbers(items, events)
    # refused before the catalog is loaded (and embedded), not after
    check_baselines(options.baselines, n_items)
    steps = list(step_bounds(events, options.ties))
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
        als_every=options.als_every,
        als_factors=options.als_factors,
    )
    stream = stream_arrays(events, numbers, steps)
    runner: InlineBaselines | BaselineProcess = (
        BaselineProcess(config, stream)
        if options.baselines_process and options.baselines
        else InlineBaselines(config, stream)
    )
    try:
        loop = _EventLoop(pipeline, n_items, numbers.tolist(), stream.users.tolist(), runner, options, len(events))
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            await loop.run(events, steps)
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
    intervals = None
    if options.bootstrap:
        started = time.perf_counter()
        intervals = paired_bootstrap(
            loop.pipeline_score.ndcg[:evaluated],
            {score.name: score.ndcg for score in baseline_scores},
            loop.evaluated_users[:evaluated],
            pipeline_name=PIPELINE,
            resamples=options.bootstrap,
        )
        timings["bootstrap"] = time.perf_counter() - started
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
        batch=options.batch,
        batches=loop.batches,
        ties=options.ties,
        steps=len(steps),
        lists=loop.lists,
        intervals=intervals,
        baseline_training=baseline_results.training,
    )


def _fusion_weights(pipeline: Pipeline) -> dict[str, dict[str, float]]:
    weights = pipeline.context.extras.get(FUSION_WEIGHTS)
    if not isinstance(weights, dict):
        return {}
    return {
        str(segment): {str(source): round(float(w), 4) for source, w in table.items()}
        for segment, table in weights.items()
    }


class _EventLoop:
    """The per-event work of :func:`replay`, with its counters; kept lean, it runs 100k times.

    Events go through in steps (a user's basket, or one event) and steps in batches: a run of
    consecutive steps of distinct users, up to ``options.batch`` (a user's second step starts
    the next batch). Every step of a batch with an evaluated event gets one list, all ranked in
    one ``rank_batch`` call before any event of the batch is applied, and the batch is then
    applied with one ``apply_events`` call: what the live agent does under load (the push
    worker ranks the users owed a push together, the consumer applies what it fetched
    together). With distinct users no step of a batch can change another's history, so a batch
    of one is exactly the one-step-at-a-time protocol.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        n_items: int,
        numbers: list[int],
        user_codes: list[int],
        runner: InlineBaselines | BaselineProcess,
        options: ReplayOptions,
        n_events: int,
    ) -> None:
        self.pipeline = pipeline
        self.n_items = n_items
        self.numbers = numbers
        self.user_codes = user_codes
        self.runner = runner
        self.options = options
        self.gains = gains_table(options.k)
        self.pipeline_score = Score(PIPELINE, np.zeros(n_events, dtype=np.float32))
        # the user of each evaluated event: the bootstrap resamples users
        self.evaluated_users = np.zeros(n_events, dtype=np.int64)
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
        self.batches = 0
        # lists the pipeline ranked (one per step with an evaluated event)
        self.lists = 0
        self.now = 0.0

    async def run(self, events: list[Event], steps: list[tuple[int, int]]) -> None:
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
                for batch in batch_steps(events, steps, self.options.batch):
                    start, stop = batch[0][0], batch[-1][1]
                    await self._batch(events, batch)
                    # Yield where the one-at-a-time loop yielded (before events 1, 17, 33, ...),
                    # once per batch: hooks that return plain values never suspend, and the
                    # plugins' background tasks (the slow path) must progress as they would live.
                    if (stop - 1) // YIELD_EVERY != (start - 1) // YIELD_EVERY:
                        started = time.perf_counter()
                        await asyncio.sleep(0)
                        self.background_s += time.perf_counter() - started
                    if stop // PROGRESS_EVERY != start // PROGRESS_EVERY:
                        bar.update(stop // PROGRESS_EVERY * PROGRESS_EVERY - bar.n)
                bar.update(len(events) - bar.n)
        finally:
            pipeline.clock = wall_clock

    async def _batch(self, events: list[Event], steps: list[tuple[int, int]]) -> None:
        """Rank one list per step of ``steps`` (consecutive, of distinct users) that has an
        evaluated event, apply all their events, then score each evaluated event against its
        step's list."""
        pipeline = self.pipeline
        start, stop = steps[0][0], steps[-1][1]
        batch = events[start:stop]
        # per event: the index of its step's list in ``ranked``, or None when not evaluated
        list_of: list[int | None] = []
        queries = []
        # the true items' slots as the lists saw the catalog: applying gives an unknown item one
        true_slots: list[int | None] = []
        for step_start, step_stop in steps:
            history = self.history.get(events[step_start].user_id)
            in_step: set[int] = set()
            wanted = False
            for position in range(step_start, step_stop):
                event, number = events[position], self.numbers[position]
                evaluate = self._should_evaluate(event, history, number, in_step)
                in_step.add(number)
                list_of.append(len(queries) if evaluate else None)
                wanted = wanted or evaluate
                evaluated_item = event.item_id if evaluate else None
                true_slots.append(pipeline.catalog.slot(evaluated_item) if evaluated_item is not None else None)
            if wanted:
                # each list at its step's time, as one at a time
                self.now = events[step_start].ts
                queries.append(pipeline.make_query(events[step_start].user_id, self.options.k))
        rank_ms = 0.0
        ranked: list[list[Scored]] = []
        if queries:
            started = time.perf_counter()
            ranked = await pipeline.rank_batch(queries)
            elapsed = time.perf_counter() - started
            self.rank_s += elapsed
            self.lists += len(queries)
            # the batch's time shared by its lists: the cost of one list, not any one's wait
            rank_ms = elapsed * 1000.0 / len(queries)
        # applied at the time of the batch's latest event (events are in time order)
        self.now = batch[-1].ts
        started = time.perf_counter()
        # Stream sequences start at 1; 0 means "no stream" to the deduplicator.
        outcomes = await pipeline.apply_events([(event, start + i + 1) for i, event in enumerate(batch)])
        elapsed = time.perf_counter() - started
        self.apply_s += elapsed
        apply_ms = elapsed * 1000.0 / len(batch)
        self.batches += 1
        for i, (event, outcome) in enumerate(zip(batch, outcomes)):
            index = list_of[i]
            scored = (ranked[index], true_slots[i]) if index is not None else None
            self._score(event, start + i, scored, outcome, rank_ms, apply_ms)

    def _score(
        self,
        event: Event,
        position: int,
        ranked: tuple[list[Scored], int | None] | None,
        outcome: ApplyOutcome | Exception,
        rank_ms: float,
        apply_ms: float,
    ) -> None:
        """Count one event's outcome and score its list (``ranked``: the list and the true
        item's slot, None when the event is not evaluated)."""
        if isinstance(outcome, InvalidMessage):
            self.counts["rejected"] += 1
            self.first_rejection = self.first_rejection or f"event {position + 1}: {outcome}"
            self.runner.push(SKIPPED)
            return
        if isinstance(outcome, Exception):
            # a failure that is no refusal stops the replay, as it would one event at a time
            raise outcome
        if outcome is not ApplyOutcome.APPLIED:
            self.counts["duplicates"] += 1
            self.runner.push(SKIPPED)
            return
        self.apply_ms[self.counts["applied"]] = apply_ms
        self.counts["applied"] += 1
        if ranked is not None:
            ranked_position, sources = _position(*ranked)
            self.rank_ms[self.pipeline_score.count] = rank_ms
            self.apply_ms_evaluated[self.pipeline_score.count] = apply_ms
            self.evaluated_users[self.pipeline_score.count] = self.user_codes[position]
            self.pipeline_score.add(ranked_position, self.gains)
            if 0 < ranked_position <= self.options.k:
                for source in set(sources):
                    self.source_hits[source] = self.source_hits.get(source, 0) + 1
        self.runner.push(EVALUATED if ranked is not None else APPLIED)
        history = self.history.get(event.user_id)
        if history is None:
            history = self.history[event.user_id] = set()
        history.add(self.numbers[position])

    def _should_evaluate(self, event: Event, history: set[int] | None, number: int, in_step: set[int]) -> bool:
        """Whether ``event`` is scored; ``history``: the user's items before its step,
        ``in_step``: the items of the step's earlier events."""
        if history is None:
            self.counts["no_history"] += 1
            return False
        if event.type in NEGATIVE_TYPES:
            self.counts["negative_feedback"] += 1
            return False
        if number in history or number in in_step:
            self.counts["repeats"] += 1
            return False
        if number >= self.n_items:
            self.counts["not_in_catalog"] += 1
        return True


def step_bounds(events: Sequence[Event], ties: str = TIES_BASKET) -> Iterator[tuple[int, int]]:
    """(start, stop) of each step: with ``basket``, the longest run of consecutive events of one
    user with one timestamp (replay order puts a user's tied events together); with ``order``,
    each event alone."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
    if ties == TIES_ORDER:
        for position in range(len(events)):
            yield position, position + 1
        return
    start = 0
    for position in range(1, len(events) + 1):
        if (
            position == len(events)
            or events[position].user_id != events[start].user_id
            or events[position].ts != events[start].ts
        ):
            yield start, position
            start = position


def batch_steps(
    events: Sequence[Event], steps: Iterable[tuple[int, int]], size: int
) -> Iterator[list[tuple[int, int]]]:
    """The steps of each batch: the longest run of consecutive steps of distinct users, up to
    ``size`` steps."""
    batch: list[tuple[int, int]] = []
    users: set[str] = set()
    for step in steps:
        user = events[step[0]].user_id
        if len(batch) >= size or user in users:
            yield batch
            batch = []
            users.clear()
        batch.append(step)
        users.add(user)
    if batch:
        yield batch


def batch_bounds(events: Sequence[Event], size: int, ties: str = TIES_BASKET) -> Iterator[tuple[int, int]]:
    """(start, stop) of each batch's events (see :func:`batch_steps`)."""
    for batch in batch_steps(events, step_bounds(events, ties), size):
        yield batch[0][0], batch[-1][1]


def _position(ranked: Sequence[Any], slot: int | None) -> tuple[int, Sequence[str]]:
    """1-based position of ``slot`` in the pipeline's list and the sources that proposed it."""
    if slot is not None:
        for position, entry in enumerate(ranked, start=1):
            if entry.slot == slot:
                return position, entry.sources
    return 0, ()
