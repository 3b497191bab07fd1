"""Benchmark: where a recommendation list's CPU goes, per hook and plugin, ranked one list at a
time and in batches, in process (no NATS).

    python -m tests.bench.bench_stages --items out/mt/items.jsonl --events out/mt/events.jsonl --batch 1,32

For each batch size: a fresh pipeline with the built-in plugins loads the catalog (item vectors
cached in ``--data-dir`` across runs), applies ``--warmup`` events to build state, then takes
the next event of each of the next ``--measure`` distinct users in batches of N, as the push
worker ranks the users owed a push under load: the lists of a batch are computed together
(``recommend_batch``, one ``rank_batch``), then the batch's events are applied together
(``apply_events``). Every batch size sees the same state and the same events.

Prints, per batch size: wall time and process CPU per list and per applied event, then the mean
microseconds per list by (hook, plugin): a batch hook's call is shared by the lists of its batch.
``--lists FILE`` writes every list (``FILE.b<N>`` per batch size) so that two versions meant to
agree can be diffed. Compare runs made back to back on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.app import freeze_survivors_of_full_passes
from agent.cli.main import limit_blas_threads
from agent.config import Settings, load_settings
from agent.evaluation.datasets import read_items
from agent.evaluation.events import load_events
from agent.evaluation.replay import load_catalog
from agent.evaluation.replay_command import inline_training
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Event, Item
from tests.bench.machine import describe


def one_per_user(events: list[Event], count: int) -> list[Event]:
    """The first event of each of the first ``count`` distinct users, in stream order: lists
    of distinct users, so that every batch of N is N users (the push worker's batch)."""
    chosen: list[Event] = []
    users: set[str] = set()
    for event in events:
        if event.user_id not in users:
            users.add(event.user_id)
            chosen.append(event)
            if len(chosen) == count:
                break
    return chosen


@dataclass
class Measured:
    batch: int
    lists: int = 0
    batches: int = 0
    rank_wall_s: float = 0.0
    rank_cpu_s: float = 0.0
    apply_wall_s: float = 0.0
    apply_cpu_s: float = 0.0
    # wall ms per list, one entry per batch (the batch's time shared by its lists)
    per_list_ms: list[float] = field(default_factory=list)
    stages: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


async def measure(
    settings: Settings,
    items: list[Item],
    warmup: list[Event],
    events: list[Event],
    size: int,
    keep_lists: bool,
    profiler: cProfile.Profile | None = None,
) -> Measured:
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    now = 0.0
    # event time for every time-aware stage, as in a replay
    pipeline.clock = lambda: now
    result = Measured(batch=size)
    async with pipeline.running():
        await load_catalog(pipeline, items, progress=False)
        # stream sequences start at 1; they tell the deduplicator apart events without ids
        for seq, event in enumerate(warmup, start=1):
            now = event.ts
            await pipeline.apply_event(event, seq)
        seq = len(warmup)
        # the collector as in the agent's process (agent/app.py): the state built so far kept
        # out of its full passes, and what survives one joins it
        await pipeline.settle()
        gc.collect()
        gc.freeze()
        gc.callbacks.append(freeze_survivors_of_full_passes)
        result.stages = pipeline.hooks.time_stages()
        for start in range(0, len(events), size):
            batch = events[start : start + size]
            now = batch[-1].ts
            queries = [pipeline.make_query(event.user_id, settings.default_k) for event in batch]
            wall, cpu = time.perf_counter(), time.process_time()
            if profiler is not None:
                profiler.enable()
            recs = await pipeline.recommend_batch(queries)
            if profiler is not None:
                profiler.disable()
            middle_wall, middle_cpu = time.perf_counter(), time.process_time()
            await pipeline.apply_events([(event, seq + i) for i, event in enumerate(batch, start=1)])
            seq += len(batch)
            result.rank_wall_s += middle_wall - wall
            result.rank_cpu_s += middle_cpu - cpu
            result.apply_wall_s += time.perf_counter() - middle_wall
            result.apply_cpu_s += time.process_time() - middle_cpu
            result.per_list_ms.append(1000 * (middle_wall - wall) / len(batch))
            result.lists += len(batch)
            result.batches += 1
            if keep_lists:
                result.lines += [" ".join(f"{i.item_id}:{i.score:.6g}" for i in r.items) for r in recs]
            # let background work (embedding, summaries) run as it would live
            await asyncio.sleep(0)
        # the table stops growing here: the lifespans' exit is not part of the measure
        pipeline.hooks.stage_times = None
        gc.callbacks.remove(freeze_survivors_of_full_passes)
        gc.unfreeze()
    return result


def report(result: Measured) -> str:
    lists = max(result.lists, 1)
    lines = [
        f"batch {result.batch}: {result.lists} lists in {result.batches} batches (mean {result.lists / max(result.batches, 1):.1f}); "
        f"per list: wall {1000 * result.rank_wall_s / lists:.3f} ms (median of batches {statistics.median(result.per_list_ms):.3f} ms), "
        f"CPU {1000 * result.rank_cpu_s / lists:.3f} ms; "
        f"per applied event: wall {1000 * result.apply_wall_s / lists:.3f} ms, CPU {1000 * result.apply_cpu_s / lists:.3f} ms",
        f"  mean microseconds per list (apply hooks: per event), by hook and plugin (batch {result.batch}):",
    ]
    for (hook, plugin), (calls, seconds) in sorted(result.stages.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {1e6 * seconds / lists:9.1f}  {hook:26s} {plugin}  ({int(calls)} calls)")
    return "\n".join(lines)


# the hooks a list is ranked by (apply hooks are per event, validation per message)
RANKING_HOOKS = ("recsys_candidates", "recsys_fuse", "recsys_rerank", "recsys_profile")


def split_costs(results: list[Measured]) -> str:
    """Each ranking stage's wall time per list at mean batch size b read as ``fixed / b +
    per_list``, fitted by least squares over the batch sizes measured: what batching can share
    (a call's numpy calls, a batch's set-up) against what grows with the lists. A rough reading:
    the per-list part itself falls with the batch (bigger array calls), so with three sizes or
    more the fit is an average over them."""
    if len({r.batch for r in results}) < 2:
        return ""
    # the mean size of the batches run (the last batch of a size may be short)
    inverse = np.array([r.batches / max(r.lists, 1) for r in results])
    design = np.stack([inverse, np.ones_like(inverse)], axis=1)

    def fit(per_list_us: list[float]) -> tuple[float, float]:
        (fixed, marginal), *_ = np.linalg.lstsq(design, np.array(per_list_us), rcond=None)
        return float(fixed), float(marginal)

    stages = sorted(
        {key for r in results for key in r.stages if key[0].startswith(RANKING_HOOKS)},
        key=lambda key: -results[-1].stages.get(key, (0, 0.0))[1],
    )
    lines = ["  ranking wall time per list at batch b = fixed per batch / b + per list (microseconds, fitted):"]
    fixed, marginal = fit([1e6 * r.rank_wall_s / max(r.lists, 1) for r in results])
    lines.append(f"  {fixed:9.1f} + {marginal:7.1f}  every ranking stage and the pipeline's own work")
    for hook, plugin in stages:
        fixed, marginal = fit([1e6 * r.stages.get((hook, plugin), (0, 0.0))[1] / max(r.lists, 1) for r in results])
        if fixed + marginal >= 1.0:
            lines.append(f"  {fixed:9.1f} + {marginal:7.1f}  {hook:26s} {plugin}")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    sizes = [int(size) for size in args.batch.split(",")]
    if not sizes or min(sizes) < 1:
        raise SystemExit("--batch: comma-separated sizes, each at least 1")
    items = read_items(Path(args.items))
    events = load_events(Path(args.events))
    warmup, measured = events[: args.warmup], one_per_user(events[args.warmup :], args.measure)
    # models refitted on the window train inline, as in a replay: every run serves the versions
    # fitted at the same events of the warm-up, whatever the machine's speed
    settings = inline_training(
        load_settings(args.config, overrides={"data_dir": args.data_dir, "log_level": "WARNING"})
    )
    print(describe())
    print(f"{len(items)} items; {len(warmup)} events of warm-up, then one event of each of {len(measured)} users")
    results = []
    for size in sizes:
        profiler = cProfile.Profile() if args.profile else None
        result = await measure(settings, items, warmup, measured, size, bool(args.lists), profiler)
        print(report(result), flush=True)
        if profiler is not None:
            profiler.dump_stats(f"{args.profile}.b{size}")
        results.append(result)
        if args.lists:
            Path(f"{args.lists}.b{size}").write_text("\n".join(result.lines) + "\n", encoding="utf-8")
    if len(results) > 1:
        per_list = [r.rank_cpu_s / max(r.lists, 1) for r in results]
        print(
            "CPU per list: "
            + ", ".join(f"batch {r.batch} {1000 * cpu:.3f} ms" for r, cpu in zip(results, per_list))
            + f" (batch {results[-1].batch}: {per_list[-1] / max(per_list[0], 1e-12):.2f}x batch {results[0].batch}'s)"
        )
        if split := split_costs(results):
            print(split)
    print(describe())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--measure", type=int, default=3_000)
    parser.add_argument(
        "--batch", default="1,32", help="batch sizes to measure in turn, comma-separated (default 1,32)"
    )
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--data-dir", default="out/bench-stages")
    parser.add_argument(
        "--lists", default=None, help="write every list (ids and scores) to FILE.b<N>, to diff two versions"
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="write a cProfile of the ranking calls only (not warm-up or applies) to FILE.b<N>; "
        "profiling slows every call, so the times printed beside it are not the figures",
    )
    # as in the agent's process
    with limit_blas_threads():
        asyncio.run(main(parser.parse_args()))
